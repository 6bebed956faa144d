"""Backward of the fused linear scoring, hidden gradient: program ``(i, j)`` takes row block
``i`` and vocabulary split ``j``.

It sweeps its split's vocabulary tiles, recomputes each logit tile (:func:`logit_tile`), turns
it into ``dlogits = g_logp (onehot - p) - g_H p (log p + H)`` (the gradients arrive already
divided by the temperature) and adds ``dlogits @ W`` (:func:`grad_dot`) to its own rows of
slice ``j`` of a float32 ``[splits, rows, H]`` buffer. No two programs write the same element;
the launcher sums the slices in a fixed order, so the result is deterministic without atomics.
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
    tokens_stride_outer,
    tokens_stride_inner,
    inv_temperature,
    ignore_index,
    TILES_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    CAST_F32: tl.constexpr,
    HIDDEN_UNIT: tl.constexpr,
    DOT: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
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
    out_rows = grad_hidden_ptr + (split * n_rows + rows) * size
    first = split * TILES_PER_SPLIT * BLOCK_V
    last = tl.minimum(first + TILES_PER_SPLIT * BLOCK_V, vocab_size)
    for start in range(first, last, BLOCK_V):
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
                weight_ptr + cols[:, None] * weight_stride_v + ks[None, :],
                mask=(cols < vocab_size)[:, None] & k_ok[None, :],
                other=0.0,
            )
            out = out_rows[:, None] + ks[None, :]
            out_ok = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(out, mask=out_ok, other=0.0)
            tl.store(out, grad_dot(grad, w, acc, DOT, CAST_F32), mask=out_ok)
