"""GRPO-S Eq. 8: the mean entropy over each row's active positions, in float64.

One program per row, sweeping the positions in blocks; float64 because two rows' means may
nearly tie (see :mod:`.shaping_common`). A row without active tokens gets 0 rather than 0/0.
"""

import triton
import triton.language as tl

from .shaping_common import load_active, load_entropy


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit(do_not_specialize=["seq_len"])
def sequence_mean_entropy_kernel(
    # pointers
    entropy_ptr,
    mask_ptr,
    out_ptr,
    # shapes
    seq_len,
    # strides
    stride_entropy_row,
    stride_entropy_t,
    stride_mask_row,
    stride_mask_t,
    # constants
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK_T], dtype=tl.float64)
    count = tl.zeros([BLOCK_T], dtype=tl.float64)
    for t0 in range(0, seq_len, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        active = load_active(
            mask_ptr, row, offs_t, offs_t < seq_len, stride_mask_row, stride_mask_t, HAS_MASK
        )
        # An infinite entropy propagates as NaN (1 / inf would turn it into a number).
        h = load_entropy(entropy_ptr, row, offs_t, active, stride_entropy_row, stride_entropy_t)
        total += h.to(tl.float64)
        count += active.to(tl.float64)
    tl.store(out_ptr + row, tl.sum(total, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0))
