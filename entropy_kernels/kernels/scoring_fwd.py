"""Forward scoring kernel: one read of each vocabulary row gives log-prob, entropy and log-sum-exp.

Row ``r`` of the ``[D0 * D1, V]`` problem lives at ``(r // D1) * stride_outer + (r % D1) *
stride_inner``: two leading strides cover contiguous logits as well as views such as
``logits[:, :-1]`` without a copy.

The online pass keeps, per lane of the block, the sum of exponentials ``s`` and the sum
``w = sum exp(x - m) * (x - m)``, both relative to one running maximum ``m`` (a scalar, so a
block costs one ``max`` reduction and one ``exp`` per logit). Then

    log p_token = (x_token - m) - log(sum s)          H = log(sum s) - (sum w) / (sum s)

Centring on ``m`` keeps both exact where it matters: ``x - m`` has no rounding error for logits
near the maximum, whereas ``x - lse`` (or ``lse - E[x]``) would cancel large logits. ``m`` and
``log(sum s)`` are stored for the backward.
``-inf`` logits have ``exp = 0`` and contribute nothing; their ``(x - m)`` is never multiplied.
"""

import triton
import triton.language as tl

from .rows import load_token, row_coordinates


@triton.jit
def row_statistics(row_ptr, n_cols, vocab_size, inv_temperature, BLOCK_V: tl.constexpr):
    """Online pass over ``n_cols`` logits of one row: ``(row_max, log_norm, entropy)``.

    ``log softmax(x / T)_j = (x_j - row_max) / T - log_norm``, with ``row_max`` in logit units:
    the difference is taken before the scaling, so it stays exact whatever the temperature.
    ``n_cols = 0`` reads nothing.
    """
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    w = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit seen is -inf, centre on 0 instead of m so that no inf - inf appears.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp((m - shift) * inv_temperature)
        recentre = tl.where(m == float("-inf"), 0.0, (m - shift) * inv_temperature)
        w = rescale * (w + recentre * s)
        s = rescale * s
        z = (x - shift) * inv_temperature
        p = tl.exp(z)
        s += p
        w += tl.where(p == 0.0, 0.0, p * z)
        m = m_new

    sum_exp = tl.sum(s, axis=0)
    log_norm = tl.log(sum_exp)
    row_max = tl.where(m == float("-inf"), 0.0, m)
    entropy = log_norm - tl.sum(w, axis=0) / sum_exp
    return row_max, log_norm, entropy


@triton.jit
def token_logprob(row_ptr, token, vocab_size, ignore_index, inv_temperature, row_max, log_norm):
    """Log-prob of ``token``; an out-of-range token (only with validate=False) is not read: NaN."""
    readable = (token >= 0) & (token < vocab_size) & (token != ignore_index)
    logit = tl.load(row_ptr + token, mask=readable, other=float("nan"))
    return (logit.to(tl.float32) - row_max) * inv_temperature - log_norm


@triton.jit
def score_row(row_ptr, token, vocab_size, ignore_index, inv_temperature, BLOCK_V: tl.constexpr):
    """``(n_cols, row_max, log_norm, entropy, logprob)`` of one row.

    An ignored row reads nothing (``n_cols = 0``: the loop runs zero times) and gets 0 for its
    log-prob and entropy; its ``row_max`` / ``log_norm`` are those of an empty row.
    """
    is_ignored = token == ignore_index
    n_cols = tl.where(is_ignored, 0, vocab_size)
    row_max, log_norm, entropy = row_statistics(
        row_ptr, n_cols, vocab_size, inv_temperature, BLOCK_V
    )
    logprob = token_logprob(
        row_ptr, token, vocab_size, ignore_index, inv_temperature, row_max, log_norm
    )
    logprob = tl.where(is_ignored, 0.0, logprob)
    entropy = tl.where(is_ignored, 0.0, entropy)
    return n_cols, row_max, log_norm, entropy, logprob


# Shapes that follow B and T are not specialised, so new batch shapes never recompile.
@triton.jit(
    do_not_specialize=["n_inner", "ignore_index", "tokens_stride_outer", "tokens_stride_inner"],
    # Per-row pointers are read or written one element per program, so their alignment buys
    # nothing: token views such as input_ids[:, 1:] start mid-vector, and the row max and
    # log-normaliser are the two rows of one [2, N] buffer (the second 16-byte aligned only
    # when N is a multiple of 4). Keying binaries on it compiled a second variant per parity
    # (measured on an H200: B = 2, T = 101 and B = 8, T = 1 gave two scoring binaries).
    do_not_specialize_on_alignment=[
        "tokens_ptr",
        "logprobs_ptr",
        "entropy_ptr",
        "row_max_ptr",
        "log_norm_ptr",
    ],
)
def scoring_fwd_kernel(
    # pointers
    logits_ptr,
    tokens_ptr,
    logprobs_ptr,
    entropy_ptr,
    row_max_ptr,
    log_norm_ptr,
    # shapes
    n_inner,
    vocab_size,
    # strides (in elements)
    logits_stride_outer,
    logits_stride_inner,
    tokens_stride_outer,
    tokens_stride_inner,
    # constants
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    STATE: tl.constexpr = False,
):
    """``STATE`` (the fused linear forward, which merges vocabulary tiles: its tokens are always
    inside the tile): write the tile's online state instead, ``m`` (``-inf`` for a tile of
    ``-inf`` logits only), ``s = sum exp(z)`` and ``w = sum exp(z) z`` where the row maximum,
    the log-normaliser and the entropy go, and the token's raw logit where the log-prob goes
    (see :mod:`entropy_kernels.kernels.linear_merge`)."""
    row, outer, inner = row_coordinates(n_inner)
    row_ptr = logits_ptr + outer * logits_stride_outer + inner * logits_stride_inner
    token = load_token(tokens_ptr, outer, inner, tokens_stride_outer, tokens_stride_inner)
    _, row_max, log_norm, entropy, logprob = score_row(
        row_ptr, token, vocab_size, ignore_index, inv_temperature, BLOCK_V
    )
    if STATE:
        sum_exp = tl.exp(log_norm)
        empty = sum_exp == 0.0
        tl.store(logprobs_ptr + row, tl.load(row_ptr + token).to(tl.float32))
        tl.store(entropy_ptr + row, tl.where(empty, 0.0, sum_exp * (log_norm - entropy)))
        tl.store(row_max_ptr + row, tl.where(empty, float("-inf"), row_max))
        tl.store(log_norm_ptr + row, sum_exp)
    else:
        is_ignored = token == ignore_index
        tl.store(logprobs_ptr + row, logprob)
        tl.store(entropy_ptr + row, entropy)
        tl.store(row_max_ptr + row, tl.where(is_ignored, 0.0, row_max))
        tl.store(log_norm_ptr + row, tl.where(is_ignored, 0.0, log_norm))
