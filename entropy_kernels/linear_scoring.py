"""Log-probs and entropy of ``hidden @ weight.T + bias`` without ever forming the logits.

The logits exist only as tiles of at most ``TILE_ROWS x TILE_VOCAB`` float32 values:

- forward: per block of rows, an online log-sum-exp over vocabulary tiles (the same running
  maximum / sum of exponentials / sum of ``exp(z) z`` as the scoring kernel) gives the log-prob
  of the token, the entropy and the per-row log-normaliser, which is all that is saved;
- backward: each tile is recomputed and turned into
  ``dlogits = (g_logp (onehot - p) - g_H p (log p + H)) / T``, then
  ``dhidden += dlogits @ W``, ``dweight += dlogits^T @ h`` and ``dbias += sum(dlogits)``.

Two backends do this with the same tiling: ``"torch"`` (BLAS matmuls with float32 output, one
pass over the tiles per row block) and ``"triton"`` (``tl.dot`` tiles, deterministic: one
kernel per row block for the hidden gradient, one per vocabulary block for the weight and bias
gradients, no atomics; see :mod:`entropy_kernels.kernels.linear_fwd`). Logits are accumulated
in float32 whatever the input dtype and never rounded to it; gradients of half-precision inputs
are accumulated in float32 and rounded once. (The torch backend's weight gradient of half
inputs is a float32 ``[V, H]`` accumulator; the Triton kernels accumulate in float32 buffers of
the gradients' shapes.)

A variant that forms the loss gradient in the forward pass from ``[rows, V]`` blocks (three
``N H V`` matmuls instead of four) was measured slower on CPU (1 thread: 6.9 s against 6.1 s
of CPU time at N = 8192, H = 128, V = 32000): the element-wise passes and the weight-gradient
updates dominate there, not the matmul that it saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._validation import (
    LOGIT_DTYPES,
    check_ignore_index,
    check_positive_float,
    check_tokens,
    check_values,
    resolve_backend,
)
from .backends.torch_scoring import _torch_chunk_backward
from .ops.linear_lse import finish_rows
from .ops.rows import as_rows, row_chunks, row_layouts
from .ops.scoring import ScoringOptions
from .weights import plain_linear_weights

# Torch backend tile: 256 rows x 4096 vocabulary entries, 4 MiB per float32 temporary; a tile
# step holds about four of them whatever N and V are.
TILE_ROWS = 256
TILE_VOCAB = 4096


@dataclass(frozen=True)
class LinearOptions:
    temperature: float = 1.0
    ignore_index: int = -100
    backend: str = "torch"
    # The vocabulary shard (entropy_kernels.parallel.VocabShard) when the weight is sharded.
    shard: Any = None


def check_linear_inputs(hidden, weight, bias, tokens, ignore_index=-100) -> torch.Tensor:
    """Types, dtypes, shapes and devices of ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``;
    the tokens as int32 / int64."""
    for name, value in (("hidden", hidden), ("weight", weight), ("tokens", tokens)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if hidden.dtype not in LOGIT_DTYPES:
        raise ValueError(
            f"hidden must be float16, bfloat16 or float32 [..., H], got dtype {hidden.dtype}"
        )
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    size = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != size:
        raise ValueError(
            f"weight must have shape [V, H] with V >= 1 and H = {size} (hidden's last "
            f"dimension), got {tuple(weight.shape)}"
        )
    vocab_size = weight.shape[0]
    for name, value in (("weight", weight), ("bias", bias)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        if value.dtype != hidden.dtype:
            raise ValueError(f"{name} must have hidden's dtype {hidden.dtype}, got {value.dtype}")
        if value.device != hidden.device:
            raise ValueError(f"{name} must be on {hidden.device} like hidden, got {value.device}")
    if bias is not None and tuple(bias.shape) != (vocab_size,):
        raise ValueError(f"bias must have shape ({vocab_size},) like weight's V, got {bias.shape}")
    return check_tokens(tokens, "hidden", hidden, ignore_index)


def linear_options(
    hidden, weight, tokens, temperature, ignore_index, validate, backend, tp_group=None, **checks
):
    """The remaining checks of a public call (after :func:`check_linear_inputs`);
    ``checks``: the mask / log-prob / entropy keywords of ``check_values``."""
    from .parallel import vocab_shard  # builds on this module

    check_positive_float("temperature", temperature)
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    backend = resolve_backend(backend, hidden.device)
    shard = vocab_shard(weight.shape[0], hidden.device, tp_group)
    if validate:
        check_values(tokens, shard.total, ignore_index, **checks)
    return LinearOptions(
        float(temperature), ignore_index, backend, None if shard.group is None else shard
    )


def hidden_rows(hidden: torch.Tensor, tokens: torch.Tensor):
    """``(hidden, tokens, hidden_layout, tokens_layout)`` over a common two-level row split.

    ``hidden`` keeps its strides (``hidden[:, :-1]`` is read in place); only a last dimension
    without unit stride is copied (``row_layouts`` assumes it).
    """
    if hidden.shape[-1] > 1 and hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    return row_layouts(hidden, tokens)


# ---------------------------------------------------------------------------------------------
# Torch backend


def logit_block(hidden_f32, weight, bias, start, stop):
    """``hidden @ weight[start:stop].T + bias[start:stop]`` in float32, ``[rows, stop - start]``."""
    block = weight[start:stop].float()
    if bias is None:
        return hidden_f32 @ block.T
    return torch.addmm(bias[start:stop].float(), hidden_f32, block.T)


def _torch_rows_forward(hidden_f32, tokens, weight, bias, masked: bool, options: LinearOptions):
    """Online log-sum-exp over vocabulary tiles: ``(logprobs, entropy, normaliser [2, rows])``.

    ``masked``: the bias has ``-inf`` entries (masked vocabulary), whose ``z`` must be clamped.
    """
    rows, vocab_size = hidden_f32.shape[0], weight.shape[0]
    inv_temperature = 1.0 / options.temperature
    row_max = hidden_f32.new_full((rows,), float("-inf"))
    sum_exp = hidden_f32.new_zeros(rows)
    sum_exp_z = hidden_f32.new_zeros(rows)
    token_logit = hidden_f32.new_full((rows,), float("nan"))
    for start in range(0, vocab_size, TILE_VOCAB):
        stop = min(start + TILE_VOCAB, vocab_size)
        logits = logit_block(hidden_f32, weight, bias, start, stop)
        in_tile = (tokens >= start) & (tokens < stop)
        index = (tokens - start).clamp(0, stop - start - 1).long().unsqueeze(-1)
        token_logit = torch.where(in_tile, logits.gather(-1, index).squeeze(-1), token_logit)
        new_max = torch.maximum(row_max, logits.amax(-1))
        # While every logit seen is -inf, centre on 0 so that no inf - inf appears.
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
        rescale = ((row_max - shift) * inv_temperature).exp()
        recentre = torch.where(row_max == float("-inf"), 0.0, (row_max - shift) * inv_temperature)
        sum_exp_z = rescale * (sum_exp_z + recentre * sum_exp)
        sum_exp = rescale * sum_exp
        z = logits.sub_(shift.unsqueeze(-1))
        if inv_temperature != 1.0:
            z *= inv_temperature
        if masked:  # -inf logits become the most negative float: exp gives 0 and 0 * z = 0
            z.clamp_min_(torch.finfo(torch.float32).min)
        exp_z = z.exp()
        sum_exp += exp_z.sum(-1)
        sum_exp_z += torch.linalg.vecdot(exp_z, z)
        row_max = new_max
    ignored = tokens == options.ignore_index
    return finish_rows(row_max, sum_exp, sum_exp_z, token_logit, ignored, inv_temperature)


def _torch_forward(hidden, weight, bias, tokens, options: LinearOptions):
    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    rows = as_rows(hidden, layout, hidden.shape[-1])
    token_rows = as_rows(tokens, tokens_layout, None)
    shape = (layout.n_outer, layout.n_inner)
    logprobs = torch.empty(shape, device=hidden.device)
    entropy = torch.empty(shape, device=hidden.device)
    normaliser = torch.empty((2, *shape), device=hidden.device)
    masked = bias is not None and bool(torch.isneginf(bias).any())
    for outer, inner in row_chunks(layout, TILE_ROWS):
        block = rows[outer, inner]
        chunk_shape = block.shape[:-1]
        outputs = _torch_rows_forward(
            block.reshape(-1, block.shape[-1]).float(),
            token_rows[outer, inner].reshape(-1),
            weight,
            bias,
            masked,
            options,
        )
        logprobs[outer, inner] = outputs[0].view(chunk_shape)
        entropy[outer, inner] = outputs[1].view(chunk_shape)
        normaliser[:, outer, inner] = outputs[2].view(2, *chunk_shape)
    return logprobs.view(tokens.shape), entropy.view(tokens.shape), normaliser.view(2, -1)


def _torch_rows_backward(hidden_f32, tokens, weight, bias, saved, grads, accumulators, options):
    """Add one row block's gradients: returns its ``dhidden`` (float32) or None."""
    grad_hidden_rows, grad_weight, grad_bias = accumulators
    ignored = tokens == options.ignore_index
    if grad_weight is not None and bool(ignored.any()):
        # Ignored rows take no part in the weight gradient, even with non-finite hidden states.
        hidden_f32 = hidden_f32.masked_fill(ignored.unsqueeze(-1), 0.0)
    scoring = ScoringOptions(options.temperature, -1)
    for start in range(0, weight.shape[0], TILE_VOCAB):
        stop = min(start + TILE_VOCAB, weight.shape[0])
        in_tile = (tokens >= start) & (tokens < stop)
        # Tile-local tokens: -1 marks ignored rows, stop - start a token outside the tile.
        tile_tokens = torch.where(in_tile, tokens - start, stop - start).masked_fill(ignored, -1)
        grad = _torch_chunk_backward(
            logit_block(hidden_f32, weight, bias, start, stop), tile_tokens, *saved, *grads, scoring
        )
        if grad_hidden_rows is not None:
            grad_hidden_rows.addmm_(grad, weight[start:stop].float())
        if grad_weight is not None:
            grad_weight[start:stop].addmm_(grad.T, hidden_f32)
        if grad_bias is not None:
            grad_bias[start:stop] += grad.sum(0)


def _torch_backward(hidden, weight, bias, tokens, normaliser, entropy, grads, needs, options):
    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    size = hidden.shape[-1]
    rows = as_rows(hidden, layout, size)
    token_rows = as_rows(tokens, tokens_layout, None)
    shape = (layout.n_outer, layout.n_inner)
    grad_hidden = hidden.new_empty((*shape, size)) if needs[0] else None
    # Weight and bias gradients are accumulated in float32 over all rows, rounded once.
    grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if needs[1] else None
    grad_bias = weight.new_zeros(weight.shape[0], dtype=torch.float32) if needs[2] else None

    def rows_of(vector, outer, inner):
        return None if vector is None else vector.reshape(shape)[outer, inner].reshape(-1)

    for outer, inner in row_chunks(layout, TILE_ROWS):
        block = rows[outer, inner]
        hidden_f32 = block.reshape(-1, size).float()
        grad_rows = hidden_f32.new_zeros(hidden_f32.shape) if needs[0] else None
        saved = (
            normaliser.view(2, *shape)[:, outer, inner].reshape(2, -1),
            rows_of(entropy, outer, inner),
        )
        chunk_grads = tuple(rows_of(grad, outer, inner) for grad in grads)
        _torch_rows_backward(
            hidden_f32,
            token_rows[outer, inner].reshape(-1),
            weight,
            bias,
            saved,
            chunk_grads,
            (grad_rows, grad_weight, grad_bias),
            options,
        )
        if grad_hidden is not None:
            grad_hidden[outer, inner] = grad_rows.view(block.shape)
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Triton backend (kernels imported when first launched)


def _triton_forward(hidden, weight, bias, tokens, options: LinearOptions):
    from .ops.linear import linear_forward as launch_forward

    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    constants = (1.0 / options.temperature, options.ignore_index)
    logprobs, entropy, normaliser = launch_forward(
        hidden, weight, bias, tokens, (layout, tokens_layout), constants
    )
    return logprobs.view(tokens.shape), entropy.view(tokens.shape), normaliser


def _triton_backward(hidden, weight, bias, tokens, normaliser, entropy, grads, needs, options):
    from .ops.linear import linear_grad_hidden, linear_grad_weight

    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    args = (
        hidden,
        weight,
        bias,
        tokens,
        (layout, tokens_layout),
        (normaliser, entropy.reshape(-1)),
        grads,
        (1.0 / options.temperature, options.ignore_index),
    )
    grad_hidden = grad_weight = grad_bias = None
    if needs[0]:
        grad_hidden = linear_grad_hidden(*args).to(hidden.dtype)
    if needs[1] or needs[2]:
        grad_weight, grad_bias = linear_grad_weight(*args, needs[1:])
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Autograd


def linear_forward(hidden, weight, bias, tokens, options: LinearOptions):
    """``(logprobs, entropy, normaliser [2, rows])`` of validated arguments."""
    forward = _triton_forward if options.backend == "triton" else _torch_forward
    return forward(hidden, weight, bias, tokens, options)


def linear_gradients(saved, grad_logprobs, grad_entropy, needs, options: LinearOptions):
    """``(dhidden, dweight, dbias)`` in the inputs' dtypes (None where not needed).

    ``saved``: ``(hidden, weight, bias, tokens, normaliser, entropy)`` of the forward.
    """
    hidden, weight, bias, tokens, normaliser, entropy = saved
    grads = tuple(
        None if grad is None else grad.reshape(-1).float().contiguous()
        for grad in (grad_logprobs, grad_entropy)
    )
    backward = _triton_backward if options.backend == "triton" else _torch_backward
    grad_hidden, grad_weight, grad_bias = backward(
        hidden, weight, bias, tokens, normaliser, entropy, grads, needs, options
    )
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view(hidden.shape)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class LinearScoring(torch.autograd.Function):
    """``(logprobs, entropy)`` of the linear head, differentiable in hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, options: LinearOptions):
        logprobs, entropy, normaliser = linear_forward(hidden, weight, bias, tokens, options)
        ctx.save_for_backward(hidden, weight, bias, tokens, normaliser, entropy)
        ctx.options = options
        # An unused output (the entropy, without an entropy bonus) gets None: its term is skipped.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs) or (grad_logprobs is None and grad_entropy is None):
            return None, None, None, None, None
        grad_hidden, grad_weight, grad_bias = linear_gradients(
            ctx.saved_tensors, grad_logprobs, grad_entropy, needs, ctx.options
        )
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_score(hidden, weight, bias, tokens, options: LinearOptions):
    """Differentiable ``(logprobs, entropy)`` for already-validated arguments."""
    if options.shard is not None:
        from .parallel import linear_score_shard  # builds on this module

        return linear_score_shard(hidden, weight, bias, tokens, options)
    return LinearScoring.apply(hidden, weight, bias, tokens, options)


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    validate: bool = True,
    backend: str = "auto",
    tp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and entropy of the LM head's logits, without forming the logits.

    Args:
        hidden: ``[..., H]`` float16 / bfloat16 / float32 last hidden states; leading dimensions
            may have any strides (``hidden[:, :-1]`` is read in place).
        weight: ``[V, H]`` LM head (as ``nn.Linear`` stores it), hidden's dtype.
        tokens: integer tensor shaped ``hidden.shape[:-1]``.
        bias: ``[V]`` or None, hidden's dtype.
        temperature, ignore_index, validate, backend: as in
            :func:`entropy_kernels.logprobs_and_entropy` (defaults 1.0, -100, True, "auto").
        tp_group: process group over which the vocabulary is sharded: ``weight`` / ``bias``
            are this rank's ``[V_r, H]`` / ``[V_r]`` rows, as in
            :func:`entropy_kernels.logprobs_and_entropy`. The hidden gradient is the full one
            (summed over the group in the backward); weight and bias get their shard's.

    Returns:
        ``(logprobs, entropy)``, float32 tensors shaped like ``tokens``: those of
        :func:`entropy_kernels.logprobs_and_entropy` on ``hidden @ weight.T + bias`` formed in
        float32. Differentiable with respect to hidden, weight and bias; no ``[..., V]`` tensor
        is allocated (memory above inputs, outputs and gradients is a few fixed-size tiles).
    """
    check_ignore_index(ignore_index)
    weight, bias = plain_linear_weights(hidden, weight, bias, tp_group)
    tokens = check_linear_inputs(hidden, weight, bias, tokens, ignore_index)
    options = linear_options(
        hidden, weight, tokens, temperature, ignore_index, validate, backend, tp_group
    )
    return linear_score(hidden, weight, bias, tokens, options)
