"""Torch-backend linear policy loss with its gradient formed in the forward pass.

The loss is ``sum_t a_t * per_token_t`` with aggregation weights ``a_t`` that depend on the mask
only (:func:`entropy_kernels.policy_loss.aggregation_weights`), so the gradient of each token's
log-prob and entropy needs nothing from other rows. Each block of rows therefore forms its
``[rows, V]`` logits once (rows chosen so that the block stays a fixed-size tile), scores them,
takes ``d loss / d logp`` and ``d loss / d H`` from the per-token surrogate by autograd on
``[rows]`` vectors (the same :func:`loss_from_logprobs`, token-mean with the weights ``a_t`` as
mask and normaliser 1), turns them into ``dlogits`` and then into ``dhidden = dlogits @ W``,
``dweight += dlogits^T @ h``, ``dbias += sum(dlogits)``: three ``N H V`` matmuls instead of the
four of score-then-backward (which recomputes the logits). The weight and bias gradients are
accumulated in float32 and rounded once; the loss value and metrics come from the full
``[B, T]`` log-probs like everywhere else.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from . import linear_scoring
from .linear_scoring import LinearOptions, hidden_rows
from .policy_loss import LossOptions, PolicyLossOutput, aggregation_weights, loss_from_logprobs
from .scoring import (
    ScoringOptions,
    _torch_chunk_backward,
    _torch_chunk_forward,
    as_rows,
    row_chunks,
)


class _LossWithGradients(torch.autograd.Function):
    """Attach gradients computed in the forward pass to a loss value (handed over once)."""

    @staticmethod
    def forward(ctx, loss, grads, *inputs):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_policy_loss computed its gradient in the forward pass and it was already "
                "used: a second backward needs the gradient of an input such as advantages"
            )
        grads, ctx.grads = ctx.grads, None
        scale = float(grad_loss)
        if scale != 1.0:
            grads = tuple(None if grad is None else grad.mul_(scale) for grad in grads)
        return (None, None, *grads)


def _block_logits(hidden_f32, weight, bias):
    """``[rows, V]`` float32 logits; half-precision weights are converted a tile at a time."""
    vocab_size, step = weight.shape[0], linear_scoring.TILE_VOCAB
    if weight.dtype == torch.float32:
        return linear_scoring.logit_block(hidden_f32, weight, bias, 0, vocab_size)
    tiles = [
        linear_scoring.logit_block(hidden_f32, weight, bias, start, min(start + step, vocab_size))
        for start in range(0, vocab_size, step)
    ]
    return torch.cat(tiles, dim=1)


def _token_gradients(logprobs, entropy, companions, options: LossOptions):
    """``d loss / d logprobs`` and ``d loss / d entropy`` (or None) of one block of tokens."""
    advantages, weights, old_logprobs, ref_logprobs = companions
    logprobs = logprobs.detach().requires_grad_()
    entropy = entropy.detach().requires_grad_()
    with torch.enable_grad():
        out = loss_from_logprobs(
            logprobs[None],
            entropy[None],
            advantages[None],
            weights[None],
            old_logprobs=None if old_logprobs is None else old_logprobs[None],
            ref_logprobs=None if ref_logprobs is None else ref_logprobs[None],
            options=options,
        )
        return torch.autograd.grad(out.loss, (logprobs, entropy), allow_unused=True)


def _gradient_buffers(hidden, weight, bias, shape):
    grad_hidden = hidden.new_empty((*shape, hidden.shape[-1])) if hidden.requires_grad else None
    grad_weight = grad_bias = None
    if weight.requires_grad:
        grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32)
    if bias is not None and bias.requires_grad:
        grad_bias = bias.new_zeros(bias.shape, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias


def _grad_hidden_rows(grad, weight):
    if weight.dtype == torch.float32:
        return grad @ weight
    step = linear_scoring.TILE_VOCAB
    result = grad.new_zeros((grad.shape[0], weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        result.addmm_(grad[:, start : start + step], weight[start : start + step].float())
    return result


def linear_fused_loss(hidden, weight, bias, scoring: LinearOptions):
    """The ``fused`` entry of ``policy_loss_core`` for ``[B, T, H]`` hidden on the torch backend."""

    def fused(tokens, advantages, mask, old_logprobs, ref_logprobs, options: LossOptions):
        with torch.no_grad():  # the gradient is formed by hand: no autograd graph of the blocks
            out, grads = _forward_and_gradients(
                tokens, advantages, mask, old_logprobs, ref_logprobs, options
            )
        loss = _LossWithGradients.apply(out.loss, grads, hidden, weight, bias)
        return PolicyLossOutput(loss, out.logprobs, out.entropy, out.metrics)

    def _forward_and_gradients(tokens, advantages, mask, old_logprobs, ref_logprobs, options):
        weights = torch.ones_like(tokens, dtype=torch.float32) if mask is None else mask.float()
        token_weights = aggregation_weights(weights, options)
        token_options = dataclasses.replace(options, aggregation="token-mean", normalizer=1.0)
        token_advantages = advantages if advantages.dim() == 2 else advantages[:, None]
        token_advantages = token_advantages.expand(tokens.shape)
        rows_of_hidden, tokens_view, layout, tokens_layout = hidden_rows(hidden, tokens)
        size, vocab_size = hidden.shape[-1], weight.shape[0]
        rows = as_rows(rows_of_hidden, layout, size)
        token_rows = as_rows(tokens_view, tokens_layout, None)
        shape = (layout.n_outer, layout.n_inner)
        logprobs = torch.empty(shape, device=hidden.device)
        entropy = torch.empty(shape, device=hidden.device)
        grads = _gradient_buffers(hidden, weight, bias, shape)
        score_options = ScoringOptions(scoring.temperature, -100)
        rows_per_block = max(
            1, linear_scoring.TILE_ROWS * linear_scoring.TILE_VOCAB * 2 // vocab_size
        )

        def block_of(tensor, outer, inner):
            return None if tensor is None else tensor.reshape(shape)[outer, inner].reshape(-1)

        for outer, inner in row_chunks(layout, rows_per_block):
            block = rows[outer, inner]
            hidden_f32 = block.reshape(-1, size).float()
            block_tokens = token_rows[outer, inner].reshape(-1)
            logits = _block_logits(hidden_f32, weight, bias)
            block_logp, block_entropy, normaliser = _torch_chunk_forward(
                logits, block_tokens, score_options
            )
            logprobs[outer, inner] = block_logp.view(block.shape[:-1])
            entropy[outer, inner] = block_entropy.view(block.shape[:-1])
            companions = (token_advantages, token_weights, old_logprobs, ref_logprobs)
            token_grads = _token_gradients(
                block_logp,
                block_entropy,
                tuple(block_of(tensor, outer, inner) for tensor in companions),
                token_options,
            )
            grad = _torch_chunk_backward(
                logits, block_tokens, normaliser, block_entropy, *token_grads, score_options
            )
            del logits
            _add_block_gradients(grads, grad, hidden_f32, weight, block_tokens, (outer, inner))
        out = loss_from_logprobs(
            logprobs.view(tokens.shape),
            entropy.view(tokens.shape),
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            options=options,
        )
        grad_hidden, grad_weight, grad_bias = grads
        return out, (
            None if grad_hidden is None else grad_hidden.view(hidden.shape),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )

    return fused


def _add_block_gradients(grads, grad, hidden_f32, weight, tokens, index):
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        outer, inner = index
        target = grad_hidden[outer, inner]
        grad_hidden[outer, inner] = _grad_hidden_rows(grad, weight).view(target.shape)
    if grad_weight is not None:
        ignored = tokens == -100
        if bool(ignored.any()):  # ignored rows leave no trace, even non-finite hidden states
            hidden_f32 = hidden_f32.masked_fill(ignored.unsqueeze(-1), 0.0)
        grad_weight.addmm_(grad.T, hidden_f32)
    if grad_bias is not None:
        grad_bias += grad.sum(0)
