"""Log-probs and entropy of ``hidden @ weight.T + bias`` without ever forming the logits.

The logits exist only as tiles of a fixed size (``backends.torch_linear.tile_shape``):

- forward: per block of rows, an online log-sum-exp over vocabulary tiles (the same running
  maximum / sum of exponentials / sum of ``exp(z) z`` as the scoring kernel) gives the log-prob
  of the token, the entropy and the per-row log-normaliser, which is all that is saved;
- backward: each tile is recomputed and turned into
  ``dlogits = (g_logp (onehot - p) - g_H p (log p + H)) / T``, then
  ``dhidden += dlogits @ W``, ``dweight += dlogits^T @ h`` and ``dbias += sum(dlogits)``.

Two backends do this with the same tiling: ``"torch"`` (BLAS matmuls with float32 output;
the backward takes the vocabulary tiles outside and the row blocks inside) and ``"triton"``
(``tl.dot`` tiles, deterministic: one kernel per row block for the hidden gradient, one per
vocabulary block for the weight and bias gradients, no atomics; see
:mod:`entropy_kernels.kernels.linear_fwd`). Logits are accumulated in float32 whatever the input
dtype and never rounded to it; gradients of half-precision inputs are accumulated in float32 and
rounded once. (The torch backend accumulates each weight tile's
gradient in a float32 tile and the hidden gradient in float32 ``[N, H]``; the tl.dot kernels
accumulate in float32 buffers of the gradients' shapes.)

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

from . import kernel_config
from ._validation import (
    IGNORE_INDEX,
    LOGIT_DTYPES,
    check_ignore_index,
    check_positive_float,
    check_tokens,
    check_values,
    resolve_backend,
)
from .backends.torch_linear import torch_linear_backward, torch_linear_forward
from .ops.rows import hidden_rows
from .weights import plain_linear_weights


@dataclass(frozen=True)
class LinearOptions:
    temperature: float = 1.0
    ignore_index: int = IGNORE_INDEX
    backend: str = "torch"
    # The vocabulary shard (entropy_kernels.parallel.VocabShard) when the weight is sharded.
    shard: Any = None


def check_linear_inputs(hidden, weight, bias, tokens, ignore_index=IGNORE_INDEX) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------
# Triton backend (kernels imported when first launched)


def gpu_forward_route(needs_grad: bool) -> str:
    """The GPU forward route of ``kernel_config.LINEAR_GPU_FORWARD`` ("auto" resolved)."""
    route = kernel_config.LINEAR_GPU_FORWARD
    if route == "auto":
        return "tiles" if needs_grad else "blas-triton-fold"
    return route


def _triton_forward(hidden, weight, bias, tokens, options: LinearOptions, needs_grad=True):
    if hidden.is_cuda and gpu_forward_route(needs_grad) == "blas-triton-fold":
        return torch_linear_forward(hidden, weight, bias, tokens, options, fold="triton")
    from .ops.linear import linear_forward as launch_forward

    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    constants = (1.0 / options.temperature, options.ignore_index)
    logprobs, entropy, normaliser = launch_forward(
        hidden, weight, bias, tokens, (layout, tokens_layout), constants
    )
    return logprobs.view(tokens.shape), entropy.view(tokens.shape), normaliser


def _triton_backward(hidden, weight, bias, tokens, normaliser, entropy, grads, needs, options):
    route = kernel_config.LINEAR_GPU_BACKWARD
    folds = {"blas": "torch", "blas-triton-fold": "triton", "blas-bf16-dlogits": "triton-rounded"}
    if hidden.is_cuda and route in folds:
        # cuBLAS tiles with float32 output and a fold: measured faster on an H200 than the
        # tl.dot kernels, whose float32 accumulators make the backward memory-bound.
        fold = folds[route]
        return torch_linear_backward(
            hidden, weight, bias, tokens, normaliser, entropy, grads, needs, options, fold
        )
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


def linear_forward(hidden, weight, bias, tokens, options: LinearOptions, needs_grad=True):
    """``(logprobs, entropy, normaliser [2, rows])`` of validated arguments; ``needs_grad``:
    whether a backward will follow (it picks the GPU forward route)."""
    if options.backend == "triton":
        return _triton_forward(hidden, weight, bias, tokens, options, needs_grad)
    return torch_linear_forward(hidden, weight, bias, tokens, options)


def linear_gradients(saved, grad_logprobs, grad_entropy, needs, options: LinearOptions):
    """``(dhidden, dweight, dbias)`` in the inputs' dtypes (None where not needed).

    ``saved``: ``(hidden, weight, bias, tokens, normaliser, entropy)`` of the forward.
    """
    hidden, weight, bias, tokens, normaliser, entropy = saved
    grads = tuple(
        None if grad is None else grad.reshape(-1).float().contiguous()
        for grad in (grad_logprobs, grad_entropy)
    )
    backward = _triton_backward if options.backend == "triton" else torch_linear_backward
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
    def forward(ctx, hidden, weight, bias, tokens, options: LinearOptions, needs_grad: bool):
        logprobs, entropy, normaliser = linear_forward(
            hidden, weight, bias, tokens, options, needs_grad
        )
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
            return None, None, None, None, None, None
        grad_hidden, grad_weight, grad_bias = linear_gradients(
            ctx.saved_tensors, grad_logprobs, grad_entropy, needs, ctx.options
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None


def gradients_wanted(hidden, weight, bias) -> bool:
    """Whether autograd will ask for a gradient of these inputs (a backward may follow): known
    before ``Function.apply``, inside which gradient mode is always off."""
    wanted = (t is not None and t.requires_grad for t in (hidden, weight, bias))
    return torch.is_grad_enabled() and any(wanted)


def linear_score(hidden, weight, bias, tokens, options: LinearOptions):
    """Differentiable ``(logprobs, entropy)`` for already-validated arguments."""
    if options.shard is not None:
        from .parallel import linear_score_shard  # builds on this module

        return linear_score_shard(hidden, weight, bias, tokens, options)
    needs_grad = gradients_wanted(hidden, weight, bias)
    return LinearScoring.apply(hidden, weight, bias, tokens, options, needs_grad)


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
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
