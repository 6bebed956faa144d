"""The linear policy loss with its gradient formed in the forward pass (torch backend).

When the per-token loss is token-local (the PPO clip and every objective whose terms need no
reduction across tokens) and its companions (advantages, old / reference log-probs) are
constants, ``d loss / d logprob`` and ``d loss / d entropy`` of a token depend only on that
token's values and on aggregation weights fixed by the mask. So a block of rows can form its
float32 logits over the whole vocabulary once, score them, take those two derivatives from
:func:`entropy_kernels.surrogate.loss_from_logprobs` on the block (by autograd, so the loss is
still defined in one place) and multiply ``dlogits`` into the hidden, weight and bias gradients
right away: three ``N H V`` matmul passes instead of the four of forward + recomputing backward.
The loss value and metrics then come from ``loss_from_logprobs`` on all the scores, and the
stored gradients are handed to autograd (scaled by the incoming gradient).

The block holds one ``[rows, V]`` float32 tile (see :func:`rows_per_block`), whatever N. Measured
on CPU only, so it serves float32 on CPU, where it beat the tiled recomputing backward at every
hidden size tried (64 to 896: 1.3-1.4x faster, no more memory); the GPU keeps the forward +
cuBLAS-tiled backward (see ``kernel_config.LINEAR_GPU_BACKWARD``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from .backends.torch_linear import matmul_rows, may_mask
from .backends.torch_linear_fused import fused_rows
from .linear_scoring import gradients_wanted
from .ops.rows import as_rows, hidden_rows, row_chunks
from .surrogate import PolicyLossOutput, aggregation_weights, loss_from_logprobs

# Float32 logits the one tile of a block holds at most.
BLOCK_BYTES = 64 * 2**20


def rows_per_block(hidden_size: int, vocab_size: int) -> int:
    """Rows of a block: at most the hidden size, so that the block's float32 ``[rows, V]`` tile
    holds no more than the float32 weight gradient the loss holds anyway, and at most
    :data:`BLOCK_BYTES`. Fewer rows cost speed: every block's matmuls re-pack the whole weight
    (on CPU, 1 thread, H = 896, V = 32000: 128-row blocks took 1.3-1.6x the time of one 1024-row
    matmul, 512-row blocks 1.0-1.1x)."""
    return max(1, min(hidden_size, BLOCK_BYTES // (4 * vocab_size)))


def applies(hidden, weight, bias, options) -> bool:
    """Whether the loss of these validated arguments can take this route."""
    return (
        gradients_wanted(hidden, weight, bias)
        and options.backend == "torch"
        and options.shard is None
        and hidden.device.type == "cpu"
        and hidden.dtype == torch.float32
    )


class _LinearLossWithGradient(torch.autograd.Function):
    """The loss value with the hidden, weight and bias gradients computed in the forward."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_policy_loss computed its gradient in the forward pass and it was "
                "already used: a second backward needs backend='triton' or a new call"
            )
        scale = float(grad_loss)
        scaled = tuple(
            None if grad is None else (grad if scale == 1.0 else grad * scale) for grad in ctx.grads
        )
        ctx.grads = None  # handed over once, like the fused logits loss
        return (None, *scaled, None)


def fused_linear_policy_loss(
    hidden, weight, bias, linear, tokens, advantages, mask, old_logprobs, ref_logprobs, options
) -> PolicyLossOutput:
    """:func:`loss_from_logprobs` of the linear scores, its gradient formed in the forward.

    ``hidden`` ``[B, T, H]``, ``tokens`` / ``mask`` ``[B, T]`` (mask already without ignored
    tokens), validated; ``linear``: the :class:`LinearOptions`; ``options``: the
    :class:`LossOptions` of a token-local objective.
    """
    source = hidden
    hidden, tokens, layout, tokens_layout = hidden_rows(hidden, tokens)
    size, vocab_size = hidden.shape[-1], weight.shape[0]
    rows = as_rows(hidden, layout, size)
    token_rows = as_rows(tokens, tokens_layout, None)
    shape = (layout.n_outer, layout.n_inner)
    # d loss / d per-token loss over d (weighted token-mean with normaliser 1) / d per-token,
    # from the [B, T] weights (sequences matter), then in the rows' order like every companion.
    weights = torch.ones(tokens.shape) if mask is None else mask.to(torch.float32)
    scale = torch.where(weights != 0, aggregation_weights(weights, options) / weights, 0.0)
    weights, scale = weights.reshape(shape), scale.reshape(shape)
    per_token_options = dataclasses.replace(options, aggregation="token-mean", normalizer=1.0)
    # [B] or [B, T] advantages at every token, in the rows' order.
    per_sequence = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    full_advantages = per_sequence.expand(tokens.shape).reshape(shape)

    needs = tuple(t is not None and t.requires_grad for t in (source, weight, bias))
    grad_hidden = torch.empty((*shape, size), dtype=hidden.dtype) if needs[0] else None
    # Overwritten by the first block's matmul (no zero fill of [V, H]), added to by the others.
    grad_weight = torch.empty(weight.shape, dtype=torch.float32) if needs[1] else None
    grad_bias = torch.zeros(vocab_size, dtype=torch.float32) if needs[2] else None
    logprobs = torch.empty(shape)
    entropy = torch.empty(shape)
    masked = may_mask(weight, bias)
    detached = tuple(None if t is None else t.detach() for t in (weight, bias))
    block_rows = rows_per_block(size, vocab_size)
    # One tile for every block: a fresh one per block would be page-faulted in each time.
    tile = torch.empty((min(block_rows, shape[0] * shape[1]), vocab_size))

    blocks = 0
    for outer, inner in row_chunks(layout, block_rows):

        def block(values, outer=outer, inner=inner):
            return None if values is None else values.reshape(shape)[outer, inner].reshape(1, -1)

        def coefficients(block_logprobs, block_entropy, block=block):
            logp = block_logprobs.reshape(1, -1).requires_grad_()
            ent = block_entropy.reshape(1, -1).requires_grad_()
            with torch.enable_grad():
                loss = loss_from_logprobs(
                    logp,
                    ent,
                    block(full_advantages),
                    block(weights),
                    old_logprobs=block(old_logprobs),
                    ref_logprobs=block(ref_logprobs),
                    options=per_token_options,
                ).loss
                grads = torch.autograd.grad(loss, (logp, ent), allow_unused=True)
            return tuple(None if g is None else (g * block(scale)).reshape(-1) for g in grads)

        piece = rows[outer, inner]
        grad_rows = torch.empty(piece.shape[:-1].numel(), size) if needs[0] else None
        with torch.no_grad():
            block_logprobs, block_entropy = fused_rows(
                matmul_rows(piece.detach().reshape(-1, size)),
                token_rows[outer, inner].reshape(-1),
                *detached,
                masked,
                linear,
                coefficients,
                (tile, grad_rows, grad_weight, grad_bias),
                blocks == 0,
            )
        blocks += 1
        logprobs[outer, inner] = block_logprobs.view(piece.shape[:-1])
        entropy[outer, inner] = block_entropy.view(piece.shape[:-1])
        if grad_hidden is not None:
            grad_hidden[outer, inner] = grad_rows.view(piece.shape)

    if grad_weight is not None and blocks == 0:
        grad_weight.zero_()
    with torch.no_grad():
        out = loss_from_logprobs(
            logprobs.view(tokens.shape),
            entropy.view(tokens.shape),
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            options=options,
        )
    grads = (
        None if grad_hidden is None else grad_hidden.view(source.shape),
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
    loss = _LinearLossWithGradient.apply(out.loss, source, weight, bias, grads)
    return PolicyLossOutput(loss, out.logprobs, out.entropy, out.metrics)
