"""GRPO, GTPO and GRPO-S advantages (arXiv 2508.04349).

GTPO (Eq. 3, 5, 6) shapes one reward per *token* from the policy entropy of the group's
success and failure rows; GRPO-S (Eq. 8, 9) shapes one reward per *sequence* from its mean
entropy; plain GRPO is the baseline both are compared with. All three take `groups` as an
int `G` (consecutive groups of `G` rows) or an integer id tensor `[B]` (ids need not be
sorted). Results are float32; entropy is always treated as a constant (detached).

Backends: `"triton"` runs the kernels through `entropy_kernels/ops/advantage_shaping.py`,
`"torch"` the vectorised PyTorch version below, `"auto"` picks Triton for CUDA tensors.
Neither synchronises with the host. The loop-style definitions are in
`entropy_kernels/reference/advantages.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import check_shaping_constant, check_threshold, resolve_backend
from .ops import advantage_shaping as shaping_ops

NORMALIZE_MODES = ("zero-filled", "separate", "joint", "none")
SCOPES = ("batch", "group")
GRPO_SCALES = ("std", "none")
# Added to the variance before the square root in the Eq. 6 whitening.
WHITENING_EPS = 1e-8


@dataclass(frozen=True)
class GroupLayout:
    """Where each row's group lives, on the device, without a host synchronisation.

    index: [B] int64, compact group of each row (0 .. number of groups - 1).
    row_order: [B] int64, the rows sorted by group (stable), so each group is contiguous.
    start / size: [capacity] int64, each group's first position in `row_order` and its row
        count; slots past the number of groups have size 0.
    capacity: an upper bound on the number of groups known without reading the device
        (`B // G` for an int, `B` for an id tensor).
    """

    index: torch.Tensor
    row_order: torch.Tensor
    start: torch.Tensor
    size: torch.Tensor
    capacity: int


def check_groups(groups: int | torch.Tensor, batch: int, device: torch.device) -> None:
    """`groups` must be an int `G` with `batch % G == 0`, or integer ids `[batch]` on `device`."""
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.Tensor)):
        raise ValueError(
            f"groups must be an int G or an integer tensor [{batch}] of group ids, "
            f"got {type(groups).__name__}"
        )
    if isinstance(groups, int):
        if groups < 1 or batch % groups != 0:
            raise ValueError(
                f"groups={groups} must be a positive divisor of the batch size "
                f"B={batch} (B % G == 0)"
            )
        return
    if groups.dtype == torch.bool or groups.dtype.is_floating_point or groups.is_complex():
        raise ValueError(f"groups must have an integer dtype, got {groups.dtype}")
    if groups.shape != (batch,):
        raise ValueError(
            f"groups must have shape [{batch}] (one id per row), got {tuple(groups.shape)}"
        )
    if groups.device != device:
        raise ValueError(f"groups must be on {device}, got {groups.device}")


def group_layout(groups: int | torch.Tensor, batch: int, device: torch.device) -> GroupLayout:
    """The device-side layout of `groups` (validated by `check_groups`)."""
    check_groups(groups, batch, device)
    if isinstance(groups, int):
        capacity = batch // groups
        rows = torch.arange(batch, device=device)
        return GroupLayout(
            index=rows // groups,
            row_order=rows,
            start=torch.arange(0, batch, groups, device=device),
            size=torch.full((capacity,), groups, dtype=torch.int64, device=device),
            capacity=capacity,
        )
    sorted_ids, row_order = torch.sort(groups.long(), stable=True)
    starts_group = torch.ones(batch, dtype=torch.bool, device=device)
    starts_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
    sorted_index = torch.cumsum(starts_group, 0) - 1
    index = torch.empty_like(sorted_index).scatter_(0, row_order, sorted_index)
    size = torch.zeros(batch, dtype=torch.int64, device=device).index_add_(
        0, sorted_index, torch.ones_like(sorted_index)
    )
    return GroupLayout(
        index=index,
        row_order=row_order,
        start=torch.cumsum(size, 0) - size,
        size=size,
        capacity=batch,
    )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_eps(eps: float) -> None:
    if not eps >= 0.0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


def check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """rewards: [B] real tensor -> detached [B], in its own dtype."""
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a tensor [B], got {type(rewards).__name__}")
    if rewards.dim() != 1 or rewards.is_complex():
        raise ValueError(
            f"rewards must be a real tensor [B], got {rewards.dtype} {tuple(rewards.shape)}"
        )
    return rewards.detach()


def success_outcomes(rewards: torch.Tensor, success_threshold: float) -> torch.Tensor:
    """[B] float32: +1 where ``rewards > success_threshold``, -1 elsewhere, NaN where a reward
    is not finite (NaN or inf propagates to the row's outputs instead of counting as a
    success or failure).

    The comparison is PyTorch's ``rewards > success_threshold``, in the rewards' own dtype:
    float64 rewards are not rounded first, and a reward equal to the threshold is a failure
    also when the threshold has no exact float32 form (0.3 in float32 rewards).
    """
    outcome = torch.where(rewards > success_threshold, 1.0, -1.0).to(torch.float32)
    return torch.where(torch.isfinite(rewards), outcome, float("nan")).contiguous()


def uniform_group_rows(outcomes: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """[B] bool: the rows of groups whose rows are all successes or all failures.

    `filter_groups` (algorithms.md) gives them advantage 0 and keeps their tokens out of every
    statistic, as DAPO's dynamic sampling would drop them. A row whose reward is not finite
    (NaN outcome) is neither, so its group is never filtered and the NaN reaches its outputs.
    """
    n_success = _index_sum((outcomes > 0).long(), layout.index, layout.capacity)
    n_failure = _index_sum((outcomes < 0).long(), layout.index, layout.capacity)
    uniform = (n_success == layout.size) | (n_failure == layout.size)
    return uniform[layout.index]


def without_uniform_groups(outcomes: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """`outcomes` with 0 (neither success nor failure: inactive) on filtered rows."""
    return torch.where(uniform_group_rows(outcomes, layout), 0.0, outcomes)


def check_token_inputs(
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    batch: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """entropy: floating [B, T]; mask: [B, T] bool / number, or None (all active)."""
    if not isinstance(entropy, torch.Tensor) or not entropy.dtype.is_floating_point:
        raise ValueError("entropy must be a floating tensor [B, T]")
    if entropy.dim() != 2 or entropy.shape[0] != batch:
        raise ValueError(f"entropy must have shape [B={batch}, T], got {tuple(entropy.shape)}")
    if entropy.device != device:
        raise ValueError(f"entropy must be on {device} like rewards, got {entropy.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.is_complex():
            raise ValueError("mask must be a bool or real tensor [B, T], or None")
        if mask.shape != entropy.shape:
            raise ValueError(
                f"mask must have the shape of entropy {tuple(entropy.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"mask must be on {device} like rewards, got {mask.device}")
    return entropy.detach(), mask


def _active(mask: torch.Tensor | None, entropy: torch.Tensor) -> torch.Tensor:
    """[B, T] contiguous bool: results then do not depend on the mask's memory layout (the
    tensors computed from it inherit it, and reductions along T sum in layout order)."""
    if mask is None:
        return torch.ones(entropy.shape, dtype=torch.bool, device=entropy.device)
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous()


def _merge_moments(count, mean, m2, dims):
    """Chan's parallel merge of (count, mean, centred sum of squares) over `dims` (kept)."""
    total = count.sum(dims, keepdim=True)
    merged_mean = (count * mean).sum(dims, keepdim=True) / total.clamp_min(1.0)
    merged_m2 = (m2 + count * (mean - merged_mean) ** 2).sum(dims, keepdim=True)
    return total, merged_mean, merged_m2


def row_whitening(
    moments: torch.Tensor,
    layout: GroupLayout,
    outcomes: torch.Tensor,
    normalize: str,
    scope: str,
    base: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row Eq. 6 whitening of the shaping terms: `A = (s - row_mean) * row_scale`.

    moments: [S, K, 2, 3], (count, mean of s, centred sum of squares of s) per group slot,
    position block and set (failure, success); `r = s + base` on successes and
    `s - base` on failures (`base = alpha1 + alpha2`). Returns row_mean, row_scale [B] float32
    such that `(s - row_mean) * row_scale` is the row's whitened value (algorithms.md):

    - "zero-filled": `w_S(u)` with `u` the field of the row's outcome (`r` on that outcome's
      tokens, 0 on the other outcome's) over all tokens `S` in scope;
    - "separate": `w` over the tokens of the row's own outcome; "joint": `w_S(r)`.

    `w(x) = (x - mean) / sqrt(var + 1e-8)` (unbiased variance; scale 0 for a set of fewer than
    two tokens). Filtered rows (outcome 0) get mean and scale 0.
    """
    count, mean, m2 = moments.unbind(-1)
    dims = [1, 0] if scope == "batch" else [1]
    count, mean, m2 = (x[:, 0] for x in _merge_moments(count, mean, m2, dims))  # [S', 2]
    slot = layout.index if scope == "group" else torch.zeros_like(layout.index)
    success = outcomes > 0
    n_failure, n_success = count[slot].unbind(-1)
    mean_failure, mean_success = mean[slot].unbind(-1)
    m2_failure, m2_success = m2[slot].unbind(-1)
    if normalize == "separate":
        # base is constant within a set and cancels.
        count = torch.where(success, n_success, n_failure)
        row_mean = torch.where(success, mean_success, mean_failure)
        m2 = torch.where(success, m2_success, m2_failure)
    else:
        count = n_failure + n_success
        total = count.clamp_min(1.0)
        if normalize == "joint":
            # Chan's merge of the two sets: their means of r differ by `gap`; base - mean(base)
            # in closed form, exactly 0 when the set holds one kind of row.
            gap = 2.0 * base + mean_success - mean_failure
            m2 = m2_success + m2_failure + n_success * n_failure / total * gap * gap
            centred_base = torch.where(success, 2.0 * base * n_failure, -2.0 * base * n_success)
            row_mean = (n_success * mean_success + n_failure * mean_failure - centred_base) / total
        else:
            # Zero-filled: the own outcome's set (mean base + mean_s) merged with the other
            # outcome's tokens at 0; the row's base is folded into row_mean in closed form.
            own_n, other_n = (
                torch.where(success, n_success, n_failure),
                torch.where(success, n_failure, n_success),
            )
            own_mean = torch.where(success, mean_success, mean_failure)
            signed_base = torch.where(success, base, -base)
            m2 = torch.where(success, m2_success, m2_failure) + own_n * other_n / total * (
                (signed_base + own_mean) ** 2
            )
            row_mean = (own_n * own_mean - other_n * signed_base) / total
    var = m2 / (count - 1.0).clamp_min(1.0)
    kept = (count >= 2) & (outcomes != 0)
    scale = torch.where(kept, torch.rsqrt(var + WHITENING_EPS), torch.zeros_like(var))
    row_mean = torch.where(outcomes != 0, row_mean, torch.zeros_like(row_mean))
    return row_mean.contiguous(), scale.contiguous()


def _float_entropy(entropy: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Entropy in `dtype` with inf read as NaN, so that it propagates (1 / inf would be 0)."""
    h = entropy.to(dtype)
    return h.masked_fill(h.isinf(), float("nan"))


def _excess_share(count, value, total, eps):
    """``count * value / (total + eps) - 1``, exactly ``-eps / (total + eps)`` for a value alone
    in its sum (see the kernel module's docstring)."""
    return ((count * value - total) - eps) / (total + eps)


def _set_index(layout: GroupLayout, success: torch.Tensor) -> torch.Tensor:
    """[B]: each row's (group, kind) set, 2 * group + 1 for successes, 2 * group for failures."""
    return layout.index * 2 + success.long()


def _set_sum(values: torch.Tensor, sets: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Sums of `values` ([B] or [B, T]) per (group, kind) set: [2 * capacity, ...]."""
    return _index_sum(values, sets, layout.capacity * 2)


def _torch_shaping_terms(entropy, active, outcomes, success, layout, alpha2, eps):
    """The shaping terms s = r - base of Eq. 3 / 5 (base = +-(alpha1 + alpha2), see the kernel
    module), float32 [B, T], 0 at inactive positions.

    Both equations are `+-alpha2 * (count * v / (sum v + eps) - 1)` over the row's set at the
    position, with `v = H` on successes and `1 / (H + eps)` on failures, so one pass of
    per-(group, kind, position) sums serves both. They run in float64 (the kernel module).
    """
    h = _float_entropy(entropy, _shaping_dtype(entropy.device))
    value = torch.where(active, torch.where(success[:, None], h, 1.0 / (h + eps)), 0.0)
    sets = _set_index(layout, success)
    count = _set_sum(active.to(h.dtype), sets, layout)[sets]
    total = _set_sum(value, sets, layout)[sets]
    sign = torch.where(success, alpha2, -alpha2)[:, None]
    s = torch.where(active, sign * _excess_share(count, value, total, eps), 0.0).float()
    # A NaN outcome is neither success nor failure: it poisons the row's active tokens.
    outcome_is_nan = active & torch.isnan(outcomes)[:, None]
    return torch.where(outcome_is_nan, outcomes[:, None].expand_as(s), s)


def _torch_moments(s, active, success, layout):
    """[S, 1, 2, 3]: (count, mean, centred sum of squares) of s per group and set."""
    sets = _set_index(layout, success)
    count = _set_sum(active.sum(1, dtype=torch.float32), sets, layout)
    mean = _set_sum(torch.where(active, s, 0.0).sum(1), sets, layout) / count.clamp_min(1.0)
    centred = torch.where(active, s - mean[sets][:, None], 0.0)
    m2 = _set_sum((centred * centred).sum(1), sets, layout)
    return torch.stack([count, mean, m2], -1).view(layout.capacity, 1, 2, 3)


def gtpo_advantages(
    rewards: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int | torch.Tensor,
    *,
    alpha1: float = 1.0,
    alpha2: float = 0.1,
    success_threshold: float = 0.0,
    normalize: str = "zero-filled",
    scope: str = "batch",
    filter_groups: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """GTPO token advantages `[B, T]` float32 (Eq. 3, 5 shaping; Eq. 6 whitening).

    Args:
        rewards: `[B]` real; row `i` is a success when `rewards[i] > success_threshold`
            (compared in the rewards' dtype); a reward that is not finite gives NaN.
        entropy: `[B, T]` floating, the policy entropy per position (any strides); detached.
        mask: `[B, T]` bool or number (nonzero = active), or None (all active).
        groups: int `G` (consecutive groups of `G` rows, `B % G == 0`) or integer ids `[B]`.
        alpha1, alpha2: Eq. 3 / 5 constants (defaults 1.0, 0.1).
        success_threshold: default 0.0.
        normalize: how the shaped rewards become advantages (Eq. 6, algorithms.md):
            `"zero-filled"` (default): each outcome's reward field (0 on the other outcome's
            tokens) whitened over all tokens in scope, each token taking its own outcome's
            value, so success tokens stay positive and failure tokens negative;
            `"separate"`: success and failure tokens whitened as two sets (the public
            re-implementations' reading: it erases the outcome sign and does not learn);
            `"joint"`: one set; `"none"`: the shaped rewards themselves.
        scope: `"batch"` (default) or `"group"`: where the whitening statistics are taken.
        filter_groups: give advantage 0 to the rows of groups whose rows are all successes
            or all failures, and keep their tokens out of every statistic (default True;
            DAPO's dynamic sampling drops such groups).
        eps: guards every division of Eq. 3 / 5 (default 1e-6); the whitening uses
            `(r - mean) / sqrt(var + 1e-8)` with the unbiased variance.
        backend: `"auto"` (Triton for CUDA tensors), `"triton"` or `"torch"`.

    Per group and position `t`, with `P_t` / `N_t` the success / failure rows active at `t`
    (`d_t`, `h_t` their counts): successes get
    `a1 + a2 * d_t * H / (sum_{P_t} H + eps)`, failures
    `-a1 - a2 * h_t * (1/(H+eps)) / (sum_{N_t} 1/(H+eps) + eps)`. A whitening set with fewer
    than two active tokens gives 0; inactive positions are exactly 0. Under
    `normalize="separate"` the alphas cancel (each set is shifted and scaled by constants
    that whitening removes); under `"zero-filled"` alpha1 sets the gap between outcomes and
    alpha2 the spread inside one. A NaN or infinite reward or entropy propagates to the
    affected outputs; a group holding a NaN reward is never filtered.
    """
    rewards = check_rewards(rewards)
    batch, device = rewards.shape[0], rewards.device
    entropy, mask = check_token_inputs(entropy, mask, batch, device)
    _check_choice("normalize", normalize, NORMALIZE_MODES)
    _check_choice("scope", scope, SCOPES)
    check_eps(eps)
    check_shaping_constant("alpha2", alpha2)
    check_threshold(success_threshold)
    layout = group_layout(groups, batch, device)
    backend = resolve_backend(backend, device)
    outcomes = success_outcomes(rewards, success_threshold)
    if filter_groups:
        outcomes = without_uniform_groups(outcomes, layout)
    # r = +-base + s, where s keeps the precision that base would round away (kernel module).
    base = alpha1 + alpha2
    whiten = normalize != "none"

    if backend == "triton":
        values, moments = shaping_ops.gtpo_token_rewards(
            entropy,
            mask,
            outcomes,
            layout.row_order,
            layout.start,
            layout.size,
            base=base,
            alpha2=alpha2,
            eps=eps,
            with_moments=whiten,
        )
        if not whiten:
            return values
        row_mean, row_scale = row_whitening(moments, layout, outcomes, normalize, scope, base)
        return shaping_ops.whiten_rows_(values, mask, row_mean, row_scale)

    # Filtered rows (outcome 0) are inactive: in no sum, no statistic, advantage 0.
    active = _active(mask, entropy) & (outcomes != 0)[:, None]
    success = outcomes > 0
    s = _torch_shaping_terms(entropy, active, outcomes, success, layout, alpha2, eps)
    if not whiten:
        success_active = active & success[:, None]
        return torch.where(success_active, base + s, torch.where(active, -base + s, 0.0))
    moments = _torch_moments(s, active, success, layout)
    row_mean, row_scale = row_whitening(moments, layout, outcomes, normalize, scope, base)
    return torch.where(active, (s - row_mean[:, None]) * row_scale[:, None], 0.0)


def _shaping_dtype(device: torch.device) -> torch.dtype:
    """The shaping sums and terms run in float64: on [B] or [B, T] values, next to the [N, V]
    logits, it costs nothing measurable, and near-ties need it (the kernel module's docstring).
    MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _index_sum(values: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """[slots, ...]: the sums of the rows of `values` ([B] or [B, T]) by slot `index` [B]."""
    sums = torch.zeros((slots, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return sums.index_add_(0, index, values)


def _group_sum(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Sum of `values` ([B] or [B, T]) over each row's group, gathered back per row."""
    return _index_sum(values, layout.index, layout.capacity)[layout.index]


def _torch_group_zscore(centred, layout, scale_by_std, eps):
    """`centred / (unbiased group std + eps)` (or `centred` itself); groups of one -> 0.

    `centred` is re-centred first (corrected two-pass), so that the rounding of the mean
    cancels: a group of equal values gets exactly 0 rather than ulp / eps.
    """
    size = _group_sum(torch.ones_like(centred), layout)
    centred = centred - _group_sum(centred, layout) / size
    if scale_by_std:
        std = torch.sqrt(_group_sum(centred * centred, layout) / (size - 1.0).clamp_min(1.0))
        scaled = centred / (std + eps)
    else:
        scaled = centred
    return torch.where(size >= 2, scaled, centred * 0.0)


def grpo_advantages(
    rewards: torch.Tensor,
    groups: int | torch.Tensor,
    *,
    scale: str = "std",
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """GRPO advantages `[B]` float32: `(r - mean_g r) / (std_g r + eps)`.

    Args:
        rewards: `[B]` real.
        groups: int `G` (consecutive groups, `B % G == 0`) or integer ids `[B]`.
        scale: `"std"` (default; unbiased group standard deviation) or `"none"` (only centre,
            Dr. GRPO).
        eps: default 1e-6.
        backend: `"auto"` (Triton for CUDA tensors), `"triton"` or `"torch"`.

    A group of one row gets 0.
    """
    rewards = check_rewards(rewards).to(torch.float32).contiguous()
    _check_choice("scale", scale, GRPO_SCALES)
    check_eps(eps)
    layout = group_layout(groups, rewards.shape[0], rewards.device)
    if resolve_backend(backend, rewards.device) == "triton":
        return shaping_ops.group_sequence_advantages(
            rewards,
            rewards,
            layout.row_order,
            layout.start,
            layout.size,
            shape_by_entropy=False,
            scale_by_std=scale == "std",
            eps=eps,
        )
    rewards = rewards.to(_shaping_dtype(rewards.device))
    size = _group_sum(torch.ones_like(rewards), layout)
    centred = rewards - _group_sum(rewards, layout) / size
    return _torch_group_zscore(centred, layout, scale == "std", eps).float()


def grpo_s_advantages(
    rewards: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int | torch.Tensor,
    *,
    beta1: float = 1.0,
    beta2: float = 0.1,
    success_threshold: float = 0.0,
    filter_groups: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """GRPO-S sequence advantages `[B]` float32 (Eq. 8, 9, then the group z-score).

    Args:
        rewards: `[B]` real; success when `rewards[i] > success_threshold` (default 0.0),
            compared in the rewards' dtype; a reward that is not finite gives NaN.
        entropy: `[B, T]` floating (any strides); detached.
        mask: `[B, T]` bool or number (nonzero = active), or None (all active).
        groups: int `G` (consecutive groups, `B % G == 0`) or integer ids `[B]`.
        beta1, beta2: Eq. 9 constants (defaults 1.0, 0.1).
        filter_groups: give advantage 0 to the rows of groups whose rows are all successes or
            all failures (default True): without it, the z-score turns the entropy differences
            inside an all-failure group into unit-size advantages, pure noise.
        eps: guards the Eq. 9 divisions and the z-score's `std + eps` (default 1e-6).
        backend: `"auto"` (Triton for CUDA tensors), `"triton"` or `"torch"`.

    `Hbar[i]` is the mean entropy over row `i`'s active positions (Eq. 8); a row with none
    stands alone, outside its group's counts and sums, with advantage 0. Within a group with
    `n` success and `m` failure rows, successes get
    `b1 + b2 * n * Hbar / (sum_success Hbar + eps)`, failures
    `-b1 - b2 * m * (1/(Hbar+eps)) / (sum_failure 1/(Hbar+eps) + eps)`; the advantage is
    `(r - mean_g r) / (std_g r + eps)` (unbiased std), 0 for a group of one row. It applies
    to every active token of the row. A NaN or infinite reward or entropy propagates to its
    group.
    """
    advantages = _grpo_s(
        rewards, entropy, mask, groups, beta1, beta2, success_threshold, eps, backend, zscore=True
    )
    if not filter_groups:
        return advantages
    layout = group_layout(groups, advantages.shape[0], advantages.device)
    uniform = uniform_group_rows(success_outcomes(rewards.detach(), success_threshold), layout)
    return torch.where(uniform, 0.0, advantages)


def grpo_s_rewards(
    rewards: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int | torch.Tensor,
    *,
    beta1: float = 1.0,
    beta2: float = 0.1,
    success_threshold: float = 0.0,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """The GRPO-S sequence rewards `r` `[B]` float32 of Eq. 9, before the group z-score.

    Arguments as in :func:`grpo_s_advantages`. Within each group they sum to
    `(beta1 + beta2) * n` over the success rows and `-(beta1 + beta2) * m` over the failure
    rows (up to `eps`).
    """
    return _grpo_s(
        rewards, entropy, mask, groups, beta1, beta2, success_threshold, eps, backend, zscore=False
    )


def _groups_of_nonempty_rows(groups, entropy, mask):
    """GRPO-S groups in which a row without active tokens stands alone.

    Such a row has no mean entropy (Eq. 8): on its own it enters no other row's counts and sums
    (its `1/(0 + eps)` would swamp a failure set), and a group of one gets advantage 0. The
    relabelling runs on the device (no host sync).
    """
    batch, device = entropy.shape[0], entropy.device
    check_groups(groups, batch, device)
    if batch == 0 or (mask is None and entropy.shape[1] > 0):
        return groups
    rows = torch.arange(batch, device=device)
    ids = rows // groups if isinstance(groups, int) else groups.long()
    alone = ids.max() + 1 + rows
    return torch.where(_active(mask, entropy).any(1), ids, alone)


def _grpo_s(rewards, entropy, mask, groups, beta1, beta2, success_threshold, eps, backend, zscore):
    rewards = check_rewards(rewards)
    batch, device = rewards.shape[0], rewards.device
    entropy, mask = check_token_inputs(entropy, mask, batch, device)
    check_eps(eps)
    check_shaping_constant("beta2", beta2)
    check_threshold(success_threshold)
    layout = group_layout(_groups_of_nonempty_rows(groups, entropy, mask), batch, device)
    outcomes = success_outcomes(rewards, success_threshold)
    # r = +-base + s, where s keeps the precision that base would round away (kernel module).
    base = beta1 + beta2
    if resolve_backend(backend, device) == "triton":
        mean_entropy = shaping_ops.sequence_mean_entropy(entropy, mask)
        return shaping_ops.group_sequence_advantages(
            mean_entropy,
            outcomes,
            layout.row_order,
            layout.start,
            layout.size,
            shape_by_entropy=True,
            scale_by_std=True,
            zscore=zscore,
            base=base,
            beta2=beta2,
            eps=eps,
        )

    active = _active(mask, entropy)
    dtype = _shaping_dtype(device)
    mean_entropy = torch.where(active, _float_entropy(entropy), 0.0).sum(1, dtype=dtype) / (
        active.sum(1, dtype=dtype).clamp_min(1.0)
    )
    outcomes = outcomes.to(dtype)
    success = outcomes > 0
    inv_entropy = 1.0 / (mean_entropy + eps)
    n_success = _group_sum(success.to(dtype), layout)
    n_failure = _group_sum((~success).to(dtype), layout)
    sum_success = _group_sum(torch.where(success, mean_entropy, 0.0), layout)
    sum_inv_failure = _group_sum(torch.where(success, 0.0, inv_entropy), layout)
    success_term = beta2 * _excess_share(n_success, mean_entropy, sum_success, eps)
    failure_term = -beta2 * _excess_share(n_failure, inv_entropy, sum_inv_failure, eps)
    s = torch.where(success, success_term, failure_term)
    s = torch.where(torch.isnan(outcomes), outcomes, s)
    if not zscore:
        return torch.where(success, base + s, -base + s).float()
    # base - mean(base) in closed form (exactly 0 in a group of one kind of row, which keeps
    # the precision of s; see the kernel module).
    size = n_success + n_failure
    centred_base = torch.where(success, 2.0 * base * n_failure, -2.0 * base * n_success) / size
    centred = centred_base + (s - _group_sum(s, layout) / size)
    return _torch_group_zscore(centred, layout, True, eps).float()
