"""GTPO shaped token rewards (Eq. 3, 5), or their shaping terms and whitening moments (Eq. 6).

One program per (group slot, block of positions). The row layout, the `r = base + s` split, the
outcome encoding and the float64 sums are described in :mod:`.shaping_common`.
"""

import triton
import triton.language as tl

from .shaping_common import (
    accumulate_set_sums,
    load_active,
    load_entropy,
    outcome_sets,
    shaping_term,
)


@triton.jit
def load_token_row(
    row,
    offs_t,
    in_seq,
    entropy_ptr,
    mask_ptr,
    outcomes_ptr,
    stride_entropy_row,
    stride_entropy_t,
    stride_mask_row,
    stride_mask_t,
    HAS_MASK: tl.constexpr,
):
    """One row's block: (outcome, success-active, failure-active, float64 entropy)."""
    # The outcome is broadcast to a block: the interpreter cannot `&` a scalar bool with a block.
    outcome = tl.zeros(offs_t.shape, dtype=tl.float32) + tl.load(outcomes_ptr + row)
    # Outcome 0 marks a row of a filtered (uniform) group: it takes part in nothing.
    active = load_active(
        mask_ptr, row, offs_t, in_seq & (outcome != 0.0), stride_mask_row, stride_mask_t, HAS_MASK
    )
    h = load_entropy(entropy_ptr, row, offs_t, active, stride_entropy_row, stride_entropy_t)
    success, failure = outcome_sets(active, outcome)
    return outcome, success, failure, h.to(tl.float64)


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit(do_not_specialize=["seq_len"])
def gtpo_token_rewards_kernel(
    # pointers
    entropy_ptr,
    mask_ptr,
    outcomes_ptr,
    row_order_ptr,
    group_start_ptr,
    group_size_ptr,
    out_ptr,
    moments_ptr,
    # shapes
    seq_len,
    # strides
    stride_entropy_row,
    stride_entropy_t,
    stride_mask_row,
    stride_mask_t,
    stride_out_row,
    stride_moments_group,
    stride_moments_block,
    # constants
    base,
    alpha2,
    eps,
    HAS_MASK: tl.constexpr,
    WITH_MOMENTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    group = tl.program_id(0)
    t_block = tl.program_id(1)
    offs_t = t_block.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_seq = offs_t < seq_len
    start = tl.load(group_start_ptr + group)
    size = tl.load(group_size_ptr + group)  # 0 for the unused group slots of an id tensor

    # Per position: the group's success rows (count d_t, sum H) and failure rows (count h_t,
    # sum 1/(H+eps)), in float64 (shaping_common); per set: the sums of s and of its squares.
    n_success = tl.zeros([BLOCK_T], dtype=tl.float32)
    sum_h_success = tl.zeros([BLOCK_T], dtype=tl.float64)
    n_failure = tl.zeros([BLOCK_T], dtype=tl.float32)
    sum_inv_failure = tl.zeros([BLOCK_T], dtype=tl.float64)
    sum_s_success = tl.zeros([BLOCK_T], dtype=tl.float32)
    sum_s_failure = tl.zeros([BLOCK_T], dtype=tl.float32)
    m2_success = tl.zeros([BLOCK_T], dtype=tl.float32)
    m2_failure = tl.zeros([BLOCK_T], dtype=tl.float32)
    # This block's mean of s in each set, set after sweep 1.
    mean_success, mean_failure = 0.0, 0.0

    # Sweeps over the group's rows, each compiled on its own (a constexpr loop): 0 takes the
    # per-position sums; 1 writes r = base + s, or only s when it is to be whitened, and sums s
    # per set; 2 (moments only) sums the squares of s about this block's mean of its set (two
    # passes for accuracy; blocks and groups are merged afterwards with Chan's formula).
    for sweep in tl.static_range(3 if WITH_MOMENTS else 2):
        for k in range(0, size):
            row = tl.load(row_order_ptr + start + k).to(tl.int64)
            outcome, success, failure, h = load_token_row(
                row,
                offs_t,
                in_seq,
                entropy_ptr,
                mask_ptr,
                outcomes_ptr,
                stride_entropy_row,
                stride_entropy_t,
                stride_mask_row,
                stride_mask_t,
                HAS_MASK,
            )
            if sweep == 0:
                n_success, sum_h_success, n_failure, sum_inv_failure = accumulate_set_sums(
                    n_success, sum_h_success, n_failure, sum_inv_failure, h, success, failure, eps
                )
            else:
                s = shaping_term(
                    h,
                    outcome,
                    success,
                    failure,
                    n_success,
                    sum_h_success,
                    n_failure,
                    sum_inv_failure,
                    alpha2,
                    eps,
                ).to(tl.float32)
                if sweep == 1:
                    if WITH_MOMENTS:
                        sum_s_success += tl.where(success, s, 0.0)
                        sum_s_failure += tl.where(failure, s, 0.0)
                        out = s
                    else:
                        out = tl.where(success, base + s, tl.where(failure, -base + s, 0.0))
                    tl.store(out_ptr + row * stride_out_row + offs_t, out, mask=in_seq)
                else:
                    m2_success += tl.where(success, (s - mean_success) * (s - mean_success), 0.0)
                    m2_failure += tl.where(failure, (s - mean_failure) * (s - mean_failure), 0.0)
        if sweep == 1:
            count_success = tl.sum(n_success, axis=0)
            count_failure = tl.sum(n_failure, axis=0)
            mean_success = tl.sum(sum_s_success, axis=0) / tl.maximum(count_success, 1.0)
            mean_failure = tl.sum(sum_s_failure, axis=0) / tl.maximum(count_failure, 1.0)

    if WITH_MOMENTS:
        # Per (group, block): failure (count, mean, m2), then success (count, mean, m2).
        moments = (
            moments_ptr
            + group.to(tl.int64) * stride_moments_group
            + t_block.to(tl.int64) * stride_moments_block
        )
        tl.store(moments + 0, count_failure)
        tl.store(moments + 1, mean_failure)
        tl.store(moments + 2, tl.sum(m2_failure, axis=0))
        tl.store(moments + 3, count_success)
        tl.store(moments + 4, mean_success)
        tl.store(moments + 5, tl.sum(m2_success, axis=0))
