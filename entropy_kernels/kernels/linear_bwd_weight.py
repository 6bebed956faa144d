"""Backward of the fused linear scoring, weight and bias gradients: one program per block of
vocabulary rows.

Each program sweeps the token rows, recomputes the logit tile and its ``dlogits`` (as
:mod:`entropy_kernels.kernels.linear_bwd_hidden` does) and adds ``dlogits^T @ h``
(:func:`grad_dot`) to its own rows of a float32 ``[V, H]`` buffer and ``sum(dlogits)`` to a
float32 register vector: every element is written by one program in a fixed order
(deterministic, no atomics), accumulated in float32 over all tokens and rounded once by the
caller. Ignored rows read their hidden states as 0, so a non-finite state there reaches no
gradient.
"""

import triton
import triton.language as tl

from .linear_tiles import dlogit_tile, grad_dot, logit_tile, row_inputs, row_offsets


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
    do_not_specialize_on_alignment=["tokens_ptr"],
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
    tokens_stride_outer,
    tokens_stride_inner,
    inv_temperature,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    CAST_F32: tl.constexpr,
    HIDDEN_UNIT: tl.constexpr,
    DOT: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    NEEDS_WEIGHT: tl.constexpr,
    NEEDS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab_size
    grad_bias = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < n_rows
        hidden_offsets = (
            row_offsets(rows, n_inner, hidden_stride_outer, hidden_stride_inner) * HIDDEN_UNIT
        )
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
                )
                out = grad_weight_ptr + cols[:, None] * size + ks[None, :]
                out_ok = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(out, mask=out_ok, other=0.0)
                tl.store(out, grad_dot(grad_t, h, acc, DOT, CAST_F32), mask=out_ok)
    if NEEDS_BIAS:
        tl.store(grad_bias_ptr + cols, grad_bias, mask=col_ok)
