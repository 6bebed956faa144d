"""The fused linear loss's rows on CPU: one row block's float32 logits ``[rows, V]`` formed once
and turned into scores, ``dlogits`` and both gradient matmuls (three ``N H V`` matmul passes
where the forward + recomputing backward of :mod:`entropy_kernels.backends.torch_linear` takes
four), for :mod:`entropy_kernels.linear_fused_loss`."""

from __future__ import annotations

import torch

from ..ops.linear_lse import finish_rows
from .split_matmuls import add_grad_matmul
from .torch_linear import logit_block
from .torch_scoring import _groups, _tile_state, add_token_grad_, row_coefficients, softmax_grad_


def fused_rows(rows, tokens, weight, bias, masked: bool, options, coefficients, buffers, first):
    """Scores and gradients of one row block whose float32 logits ``[rows, V]`` are formed once:
    the log-sum-exp, then ``coefficients(logprobs, entropy)`` gives ``(d loss / d logprobs,
    d loss / d entropy)`` of those rows (None for an unused term), then ``dlogits`` and the two
    gradient matmuls. Three matmul passes over the vocabulary where the forward + recomputing
    backward takes four. ``buffers``: ``(tile, grad_rows, grad_weight, grad_bias)``, float32, the
    tile (at least ``[rows, V]``) and ``grad_rows`` overwritten, the weight gradient added to,
    or overwritten for the ``first`` block (no zero fill of ``[V, H]``), the bias gradient added
    to (None where not wanted). Returns ``(logprobs, entropy)``.

    The tile holds the logits, then ``z``, then ``dlogits``; the element-wise passes run over
    cache-sized row groups (``exp(z)`` is recomputed per group rather than held as a second tile).
    """
    inv_temperature = 1.0 / options.temperature
    weight_operand = weight.float() if rows.dtype == torch.float32 else weight
    tile, grad_rows, grad_weight, grad_bias = buffers
    z = logit_block(rows, weight_operand, bias, 0, weight.shape[0], out=tile[: rows.shape[0]])
    state = _tile_state(z, tokens, 0, masked, inv_temperature)
    ignored = tokens == options.ignore_index
    logprobs, entropy, _ = finish_rows(*state, ignored, inv_temperature)
    grad_logp, grad_h = row_coefficients(
        ignored, entropy, *coefficients(logprobs, entropy), inv_temperature
    )
    # -p (g_logp + g_H (log p + H)) with p = exp(z) / S and log p + H = z - W / S
    # (W = sum exp(z) z): (-g_H / S) exp(z) z + ((g_H W / S - g_logp) / S) exp(z).
    sum_exp, sum_exp_z = state[1:3]
    if grad_h is None:
        scale, offset = None, -grad_logp / sum_exp
    else:
        scale = -grad_h / sum_exp
        offset = (grad_h * sum_exp_z / sum_exp - grad_logp) / sum_exp
    for group in _groups(z):
        exp_z = z[group].exp()
        if scale is None:
            softmax_grad_(z[group], exp_z, None, offset[group])
        else:
            softmax_grad_(z[group].mul_(exp_z), exp_z, scale[group], offset[group])
    grad = add_token_grad_(z, grad_logp, tokens, ignored)
    if grad_rows is not None:
        add_grad_matmul(grad_rows, grad, weight_operand, first=True)
    if grad_weight is not None:
        if bool(ignored.any()):  # ignored rows reach no weight gradient, even non-finite ones
            rows = rows.masked_fill(ignored.unsqueeze(-1), 0.0)
        add_grad_matmul(grad_weight, grad.T, rows, first)
    if grad_bias is not None:
        grad_bias += grad.sum(0)
    return logprobs, entropy
