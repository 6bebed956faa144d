"""The arguments of the advantage functions: groups, rewards and outcomes, token inputs.

:func:`group_layout` turns ``groups`` (an int ``G`` or an id tensor ``[B]``) into the
:class:`GroupLayout` every backend reads; the checks raise ValueError naming the argument.
Shared by :mod:`entropy_kernels.advantages`, :mod:`entropy_kernels.gtpo` and the TRL adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMALIZE_MODES = ("zero-filled", "separate", "joint", "none")


SCOPES = ("batch", "group")


GRPO_SCALES = ("std", "none")


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


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
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


def index_sum(values: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """[slots, ...]: the sums of the rows of `values` ([B] or [B, T]) by slot `index` [B]."""
    sums = torch.zeros((slots, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return sums.index_add_(0, index, values)


def uniform_group_rows(outcomes: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """[B] bool: the rows of groups whose rows are all successes or all failures.

    `filter_groups` (algorithms.md) gives them advantage 0 and keeps their tokens out of every
    statistic, as DAPO's dynamic sampling would drop them. A row whose reward is not finite
    (NaN outcome) is neither, so its group is never filtered and the NaN reaches its outputs.
    """
    n_success = index_sum((outcomes > 0).long(), layout.index, layout.capacity)
    n_failure = index_sum((outcomes < 0).long(), layout.index, layout.capacity)
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


def active_mask(mask: torch.Tensor | None, entropy: torch.Tensor) -> torch.Tensor:
    """[B, T] contiguous bool: results then do not depend on the mask's memory layout (the
    tensors computed from it inherit it, and reductions along T sum in layout order)."""
    if mask is None:
        return torch.ones(entropy.shape, dtype=torch.bool, device=entropy.device)
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous()
