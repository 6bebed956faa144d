"""Forward of the fused linear scoring: the online log-sum-exp state of ``hidden @ weight.T +
bias`` over one vocabulary range per program, the logits living only as ``[BLOCK_N, BLOCK_V]``
float32 tiles (``tl.dot`` over ``BLOCK_H`` slices of the hidden dimension).

Program ``(i, j)`` takes row block ``i`` and vocabulary split ``j`` (``TILES_PER_SPLIT`` tiles,
so that a few thousand rows still fill every SM) and keeps per row a running maximum ``m``, the
sum of exponentials ``s`` and ``w = sum exp(z) z`` with ``z = (x - m) / T``. It writes them to
row ``j`` of ``[splits, rows]`` buffers, and the token's logit to ``token_logit`` from the one
split that holds it; :func:`entropy_kernels.ops.linear_lse.finish_rows` merges the splits and forms
the log-prob, the entropy and the log-normaliser (the torch backend shares that epilogue).
"""

import triton
import triton.language as tl

from .linear_tiles import logit_tile, row_offsets


# Shapes that follow B and T are not specialised, so new batch shapes never recompile.
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
def linear_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    tokens_ptr,
    state_ptr,
    token_logit_ptr,
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
    tokens = tl.load(tokens_ptr + token_offsets, mask=row_ok, other=ignore_index).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    token_logit = tl.zeros((BLOCK_N,), tl.float32)
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
        token_logit += tl.sum(tl.where(cols[None, :] == tokens[:, None], x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # While every logit seen is -inf, centre on 0 instead of m so that no inf - inf appears.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp((m - shift) * inv_temperature)
        recentre = tl.where(m == float("-inf"), 0.0, (m - shift) * inv_temperature)
        w = rescale * (w + recentre * s)
        s = rescale * s
        z = (x - shift[:, None]) * inv_temperature
        p = tl.exp(z)
        s += tl.sum(p, axis=1)
        w += tl.sum(tl.where(p == 0.0, 0.0, p * z), axis=1)
        m = m_new
    state = state_ptr + split * 3 * n_rows + rows
    tl.store(state, m, mask=row_ok)
    tl.store(state + n_rows, s, mask=row_ok)
    tl.store(state + 2 * n_rows, w, mask=row_ok)
    # An out-of-range token (only with validate=False) is in no split: its logit stays NaN.
    tl.store(token_logit_ptr + rows, token_logit, mask=row_ok & (tokens >= first) & (tokens < last))
