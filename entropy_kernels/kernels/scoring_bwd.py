"""Backward scoring kernel: probabilities recomputed from the saved row max and log-normaliser.

With ``z = logits / temperature``, ``p = softmax(z)`` and ``H = -sum p log p``:

    d logp_token / dz_j = onehot_j - p_j          dH / dz_j = -p_j (log p_j + H)

so ``dlogits_j = (g_logp (onehot_j - p_j) - g_H p_j (log p_j + H)) / temperature``, written in
the logits' dtype into ``grad_logits`` (which may be the logits' own storage: each element is
read before it is overwritten, by the same program). With ``grad_low`` (the fused linear
gradients of half-precision heads), ``grad_logits`` gets the bfloat16 rounding of the float32
``dlogits`` and ``grad_low`` the bfloat16 rounding of the rest, and with ``PARTS = 3``
``grad_low + part_stride`` the rounding of what is left after both: two bfloat16 matmuls carry
``dlogits`` to a relative 2^-16, three to 2^-24, where one would carry it to 2^-8.
"""

import triton
import triton.language as tl

from .rows import load_token, row_coordinates


@triton.jit
def to_bfloat16_rtne(x):
    """float32 -> bfloat16 rounded to nearest, ties to even, as ``Tensor.bfloat16()`` does.

    Compiled kernels convert so already; the interpreter (CPU tensors) truncates, which would
    bias every gradient written in bfloat16 by half a unit in the last place.
    """
    bits = x.to(tl.uint32, bitcast=True)
    upper = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # Built from bits: the interpreter's own cast also flushes subnormals to zero.
    upper = tl.where(x != x, 0x7FC0, upper)
    return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_bfloat16(x, ROUND_BF16_BY_HAND: tl.constexpr):
    if ROUND_BF16_BY_HAND:
        return to_bfloat16_rtne(x)
    return x.to(tl.bfloat16)


@triton.jit
def write_row_gradient(
    grad_row_ptr,
    low_row_ptr,
    part_stride,
    row_ptr,
    n_cols_read,
    vocab_size,
    token,
    row_max,
    log_norm,
    entropy,
    grad_logprob,
    grad_entropy,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Write ``dlogits`` of one row; columns past ``n_cols_read`` are not read (gradient 0).

    ``grad_logprob`` / ``grad_entropy`` are already divided by the temperature.
    ``ROUND_BF16_BY_HAND``: bfloat16 gradient under the interpreter (see ``to_bfloat16_rtne``).
    ``PARTS``: 1, ``dlogits`` at ``grad_row_ptr`` in its dtype; 2 or 3, as that many bfloat16
    parts, the high one at ``grad_row_ptr``, the next at ``low_row_ptr`` and the third
    ``part_stride`` elements after it (``low_row_ptr`` and ``part_stride`` unused for 1).

    The sweep runs from the last block to the first. Right after a forward pass over the same
    row (the fused policy loss), the blocks read last are then re-read first, while they are
    most likely still in L2: in a least-recently-used cache, a forward re-sweep would find each
    block behind a whole row of newer lines per resident program, the reverse one behind
    twice the part of the row that follows it.
    """
    cols = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(vocab_size, BLOCK_V)
    for block in range(0, n_blocks):
        offs = (n_blocks - 1 - block) * BLOCK_V + cols
        x = tl.load(row_ptr + offs, mask=offs < n_cols_read, other=float("-inf"))
        logp = (x.to(tl.float32) - row_max) * inv_temperature - log_norm
        p = tl.exp(logp)
        entropy_term = tl.where(p == 0.0, 0.0, p * (logp + entropy))
        grad = tl.where(offs == token, grad_logprob, 0.0) - grad_logprob * p
        grad -= grad_entropy * entropy_term
        grad = tl.where(offs < n_cols_read, grad, 0.0)
        if PARTS > 1:
            high = to_bfloat16(grad, ROUND_BF16_BY_HAND)
            rest = grad - high.to(tl.float32)
            low = to_bfloat16(rest, ROUND_BF16_BY_HAND)
            tl.store(low_row_ptr + offs, low, mask=offs < vocab_size)
            if PARTS > 2:
                third = to_bfloat16(rest - low.to(tl.float32), ROUND_BF16_BY_HAND)
                tl.store(low_row_ptr + part_stride + offs, third, mask=offs < vocab_size)
            grad = high
        elif ROUND_BF16_BY_HAND:
            grad = to_bfloat16_rtne(grad)
        tl.store(
            grad_row_ptr + offs,
            grad.to(grad_row_ptr.dtype.element_ty),
            mask=offs < vocab_size,
        )


@triton.heuristics(
    {
        "HAS_GRAD_LOGPROBS": lambda args: args["grad_logprobs_ptr"] is not None,
        "HAS_GRAD_ENTROPY": lambda args: args["grad_entropy_ptr"] is not None,
    }
)
# Shapes that follow B and T are not specialised, so new batch shapes never recompile.
@triton.jit(
    do_not_specialize=[
        "n_inner",
        "ignore_index",
        "tokens_stride_outer",
        "tokens_stride_inner",
        "part_stride",
    ],
    # Per-row pointers are read or written one element per program, so their alignment buys
    # nothing: token views such as input_ids[:, 1:] start mid-vector, and the row max and
    # log-normaliser are the two rows of one [2, N] buffer (the second 16-byte aligned only
    # when N is a multiple of 4). Keying binaries on it compiled a second variant per parity
    # (measured on an H200: B = 2, T = 101 and B = 8, T = 1 gave two scoring binaries).
    do_not_specialize_on_alignment=[
        "tokens_ptr",
        "row_max_ptr",
        "log_norm_ptr",
        "entropy_ptr",
        "grad_logprobs_ptr",
        "grad_entropy_ptr",
    ],
)
def scoring_bwd_kernel(
    # pointers
    grad_logits_ptr,
    grad_low_ptr,
    part_stride,
    logits_ptr,
    tokens_ptr,
    row_max_ptr,
    log_norm_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    # shapes
    n_inner,
    vocab_size,
    # strides (in elements)
    logits_stride_outer,
    logits_stride_inner,
    grad_stride_outer,
    grad_stride_inner,
    tokens_stride_outer,
    tokens_stride_inner,
    # constants
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_GRAD_LOGPROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
    PARTS: tl.constexpr,
):
    row, outer, inner = row_coordinates(n_inner)
    row_ptr = logits_ptr + outer * logits_stride_outer + inner * logits_stride_inner
    grad_offset = outer * grad_stride_outer + inner * grad_stride_inner
    grad_row_ptr = grad_logits_ptr + grad_offset
    low_row_ptr = grad_row_ptr
    if PARTS > 1:  # the other parts have the gradient's layout
        low_row_ptr = grad_low_ptr + grad_offset
    token = load_token(tokens_ptr, outer, inner, tokens_stride_outer, tokens_stride_inner)
    is_ignored = token == ignore_index

    grad_logprob = 0.0
    if HAS_GRAD_LOGPROBS:
        grad_logprob = tl.load(grad_logprobs_ptr + row)
    grad_entropy = 0.0
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.load(grad_entropy_ptr + row)
    # Ignored rows have constant outputs: their gradient is exactly 0 and their logits are not read.
    write_row_gradient(
        grad_row_ptr,
        low_row_ptr,
        part_stride,
        row_ptr,
        tl.where(is_ignored, 0, vocab_size),
        vocab_size,
        token,
        tl.load(row_max_ptr + row),
        tl.load(log_norm_ptr + row),
        tl.load(entropy_ptr + row),
        grad_logprob * inv_temperature,
        grad_entropy * inv_temperature,
        inv_temperature,
        BLOCK_V,
        ROUND_BF16_BY_HAND,
        PARTS,
    )
