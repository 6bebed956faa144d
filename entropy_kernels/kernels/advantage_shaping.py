"""Triton kernels for GTPO / GRPO-S advantage shaping (arXiv 2508.04349, Eq. 3, 5, 6, 8, 9).

Rows are visited group by group through a permutation `row_order` that lists each group's
rows contiguously, with per-group `group_start` / `group_size` arrays on the device, so both
group forms (consecutive groups of G rows, or unsorted ids) run through the same kernels
without a host synchronisation. Every sum is accumulated in a fixed order by one program:
no float atomics, so results are bitwise reproducible.

Each shaped reward is split as `r = base + s`, with `base = +(alpha1 + alpha2)` on success
rows and `-(alpha1 + alpha2)` on failure rows (GRPO-S: the betas), and `s` the deviation that
the entropy makes, e.g. `s = alpha2 * ((d_t H - sum H) - eps) / (sum H + eps)` on successes.
`d_t H - sum H` is exactly 0 for a row alone in its set at `t`, so `s = -alpha2 eps / (H + eps)`
keeps its full relative precision: when every set holds one row per group (groups of two, say),
whitening divides spreads of order `alpha2 * eps` by `sqrt(var + 1e-8)`, and computing `r` first
would leave only float32 rounding noise to divide. The whitening works on `s` and adds the
(exactly known) centred base back: within one set `base` is constant and cancels exactly.

The sums of entropies and the shaping terms are computed in float64 and `s` is rounded to
float32 once. Rows whose entropies (GTPO) or mean entropies (GRPO-S) nearly tie, agreeing to
1e-6 .. 1e-4 relative, give terms `d_t H - sum H` or shaped rewards whose spread is of the order
of `eps`, which whitening magnifies: a float32 sum of the entropies rounds away most of that
spread (errors up to 3e-4 in the advantages, tests/test_advantages.py). The extra cost is
float64 arithmetic on [B, T] or [B] values, nothing next to the logits.

Rows arrive as outcomes, not rewards: +1 for a success, -1 for a failure (decided by the
launcher in the rewards' own dtype), NaN for a reward that is not finite, which poisons its
row's outputs, and 0 for a row of a group that `filter_groups` removes (inactive everywhere).
An infinite entropy is read as NaN, so it propagates too instead of becoming
`1 / inf = 0`.

The plain loop-style definitions these kernels implement are in
`entropy_kernels/reference/advantages.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Moments per (group slot, position block, set): active count, mean of s, centred sum of squares.
MOMENT_FIELDS = 3
# Set index in the moments tensor (the kernel hard-codes this layout).
FAILURE_SET, SUCCESS_SET = 0, 1
# Rows per step of the sequence-level kernel's loops.
SEQUENCE_BLOCK_ROWS = 64


@triton.jit
def _load_row(
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
    # The outcome is broadcast to a block: the interpreter cannot `&` a scalar bool with a block.
    outcome = tl.zeros(offs_t.shape, dtype=tl.float32) + tl.load(outcomes_ptr + row)
    # Outcome 0 marks a row of a filtered (uniform) group: it takes part in nothing.
    active = in_seq & (outcome != 0.0)
    if HAS_MASK:
        mask = tl.load(
            mask_ptr + row * stride_mask_row + offs_t * stride_mask_t, mask=in_seq, other=0
        )
        active = active & (mask != 0)
    h = tl.load(
        entropy_ptr + row * stride_entropy_row + offs_t * stride_entropy_t, mask=active, other=0.0
    ).to(tl.float32)
    return outcome, active, tl.where(tl.abs(h) == float("inf"), float("nan"), h)


@triton.jit
def _excess_share(count, value, total, eps):
    """``count * value / (total + eps) - 1``, written so that a value alone in its sum (``count``
    1, ``total`` == ``value``) gives exactly ``-eps / (total + eps)``: see the module docstring."""
    return ((count * value - total) - eps) / (total + eps)


@triton.jit
def _token_shaping_term(
    h,
    outcome,
    success_active,
    failure_active,
    n_success,
    sum_h_success,
    n_failure,
    sum_inv_failure,
    alpha2,
    eps,
):
    # s = r - base of Eq. 3 (successes) and Eq. 5 (failures); inactive positions get 0.
    # float64 up to here (module docstring), float32 from here on.
    h = h.to(tl.float64)
    success_term = alpha2 * _excess_share(n_success, h, sum_h_success, eps)
    failure_term = -alpha2 * _excess_share(n_failure, 1.0 / (h + eps), sum_inv_failure, eps)
    s = tl.where(success_active, success_term, tl.where(failure_active, failure_term, 0.0))
    # A NaN outcome is neither success nor failure: it poisons the row's active tokens.
    return tl.where(failure_active & (outcome != outcome), outcome, s.to(tl.float32))


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit(do_not_specialize=["seq_len"])
def _gtpo_token_rewards_kernel(
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

    # Pass 1: per-position sums over the group's success rows (d_t, sum H) and failure
    # rows (h_t, sum 1/(H+eps)).
    n_success = tl.zeros([BLOCK_T], dtype=tl.float32)
    sum_h_success = tl.zeros([BLOCK_T], dtype=tl.float64)
    n_failure = tl.zeros([BLOCK_T], dtype=tl.float32)
    sum_inv_failure = tl.zeros([BLOCK_T], dtype=tl.float64)
    for k in range(0, size):
        row = tl.load(row_order_ptr + start + k).to(tl.int64)
        outcome, active, h = _load_row(
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
        success_active = active & (outcome > 0.0)
        failure_active = active & ((outcome > 0.0) == 0)
        n_success += success_active.to(tl.float32)
        sum_h_success += tl.where(success_active, h.to(tl.float64), 0.0)
        n_failure += failure_active.to(tl.float32)
        sum_inv_failure += tl.where(failure_active, 1.0 / (h.to(tl.float64) + eps), 0.0)

    # Pass 2: write r = base + s, or only s when it is to be whitened, and sum s per set.
    sum_s_success = tl.zeros([BLOCK_T], dtype=tl.float32)
    sum_s_failure = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k in range(0, size):
        row = tl.load(row_order_ptr + start + k).to(tl.int64)
        outcome, active, h = _load_row(
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
        success_active = active & (outcome > 0.0)
        failure_active = active & ((outcome > 0.0) == 0)
        s = _token_shaping_term(
            h,
            outcome,
            success_active,
            failure_active,
            n_success,
            sum_h_success,
            n_failure,
            sum_inv_failure,
            alpha2,
            eps,
        )
        if WITH_MOMENTS:
            sum_s_success += tl.where(success_active, s, 0.0)
            sum_s_failure += tl.where(failure_active, s, 0.0)
            out = s
        else:
            out = tl.where(success_active, base + s, tl.where(failure_active, -base + s, 0.0))
        tl.store(out_ptr + row * stride_out_row + offs_t, out, mask=in_seq)

    if WITH_MOMENTS:
        # Pass 3: centred sums of squares about this block's mean (two passes for accuracy);
        # blocks and groups are merged afterwards with Chan's formula.
        count_success = tl.sum(n_success, axis=0)
        count_failure = tl.sum(n_failure, axis=0)
        mean_success = tl.sum(sum_s_success, axis=0) / tl.maximum(count_success, 1.0)
        mean_failure = tl.sum(sum_s_failure, axis=0) / tl.maximum(count_failure, 1.0)
        m2_success = tl.zeros([BLOCK_T], dtype=tl.float32)
        m2_failure = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k in range(0, size):
            row = tl.load(row_order_ptr + start + k).to(tl.int64)
            outcome, active, h = _load_row(
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
            success_active = active & (outcome > 0.0)
            failure_active = active & ((outcome > 0.0) == 0)
            s = _token_shaping_term(
                h,
                outcome,
                success_active,
                failure_active,
                n_success,
                sum_h_success,
                n_failure,
                sum_inv_failure,
                alpha2,
                eps,
            )
            m2_success += tl.where(success_active, (s - mean_success) * (s - mean_success), 0.0)
            m2_failure += tl.where(failure_active, (s - mean_failure) * (s - mean_failure), 0.0)
        # Per (group, block): failure (count, mean, m2), then success (count, mean, m2).
        base = (
            moments_ptr
            + group.to(tl.int64) * stride_moments_group
            + t_block.to(tl.int64) * stride_moments_block
        )
        tl.store(base + 0, count_failure)
        tl.store(base + 1, mean_failure)
        tl.store(base + 2, tl.sum(m2_failure, axis=0))
        tl.store(base + 3, count_success)
        tl.store(base + 4, mean_success)
        tl.store(base + 5, tl.sum(m2_success, axis=0))


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit(do_not_specialize=["seq_len"])
def _whiten_rows_kernel(
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
    active = in_seq
    if HAS_MASK:
        mask = tl.load(
            mask_ptr + row * stride_mask_row + offs_t * stride_mask_t, mask=in_seq, other=0
        )
        active = active & (mask != 0)
    mean = tl.load(row_mean_ptr + row)
    scale = tl.load(row_scale_ptr + row)
    values = tl.load(values_ptr + row * stride_values_row + offs_t, mask=in_seq, other=0.0)
    tl.store(
        values_ptr + row * stride_values_row + offs_t,
        tl.where(active, (values - mean) * scale, 0.0),
        mask=in_seq,
    )


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit(do_not_specialize=["seq_len"])
def _sequence_mean_entropy_kernel(
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
    # float64: two rows' means may nearly tie (see the module docstring).
    total = tl.zeros([BLOCK_T], dtype=tl.float64)
    count = tl.zeros([BLOCK_T], dtype=tl.float64)
    for t0 in range(0, seq_len, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        active = offs_t < seq_len
        if HAS_MASK:
            mask = tl.load(
                mask_ptr + row * stride_mask_row + offs_t * stride_mask_t, mask=active, other=0
            )
            active = active & (mask != 0)
        h = tl.load(
            entropy_ptr + row * stride_entropy_row + offs_t * stride_entropy_t,
            mask=active,
            other=0.0,
        ).to(tl.float32)
        # An infinite entropy propagates as NaN (1 / inf would turn it into a number).
        total += tl.where(tl.abs(h) == float("inf"), float("nan"), h).to(tl.float64)
        count += active.to(tl.float64)
    # Eq. 8; a row without active tokens gets 0 rather than 0/0.
    tl.store(out_ptr + row, tl.sum(total, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0))


@triton.jit
def _load_sequences(
    k,
    offs_r,
    start,
    size,
    scores_ptr,
    rewards_ptr,
    row_order_ptr,
):
    in_group = k + offs_r < size
    rows = tl.load(row_order_ptr + start + k + offs_r, mask=in_group, other=0)
    # Sequence-level arithmetic runs in float64 (see group_sequence_advantages).
    score = tl.load(scores_ptr + rows, mask=in_group, other=0.0).to(tl.float64)
    reward = tl.load(rewards_ptr + rows, mask=in_group, other=0.0).to(tl.float64)
    success = in_group & (reward > 0.0)
    failure = in_group & ((reward > 0.0) == 0)
    return in_group, rows, score, reward, success, failure


@triton.jit
def _sequence_shaping_term(
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
):
    # s = r - base of Eq. 9 on the sequence-mean entropies; a NaN outcome poisons its row.
    success_term = beta2 * _excess_share(n_success, score, sum_success, eps)
    failure_term = -beta2 * _excess_share(n_failure, 1.0 / (score + eps), sum_inv_failure, eps)
    s = tl.where(success, success_term, tl.where(failure, failure_term, 0.0))
    return tl.where(failure & (reward != reward), reward, s)


@triton.jit
def _centred_sequence_reward(
    score,
    reward,
    success,
    failure,
    n_success,
    sum_success,
    n_failure,
    sum_inv_failure,
    n_rows,
    mean_s,
    base,
    beta2,
    eps,
    SHAPE_BY_ENTROPY: tl.constexpr,
):
    if SHAPE_BY_ENTROPY:
        # r - mean(r) for r = +-base + s, with the centred base in closed form:
        # 2 * base * m / (n + m) on successes, -2 * base * n / (n + m) on failures.
        # It is exactly 0 in a group of one kind, which so keeps the precision of s.
        s = _sequence_shaping_term(
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
        centred_base = tl.where(success, 2.0 * base * n_failure, -2.0 * base * n_success) / n_rows
        centred = centred_base + (s - mean_s)
    else:
        centred = reward - mean_s
    return centred


@triton.jit
def _group_sequence_advantages_kernel(
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

    # Pass 1: success / failure counts and the Eq. 9 sums (GRPO-S), or the plain sum (GRPO).
    acc_n_success = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_sum_success = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_n_failure = tl.zeros([BLOCK_R], dtype=tl.float64)
    acc_sum_inv_failure = tl.zeros([BLOCK_R], dtype=tl.float64)
    for k in range(0, size, BLOCK_R):
        in_group, rows, score, reward, success, failure = _load_sequences(
            k, offs_r, start, size, scores_ptr, rewards_ptr, row_order_ptr
        )
        acc_n_success += success.to(tl.float64)
        acc_sum_success += tl.where(success, score, 0.0)
        acc_n_failure += failure.to(tl.float64)
        acc_sum_inv_failure += tl.where(failure, 1.0 / (score + eps), 0.0)
    n_success = tl.sum(acc_n_success, axis=0)
    sum_success = tl.sum(acc_sum_success, axis=0)
    n_failure = tl.sum(acc_n_failure, axis=0)
    sum_inv_failure = tl.sum(acc_sum_inv_failure, axis=0)
    n_rows = tl.maximum(n_success + n_failure, 1.0)

    if not ZSCORE:
        # The Eq. 9 rewards themselves, r = +-base + s.
        for k in range(0, size, BLOCK_R):
            in_group, rows, score, reward, success, failure = _load_sequences(
                k, offs_r, start, size, scores_ptr, rewards_ptr, row_order_ptr
            )
            s = _sequence_shaping_term(
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
            r = tl.where(success, base + s, -base + s)
            tl.store(out_ptr + rows, r.to(tl.float32), mask=in_group)
    else:
        # Pass 2: the mean of the shaping term (GRPO: of the reward itself).
        acc_s = tl.zeros([BLOCK_R], dtype=tl.float64)
        for k in range(0, size, BLOCK_R):
            in_group, rows, score, reward, success, failure = _load_sequences(
                k, offs_r, start, size, scores_ptr, rewards_ptr, row_order_ptr
            )
            if SHAPE_BY_ENTROPY:
                s = _sequence_shaping_term(
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
            else:
                s = reward
            acc_s += tl.where(in_group, s, 0.0)
        mean_s = tl.sum(acc_s, axis=0) / n_rows

        # Pass 3: centred sums (corrected two-pass: the sum of the centred values removes the
        # rounding of the mean, so a group of equal rewards gets exactly 0, not ulp / eps).
        acc_centred = tl.zeros([BLOCK_R], dtype=tl.float64)
        acc_m2 = tl.zeros([BLOCK_R], dtype=tl.float64)
        for k in range(0, size, BLOCK_R):
            in_group, rows, score, reward, success, failure = _load_sequences(
                k, offs_r, start, size, scores_ptr, rewards_ptr, row_order_ptr
            )
            centred = _centred_sequence_reward(
                score,
                reward,
                success,
                failure,
                n_success,
                sum_success,
                n_failure,
                sum_inv_failure,
                n_rows,
                mean_s,
                base,
                beta2,
                eps,
                SHAPE_BY_ENTROPY,
            )
            acc_centred += tl.where(in_group, centred, 0.0)
            acc_m2 += tl.where(in_group, centred * centred, 0.0)
        sum_centred = tl.sum(acc_centred, axis=0)
        mean_correction = sum_centred / n_rows
        m2 = tl.maximum(tl.sum(acc_m2, axis=0) - sum_centred * mean_correction, 0.0)
        std = tl.sqrt(m2 / tl.maximum(n_rows - 1.0, 1.0))

        # Pass 4: the z-score; a group of one row has no spread: 0 (times its value, so NaN shows).
        for k in range(0, size, BLOCK_R):
            in_group, rows, score, reward, success, failure = _load_sequences(
                k, offs_r, start, size, scores_ptr, rewards_ptr, row_order_ptr
            )
            centred = _centred_sequence_reward(
                score,
                reward,
                success,
                failure,
                n_success,
                sum_success,
                n_failure,
                sum_inv_failure,
                n_rows,
                mean_s,
                base,
                beta2,
                eps,
                SHAPE_BY_ENTROPY,
            )
            centred = centred - mean_correction
            scaled = centred / (std + eps) if SCALE_BY_STD else centred
            advantage = tl.where(size >= 2, scaled, centred * 0.0)
            tl.store(out_ptr + rows, advantage.to(tl.float32), mask=in_group)


def _block_t(seq_len: int) -> int:
    return min(max(triton.next_power_of_2(seq_len), 16), 512)


def _mask_args(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    if mask is None:
        return None, 0, 0
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads it as integers
    return mask, mask.stride(0), mask.stride(1)


def _check_layout(rewards, row_order, group_start, group_size) -> None:
    batch = rewards.shape[0]
    if rewards.dtype != torch.float32 or rewards.shape != (batch,) or rewards.stride(0) != 1:
        raise ValueError(
            f"rewards must be a contiguous float32 [{batch}], got {rewards.dtype} "
            f"{tuple(rewards.shape)}"
        )
    for name, tensor in (
        ("row_order", row_order),
        ("group_start", group_start),
        ("group_size", group_size),
    ):
        if tensor.dtype != torch.int64 or tensor.dim() != 1 or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 vector")
        if tensor.device != rewards.device:
            raise ValueError(f"{name} must be on {rewards.device}, got {tensor.device}")
    if row_order.shape[0] != batch or group_start.shape != group_size.shape:
        raise ValueError(
            "row_order must have one entry per row, and group_start / group_size "
            "one entry per group slot"
        )


def _check_token_tensors(entropy: torch.Tensor, mask: torch.Tensor | None, batch: int) -> None:
    if entropy.dim() != 2 or entropy.shape[0] != batch:
        raise ValueError(f"entropy must have shape [{batch}, T], got {tuple(entropy.shape)}")
    if mask is not None and mask.shape != entropy.shape:
        raise ValueError(f"mask must have shape {tuple(entropy.shape)}, got {tuple(mask.shape)}")


def gtpo_token_rewards(
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    outcomes: torch.Tensor,
    row_order: torch.Tensor,
    group_start: torch.Tensor,
    group_size: torch.Tensor,
    *,
    base: float,
    alpha2: float,
    eps: float,
    with_moments: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GTPO shaped token rewards (Eq. 3, 5), or their shaping terms and whitening moments.

    entropy: [B, T] floating (any strides); mask: [B, T] bool / number (nonzero = active) or
    None (all active); outcomes: [B] float32, +1 success, -1 failure, NaN poisons the row,
    0 makes it inactive;
    base: alpha1 + alpha2; row_order [B] and group_start / group_size [S] int64 describe S
    group slots (unused slots have size 0).

    Without `with_moments`: returns (r [B, T] float32, None), r = 0 at inactive positions.
    With it: returns (s [B, T] float32, the shaping term r - base), and moments
    [S, cdiv(T, BLOCK_T), 2, 3] float32: (count, mean of s, centred sum of squares of s) of
    each group's failure (index 0) and success (index 1) tokens in each position block.
    """
    _check_layout(outcomes, row_order, group_start, group_size)
    _check_token_tensors(entropy, mask, outcomes.shape[0])
    batch, seq_len = entropy.shape
    slots = group_start.shape[0]
    block_t = _block_t(seq_len)
    t_blocks = triton.cdiv(seq_len, block_t)
    out = torch.empty((batch, seq_len), dtype=torch.float32, device=entropy.device)
    moments = None
    if with_moments:
        moments = torch.zeros(
            (slots, t_blocks, 2, MOMENT_FIELDS), dtype=torch.float32, device=entropy.device
        )
    if batch == 0 or seq_len == 0:
        return out, moments
    mask_arg, stride_mask_row, stride_mask_t = _mask_args(mask)
    _gtpo_token_rewards_kernel[(slots, t_blocks)](
        entropy,
        mask_arg,
        outcomes,
        row_order,
        group_start,
        group_size,
        out,
        moments if moments is not None else out,
        seq_len,
        entropy.stride(0),
        entropy.stride(1),
        stride_mask_row,
        stride_mask_t,
        out.stride(0),
        moments.stride(0) if moments is not None else 0,
        moments.stride(1) if moments is not None else 0,
        float(base),
        float(alpha2),
        float(eps),
        WITH_MOMENTS=with_moments,
        BLOCK_T=block_t,
    )
    return out, moments


def whiten_rows_(
    values: torch.Tensor,
    mask: torch.Tensor | None,
    row_mean: torch.Tensor,
    row_scale: torch.Tensor,
) -> torch.Tensor:
    """In place: `values[i, t] = (values[i, t] - row_mean[i]) * row_scale[i]` where active, else 0.

    values: [B, T] float32 with unit stride along T; mask: [B, T] or None (all active);
    row_mean / row_scale: contiguous [B] float32. Returns `values`.
    """
    batch, seq_len = values.shape
    if values.dtype != torch.float32 or values.stride(1) != 1:
        raise ValueError("values must be float32 with unit stride along T")
    for name, tensor in (("row_mean", row_mean), ("row_scale", row_scale)):
        if tensor.dtype != torch.float32 or tensor.shape != (batch,) or tensor.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous float32 [{batch}]")
    _check_token_tensors(values, mask, batch)
    if batch == 0 or seq_len == 0:
        return values
    block_t = _block_t(seq_len)
    mask_arg, stride_mask_row, stride_mask_t = _mask_args(mask)
    _whiten_rows_kernel[(batch, triton.cdiv(seq_len, block_t))](
        values,
        mask_arg,
        row_mean,
        row_scale,
        seq_len,
        values.stride(0),
        stride_mask_row,
        stride_mask_t,
        BLOCK_T=block_t,
    )
    return values


def sequence_mean_entropy(entropy: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. 8: mean entropy over each row's active positions; [B] float64, 0 for empty rows."""
    _check_token_tensors(entropy, mask, entropy.shape[0] if entropy.dim() == 2 else -1)
    batch, seq_len = entropy.shape
    out = torch.zeros(batch, dtype=torch.float64, device=entropy.device)
    if batch == 0 or seq_len == 0:
        return out
    mask_arg, stride_mask_row, stride_mask_t = _mask_args(mask)
    _sequence_mean_entropy_kernel[(batch,)](
        entropy,
        mask_arg,
        out,
        seq_len,
        entropy.stride(0),
        entropy.stride(1),
        stride_mask_row,
        stride_mask_t,
        BLOCK_T=_block_t(seq_len),
    )
    return out


def group_sequence_advantages(
    scores: torch.Tensor,
    rewards: torch.Tensor,
    row_order: torch.Tensor,
    group_start: torch.Tensor,
    group_size: torch.Tensor,
    *,
    shape_by_entropy: bool,
    scale_by_std: bool,
    zscore: bool = True,
    base: float = 1.1,
    beta2: float = 0.1,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-group z-scores of sequence rewards; [B] float32.

    With `shape_by_entropy` the rewards are GRPO-S's (Eq. 9) built from `scores`, the
    sequence-mean entropies [B] float64 (or float32), and `rewards` holds outcomes (+1 success,
    -1 failure, NaN poisons the row; `base` = beta1 + beta2); otherwise they are `rewards`
    themselves (GRPO) and `scores` is not read. `scale_by_std=False` only centres (Dr. GRPO).
    A group of one row gets 0. `zscore=False` (with `shape_by_entropy`) returns the Eq. 9
    rewards themselves.

    The arithmetic runs in float64 (see the module docstring).
    """
    _check_layout(rewards, row_order, group_start, group_size)
    batch = rewards.shape[0]
    floating = (torch.float32, torch.float64)
    if scores.dtype not in floating or scores.shape != (batch,) or scores.stride(0) != 1:
        raise ValueError(f"scores must be a contiguous float32 or float64 [{batch}]")
    out = torch.empty(batch, dtype=torch.float32, device=rewards.device)
    slots = group_start.shape[0]
    if batch == 0:
        return out
    _group_sequence_advantages_kernel[(slots,)](
        scores,
        rewards,
        row_order,
        group_start,
        group_size,
        out,
        float(base),
        float(beta2),
        float(eps),
        SHAPE_BY_ENTROPY=shape_by_entropy,
        ZSCORE=zscore,
        SCALE_BY_STD=scale_by_std,
        BLOCK_R=SEQUENCE_BLOCK_ROWS,
    )
    return out
