"""Log-probs and entropy in one pass over the vocabulary, with a fused backward.

Two backends compute the same thing:

- ``"triton"``: :mod:`entropy_kernels.kernels.scoring_fwd` / ``scoring_bwd``, one program per
  token row; only ``[rows]`` float32 vectors (log-prob, entropy, row max, log-normaliser)
  are stored.
- ``"torch"``: the same maths in chunks of rows, so the float32 temporaries are bounded by the
  chunk, never ``[..., V]``.

Both read the logits through two leading strides (:class:`RowLayout`), so views such as
``logits[:, :-1]`` are used in place.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._validation import (
    check_ignore_index,
    check_logits_and_tokens,
    check_positive_float,
    check_values,
    resolve_backend,
)
from .kernel_config import launch_config, round_bf16_by_hand

# Elements of one float32 temporary in a torch-backend chunk (8 MiB): a chunk holds about four
# such temporaries, so the peak stays far below the logits themselves at real sizes.
TORCH_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class ScoringOptions:
    temperature: float = 1.0
    ignore_index: int = -100
    backend: str = "triton"
    inplace_backward: bool = False


@dataclass(frozen=True)
class RowLayout:
    """``[..., V]`` seen as ``[n_outer, n_inner, V]`` with strides ``(outer, inner, 1)``."""

    n_outer: int
    n_inner: int
    stride_outer: int
    stride_inner: int

    @property
    def n_rows(self) -> int:
        return self.n_outer * self.n_inner


def _collapsed_stride(shape: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """Stride of ``shape`` collapsed into one dimension, or None if it does not collapse."""
    dims = [(size, stride) for size, stride in zip(shape, strides, strict=True) if size != 1]
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:], strict=False):
        if outer_stride != inner_stride * inner_size:
            return None
    return dims[-1][1] if dims else 0


def _two_level_layouts(tensor: torch.Tensor, lead: int):
    """Every way to split the first ``lead`` dimensions into (outer, inner) collapsible groups."""
    shape, strides = tuple(tensor.shape[:lead]), tuple(tensor.stride()[:lead])
    for split in range(lead + 1):
        outer = _collapsed_stride(shape[:split], strides[:split])
        inner = _collapsed_stride(shape[split:], strides[split:])
        if outer is not None and inner is not None:
            yield split, RowLayout(math.prod(shape[:split]), math.prod(shape[split:]), outer, inner)


def row_layouts(logits: torch.Tensor, tokens: torch.Tensor):
    """Layouts of logits and tokens over the same (outer, inner) split of the leading dims.

    Returns ``(logits, tokens, logits_layout, tokens_layout)``. Tokens are copied to a contiguous
    tensor when no common split exists (a few bytes per row); logits are copied only in the rare
    case that their leading dimensions need more than two strides (documented in the README).
    """
    lead = logits.dim() - 1
    logits_layouts = dict(_two_level_layouts(logits, lead))
    if not logits_layouts:
        return row_layouts(logits.contiguous(), tokens)
    token_layouts = dict(_two_level_layouts(tokens, lead))
    common = [split for split in logits_layouts if split in token_layouts]
    if not common:
        tokens = tokens.contiguous()  # every split of a contiguous tensor collapses
        token_layouts = dict(_two_level_layouts(tokens, lead))
        common = list(logits_layouts)
    return logits, tokens, logits_layouts[common[0]], token_layouts[common[0]]


def as_rows(tensor: torch.Tensor, layout: RowLayout, vocab_size: int | None) -> torch.Tensor:
    """The ``[n_outer, n_inner(, V)]`` strided view of ``tensor`` described by ``layout``."""
    size, stride = (layout.n_outer, layout.n_inner), (layout.stride_outer, layout.stride_inner)
    if vocab_size is not None:
        size, stride = (*size, vocab_size), (*stride, 1)
    return tensor.as_strided(size, stride, tensor.storage_offset())


# ---------------------------------------------------------------------------------------------
# Triton backend


def _triton_forward(logits, tokens, logits_layout, tokens_layout, options: ScoringOptions):
    from .kernels.scoring_fwd import scoring_fwd_kernel

    n_rows, vocab_size = logits_layout.n_rows, logits.shape[-1]
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logprobs)
    normaliser = torch.empty((2, n_rows), dtype=torch.float32, device=logits.device)
    if n_rows > 0:
        config = launch_config("scoring_fwd", vocab_size, logits.device)
        scoring_fwd_kernel[(n_rows,)](
            logits,
            tokens,
            logprobs,
            entropy,
            normaliser[0],
            normaliser[1],
            logits_layout.n_inner,
            vocab_size,
            logits_layout.stride_outer,
            logits_layout.stride_inner,
            tokens_layout.stride_outer,
            tokens_layout.stride_inner,
            1.0 / options.temperature,
            options.ignore_index,
            BLOCK_V=config.block_v,
            **config.launch_options(),
        )
    return logprobs, entropy, normaliser


def _triton_backward(
    grad_logits, logits, tokens, layouts, normaliser, entropy, grad_logprobs, grad_entropy, options
):
    from .kernels.scoring_bwd import scoring_bwd_kernel

    logits_layout, grad_layout, tokens_layout = layouts
    vocab_size = logits.shape[-1]
    if logits_layout.n_rows == 0:
        return
    config = launch_config("scoring_bwd", vocab_size, logits.device)
    scoring_bwd_kernel[(logits_layout.n_rows,)](
        grad_logits,
        logits,
        tokens,
        normaliser[0],
        normaliser[1],
        entropy,
        grad_logprobs,
        grad_entropy,
        logits_layout.n_inner,
        vocab_size,
        logits_layout.stride_outer,
        logits_layout.stride_inner,
        grad_layout.stride_outer,
        grad_layout.stride_inner,
        tokens_layout.stride_outer,
        tokens_layout.stride_inner,
        1.0 / options.temperature,
        options.ignore_index,
        BLOCK_V=config.block_v,
        ROUND_BF16_BY_HAND=round_bf16_by_hand(grad_logits),
        **config.launch_options(),
    )


# ---------------------------------------------------------------------------------------------
# Torch backend: the same maths over chunks of rows.


def _row_chunks(layout: RowLayout, vocab_size: int):
    """(outer, inner) index slices covering all rows, each at most TORCH_CHUNK_ELEMENTS logits."""
    return row_chunks(layout, max(1, TORCH_CHUNK_ELEMENTS // vocab_size))


def row_chunks(layout: RowLayout, rows_per_chunk: int):
    """(outer, inner) index slices covering all rows, each at most ``rows_per_chunk`` rows."""
    if layout.n_inner <= rows_per_chunk:
        step = max(1, rows_per_chunk // max(1, layout.n_inner))
        for outer in range(0, layout.n_outer, step):
            yield slice(outer, outer + step), slice(None)
    else:
        for outer in range(layout.n_outer):
            for inner in range(0, layout.n_inner, rows_per_chunk):
                yield slice(outer, outer + 1), slice(inner, inner + rows_per_chunk)


def _torch_chunk_forward(logits_chunk, tokens_chunk, options: ScoringOptions):
    vocab_size = logits_chunk.shape[-1]
    x = logits_chunk.float()
    # Centred on the row max like the kernel: (x - max) is exact where it matters.
    row_max = x.amax(-1, keepdim=True)
    row_max.masked_fill_(row_max == float("-inf"), 0.0)
    shifted = x - row_max
    if options.temperature != 1.0:
        shifted *= 1.0 / options.temperature
    in_range = (tokens_chunk >= 0) & (tokens_chunk < vocab_size)
    index = tokens_chunk.clamp(0, vocab_size - 1).long().unsqueeze(-1)
    token_shifted = shifted.gather(-1, index).squeeze(-1)
    # -inf logits become the most negative float: exp gives 0 and 0 * z = 0 in the dot product
    # below, with no temporary to mask (clamp keeps NaN, which reaches H through S).
    shifted.clamp_min_(torch.finfo(torch.float32).min)
    exp_shifted = shifted.exp()
    sum_exp = exp_shifted.sum(-1)
    log_norm = sum_exp.log()
    # H = log S - sum(e * z) / S.
    entropy = log_norm - torch.linalg.vecdot(exp_shifted, shifted) / sum_exp
    token_logprob = token_shifted - log_norm
    logprobs = torch.where(in_range, token_logprob, float("nan"))
    ignored = tokens_chunk == options.ignore_index
    return (
        logprobs.masked_fill_(ignored, 0.0),
        entropy.masked_fill_(ignored, 0.0),
        torch.stack([row_max.squeeze(-1), log_norm]).masked_fill_(ignored, 0.0),
    )


def _torch_chunk_backward(
    logits_chunk, tokens_chunk, normaliser, entropy, grad_logprobs, grad_entropy, options
):
    """``dlogits = g_logp onehot - p (g_logp + g_H (log p + H))``, divided by the temperature.

    Written with in-place updates of two chunk-sized float32 temporaries.
    """
    vocab_size = logits_chunk.shape[-1]
    inv_temperature = 1.0 / options.temperature
    ignored = tokens_chunk == options.ignore_index
    row_max, log_norm = normaliser.unsqueeze(-1)
    log_p = logits_chunk.float() - row_max
    if inv_temperature != 1.0:
        log_p *= inv_temperature
    log_p -= log_norm
    p = log_p.exp()
    grad_logp = torch.zeros_like(entropy)
    if grad_logprobs is not None:
        grad_logp = grad_logprobs.masked_fill(ignored, 0.0) * inv_temperature
    if grad_entropy is not None:
        grad_h = grad_entropy.masked_fill(ignored, 0.0) * inv_temperature
        coefficient = log_p.add_(entropy.unsqueeze(-1)).mul_(grad_h.unsqueeze(-1))
        grad = coefficient.add_(grad_logp.unsqueeze(-1)).mul_(p).neg_()
        # Masked (-inf) vocabulary entries: p = 0 and log p = -inf, whose product is 0.
        grad.masked_fill_(p == 0, 0.0)
    else:
        grad = p.mul_(-grad_logp.unsqueeze(-1))
    in_range = (tokens_chunk >= 0) & (tokens_chunk < vocab_size)
    index = tokens_chunk.clamp(0, vocab_size - 1).long().unsqueeze(-1)
    grad.scatter_add_(-1, index, (grad_logp * in_range).unsqueeze(-1))
    # Ignored rows get exactly 0 even where their logits are not finite. The check spares a
    # full pass over the chunk; it reads the host, so on a GPU the pass runs regardless.
    if grad.device.type != "cpu" or bool(ignored.any()):
        grad.masked_fill_(ignored.unsqueeze(-1), 0.0)
    return grad


def _torch_forward(logits, tokens, logits_layout, tokens_layout, options: ScoringOptions):
    vocab_size = logits.shape[-1]
    logits_rows = as_rows(logits, logits_layout, vocab_size)
    tokens_rows = as_rows(tokens, tokens_layout, None)
    shape = (logits_layout.n_outer, logits_layout.n_inner)
    logprobs = torch.empty(shape, device=logits.device)
    entropy = torch.empty(shape, device=logits.device)
    normaliser = torch.empty((2, *shape), device=logits.device)
    for outer, inner in _row_chunks(logits_layout, vocab_size):
        chunk = logits_rows[outer, inner]
        chunk_logprobs, chunk_entropy, chunk_normaliser = _torch_chunk_forward(
            chunk.reshape(-1, vocab_size), tokens_rows[outer, inner].reshape(-1), options
        )
        logprobs[outer, inner] = chunk_logprobs.view(chunk.shape[:-1])
        entropy[outer, inner] = chunk_entropy.view(chunk.shape[:-1])
        normaliser[:, outer, inner] = chunk_normaliser.view(2, *chunk.shape[:-1])
    return logprobs.view(-1), entropy.view(-1), normaliser.view(2, -1)


def _torch_backward(
    grad_logits, logits, tokens, layouts, normaliser, entropy, grad_logprobs, grad_entropy, options
):
    logits_layout, grad_layout, tokens_layout = layouts
    vocab_size = logits.shape[-1]
    logits_rows = as_rows(logits, logits_layout, vocab_size)
    grad_rows = as_rows(grad_logits, grad_layout, vocab_size)
    tokens_rows = as_rows(tokens, tokens_layout, None)
    shape = (logits_layout.n_outer, logits_layout.n_inner)

    def rows_of(vector, outer, inner):
        return None if vector is None else vector.view(shape)[outer, inner].reshape(-1)

    for outer, inner in _row_chunks(logits_layout, vocab_size):
        chunk = logits_rows[outer, inner]
        grad = _torch_chunk_backward(
            chunk.reshape(-1, vocab_size),
            tokens_rows[outer, inner].reshape(-1),
            normaliser.view(2, *shape)[:, outer, inner].reshape(2, -1),
            rows_of(entropy, outer, inner),
            rows_of(grad_logprobs, outer, inner),
            rows_of(grad_entropy, outer, inner),
            options,
        )
        grad_rows[outer, inner] = grad.view(chunk.shape)


# ---------------------------------------------------------------------------------------------
# Autograd


# The ops are torch.library custom ops so that torch.compile treats them as opaque nodes with
# known shapes (no graph break), and so that the autograd formula lives beside them.


def contiguous_layout(layout: RowLayout, vocab_size: int) -> RowLayout:
    """The layout of a freshly allocated contiguous ``[..., V]`` tensor over the same rows."""
    return RowLayout(layout.n_outer, layout.n_inner, layout.n_inner * vocab_size, vocab_size)


@torch.library.custom_op("entropy_kernels::scoring_forward", mutates_args=())
def scoring_forward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy, normaliser [2, rows])``; ``inplace_backward`` is for the backward."""
    options = ScoringOptions(temperature, ignore_index, backend, inplace_backward)
    logits, tokens, logits_layout, tokens_layout = row_layouts(logits, tokens)
    forward = _triton_forward if backend == "triton" else _torch_forward
    logprobs, entropy, normaliser = forward(logits, tokens, logits_layout, tokens_layout, options)
    return logprobs.view(tokens.shape), entropy.view(tokens.shape), normaliser


@scoring_forward.register_fake
def _(logits, tokens, temperature, ignore_index, backend, inplace_backward):
    vector = tokens.new_empty(tokens.shape, dtype=torch.float32)
    return (
        vector,
        torch.empty_like(vector),
        tokens.new_empty((2, tokens.numel()), dtype=torch.float32),
    )


def _run_backward(
    target, logits, tokens, normaliser, entropy, grad_logprobs, grad_entropy, options
):
    """Write ``dlogits`` into ``target`` (None: a new contiguous tensor); returns it."""
    source, tokens, logits_layout, tokens_layout = row_layouts(logits, tokens)
    vocab_size = source.shape[-1]
    if target is None:
        target = torch.empty(source.shape, dtype=source.dtype, device=source.device)
        grad_layout = contiguous_layout(logits_layout, vocab_size)
    else:
        grad_layout = logits_layout

    def flat(grad):
        return None if grad is None else grad.reshape(-1).float().contiguous()

    backward = _triton_backward if options.backend == "triton" else _torch_backward
    backward(
        target,
        source,
        tokens,
        (logits_layout, grad_layout, tokens_layout),
        normaliser,
        entropy,
        flat(grad_logprobs),
        flat(grad_entropy),
        options,
    )
    return target


@torch.library.custom_op("entropy_kernels::scoring_backward", mutates_args=())
def scoring_backward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    normaliser: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """``dlogits`` in a new contiguous tensor of the logits' dtype."""
    options = ScoringOptions(temperature, ignore_index, backend)
    return _run_backward(
        None, logits, tokens, normaliser, entropy, grad_logprobs, grad_entropy, options
    )


@scoring_backward.register_fake
def _(logits, tokens, normaliser, entropy, grad_logprobs, grad_entropy, *options):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("entropy_kernels::scoring_backward_", mutates_args=("logits",))
def scoring_backward_(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    normaliser: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
) -> None:
    """``dlogits`` written over the logits themselves."""
    options = ScoringOptions(temperature, ignore_index, backend)
    source = row_layouts(logits, tokens)[0]
    grad = _run_backward(
        source, logits, tokens, normaliser, entropy, grad_logprobs, grad_entropy, options
    )
    if grad is not logits:  # the rare layout that needed a contiguous copy
        logits.copy_(grad)


def _setup_scoring_context(ctx, inputs, output):
    logits, tokens, temperature, ignore_index, backend, inplace_backward = inputs
    _, entropy, normaliser = output
    ctx.save_for_backward(logits, tokens, normaliser, entropy)
    ctx.options = ScoringOptions(temperature, ignore_index, backend, inplace_backward)
    # An output the loss does not use (the entropy, without an entropy bonus) then gets None,
    # not zeros, and the backward skips its term instead of multiplying by 0.
    ctx.set_materialize_grads(False)


def _scoring_autograd(ctx, grad_logprobs, grad_entropy, _grad_normaliser):
    if not ctx.needs_input_grad[0] or (grad_logprobs is None and grad_entropy is None):
        return None, None, None, None, None, None
    logits, tokens, normaliser, entropy = ctx.saved_tensors
    options: ScoringOptions = ctx.options
    args = (tokens, normaliser, entropy, grad_logprobs, grad_entropy)
    consts = (options.temperature, options.ignore_index, options.backend)
    # Under torch.compile the in-place variant would be functionalised into a copy anyway.
    if options.inplace_backward and not torch.compiler.is_compiling():
        scoring_backward_(logits, *args, *consts)
        grad_logits = logits
    else:
        grad_logits = scoring_backward(logits, *args, *consts)
    return grad_logits, None, None, None, None, None


scoring_forward.register_autograd(_scoring_autograd, setup_context=_setup_scoring_context)


def score(logits: torch.Tensor, tokens: torch.Tensor, options: ScoringOptions):
    """Differentiable ``(logprobs, entropy)`` for already-validated arguments."""
    logprobs, entropy, _ = scoring_forward(
        logits,
        tokens,
        options.temperature,
        options.ignore_index,
        options.backend,
        options.inplace_backward,
    )
    return logprobs, entropy


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    validate: bool = True,
    backend: str = "auto",
    tp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probabilities and full-vocabulary entropy in one pass over the logits.

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32. The last dimension must have unit
            stride; leading dimensions may have any strides (``logits[:, :-1]`` is read in place).
        tokens: integer tensor shaped ``logits.shape[:-1]``.
        temperature: the logits are divided by it (``> 0``, default 1.0), inside the kernel.
        ignore_index: tokens equal to it get 0 for both outputs and zero gradient (default -100).
        validate: check that tokens lie in ``[0, V)`` or equal ``ignore_index`` (one host sync).
            With ``validate=False`` an out-of-range token yields NaN; nothing is read out of bounds.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch otherwise), ``"triton"``, ``"torch"``.
        tp_group: a ``torch.distributed`` process group over which the vocabulary is sharded in
            rank order (``logits`` is this rank's ``[..., V_r]`` shard, ``tokens`` the same
            global ids on every rank); every rank gets the full-vocabulary results and its
            shard's gradient (:mod:`entropy_kernels.parallel`). None (default): not sharded.

    Returns:
        ``(logprobs, entropy)``, float32 tensors shaped like ``tokens``:
        ``log_softmax(logits / temperature)[token]`` and ``-sum p log p``. Both are differentiable
        with respect to ``logits``; the backward recomputes the probabilities from the saved
        log-sum-exp, so no ``[..., V]`` float32 tensor is ever stored. ``-inf`` logits are masked
        vocabulary entries (probability 0, no NaN); NaN or +inf logits give NaN.
    """
    check_ignore_index(ignore_index)
    tokens = check_logits_and_tokens(logits, tokens, ignore_index)
    check_positive_float("temperature", temperature)
    backend = resolve_backend(backend, logits.device)
    from .parallel import score_shard, vocab_shard  # builds on this module's ops

    shard = vocab_shard(logits.shape[-1], logits.device, tp_group)
    if validate:
        check_values(tokens, shard.total, ignore_index)
    options = ScoringOptions(float(temperature), ignore_index, backend)
    return score_shard(logits, tokens, options, shard)
