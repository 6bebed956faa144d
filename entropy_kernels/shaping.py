"""GTPO / GRPO-S shaping options (one frozen dataclass each, validated once) and the shaped
advantages' metrics, shared by the logits and the linear one-call losses and the modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import (
    check_shaping_constant,
    check_threshold,
)
from .advantage_groups import (
    NORMALIZE_MODES,
    SCOPES,
    check_eps,
    success_outcomes,
)
from .advantages import gtpo_advantages_core
from .sequence_advantages import grpo_s_advantages_core

# The paper's clip-higher bound (DAPO), the default of both one-call losses.
PAPER_CLIP_HIGH = 0.28


@dataclass(frozen=True)
class GTPOShaping:
    """Options of :func:`entropy_kernels.gtpo_advantages` (Eq. 3, 5, 6)."""

    alpha1: float = 1.0
    alpha2: float = 0.1
    success_threshold: float = 0.0
    normalize: str = "zero-filled"
    scope: str = "batch"
    eps: float = 1e-6
    filter_groups: bool = True

    def __post_init__(self):
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        check_eps(self.eps)
        check_shaping_constant("alpha2", self.alpha2)
        check_threshold(self.success_threshold)

    def advantages(self, rewards, entropy, mask, groups, backend: str) -> torch.Tensor:
        """:func:`entropy_kernels.gtpo_advantages` of arguments the loss validated."""
        options = (
            self.alpha1,
            self.alpha2,
            self.success_threshold,
            self.normalize,
            self.scope,
            self.filter_groups,
            self.eps,
        )
        return gtpo_advantages_core(
            rewards.detach(), entropy.detach(), mask, groups, options, backend
        )


@dataclass(frozen=True)
class GRPOSShaping:
    """Options of :func:`entropy_kernels.grpo_s_advantages` (Eq. 8, 9)."""

    beta1: float = 1.0
    beta2: float = 0.1
    success_threshold: float = 0.0
    eps: float = 1e-6
    filter_groups: bool = True

    def __post_init__(self):
        check_eps(self.eps)
        check_shaping_constant("beta2", self.beta2)
        check_threshold(self.success_threshold)

    def advantages(self, rewards, entropy, mask, groups, backend: str) -> torch.Tensor:
        """:func:`entropy_kernels.grpo_s_advantages` of arguments the loss validated."""
        options = (self.beta1, self.beta2, self.success_threshold, self.eps, self.filter_groups)
        return grpo_s_advantages_core(
            rewards.detach(),
            entropy.detach(),
            mask,
            groups,
            options,
            backend,
        )


def advantage_metrics(
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    success_threshold: float = 0.0,
    filtered_rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Advantage statistics over active tokens, as 0-dim float32 tensors (no host sync).

    advantages: `[B, T]` or `[B]` (one per sequence, counted on each active token);
    entropy: `[B, T]`, the entropy the advantages were shaped from. Success rows are those
    with `rewards > success_threshold`, failure rows the others. Returns
    `success_advantage_mean` / `_std` and `failure_advantage_mean` / `_std` (unbiased std over
    the set's active tokens), `success_entropy` / `failure_entropy` (mean entropy over the
    set's active tokens), `success_fraction` and `filtered_fraction` (of rows; `filtered_rows`
    [B] bool marks the rows that `filter_groups` removed, None for none). A float mask counts
    its nonzero positions, unweighted. An empty set gives 0.
    """
    with torch.no_grad():
        # Classified as the shaping does (a NaN or infinite reward is no success).
        success = success_outcomes(rewards.detach(), success_threshold) > 0
        entropy = entropy.detach().float()
        active = (
            torch.ones(entropy.shape, dtype=torch.bool, device=entropy.device)
            if mask is None
            else mask != 0
        )
        advantages = advantages.detach().float()
        if advantages.dim() == 1:
            advantages = advantages[:, None].expand(entropy.shape)
        metrics = {}
        for name, rows in (("success", success), ("failure", ~success)):
            tokens = active & rows[:, None]
            count = tokens.sum(dtype=torch.float32)
            size = count.clamp_min(1.0)
            mean = torch.where(tokens, advantages, 0.0).sum() / size
            centred = torch.where(tokens, advantages - mean, 0.0)
            var = (centred * centred).sum() / (count - 1.0).clamp_min(1.0)
            metrics[f"{name}_advantage_mean"] = mean
            metrics[f"{name}_advantage_std"] = torch.sqrt(var)
            metrics[f"{name}_entropy"] = torch.where(tokens, entropy, 0.0).sum() / size
        rows = max(success.shape[0], 1)
        metrics["success_fraction"] = success.sum(dtype=torch.float32) / rows
        metrics["filtered_fraction"] = (
            torch.zeros((), device=success.device)
            if filtered_rows is None
            else filtered_rows.sum(dtype=torch.float32) / rows
        )
    return metrics
