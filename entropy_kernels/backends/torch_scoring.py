"""The scoring launchers' torch twin: the same maths over chunks of rows.

Same signatures as :func:`entropy_kernels.ops.scoring.triton_forward` / ``triton_backward``:
each reads the logits through two leading strides (:class:`~entropy_kernels.ops.rows.RowLayout`)
and writes into the outputs the op allocated. The float32 temporaries are bounded by the chunk,
never ``[..., V]``.
"""

import torch

from ..ops.linear_lse import finish_rows
from ..ops.rows import RowLayout, as_rows, row_chunks

# Elements of one float32 temporary in a torch-backend chunk; a chunk holds two or three such
# temporaries. On CPU 2 MiB: small enough that a chunk's passes mostly stay in the cache (policy
# loss, N = 512, V = 32000, 1 thread: 5-9% faster than 8 MiB chunks), large enough that the
# per-chunk overhead stays small at V = 151,936 (3 rows a chunk). On a GPU 8 MiB as before (the
# GPU torch-backend figures were measured with it; fewer, larger launches).
TORCH_CHUNK_ELEMENTS = 1 << 19
GPU_CHUNK_ELEMENTS = 1 << 21
# A tile's element-wise passes run over this many bytes of it at a time on CPU: in the cache,
# about 1.9x faster than passes over a whole 33 MiB tile (1 thread).
GROUP_BYTES = 2**20


def _row_chunks(layout: RowLayout, vocab_size: int, device: torch.device):
    """(outer, inner) index slices covering all rows, each at most a chunk of logits."""
    elements = TORCH_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return row_chunks(layout, max(1, elements // vocab_size))


def _torch_chunk_forward(logits_chunk, tokens_chunk, options):
    # A float32 copy to centre and exponentiate in place: the logits are never written.
    tile = logits_chunk.to(torch.float32, copy=True)
    inv_temperature = 1.0 / options.temperature
    # -inf logits may appear anywhere in given logits: always clamp (see _tile_state).
    state = _tile_state(tile, tokens_chunk, 0, True, inv_temperature)
    return finish_rows(*state, tokens_chunk == options.ignore_index, inv_temperature)


# Below this, exp of a float32 log-probability is 0: clamping there changes no probability and
# makes ``p log p`` 0 where a logit is -inf (else 0 * inf = NaN).
LOG_FLOOR = -200.0


def _groups(tile: torch.Tensor) -> list[slice]:
    """Row slices of ``tile`` of about :data:`GROUP_BYTES` of float32 each; one on a GPU, where
    small launches cost more than the cache saves."""
    if tile.device.type != "cpu":
        return [slice(None)]
    step = max(1, GROUP_BYTES // (4 * tile.shape[-1]))
    return [slice(start, start + step) for start in range(0, tile.shape[0], step)]


def _tile_state(logits, tokens, start: int, masked: bool, inv_temperature: float):
    """The log-sum-exp state ``(m, s, w, token_logit)`` of a float32 ``[rows, width]`` logits
    tile of vocabulary ``start:start + width`` (``token_logit`` NaN where the token lies outside);
    the tile is left holding ``z = (logits - shift) / T``."""
    width = logits.shape[-1]
    in_tile = (tokens >= start) & (tokens < start + width)
    index = (tokens - start).clamp(0, width - 1).long().unsqueeze(-1)
    token_logit = torch.where(in_tile, logits.gather(-1, index).squeeze(-1), float("nan"))
    row_max, sum_exp, sum_exp_z = torch.empty((3, logits.shape[0]), device=logits.device)
    for group in _groups(logits):
        group_max = torch.amax(logits[group], -1, out=row_max[group])
        # Where every logit is -inf, centre on 0 so that no inf - inf appears.
        shift = group_max.masked_fill(group_max == float("-inf"), 0.0)
        z = logits[group].sub_(shift.unsqueeze(-1))
        if inv_temperature != 1.0:
            z *= inv_temperature
        if masked:  # -inf logits: exp(LOG_FLOOR) is 0, and 0 * z = 0 and scale * z stay finite
            z.clamp_min_(LOG_FLOOR)
        exp_z = z.exp()
        torch.sum(exp_z, -1, out=sum_exp[group])
        torch.sum(exp_z.mul_(z), -1, out=sum_exp_z[group])
    return row_max, sum_exp, sum_exp_z, token_logit


def row_coefficients(ignored, entropy, grad_logprobs, grad_entropy, inv_temperature):
    """``(g_logp, g_H)`` of the rows, 0 where ignored, times ``1 / T``; ``g_H`` None if unused."""
    grad_logp = torch.zeros_like(entropy)
    if grad_logprobs is not None:
        grad_logp = grad_logprobs.masked_fill(ignored, 0.0) * inv_temperature
    if grad_entropy is None:
        return grad_logp, None
    return grad_logp, grad_entropy.masked_fill(ignored, 0.0) * inv_temperature


def softmax_grad_(weighted, probs, scale, offset):
    """``scale weighted + offset probs`` with ``weighted = probs * log_terms``, written over
    ``weighted`` (with ``scale`` None, no entropy term, it is only the output buffer);
    ``scale`` / ``offset``: ``[rows]``.

    Every softmax gradient of this backend is this expression plus :func:`add_token_grad_`, over
    ``p log p`` and ``p`` (the logits backward) or over ``exp(z) z`` and ``exp(z)`` with
    ``1 / S`` folded into the row coefficients (the fused linear rows).
    """
    if scale is None:
        return torch.mul(probs, offset.unsqueeze(-1), out=weighted)
    return weighted.mul_(scale.unsqueeze(-1)).addcmul_(probs, offset.unsqueeze(-1))


def add_token_grad_(grad, grad_token, tokens, ignored):
    """Add ``grad_token`` at each row's token (none for a token outside ``[0, width)``) and
    zero the ignored rows, even where their logits are not finite."""
    width = grad.shape[-1]
    in_range = (tokens >= 0) & (tokens < width)
    index = tokens.clamp(0, width - 1).long().unsqueeze(-1)
    grad.scatter_add_(-1, index, (grad_token * in_range).unsqueeze(-1))
    # The check spares a full pass over the tile; it reads the host, so on a GPU the pass runs.
    if grad.device.type != "cpu" or bool(ignored.any()):
        grad.masked_fill_(ignored.unsqueeze(-1), 0.0)
    return grad


def _torch_chunk_backward(
    logits_chunk, tokens_chunk, normaliser, entropy, grad_logprobs, grad_entropy, options, out=None
):
    """``dlogits = g_logp onehot - p (g_logp + g_H (log p + H))``, divided by the temperature,
    over two chunk-sized float32 temporaries (``log p`` and ``p``); ``log p``, then the gradient,
    is written into ``out`` when given (float32, shaped like the chunk, may be the chunk)."""
    inv_temperature = 1.0 / options.temperature
    ignored = tokens_chunk == options.ignore_index
    row_max, log_norm = normaliser.unsqueeze(-1)
    # log p = (x - m) / T - log S (x - m first: exact near the maximum).
    log_p = torch.sub(logits_chunk.float(), row_max, out=out)
    if inv_temperature != 1.0:
        log_p *= inv_temperature
    log_p -= log_norm
    grad_logp, grad_h = row_coefficients(
        ignored, entropy, grad_logprobs, grad_entropy, inv_temperature
    )
    p = log_p.clamp_min_(LOG_FLOOR).exp()
    if grad_h is None:
        grad = softmax_grad_(log_p, p, None, -grad_logp)
    else:  # -p (g_logp + g_H (log p + H)) = -g_H p log p - (g_logp + g_H H) p
        grad = softmax_grad_(log_p.mul_(p), p, -grad_h, -(grad_logp + grad_h * entropy))
    return add_token_grad_(grad, grad_logp, tokens_chunk, ignored)


def torch_forward(logits, tokens, layouts, outputs, options):
    """Fill ``outputs`` = ``(logprobs [rows], entropy [rows], normaliser [2, rows])``."""
    logits_layout, tokens_layout = layouts
    vocab_size = logits.shape[-1]
    logits_rows = as_rows(logits, logits_layout, vocab_size)
    tokens_rows = as_rows(tokens, tokens_layout, None)
    shape = (logits_layout.n_outer, logits_layout.n_inner)
    logprobs, entropy, normaliser = outputs
    logprobs, entropy, normaliser = (
        logprobs.view(shape),
        entropy.view(shape),
        normaliser.view(2, *shape),
    )
    for outer, inner in _row_chunks(logits_layout, vocab_size, logits.device):
        chunk = logits_rows[outer, inner]
        chunk_logprobs, chunk_entropy, chunk_normaliser = _torch_chunk_forward(
            chunk.reshape(-1, vocab_size), tokens_rows[outer, inner].reshape(-1), options
        )
        logprobs[outer, inner] = chunk_logprobs.view(chunk.shape[:-1])
        entropy[outer, inner] = chunk_entropy.view(chunk.shape[:-1])
        normaliser[:, outer, inner] = chunk_normaliser.view(2, *chunk.shape[:-1])


def torch_backward(
    grad_logits, logits, tokens, layouts, normaliser, entropy, grad_logprobs, grad_entropy, options
):
    """Write ``dlogits`` into ``grad_logits``; ``layouts``: logits, gradient, tokens."""
    logits_layout, grad_layout, tokens_layout = layouts
    vocab_size = logits.shape[-1]
    logits_rows = as_rows(logits, logits_layout, vocab_size)
    grad_rows = as_rows(grad_logits, grad_layout, vocab_size)
    tokens_rows = as_rows(tokens, tokens_layout, None)
    shape = (logits_layout.n_outer, logits_layout.n_inner)

    def rows_of(vector, outer, inner):
        return None if vector is None else vector.view(shape)[outer, inner].reshape(-1)

    for outer, inner in _row_chunks(logits_layout, vocab_size, logits.device):
        chunk = logits_rows[outer, inner]
        # A float32 gradient whose rows are one strided block is computed in place there: no
        # chunk-sized temporary and no copy pass.
        target = _rows_view(grad_rows[outer, inner], vocab_size)
        grad = _torch_chunk_backward(
            chunk.reshape(-1, vocab_size),
            tokens_rows[outer, inner].reshape(-1),
            normaliser.view(2, *shape)[:, outer, inner].reshape(2, -1),
            rows_of(entropy, outer, inner),
            rows_of(grad_logprobs, outer, inner),
            rows_of(grad_entropy, outer, inner),
            options,
            target,
        )
        if target is None:
            grad_rows[outer, inner] = grad.view(chunk.shape)


def _rows_view(rows: torch.Tensor, vocab_size: int):
    """``rows`` as a float32 ``[n, V]`` view, or None (another dtype, or no such view)."""
    if rows.dtype != torch.float32:
        return None
    try:
        return rows.view(-1, vocab_size)
    except RuntimeError:
        return None
