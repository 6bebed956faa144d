"""In-place Eq. 6 whitening of token values with per-row constants:
`values[i, t] = (values[i, t] - row_mean[i]) * row_scale[i]` where active, 0 elsewhere.

One program per (row, block of positions); the constants come from the moments that
:mod:`.gtpo_token_rewards` writes (merged on the host side in `entropy_kernels.advantages`).
"""

import triton
import triton.language as tl

from .shaping_common import load_active


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit(do_not_specialize=["seq_len"])
def whiten_rows_kernel(
    # pointers
    values_ptr,
    mask_ptr,
    row_mean_ptr,
    row_scale_ptr,
    # shapes
    seq_len,
    # strides
    stride_values_row,
    stride_mask_row,
    stride_mask_t,
    # constants
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_seq = offs_t < seq_len
    active = load_active(mask_ptr, row, offs_t, in_seq, stride_mask_row, stride_mask_t, HAS_MASK)
    mean = tl.load(row_mean_ptr + row)
    scale = tl.load(row_scale_ptr + row)
    values = tl.load(values_ptr + row * stride_values_row + offs_t, mask=in_seq, other=0.0)
    tl.store(
        values_ptr + row * stride_values_row + offs_t,
        tl.where(active, (values - mean) * scale, 0.0),
        mask=in_seq,
    )
