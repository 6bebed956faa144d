"""Scoring ops: the Triton launchers of ``scoring_fwd`` / ``scoring_bwd`` and their custom ops.

- ``entropy_kernels::scoring_forward``: ``(logprobs, entropy, normaliser [2, rows])``, a
  functional op with its autograd formula (torch.library gives autograd to functional ops only).
- ``entropy_kernels::scoring_backward_out``: ``dlogits`` written into ``out``, which the caller
  chooses: a new tensor, or the logits themselves for the in-place backward.

Each op computes the row layouts once and runs the Triton launcher or its torch twin
(:mod:`entropy_kernels.backends.torch_scoring`, same signatures), chosen by ``backend``. They are
torch.library custom ops so that torch.compile treats them as opaque nodes with known shapes (no
graph break), and so that the autograd formula lives beside them.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from .._validation import IGNORE_INDEX
from ..backends.torch_scoring import torch_backward, torch_forward
from ..kernel_config import launch_config, round_bf16_by_hand
from .rows import RowLayout, copy_back, launch_rows, output_rows, row_layouts


@dataclass(frozen=True)
class ScoringOptions:
    temperature: float = 1.0
    ignore_index: int = IGNORE_INDEX
    backend: str = "triton"
    inplace_backward: bool = False


def triton_forward(logits, tokens, layouts, outputs, options: ScoringOptions):
    """Fill ``outputs`` = ``(logprobs [rows], entropy [rows], normaliser [2, rows])``."""
    logits_layout, tokens_layout = layouts
    if logits_layout.n_rows == 0:
        return
    from ..kernels.scoring_fwd import scoring_fwd_kernel

    logprobs, entropy, normaliser = outputs
    vocab_size = logits.shape[-1]
    config = launch_config("scoring_fwd", vocab_size, logits.device)
    scoring_fwd_kernel[(logits_layout.n_rows,)](
        logits,
        tokens,
        logprobs,
        entropy,
        normaliser[0],
        normaliser[1],
        *launch_rows(vocab_size, logits_layout, tokens_layout),
        1.0 / options.temperature,
        options.ignore_index,
        BLOCK_V=config.block_v,
        **config.launch_options(),
    )


def triton_backward(
    grad_logits,
    logits,
    tokens,
    layouts,
    normaliser,
    entropy,
    grad_logprobs,
    grad_entropy,
    options,
    parts=None,
):
    """Write ``dlogits`` into ``grad_logits``; ``layouts``: logits, gradient, tokens.
    ``parts``: for the split form, contiguous bfloat16 ``[2 or 3, ...]`` whose first part is
    ``grad_logits`` (see ``write_row_gradient``)."""
    if layouts[0].n_rows == 0:
        return
    from ..kernels.scoring_bwd import scoring_bwd_kernel

    vocab_size = logits.shape[-1]
    config = launch_config("scoring_bwd", vocab_size, logits.device)
    n_parts = 1 if parts is None else parts.shape[0]
    scoring_bwd_kernel[(layouts[0].n_rows,)](
        grad_logits,
        None if n_parts == 1 else parts[1],
        0 if n_parts == 1 else parts.stride(0),
        logits,
        tokens,
        normaliser[0],
        normaliser[1],
        entropy,
        grad_logprobs,
        grad_entropy,
        *launch_rows(vocab_size, *layouts),
        1.0 / options.temperature,
        options.ignore_index,
        BLOCK_V=config.block_v,
        ROUND_BF16_BY_HAND=round_bf16_by_hand(grad_logits),
        PARTS=n_parts,
        **config.launch_options(),
    )


def _reusable_layouts(logits, tokens):
    """The row layouts of ``logits`` and ``tokens`` as they are: a launcher prepared once reads
    later tensors through them, so a layout that needed a copy would be wrong for those."""
    source, same_tokens, logits_layout, tokens_layout = row_layouts(logits, tokens)
    if source is not logits or same_tokens is not tokens:
        raise ValueError("a prepared launcher needs logits and tokens read in place (2-D tiles)")
    return logits_layout, tokens_layout


def tile_forward_launcher(tile, tokens, options: ScoringOptions):
    """``launch(tile, tokens, token_logit, state)``: the scoring forward kernel over a series of
    tiles laid out like ``tile`` (and tokens like ``tokens``, each inside the tile), writing
    each row's raw token logit and the tile's online state ``(m, s, w)`` into ``state [3,
    rows]`` (the kernel's ``STATE`` form); the layouts and the launch configuration are worked
    out once: the fused linear forward launches it once per cuBLAS tile, where working them out
    each time would leave the device waiting on the host."""
    from ..kernels.scoring_fwd import scoring_fwd_kernel

    logits_layout, tokens_layout = _reusable_layouts(tile, tokens)
    vocab_size = tile.shape[-1]
    config = launch_config("scoring_fwd", vocab_size, tile.device)
    constants = (*launch_rows(vocab_size, logits_layout, tokens_layout), 1.0 / options.temperature,
                 options.ignore_index)  # fmt: skip
    launch_options = config.launch_options()
    grid = (logits_layout.n_rows,)

    def launch(logits, tokens, token_logit, state):
        if not grid[0]:
            return
        scoring_fwd_kernel[grid](logits, tokens, token_logit, state[2], state[0], state[1],
                                 *constants, BLOCK_V=config.block_v, STATE=True,
                                 **launch_options)  # fmt: skip

    return launch


_FORWARD = {"triton": triton_forward, "torch": torch_forward}
_BACKWARD = {"triton": triton_backward, "torch": torch_backward}


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
    n_rows = logits_layout.n_rows
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logprobs)
    normaliser = torch.empty((2, n_rows), dtype=torch.float32, device=logits.device)
    outputs = (logprobs, entropy, normaliser)
    _FORWARD[backend](logits, tokens, (logits_layout, tokens_layout), outputs, options)
    return logprobs.view(tokens.shape), entropy.view(tokens.shape), normaliser


@scoring_forward.register_fake
def _(logits, tokens, temperature, ignore_index, backend, inplace_backward):
    vector = tokens.new_empty(tokens.shape, dtype=torch.float32)
    return (
        vector,
        torch.empty_like(vector),
        tokens.new_empty((2, tokens.numel()), dtype=torch.float32),
    )


@torch.library.custom_op("entropy_kernels::scoring_backward_out", mutates_args=("out",))
def scoring_backward_out(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    normaliser: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
    out: torch.Tensor,
) -> None:
    """``dlogits`` written into ``out`` (shaped like the logits; may be the logits themselves)."""
    options = ScoringOptions(temperature, ignore_index, backend)
    source, tokens, logits_layout, tokens_layout = row_layouts(logits, tokens)
    target, grad_layout = output_rows(out, logits_layout)

    def flat(grad):
        return None if grad is None else grad.reshape(-1).float().contiguous()

    _BACKWARD[backend](
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
    copy_back(out, target)


@scoring_backward_out.register_fake
def _(logits, tokens, normaliser, entropy, grad_logprobs, grad_entropy, *options_and_out):
    return None


def split_backward_launcher(logits, tokens, n_parts: int, options: ScoringOptions):
    """``launch(logits, tokens, saved, grads, parts)``: ``dlogits`` of a contiguous float32
    ``[rows, V]`` tile laid out like ``logits`` as bfloat16 parts (Triton): ``parts[0]`` its
    bfloat16 rounding, ``parts[1]`` (for ``n_parts >= 2``) the rounding of the rest,
    ``parts[2]`` (for 3) the rounding of what both leave; ``parts``: contiguous
    ``[n_parts, rows, V]``. ``saved``: ``(normaliser, entropy)``; ``grads``: the
    float32 ``(grad_logprobs, grad_entropy)`` (None for an unused one). Layouts worked out once.

    A plain launcher, not a custom op: it runs once per cuBLAS tile inside the fused linear
    backward (itself opaque to torch.compile), where a custom op's dispatch (about 0.2 ms of
    host time per call in the H200 profile) would leave the device waiting."""
    if not 1 <= n_parts <= 3:  # write_row_gradient writes at most three
        raise ValueError(f"n_parts: 1 to 3 bfloat16 parts of dlogits, got {n_parts}")
    logits_layout, tokens_layout = _reusable_layouts(logits, tokens)
    n_outer, n_inner, vocab_size = logits_layout.n_outer, logits_layout.n_inner, logits.shape[-1]
    grad_layout = RowLayout(n_outer, n_inner, n_inner * vocab_size, vocab_size)
    layouts = (logits_layout, grad_layout, tokens_layout)

    def launch(logits, tokens, saved, grads, parts):
        split = parts if n_parts > 1 else None
        triton_backward(parts[0], logits, tokens, layouts, *saved, *grads, options, split)

    return launch


def scoring_backward_split(logits, tokens, saved, grads, temperature, ignore_index, parts):
    """:func:`split_backward_launcher`'s launch, for one tile."""
    options = ScoringOptions(temperature, ignore_index)
    launch = split_backward_launcher(logits, tokens, len(parts), options)
    launch(logits, tokens, saved, grads, parts)


def gradient_buffer(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Where a backward writes ``dlogits``: the logits themselves when ``inplace`` (not under
    torch.compile, which would functionalise the write into a copy anyway), else a new tensor."""
    if inplace and not torch.compiler.is_compiling():
        return logits
    return logits.new_empty(logits.shape)


def _setup_scoring_context(ctx, inputs, output):
    logits, tokens, temperature, ignore_index, backend, inplace_backward = inputs
    _, entropy, normaliser = output
    ctx.save_for_backward(logits, tokens, normaliser, entropy)
    ctx.constants = (temperature, ignore_index, backend)
    ctx.inplace_backward = inplace_backward
    # An output the loss does not use (the entropy, without an entropy bonus) then gets None,
    # not zeros, and the backward skips its term instead of multiplying by 0.
    ctx.set_materialize_grads(False)


def _scoring_autograd(ctx, grad_logprobs, grad_entropy, _grad_normaliser):
    if not ctx.needs_input_grad[0] or (grad_logprobs is None and grad_entropy is None):
        return None, None, None, None, None, None
    logits, tokens, normaliser, entropy = ctx.saved_tensors
    grad_logits = gradient_buffer(logits, ctx.inplace_backward)
    scoring_backward_out(
        logits,
        tokens,
        normaliser,
        entropy,
        grad_logprobs,
        grad_entropy,
        *ctx.constants,
        grad_logits,
    )
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
