"""Jit helpers shared by the GTPO / GRPO-S advantage-shaping kernels (arXiv 2508.04349).

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
An infinite entropy is read as NaN, so it propagates too instead of becoming `1 / inf = 0`.

The plain loop-style definitions these kernels implement are in
`entropy_kernels/reference/advantages.py`; the launchers in `entropy_kernels/ops`.
"""

import triton
import triton.language as tl


@triton.jit
def load_active(mask_ptr, row, offs_t, in_range, stride_mask_row, stride_mask_t, HAS_MASK):
    """Positions `offs_t` of `row` that are in range and, with a mask, nonzero in it."""
    active = in_range
    if HAS_MASK:
        mask = tl.load(
            mask_ptr + row * stride_mask_row + offs_t * stride_mask_t, mask=in_range, other=0
        )
        active = active & (mask != 0)
    return active


@triton.jit
def load_entropy(entropy_ptr, row, offs_t, active, stride_entropy_row, stride_entropy_t):
    """float32 entropies of `row` at its active positions (0 elsewhere), inf read as NaN."""
    h = tl.load(
        entropy_ptr + row * stride_entropy_row + offs_t * stride_entropy_t, mask=active, other=0.0
    ).to(tl.float32)
    return tl.where(tl.abs(h) == float("inf"), float("nan"), h)


@triton.jit
def outcome_sets(active, outcome):
    """(success, failure) members among `active`: a NaN outcome falls in the failure set, where
    :func:`shaping_term` lets it poison the row."""
    success = active & (outcome > 0.0)
    return success, active & ((outcome > 0.0) == 0)


@triton.jit
def accumulate_set_sums(
    n_success, sum_success, n_failure, sum_inv_failure, value, success, failure, eps
):
    """Adds one row's terms to the per-set sums of Eq. 3 / 5 (GRPO-S: Eq. 9): the success
    count and sum of `value`, the failure count and sum of `1 / (value + eps)`. The counts keep
    their accumulators' dtype; `value` is float64 (module docstring)."""
    n_success += success.to(n_success.dtype)
    sum_success += tl.where(success, value, 0.0)
    n_failure += failure.to(n_failure.dtype)
    sum_inv_failure += tl.where(failure, 1.0 / (value + eps), 0.0)
    return n_success, sum_success, n_failure, sum_inv_failure


@triton.jit
def excess_share(count, value, total, eps):
    """``count * value / (total + eps) - 1``, written so that a value alone in its sum (``count``
    1, ``total`` == ``value``) gives exactly ``-eps / (total + eps)``: see the module docstring."""
    return ((count * value - total) - eps) / (total + eps)


@triton.jit
def shaping_term(
    value, outcome, success, failure, n_success, sum_success, n_failure, sum_inv_failure, scale, eps
):
    """`s = r - base` of Eq. 3 / 5 (`value` = H, `scale` = alpha2) or Eq. 9 (`value` = the mean
    entropy, `scale` = beta2), in float64, 0 outside both sets; a NaN outcome poisons its row.
    """
    success_term = scale * excess_share(n_success, value, sum_success, eps)
    failure_term = -scale * excess_share(n_failure, 1.0 / (value + eps), sum_inv_failure, eps)
    s = tl.where(success, success_term, tl.where(failure, failure_term, 0.0))
    return tl.where(failure & (outcome != outcome), outcome, s)
