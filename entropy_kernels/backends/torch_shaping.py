"""The advantage-shaping launchers' torch twin (:mod:`entropy_kernels.ops.advantage_shaping`):
the same sums per (group, kind) set, vectorised with ``index_add``, on ``[B]`` / ``[B, T]``.

The shaping sums run in float64 (:func:`shaping_dtype`), as in the kernels; see
``kernels/shaping_common.py`` for the numerical design (the ``r = base + s`` split).
"""

from __future__ import annotations

import torch

from ..advantage_groups import GroupLayout, index_sum


def float_entropy(entropy: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Entropy in `dtype` with inf read as NaN, so that it propagates (1 / inf would be 0)."""
    h = entropy.to(dtype)
    return h.masked_fill(h.isinf(), float("nan"))


def excess_share(count, value, total, eps):
    """``count * value / (total + eps) - 1``, exactly ``-eps / (total + eps)`` for a value alone
    in its sum (see the kernel module's docstring)."""
    return ((count * value - total) - eps) / (total + eps)


def set_index(layout: GroupLayout, success: torch.Tensor) -> torch.Tensor:
    """[B]: each row's (group, kind) set, 2 * group + 1 for successes, 2 * group for failures."""
    return layout.index * 2 + success.long()


def set_sum(values: torch.Tensor, sets: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Sums of `values` ([B] or [B, T]) per (group, kind) set: [2 * capacity, ...]."""
    return index_sum(values, sets, layout.capacity * 2)


def torch_shaping_terms(entropy, active, outcomes, success, layout, alpha2, eps):
    """The shaping terms s = r - base of Eq. 3 / 5 (base = +-(alpha1 + alpha2), see the kernel
    module), float32 [B, T], 0 at inactive positions.

    Both equations are `+-alpha2 * (count * v / (sum v + eps) - 1)` over the row's set at the
    position, with `v = H` on successes and `1 / (H + eps)` on failures, so one pass of
    per-(group, kind, position) sums serves both. They run in float64 (the kernel module).
    """
    h = float_entropy(entropy, shaping_dtype(entropy.device))
    value = torch.where(active, torch.where(success[:, None], h, 1.0 / (h + eps)), 0.0)
    sets = set_index(layout, success)
    count = set_sum(active.to(h.dtype), sets, layout)[sets]
    total = set_sum(value, sets, layout)[sets]
    sign = torch.where(success, alpha2, -alpha2)[:, None]
    s = torch.where(active, sign * excess_share(count, value, total, eps), 0.0).float()
    # A NaN outcome is neither success nor failure: it poisons the row's active tokens.
    outcome_is_nan = active & torch.isnan(outcomes)[:, None]
    return torch.where(outcome_is_nan, outcomes[:, None].expand_as(s), s)


def torch_moments(s, active, success, layout):
    """[S, 1, 2, 3]: (count, mean, centred sum of squares) of s per group and set."""
    sets = set_index(layout, success)
    count = set_sum(active.sum(1, dtype=torch.float32), sets, layout)
    mean = set_sum(torch.where(active, s, 0.0).sum(1), sets, layout) / count.clamp_min(1.0)
    centred = torch.where(active, s - mean[sets][:, None], 0.0)
    m2 = set_sum((centred * centred).sum(1), sets, layout)
    return torch.stack([count, mean, m2], -1).view(layout.capacity, 1, 2, 3)


def shaping_dtype(device: torch.device) -> torch.dtype:
    """The shaping sums and terms run in float64: on [B] or [B, T] values, next to the [N, V]
    logits, it costs nothing measurable, and near-ties need it (the kernel module's docstring).
    MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def group_sum(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Sum of `values` ([B] or [B, T]) over each row's group, gathered back per row."""
    return index_sum(values, layout.index, layout.capacity)[layout.index]


def torch_group_zscore(centred, layout, scale_by_std, eps):
    """`centred / (unbiased group std + eps)` (or `centred` itself); groups of one -> 0.

    `centred` is re-centred first (corrected two-pass), so that the rounding of the mean
    cancels: a group of equal values gets exactly 0 rather than ulp / eps.
    """
    size = group_sum(torch.ones_like(centred), layout)
    centred = centred - group_sum(centred, layout) / size
    if scale_by_std:
        std = torch.sqrt(group_sum(centred * centred, layout) / (size - 1.0).clamp_min(1.0))
        scaled = centred / (std + eps)
    else:
        scaled = centred
    return torch.where(size >= 2, scaled, centred * 0.0)


def torch_group_sequence_advantages(entropy, active, outcomes, layout, base, beta2, eps, zscore):
    """GRPO-S (Eq. 8, 9): the sequence rewards ``r = +-base + s`` ``[B]`` float32 from each row's
    mean entropy over ``active``, z-scored in their group when ``zscore``."""
    dtype = shaping_dtype(entropy.device)
    mean_entropy = torch.where(active, float_entropy(entropy), 0.0).sum(1, dtype=dtype) / (
        active.sum(1, dtype=dtype).clamp_min(1.0)
    )
    outcomes = outcomes.to(dtype)
    success = outcomes > 0
    inv_entropy = 1.0 / (mean_entropy + eps)
    n_success = group_sum(success.to(dtype), layout)
    n_failure = group_sum((~success).to(dtype), layout)
    sum_success = group_sum(torch.where(success, mean_entropy, 0.0), layout)
    sum_inv_failure = group_sum(torch.where(success, 0.0, inv_entropy), layout)
    success_term = beta2 * excess_share(n_success, mean_entropy, sum_success, eps)
    failure_term = -beta2 * excess_share(n_failure, inv_entropy, sum_inv_failure, eps)
    s = torch.where(success, success_term, failure_term)
    s = torch.where(torch.isnan(outcomes), outcomes, s)
    if not zscore:
        return torch.where(success, base + s, -base + s).float()
    # base - mean(base) in closed form (exactly 0 in a group of one kind of row, which keeps
    # the precision of s; see the kernel module).
    size = n_success + n_failure
    centred_base = torch.where(success, 2.0 * base * n_failure, -2.0 * base * n_success) / size
    centred = centred_base + (s - group_sum(s, layout) / size)
    return torch_group_zscore(centred, layout, True, eps).float()
