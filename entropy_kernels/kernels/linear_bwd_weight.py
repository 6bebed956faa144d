"""Backward of the fused linear scoring, weight and bias gradients: one program per block of
vocabulary rows.

Each program sweeps the token rows, recomputes the logit tile and its ``dlogits`` (as
:mod:`entropy_kernels.kernels.linear_bwd_hidden` does) and adds ``dlogits^T @ h`` to its own
rows of a float32 ``[V, H]`` buffer and ``sum(dlogits)`` to a float32 register vector: every
element is written by one program in a fixed order (deterministic, no atomics), accumulated in
float32 over all tokens and rounded once by the caller. Ignored rows read their hidden states
as 0, so a non-finite state there reaches no gradient.
"""

import torch
import triton
import triton.language as tl

from .linear_bwd_hidden import dlogit_tile, row_inputs
from .linear_fwd import blocks, cast_f32, logit_tile, row_offsets


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
def linear_bwd_weight_kernel(
    grad_weight_ptr,
    grad_bias_ptr,
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
    NEEDS_WEIGHT: tl.constexpr,
    NEEDS_BIAS: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab_size
    grad_bias = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N).to(tl.int64)
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
        if NEEDS_BIAS:
            grad_bias += tl.sum(grad, axis=0)
        if NEEDS_WEIGHT:
            grad_t = tl.trans(grad)
            for k in range(0, size, BLOCK_H):
                ks = k + tl.arange(0, BLOCK_H)
                k_ok = ks < size
                h = tl.load(
                    hidden_ptr + hidden_offsets[:, None] + ks[None, :],
                    mask=(row_ok & ~ignored)[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                out = grad_weight_ptr + cols[:, None] * size + ks[None, :]
                out_ok = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(out, mask=out_ok, other=0.0)
                tl.store(out, tl.dot(grad_t, h, acc, input_precision="ieee"), mask=out_ok)
    if NEEDS_BIAS:
        tl.store(grad_bias_ptr + cols, grad_bias, mask=col_ok)


def launch_linear_bwd_weight(hidden, weight, bias, tokens, layouts, saved, grads, constants, needs):
    """``(dweight [V, H], dbias [V])`` in float32; each None unless ``needs`` asks for it."""
    layout, tokens_layout = layouts
    normaliser, entropy = saved
    inv_temperature, ignore_index = constants
    needs_weight, needs_bias = needs
    vocab_size = weight.shape[0]
    grad_weight = grad_bias = None
    if needs_weight:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    if needs_bias:
        grad_bias = torch.empty(vocab_size, dtype=torch.float32, device=weight.device)
    config = blocks(hidden.device)
    linear_bwd_weight_kernel[(triton.cdiv(vocab_size, config["BLOCK_V"]),)](
        grad_weight,
        grad_bias,
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
        vocab_size,
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
        NEEDS_WEIGHT=needs_weight,
        NEEDS_BIAS=needs_bias,
        **config,
    )
    return grad_weight, grad_bias
