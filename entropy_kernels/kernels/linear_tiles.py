"""Jit helpers shared by the fused linear kernels: row addressing, the float32 logit tile, its
``dlogits`` and the gradient matmul at a chosen precision.

Row ``r`` of hidden lives at ``((r // n_inner) * stride_outer + (r % n_inner) * stride_inner)
* UNIT`` elements: the launcher passes the strides divided by ``UNIT`` (8 when every stride and
the base pointer allow 16-byte vector loads), so the compiler can prove the alignment without
specialising on the strides themselves (new batch shapes never recompile).
"""

import triton
import triton.language as tl

# How the gradient matmuls multiply a float32 dlogits tile by a hidden / weight tile.
DOT_IEEE = 0  # float32 operands, IEEE products (the interpreter; float32 inputs off the GPU)
DOT_BF16X3 = 1  # bfloat16 inputs: dlogits split into three bfloat16 parts, three dots
DOT_TF32X3 = 2  # float16 / float32 inputs on the GPU: Triton's three-pass TF32 split


@triton.jit
def row_offsets(rows, n_inner, stride_outer, stride_inner):
    """Offsets (in units of the launcher's stride unit) of rows in an ``[outer, inner]`` split."""
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
            weight_ptr + cols[:, None] * weight_stride_v + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if CAST_F32:  # the interpreter's tl.dot is wrong on bfloat16 operands
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        # Exact float32 products: IEEE for float32 inputs, native for half precision.
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc, float("-inf"))


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
def grad_dot(grad, operand, acc, DOT: tl.constexpr, CAST_F32: tl.constexpr):
    """``acc + grad @ operand`` with float32 ``grad`` and ``operand`` in the inputs' dtype.

    ``DOT_BF16X3``: ``grad = hi + mid + lo`` with the three parts bfloat16 (relative error
    at most 2^-24, where rounding ``grad`` to bfloat16 as eager autograd does gives up to 2^-8),
    three tensor-core dots with float32 accumulation; under the interpreter the parts are
    formed the same way and multiplied in float32. Two parts (2^-16) are not enough once the
    gradient is rounded to bfloat16: an element whose float32 value sits within the error of a
    rounding boundary lands a unit away from the rounded reference, and on small or cancelling
    gradients those units break the spec's 2e-4 (``benchmarks/gradient_precision.py``).
    """
    if DOT == 1:
        hi = grad.to(tl.bfloat16)
        rest = grad - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        if CAST_F32:
            right = operand.to(tl.float32)
            acc = tl.dot(hi.to(tl.float32), right, acc, input_precision="ieee")
            acc = tl.dot(mid.to(tl.float32), right, acc, input_precision="ieee")
            acc = tl.dot(lo.to(tl.float32), right, acc, input_precision="ieee")
        else:
            acc = tl.dot(hi, operand, acc)
            acc = tl.dot(mid, operand, acc)
            acc = tl.dot(lo, operand, acc)
    elif DOT == 2:
        acc = tl.dot(grad, operand.to(tl.float32), acc, input_precision="tf32x3")
    else:
        acc = tl.dot(grad, operand.to(tl.float32), acc, input_precision="ieee")
    return acc


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
