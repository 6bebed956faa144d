"""Loop-style reference for GRPO, GTPO and GRPO-S (arXiv 2508.04349, Eq. 3, 5, 6, 8, 9).

Written to read like the equations: explicit loops over groups, positions and rows in
Python floats (float64). Slow; for tests and for reading. Results are float64 tensors. The
signatures are the public ones; `backend`, `validate` and `inplace_backward` are accepted and
ignored.
"""

from __future__ import annotations

import math

import torch

# The option values and whitening constant of the spec (algorithms.md), restated here: the
# reference imports nothing from the library (tests check that these match it).
NORMALIZE_MODES = ("zero-filled", "separate", "joint", "none")
SCOPES = ("batch", "group")
GRPO_SCALES = ("std", "none")
WHITENING_EPS = 1e-8

__all__ = [
    "grpo_advantages",
    "gtpo_advantages",
    "grpo_s_advantages",
    "grpo_s_rewards",
    "advantage_metrics",
]


def group_rows(groups: int | torch.Tensor, batch: int) -> list[list[int]]:
    """The rows of each group, in row order."""
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.Tensor)):
        raise ValueError("groups must be an int G or an integer tensor [B] of group ids")
    if isinstance(groups, int):
        if groups < 1 or batch % groups != 0:
            raise ValueError(f"groups={groups} must be a positive divisor of B={batch}")
        return [list(range(start, start + groups)) for start in range(0, batch, groups)]
    if groups.dtype == torch.bool or groups.dtype.is_floating_point or groups.shape != (batch,):
        raise ValueError(f"groups must be an integer tensor of shape [{batch}]")
    members: dict[int, list[int]] = {}
    for row, group_id in enumerate(groups.tolist()):
        members.setdefault(group_id, []).append(row)
    return list(members.values())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _unbiased_var(values: list[float]) -> float:
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def _rewards(rewards) -> list[float]:
    """Rewards as float32 values, the precision of the library's GRPO arithmetic."""
    if rewards.dim() != 1:
        raise ValueError("rewards must be a tensor [B]")
    return rewards.detach().float().double().tolist()


def _successes(rewards, success_threshold) -> list[bool]:
    """PyTorch's ``rewards > success_threshold`` in the rewards' own dtype; a reward that is
    not finite is no success (its row's outputs are NaN)."""
    if rewards.dim() != 1:
        raise ValueError("rewards must be a tensor [B]")
    rewards = rewards.detach()
    return ((rewards > success_threshold) & torch.isfinite(rewards)).tolist()


def _active_mask(mask, tokens):
    """Tokens equal to -100 are never active, as in ``policy_loss``."""
    kept = tokens != -100
    if mask is None:
        return kept
    return mask & kept if mask.dtype == torch.bool else mask * kept


def _inputs(rewards, entropy, mask):
    rewards = _rewards(rewards)
    entropy = entropy.detach().double()
    # An infinite entropy propagates like NaN instead of giving 1 / inf = 0.
    entropy = entropy.masked_fill(entropy.isinf(), math.nan)
    if entropy.dim() != 2 or entropy.shape[0] != len(rewards):
        raise ValueError(f"entropy must have shape [B={len(rewards)}, T]")
    if mask is None:
        active = [[True] * entropy.shape[1] for _ in rewards]
    else:
        if mask.shape != entropy.shape:
            raise ValueError(f"mask must have shape {tuple(entropy.shape)}")
        active = (mask != 0).tolist()
    return rewards, entropy.tolist(), active


def uniform_group_rows(rewards, groups, success_threshold=0.0) -> list[bool]:
    """`filter_groups`: the rows of groups whose rows are all successes or all failures. A row
    whose reward is not finite is neither, so its group is kept (its NaN reaches the outputs)."""
    finite = torch.isfinite(rewards.detach()).tolist()
    success = _successes(rewards, success_threshold)
    uniform = [False] * len(success)
    for rows in group_rows(groups, len(success)):
        kinds = {success[i] if finite[i] else None for i in rows}
        if kinds in ({True}, {False}):
            for i in rows:
                uniform[i] = True
    return uniform


def _without_rows(mask, entropy, rows_out: list[bool]):
    """The mask with the given rows made inactive."""
    keep = torch.tensor([not out for out in rows_out], dtype=torch.bool)[:, None]
    if mask is None:
        return keep.expand(entropy.shape)
    return (mask != 0) & keep


def gtpo_token_rewards(
    rewards, entropy, mask, groups, *, alpha1=1.0, alpha2=0.1, success_threshold=0.0, eps=1e-6
) -> torch.Tensor:
    """Eq. 3 (success rows) and Eq. 5 (failure rows): shaped rewards [B, T] float64."""
    success = _successes(rewards, success_threshold)
    seq_len = entropy.shape[-1]  # also for an empty batch
    rewards, entropy, active = _inputs(rewards, entropy, mask)
    batch = len(rewards)
    r = [[0.0] * seq_len for _ in range(batch)]
    for rows in group_rows(groups, batch):
        for t in range(seq_len):
            successes = [i for i in rows if active[i][t] and success[i]]
            failures = [j for j in rows if active[j][t] and not success[j]]
            d_t, h_t = len(successes), len(failures)
            sum_h = sum(entropy[k][t] for k in successes)
            sum_inv_h = sum(1.0 / (entropy[k][t] + eps) for k in failures)
            for i in successes:
                r[i][t] = alpha1 + alpha2 * d_t * entropy[i][t] / (sum_h + eps)
            for j in failures:
                r[j][t] = -alpha1 - alpha2 * h_t * (1.0 / (entropy[j][t] + eps)) / (sum_inv_h + eps)
                if not math.isfinite(rewards[j]):
                    r[j][t] = math.nan
    return torch.tensor(r, dtype=torch.float64).reshape(batch, seq_len)


def gtpo_advantages(
    rewards,
    entropy,
    mask,
    groups,
    *,
    alpha1=1.0,
    alpha2=0.1,
    success_threshold=0.0,
    normalize="zero-filled",
    scope="batch",
    filter_groups=True,
    eps=1e-6,
    backend="auto",
) -> torch.Tensor:
    """Eq. 6: whiten the shaped rewards over the scope's active tokens; [B, T] float64.

    "zero-filled": each outcome's field (r on its tokens, 0 on the other outcome's) whitened
    over all tokens S in scope, each token taking its own outcome's value; "separate": each
    outcome's tokens whitened alone; "joint": all of S at once; "none": r. With
    `filter_groups`, the rows of uniform groups are inactive: advantage 0, in no statistic.
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if filter_groups:
        mask = _without_rows(mask, entropy, uniform_group_rows(rewards, groups, success_threshold))
    r = gtpo_token_rewards(
        rewards,
        entropy,
        mask,
        groups,
        alpha1=alpha1,
        alpha2=alpha2,
        success_threshold=success_threshold,
        eps=eps,
    )
    if normalize == "none":
        return r
    success = _successes(rewards, success_threshold)
    active = _inputs(rewards, entropy, mask)[2]
    batch, seq_len = r.shape
    scopes = group_rows(groups, batch) if scope == "group" else [list(range(batch))]
    advantages = torch.zeros_like(r)
    for rows in scopes:
        outcome_sets = [[i for i in rows if success[i]], [i for i in rows if not success[i]]]
        if normalize == "separate":
            whitened = [(set_rows, set_rows) for set_rows in outcome_sets]
        elif normalize == "joint":
            whitened = [(rows, rows)]
        else:  # zero-filled: each outcome's field over all of S, read on its own tokens
            whitened = [(rows, set_rows) for set_rows in outcome_sets]
        for scope_rows, field_rows in whitened:
            tokens = [(i, t) for i in scope_rows for t in range(seq_len) if active[i][t]]
            if len(tokens) < 2:
                for i, t in tokens:  # no variance: advantage 0, but NaN stays NaN
                    advantages[i, t] = 0.0 * r[i, t]
                continue
            field = set(field_rows)
            values = [r[i, t].item() if i in field else 0.0 for i, t in tokens]
            mean, var = _mean(values), _unbiased_var(values)
            for (i, t), value in zip(tokens, values, strict=True):
                if i in field:
                    advantages[i, t] = (value - mean) / math.sqrt(var + WHITENING_EPS)
    return advantages


def _group_zscore(values: list[float], groups, eps: float, scale_by_std: bool) -> torch.Tensor:
    """``groups`` as in the public API, or already a list of row lists."""
    advantages = [0.0] * len(values)
    row_groups = groups if isinstance(groups, list) else group_rows(groups, len(values))
    for rows in row_groups:
        group_values = [values[i] for i in rows]
        if len(rows) < 2:
            for i in rows:
                advantages[i] = 0.0 * values[i]
            continue
        mean = _mean(group_values)
        std = math.sqrt(_unbiased_var(group_values))
        for i in rows:
            advantages[i] = (values[i] - mean) / (std + eps) if scale_by_std else values[i] - mean
    return torch.tensor(advantages, dtype=torch.float64)


def grpo_advantages(rewards, groups, *, scale="std", eps=1e-6, backend="auto") -> torch.Tensor:
    """`(r - mean_g r) / (std_g r + eps)` (unbiased std; only centred if `scale="none"`)."""
    if scale not in GRPO_SCALES:
        raise ValueError(f"scale must be one of {GRPO_SCALES}, got {scale!r}")
    return _group_zscore(_rewards(rewards), groups, eps, scale == "std")


def _grpo_s_sequence_rewards(
    rewards, entropy, mask, groups, beta1, beta2, success_threshold, eps
) -> list[float]:
    """Eq. 8 (sequence-mean entropy) and Eq. 9 (sequence rewards)."""
    success = _successes(rewards, success_threshold)
    rewards, entropy, active = _inputs(rewards, entropy, mask)
    mean_entropy = []
    for row, row_active in zip(entropy, active, strict=True):
        values = [h for h, a in zip(row, row_active, strict=True) if a]
        mean_entropy.append(_mean(values) if values else 0.0)
    r = [0.0] * len(rewards)
    for rows in _grpo_s_groups(groups, active):
        successes = [i for i in rows if success[i]]
        failures = [j for j in rows if not success[j]]
        n, m = len(successes), len(failures)
        sum_h = sum(mean_entropy[k] for k in successes)
        sum_inv_h = sum(1.0 / (mean_entropy[k] + eps) for k in failures)
        for i in successes:
            r[i] = beta1 + beta2 * n * mean_entropy[i] / (sum_h + eps)
        for j in failures:
            r[j] = -beta1 - beta2 * m * (1.0 / (mean_entropy[j] + eps)) / (sum_inv_h + eps)
            if not math.isfinite(rewards[j]):
                r[j] = math.nan
    return r


def _grpo_s_groups(groups, active) -> list[list[int]]:
    """Each group's rows that have active tokens; a row without any stands alone (no Eq. 8
    mean entropy: it takes no part in its group's sums and gets advantage 0)."""
    row_groups = []
    for rows in group_rows(groups, len(active)):
        row_groups.append([i for i in rows if any(active[i])])
        row_groups.extend([i] for i in rows if not any(active[i]))
    return [rows for rows in row_groups if rows]


def grpo_s_rewards(
    rewards,
    entropy,
    mask,
    groups,
    *,
    beta1=1.0,
    beta2=0.1,
    success_threshold=0.0,
    eps=1e-6,
    backend="auto",
) -> torch.Tensor:
    """GRPO-S: the Eq. 9 sequence rewards before the z-score; [B] float64."""
    r = _grpo_s_sequence_rewards(
        rewards, entropy, mask, groups, beta1, beta2, success_threshold, eps
    )
    return torch.tensor(r, dtype=torch.float64)


def grpo_s_advantages(
    rewards,
    entropy,
    mask,
    groups,
    *,
    beta1=1.0,
    beta2=0.1,
    success_threshold=0.0,
    filter_groups=True,
    eps=1e-6,
    backend="auto",
) -> torch.Tensor:
    """GRPO-S: the group z-score of the Eq. 9 sequence rewards; [B] float64. With
    `filter_groups`, the rows of uniform groups get 0."""
    r = _grpo_s_sequence_rewards(
        rewards, entropy, mask, groups, beta1, beta2, success_threshold, eps
    )
    active = _inputs(rewards, entropy, mask)[2]
    advantages = _group_zscore(r, _grpo_s_groups(groups, active), eps, scale_by_std=True)
    if filter_groups:
        uniform = uniform_group_rows(rewards, groups, success_threshold)
        advantages[torch.tensor(uniform, dtype=torch.bool)] = 0.0
    return advantages


def advantage_metrics(advantages, rewards, entropy, mask, success_threshold=0.0) -> dict:
    """Token-level statistics of the success and failure sets (see `gtpo.advantage_metrics`)."""
    success = _successes(rewards, success_threshold)
    seq_len = entropy.shape[-1]  # also for an empty batch
    raw_entropy = entropy.detach().double().tolist()  # the metric reports inf as inf
    rewards, entropy, active = _inputs(rewards, entropy, mask)
    adv = advantages.detach().double()
    if adv.dim() == 1:
        adv = adv[:, None].expand(len(rewards), seq_len)
    metrics = {"success_fraction": _mean([float(s) for s in success]) if success else 0.0}
    for name, kind in (("success", True), ("failure", False)):
        tokens = [
            (i, t)
            for i in range(len(rewards))
            if success[i] == kind
            for t in range(len(entropy[i]))
            if active[i][t]
        ]
        values = [adv[i, t].item() for i, t in tokens]
        metrics[f"{name}_advantage_mean"] = _mean(values) if values else 0.0
        metrics[f"{name}_advantage_std"] = (
            # One value: 0, unless it is NaN (NaN propagates, as in the library).
            math.sqrt(_unbiased_var(values)) if len(values) > 1 else 0.0 * sum(values)
        )
        entropies = [raw_entropy[i][t] for i, t in tokens]
        metrics[f"{name}_entropy"] = _mean(entropies) if entropies else 0.0
    return metrics
