"""Forward of the fused linear scoring: log-prob, entropy and log-normaliser of
``hidden @ weight.T + bias`` per row, the logits living only as ``[BLOCK_N, BLOCK_V]`` float32
tiles (``tl.dot`` over ``BLOCK_H`` slices of the hidden dimension, float32 accumulation).

One program per block of ``BLOCK_N`` rows sweeps the vocabulary with an online log-sum-exp:
per row a running maximum ``m``, the sum of exponentials ``s`` and ``w = sum exp(z) z`` with
``z = (x - m) / T``; then ``log p_token = (x_token - m) / T - log s`` and
``H = log s - w / s`` (as in :mod:`entropy_kernels.kernels.scoring_fwd`). Row ``r`` of hidden
lives at ``(r // n_inner) * stride_outer + (r % n_inner) * stride_inner`` (views such as
``hidden[:, :-1]`` are read in place).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, n_inner, stride_outer, stride_inner):
    """Element offsets of rows ``rows`` in a two-level ``[n_outer, n_inner, ...]`` layout."""
    outer = rows // n_inner
    return outer * stride_outer + (rows - outer * n_inner) * stride_inner


@triton.jit
def logit_tile(
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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAST_F32: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_V]`` float32 logits; columns past the vocabulary are ``-inf``."""
    col_ok = cols < vocab_size
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for start in range(0, size, BLOCK_H):
        ks = start + tl.arange(0, BLOCK_H)
        k_ok = ks < size
        h = tl.load(
            hidden_ptr + hidden_offsets[:, None] + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + cols[:, None] * weight_stride_v + ks[None, :] * weight_stride_h,
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if CAST_F32:  # the interpreter's tl.dot is wrong on bfloat16 operands
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc, float("-inf"))


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
    do_not_specialize_on_alignment=["hidden_ptr", "tokens_ptr"],
)
def linear_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    tokens_ptr,
    logprobs_ptr,
    entropy_ptr,
    row_max_ptr,
    log_norm_ptr,
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
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    hidden_offsets = row_offsets(rows, n_inner, hidden_stride_outer, hidden_stride_inner)
    token_offsets = row_offsets(rows, n_inner, tokens_stride_outer, tokens_stride_inner)
    tokens = tl.load(tokens_ptr + token_offsets, mask=row_ok, other=ignore_index).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    token_logit = tl.full((BLOCK_N,), float("nan"), tl.float32)
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
        # An out-of-range token (only with validate=False) is in no tile: its log-prob is NaN.
        in_tile = (tokens >= start) & (tokens < start + BLOCK_V) & (tokens < vocab_size)
        picked = tl.sum(tl.where(cols[None, :] == tokens[:, None], x, 0.0), axis=1)
        token_logit = tl.where(in_tile, picked, token_logit)
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
    log_norm = tl.log(s)
    row_max = tl.where(m == float("-inf"), 0.0, m)
    entropy = log_norm - w / s
    logprob = (token_logit - row_max) * inv_temperature - log_norm
    ignored = tokens == ignore_index
    tl.store(logprobs_ptr + rows, tl.where(ignored, 0.0, logprob), mask=row_ok)
    tl.store(entropy_ptr + rows, tl.where(ignored, 0.0, entropy), mask=row_ok)
    tl.store(row_max_ptr + rows, tl.where(ignored, 0.0, row_max), mask=row_ok)
    tl.store(log_norm_ptr + rows, tl.where(ignored, 0.0, log_norm), mask=row_ok)


def blocks(device: torch.device) -> dict:
    """Tile sizes: small under the interpreter so that test shapes span several tiles."""
    if device.type == "cuda":
        return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8}
    return {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16, "num_warps": 4}


def cast_f32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``tl.dot`` operands must be cast to float32: half precision off the GPU."""
    return dtype != torch.float32 and device.type != "cuda"


def launch_linear_fwd(hidden, weight, bias, tokens, layouts, inv_temperature, ignore_index):
    """``(logprobs [rows], entropy [rows], normaliser [2, rows])`` of validated arguments."""
    layout, tokens_layout = layouts
    n_rows = layout.n_rows
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logprobs)
    normaliser = torch.empty((2, n_rows), dtype=torch.float32, device=hidden.device)
    config = blocks(hidden.device)
    if n_rows > 0:
        linear_fwd_kernel[(triton.cdiv(n_rows, config["BLOCK_N"]),)](
            hidden,
            weight,
            bias,
            tokens,
            logprobs,
            entropy,
            normaliser[0],
            normaliser[1],
            n_rows,
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
            **config,
        )
    return logprobs, entropy, normaliser
