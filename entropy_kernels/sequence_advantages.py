"""GRPO and GRPO-S advantages (arXiv 2508.04349, Eq. 8, 9): one reward per *sequence*, shaped
(GRPO-S) from its mean entropy or not (GRPO), then the group z-score. `groups`, backends and
dtypes as in :mod:`entropy_kernels.advantages`, which re-exports these functions.
"""

from __future__ import annotations

import torch

from ._validation import check_shaping_constant, check_threshold, resolve_backend
from .advantage_groups import (
    GRPO_SCALES,
    active_mask,
    check_choice,
    check_eps,
    check_groups,
    check_rewards,
    check_token_inputs,
    group_layout,
    success_outcomes,
    uniform_group_rows,
)
from .backends.torch_shaping import (
    group_sum,
    shaping_dtype,
    torch_group_sequence_advantages,
    torch_group_zscore,
)
from .ops import advantage_shaping as shaping_ops


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
    check_choice("scale", scale, GRPO_SCALES)
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
    rewards = rewards.to(shaping_dtype(rewards.device))
    size = group_sum(torch.ones_like(rewards), layout)
    centred = rewards - group_sum(rewards, layout) / size
    return torch_group_zscore(centred, layout, scale == "std", eps).float()


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
    rewards = check_rewards(rewards)
    entropy, mask = check_token_inputs(entropy, mask, rewards.shape[0], rewards.device)
    check_eps(eps)
    check_shaping_constant("beta2", beta2)
    check_threshold(success_threshold)
    options = (beta1, beta2, success_threshold, eps, filter_groups)
    return grpo_s_advantages_core(rewards, entropy, mask, groups, options, backend)


def grpo_s_advantages_core(rewards, entropy, mask, groups, options: tuple, backend: str):
    """:func:`grpo_s_advantages` of validated arguments (``rewards`` / ``entropy`` detached);
    ``options``: ``(beta1, beta2, success_threshold, eps, filter_groups)``."""
    *shaping, filter_groups = options
    advantages = grpo_s_core(rewards, entropy, mask, groups, tuple(shaping), backend, zscore=True)
    if not filter_groups:
        return advantages
    layout = group_layout(groups, advantages.shape[0], advantages.device)
    uniform = uniform_group_rows(success_outcomes(rewards, shaping[2]), layout)
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
    return torch.where(active_mask(mask, entropy).any(1), ids, alone)


def _grpo_s(rewards, entropy, mask, groups, beta1, beta2, success_threshold, eps, backend, zscore):
    rewards = check_rewards(rewards)
    entropy, mask = check_token_inputs(entropy, mask, rewards.shape[0], rewards.device)
    check_eps(eps)
    check_shaping_constant("beta2", beta2)
    check_threshold(success_threshold)
    return grpo_s_core(
        rewards, entropy, mask, groups, (beta1, beta2, success_threshold, eps), backend, zscore
    )


def grpo_s_core(rewards, entropy, mask, groups, options: tuple, backend: str, zscore: bool):
    """GRPO-S rewards (``zscore=False``) or advantages of validated arguments;
    ``options``: ``(beta1, beta2, success_threshold, eps)``."""
    beta1, beta2, success_threshold, eps = options
    batch, device = rewards.shape[0], rewards.device
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

    active = active_mask(mask, entropy)
    return torch_group_sequence_advantages(
        entropy, active, outcomes, layout, base, beta2, eps, zscore
    )
