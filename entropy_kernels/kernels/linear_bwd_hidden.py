"""Backward of the fused linear scoring, hidden gradient: one program per block of rows.

Each program sweeps the vocabulary, recomputes the logit tile (:func:`logit_tile`), turns it
into ``dlogits = g_logp (onehot - p) - g_H p (log p + H)`` (the gradients arrive already
divided by the temperature) and adds ``dlogits @ W`` to its own rows of a float32 ``[N, H]``
buffer: no two programs write the same element, so the result is deterministic without atomics.
"""

import torch
import triton
import triton.language as tl

from .linear_fwd import blocks, cast_f32, logit_tile, row_offsets


@triton.jit
def dlogit_tile(x, cols, tokens, ignored, row_max, log_norm, entropy, grad_logp, grad_h, inv_t):
    """``[BLOCK_N, BLOCK_V]`` float32 ``d loss / d logits`` (times the temperature) of a tile.

    ``grad_logp`` / ``grad_h``: per row, already multiplied by ``1 / T`` (zero where unused).
    Masked (``-inf``) logits have ``p = 0`` and no entropy term; ignored rows give 0.
    """
    log_p = (x - row_max[:, None]) * inv_t - log_norm[:, None]
    p = tl.exp(log_p)
    entropy_term = tl.where(p == 0.0, 0.0, p * (log_p + entropy[:, None]) * grad_h[:, None])
    grad = -p * grad_logp[:, None] - entropy_term
    grad += tl.where(cols[None, :] == tokens[:, None], grad_logp[:, None], 0.0)
    return tl.where(ignored[:, None], 0.0, grad)


@triton.jit
def row_inputs(
    rows,
    row_ok,
    tokens_ptr,
    token_offsets,
    row_max_ptr,
    log_norm_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    ignore_index,
    inv_temperature,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    """Per-row ``(tokens, ignored, row_max, log_norm, entropy, grad_logp / T, grad_H / T)``."""
    tokens = tl.load(tokens_ptr + token_offsets, mask=row_ok, other=ignore_index).to(tl.int64)
    ignored = (tokens == ignore_index) | ~row_ok
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    log_norm = tl.load(log_norm_ptr + rows, mask=row_ok, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    grad_logp = tl.zeros(rows.shape, tl.float32)
    grad_h = tl.zeros(rows.shape, tl.float32)
    if HAS_GRAD_LOGP:
        grad_logp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0) * inv_temperature
    if HAS_GRAD_ENTROPY:
        grad_h = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0) * inv_temperature
    grad_logp = tl.where(ignored, 0.0, grad_logp)
    grad_h = tl.where(ignored, 0.0, grad_h)
    return tokens, ignored, row_max, log_norm, entropy, grad_logp, grad_h


@triton.jit(
    do_not_specialize=[
        "n_rows",
        "n_inner",
        "hidden_stride_outer",
        "hidden_stride_inner",
        "tokens_stride_outer",
        "tokens_stride_inner",
        "ignore_index",
    ],
    do_not_specialize_on_alignment=["hidden_ptr", "tokens_ptr"],
)
def linear_bwd_hidden_kernel(
    grad_hidden_ptr,
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    tokens_ptr,
    row_max_ptr,
    log_norm_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    n_rows,
    n_inner,
    vocab_size,
    size,
    hidden_stride_outer,
    hidden_stride_inner,
    weight_stride_v,
    weight_stride_h,
    tokens_stride_outer,
    tokens_stride_inner,
    inv_temperature,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAST_F32: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    hidden_offsets = row_offsets(rows, n_inner, hidden_stride_outer, hidden_stride_inner)
    token_offsets = row_offsets(rows, n_inner, tokens_stride_outer, tokens_stride_inner)
    tokens, ignored, row_max, log_norm, entropy, grad_logp, grad_h = row_inputs(
        rows,
        row_ok,
        tokens_ptr,
        token_offsets,
        row_max_ptr,
        log_norm_ptr,
        entropy_ptr,
        grad_logp_ptr,
        grad_entropy_ptr,
        ignore_index,
        inv_temperature,
        HAS_GRAD_LOGP,
        HAS_GRAD_ENTROPY,
    )
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = logit_tile(
            hidden_ptr,
            hidden_offsets,
            row_ok,
            weight_ptr,
            bias_ptr,
            cols,
            vocab_size,
            size,
            weight_stride_v,
            weight_stride_h,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            HAS_BIAS,
            CAST_F32,
        )
        grad = dlogit_tile(
            x, cols, tokens, ignored, row_max, log_norm, entropy, grad_logp, grad_h, inv_temperature
        )
        for k in range(0, size, BLOCK_H):
            ks = k + tl.arange(0, BLOCK_H)
            k_ok = ks < size
            w = tl.load(
                weight_ptr + cols[:, None] * weight_stride_v + ks[None, :] * weight_stride_h,
                mask=(cols < vocab_size)[:, None] & k_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            out = grad_hidden_ptr + rows[:, None] * size + ks[None, :]
            out_ok = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(out, mask=out_ok, other=0.0)
            tl.store(out, tl.dot(grad, w, acc, input_precision="ieee"), mask=out_ok)


def launch_linear_bwd_hidden(hidden, weight, bias, tokens, layouts, saved, grads, constants):
    """``dhidden`` as a float32 ``[rows, H]`` tensor (rows in the layout's order)."""
    layout, tokens_layout = layouts
    normaliser, entropy = saved
    inv_temperature, ignore_index = constants
    grad_hidden = torch.zeros(
        (layout.n_rows, hidden.shape[-1]), dtype=torch.float32, device=hidden.device
    )
    config = blocks(hidden.device)
    if layout.n_rows > 0:
        linear_bwd_hidden_kernel[(triton.cdiv(layout.n_rows, config["BLOCK_N"]),)](
            grad_hidden,
            hidden,
            weight,
            bias,
            tokens,
            normaliser[0],
            normaliser[1],
            entropy,
            grads[0],
            grads[1],
            layout.n_rows,
            layout.n_inner,
            weight.shape[0],
            weight.shape[1],
            layout.stride_outer,
            layout.stride_inner,
            weight.stride(0),
            weight.stride(1),
            tokens_layout.stride_outer,
            tokens_layout.stride_inner,
            inv_temperature,
            ignore_index,
            HAS_BIAS=bias is not None,
            CAST_F32=cast_f32(hidden.dtype, hidden.device),
            HAS_GRAD_LOGP=grads[0] is not None,
            HAS_GRAD_ENTROPY=grads[1] is not None,
            **config,
        )
    return grad_hidden
