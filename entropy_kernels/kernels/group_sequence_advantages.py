"""Per-group z-scores of sequence rewards: GRPO, and GRPO-S on its Eq. 9 rewards.

One program per group slot, sweeping the group's rows in blocks of `BLOCK_R`; all arithmetic
in float64 (see :mod:`.shaping_common` for the row layout and the `r = base + s` split).
"""

import triton
import triton.language as tl

from .shaping_common import accumulate_set_sums, outcome_sets, shaping_term


@triton.jit
def load_sequences(k, offs_r, start, size, scores_ptr, rewards_ptr, row_order_ptr):
    """Rows `k + offs_r` of the group: (in_group, rows, float64 score, float64 reward or
    outcome, success, failure)."""
    in_group = k + offs_r < size
    rows = tl.load(row_order_ptr + start + k + offs_r, mask=in_group, other=0)
    score = tl.load(scores_ptr + rows, mask=in_group, other=0.0).to(tl.float64)
    reward = tl.load(rewards_ptr + rows, mask=in_group, other=0.0).to(tl.float64)
    success, failure = outcome_sets(in_group, reward)
    return in_group, rows, score, reward, success, failure


@triton.jit
def group_sequence_advantages_kernel(
    # pointers
    scores_ptr,
    rewards_ptr,
    row_order_ptr,
    group_start_ptr,
    group_size_ptr,
    out_ptr,
    # constants
    base,
    beta2,
    eps,
    SHAPE_BY_ENTROPY: tl.constexpr,
    ZSCORE: tl.constexpr,
    SCALE_BY_STD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    group = tl.program_id(0)
    start = tl.load(group_start_ptr + group)
    size = tl.load(group_size_ptr + group)  # 0 for the unused group slots of an id tensor
    offs_r = tl.arange(0, BLOCK_R)

    acc_n_success = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_sum_success = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_n_failure = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_sum_inv_failure = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_s = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_centred = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_m2 = tl.zeros([BLOCK_R], dtype=tl.float64)
    # The group statistics, set between the sweeps that need them.
    n_success, sum_success, n_failure, sum_inv_failure, n_rows = 0.0, 0.0, 0.0, 0.0, 1.0
    mean_s, mean_correction, std = 0.0, 0.0, 0.0

    # Sweeps over the group's rows, each compiled on its own (a constexpr loop): 0 takes the
    # success / failure counts and the Eq. 9 sums (GRPO-S); 1 the mean of the shaping term s
    # (GRPO: of the reward itself); 2 the centred sums; 3 writes the z-score, or without
    # ZSCORE (sweeps 0 and 3 only) the Eq. 9 rewards themselves, r = +-base + s.
    for sweep in tl.static_range(0, 4, 1 if ZSCORE else 3):
        for k in range(0, size, BLOCK_R):
            in_group, rows, score, reward, success, failure = load_sequences(
                k, offs_r, start, size, scores_ptr, rewards_ptr, row_order_ptr
            )
            if sweep == 0:
                acc_n_success, acc_sum_success, acc_n_failure, acc_sum_inv_failure = (
                    accumulate_set_sums(
                        acc_n_success,
                        acc_sum_success,
                        acc_n_failure,
                        acc_sum_inv_failure,
                        score,
                        success,
                        failure,
                        eps,
                    )
                )
            else:
                if SHAPE_BY_ENTROPY:
                    s = shaping_term(
                        score,
                        reward,
                        success,
                        failure,
                        n_success,
                        sum_success,
                        n_failure,
                        sum_inv_failure,
                        beta2,
                        eps,
                    )
                    # r - mean(r) for r = +-base + s, with the centred base in closed form:
                    # 2 * base * m / (n + m) on successes, -2 * base * n / (n + m) on failures.
                    # It is exactly 0 in a group of one kind, which so keeps the precision of s.
                    centred_base = (
                        tl.where(success, 2.0 * base * n_failure, -2.0 * base * n_success) / n_rows
                    )
                else:
                    s = reward
                if not ZSCORE:
                    r = tl.where(success, base + s, -base + s)
                    tl.store(out_ptr + rows, r.to(tl.float32), mask=in_group)
                elif sweep == 1:
                    acc_s += tl.where(in_group, s, 0.0)
                else:
                    centred = centred_base + (s - mean_s) if SHAPE_BY_ENTROPY else reward - mean_s
                    if sweep == 2:
                        acc_centred += tl.where(in_group, centred, 0.0)
                        acc_m2 += tl.where(in_group, centred * centred, 0.0)
                    else:
                        # A group of one row has no spread: 0 (times its value, so NaN shows).
                        centred = centred - mean_correction
                        scaled = centred / (std + eps) if SCALE_BY_STD else centred
                        advantage = tl.where(size >= 2, scaled, centred * 0.0)
                        tl.store(out_ptr + rows, advantage.to(tl.float32), mask=in_group)
        if sweep == 0:
            n_success = tl.sum(acc_n_success, axis=0)
            sum_success = tl.sum(acc_sum_success, axis=0)
            n_failure = tl.sum(acc_n_failure, axis=0)
            sum_inv_failure = tl.sum(acc_sum_inv_failure, axis=0)
            n_rows = tl.maximum(n_success + n_failure, 1.0)
        if sweep == 1:
            mean_s = tl.sum(acc_s, axis=0) / n_rows
        if sweep == 2:
            # Corrected two-pass: the sum of the centred values removes the rounding of the
            # mean, so a group of equal rewards gets exactly 0, not ulp / eps.
            sum_centred = tl.sum(acc_centred, axis=0)
            mean_correction = sum_centred / n_rows
            m2 = tl.maximum(tl.sum(acc_m2, axis=0) - sum_centred * mean_correction, 0.0)
            std = tl.sqrt(m2 / tl.maximum(n_rows - 1.0, 1.0))
