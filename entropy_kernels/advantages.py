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

import torch

from ._validation import check_shaping_constant, check_threshold, resolve_backend
from .advantage_groups import (
    GRPO_SCALES,
    NORMALIZE_MODES,
    SCOPES,
    GroupLayout,
    active_mask,
    check_choice,
    check_eps,
    check_rewards,
    check_token_inputs,
    group_layout,
    success_outcomes,
    uniform_group_rows,
    without_uniform_groups,
)
from .backends.torch_shaping import (
    torch_moments,
    torch_shaping_terms,
)
from .ops import advantage_shaping as shaping_ops
from .sequence_advantages import (
    grpo_advantages,
    grpo_s_advantages,
    grpo_s_rewards,
)

# The option names, the group helpers and the sequence-level advantages
# (entropy_kernels.sequence_advantages) are reached through this module too (the reference
# restates the names; the TRL adapter uses the helpers).
__all__ = [
    "GRPO_SCALES",
    "NORMALIZE_MODES",
    "SCOPES",
    "WHITENING_EPS",
    "GroupLayout",
    "group_layout",
    "grpo_advantages",
    "grpo_s_advantages",
    "grpo_s_rewards",
    "gtpo_advantages",
    "row_whitening",
    "success_outcomes",
    "uniform_group_rows",
]

# Added to the variance before the square root in the Eq. 6 whitening.
WHITENING_EPS = 1e-8


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
    entropy, mask = check_token_inputs(entropy, mask, rewards.shape[0], rewards.device)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_choice("scope", scope, SCOPES)
    check_eps(eps)
    check_shaping_constant("alpha2", alpha2)
    check_threshold(success_threshold)
    return gtpo_advantages_core(
        rewards,
        entropy,
        mask,
        groups,
        (alpha1, alpha2, success_threshold, normalize, scope, filter_groups, eps),
        backend,
    )


def gtpo_advantages_core(rewards, entropy, mask, groups, options: tuple, backend: str):
    """:func:`gtpo_advantages` of validated arguments (``rewards`` / ``entropy`` detached);
    ``options``: ``(alpha1, alpha2, success_threshold, normalize, scope, filter_groups, eps)``.
    The one-call losses call it with options checked once, by ``GTPOShaping``."""
    alpha1, alpha2, success_threshold, normalize, scope, filter_groups, eps = options
    batch, device = rewards.shape[0], rewards.device
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
    active = active_mask(mask, entropy) & (outcomes != 0)[:, None]
    success = outcomes > 0
    s = torch_shaping_terms(entropy, active, outcomes, success, layout, alpha2, eps)
    if not whiten:
        success_active = active & success[:, None]
        return torch.where(success_active, base + s, torch.where(active, -base + s, 0.0))
    moments = torch_moments(s, active, success, layout)
    row_mean, row_scale = row_whitening(moments, layout, outcomes, normalize, scope, base)
    return torch.where(active, (s - row_mean[:, None]) * row_scale[:, None], 0.0)
