"""One-call GTPO and GRPO-S losses (arXiv 2508.04349) and their `torch.nn.Module` wrappers.

Without `old_entropy`, each call reads the logits once through the scoring op (log-probs and
entropy), shapes the advantages from that entropy (detached), applies the clipped surrogate
(Eq. 7) to the log-probs, and the backward reads the logits once more. With `old_entropy`
(the rollout policy's entropy: the paper's setting) the advantages come first, and on the
Triton backend the fused kernel of `policy_loss` reads the logits once for loss and gradient.
"""

from __future__ import annotations

import torch

from ._validation import (
    IGNORE_INDEX,
    check_companion,
    check_logits_and_tokens,
    check_mask_dtype,
    check_positive_float,
    check_values,
    resolve_backend,
)
from .advantage_groups import (
    check_groups,
    check_rewards,
    group_layout,
    success_outcomes,
    uniform_group_rows,
)
from .objectives import Objective
from .ops.scoring import ScoringOptions
from .parallel import vocab_shard
from .policy_loss import (
    LossOptions,
    PolicyLossOutput,
    check_inplace_backward,
    logits_scorers,
    loss_from_logprobs,
    policy_loss_core,
    without_ignored_tokens,
)
from .shaping import PAPER_CLIP_HIGH, GRPOSShaping, GTPOShaping, advantage_metrics

__all__ = [
    "GTPOShaping",
    "GRPOSShaping",
    "gtpo_loss",
    "grpo_s_loss",
    "advantage_metrics",
]


def _entropy_shaped_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int | torch.Tensor,
    *,
    shaping: GTPOShaping | GRPOSShaping,
    loss_options: LossOptions,
    old_logprobs: torch.Tensor | None,
    old_entropy: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    temperature: float,
    inplace_backward: bool,
    validate: bool,
    backend: str,
    tp_group,
) -> PolicyLossOutput:
    tokens = check_logits_and_tokens(logits, tokens)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V] (rows are grouped), got {tuple(logits.shape)}")
    companions = (rewards, mask, groups, old_logprobs, old_entropy, ref_logprobs)
    checked_rewards = check_shaped_loss_inputs(tokens, *companions, loss_options, temperature)
    check_inplace_backward(logits, inplace_backward)
    backend = resolve_backend(backend, logits.device)
    shard = vocab_shard(logits.shape[-1], logits.device, tp_group)
    if validate:
        log_probs = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
        check_values(
            tokens, shard.total, IGNORE_INDEX, mask, log_probs, {"old_entropy": old_entropy}
        )
    scoring = ScoringOptions(float(temperature), IGNORE_INDEX, backend, inplace_backward)
    return shaped_loss_core(
        logits_scorers(logits, scoring, shard),
        tokens,
        (checked_rewards, *companions[1:]),
        shaping,
        loss_options,
        backend,
    )


def check_shaped_loss_inputs(
    tokens, rewards, mask, groups, old_logprobs, old_entropy, ref_logprobs, options, temperature
) -> torch.Tensor:
    """Checks of the one-call losses' ``[B, T]`` / ``[B]`` companions; the checked rewards."""
    check_positive_float("temperature", temperature)
    shape, device = tuple(tokens.shape), tokens.device
    checked_rewards = check_rewards(rewards)
    if checked_rewards.shape != shape[:1] or rewards.device != device:
        raise ValueError(
            f"rewards must have shape {shape[:1]} on {device}, got "
            f"{tuple(rewards.shape)} on {rewards.device}"
        )
    check_groups(groups, shape[0], device)
    check_companion("mask", mask, shape, device)
    check_mask_dtype(mask)
    check_companion("old_logprobs", old_logprobs, shape, device)
    check_companion("old_entropy", old_entropy, shape, device)
    check_companion("ref_logprobs", ref_logprobs, shape, device)
    if options.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs [B, T] is required when kl_coef != 0")
    return checked_rewards


def shaped_loss_core(
    scorers, tokens, companions, shaping, loss_options: LossOptions, backend: str
) -> PolicyLossOutput:
    """The one-call loss of validated arguments; ``scorers`` as in ``policy_loss_core``.

    ``companions``: ``(checked rewards, mask, groups, old_logprobs, old_entropy, ref_logprobs)``.
    """
    rewards, mask, groups, old_logprobs, old_entropy, ref_logprobs = companions
    # Tokens equal to -100 are inactive for the shaping as for the loss.
    mask = without_ignored_tokens(mask, tokens)
    if old_entropy is not None:
        # The advantages need no pass over the scored tensor: the loss reads it once (on Triton
        # the fused kernel of the logits path also writes the gradient in that pass).
        shaping_entropy = old_entropy.detach()
        advantages = shaping.advantages(rewards, shaping_entropy, mask, groups, backend)
        out = policy_loss_core(
            scorers, tokens, advantages, mask, old_logprobs, ref_logprobs, loss_options
        )
    else:
        logprobs, entropy = scorers[0](tokens)
        shaping_entropy = entropy.detach()
        advantages = shaping.advantages(rewards, shaping_entropy, mask, groups, backend)
        out = loss_from_logprobs(
            logprobs,
            entropy,
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            options=loss_options,
        )
    filtered_rows = None
    if shaping.filter_groups:
        outcomes = success_outcomes(rewards, shaping.success_threshold)
        filtered_rows = uniform_group_rows(
            outcomes, group_layout(groups, rewards.shape[0], rewards.device)
        )
    threshold = shaping.success_threshold
    out.metrics.update(
        advantage_metrics(advantages, rewards, shaping_entropy, mask, threshold, filtered_rows)
    )
    return out


def gtpo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int | torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    old_entropy: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    alpha1: float = 1.0,
    alpha2: float = 0.1,
    success_threshold: float = 0.0,
    normalize: str = "zero-filled",
    scope: str = "batch",
    filter_groups: bool = True,
    eps: float = 1e-6,
    clip_low: float = 0.2,
    clip_high: float = PAPER_CLIP_HIGH,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    aggregation: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    inplace_backward: bool = False,
    validate: bool = True,
    backend: str = "auto",
    objective: str | Objective = "clip",
    tp_group=None,
) -> PolicyLossOutput:
    """GTPO loss from logits: token-level entropy-shaped advantages (Eq. 3, 5, 6) in the
    clipped surrogate (Eq. 7), in one pass over the logits.

    Args:
        logits: `[B, T, V]` float16 / bfloat16 / float32 (vocabulary with unit stride).
        tokens: `[B, T]` integer; rewards: `[B]` real (success when `> success_threshold`).
        mask: `[B, T]` bool or float (nonzero = active; float values weight the loss), or None.
        groups: int `G` (consecutive groups of `G` rows, `B % G == 0`) or integer ids `[B]`.
        old_logprobs: `[B, T]` behaviour-policy log-probs; None is on-policy.
        old_entropy: `[B, T]` rollout-policy entropy to shape from (the paper's setting);
            None shapes from this pass's entropy. Either way it is detached.
        ref_logprobs: `[B, T]`, required when `kl_coef != 0`.
        alpha1, alpha2, success_threshold, normalize, scope, filter_groups, eps: as in
            :func:`entropy_kernels.gtpo_advantages` (defaults 1.0, 0.1, 0.0, "zero-filled",
            "batch", True, 1e-6).
        clip_low, clip_high, dual_clip, kl_coef, entropy_coef, temperature, aggregation,
        normalizer, inplace_backward, validate, backend: as in
            :func:`entropy_kernels.policy_loss`, with the paper's `clip_high=0.28`
            (defaults: 0.2, 0.28, None, 0.0, 0.0, 1.0, "token-mean", None, False, True, "auto").
        objective: as in :func:`entropy_kernels.policy_loss` (default ``"clip"``, Eq. 7): GTPO
            advantages under CISPO, GSPO's sequence ratio, SAPO...
        tp_group: vocabulary-parallel process group, as in :func:`entropy_kernels.policy_loss`.

    Returns:
        `PolicyLossOutput`; `metrics` adds the statistics of :func:`advantage_metrics`.
    """
    return _entropy_shaped_loss(
        logits,
        tokens,
        rewards,
        mask,
        groups,
        shaping=GTPOShaping(
            alpha1, alpha2, success_threshold, normalize, scope, eps, filter_groups
        ),
        loss_options=LossOptions(
            clip_low,
            clip_high,
            dual_clip,
            kl_coef,
            entropy_coef,
            aggregation,
            normalizer,
            objective,
        ),
        old_logprobs=old_logprobs,
        old_entropy=old_entropy,
        ref_logprobs=ref_logprobs,
        temperature=temperature,
        inplace_backward=inplace_backward,
        validate=validate,
        backend=backend,
        tp_group=tp_group,
    )


def grpo_s_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int | torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    old_entropy: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta1: float = 1.0,
    beta2: float = 0.1,
    success_threshold: float = 0.0,
    filter_groups: bool = True,
    eps: float = 1e-6,
    clip_low: float = 0.2,
    clip_high: float = PAPER_CLIP_HIGH,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    aggregation: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    inplace_backward: bool = False,
    validate: bool = True,
    backend: str = "auto",
    objective: str | Objective = "clip",
    tp_group=None,
) -> PolicyLossOutput:
    """GRPO-S loss from logits: sequence-level entropy-shaped advantages (Eq. 8, 9) on every
    active token of the row, in the clipped surrogate (Eq. 7), in one pass over the logits.

    Args:
        logits, tokens, rewards, mask, groups, old_logprobs, old_entropy, ref_logprobs: as in
            :func:`gtpo_loss`.
        beta1, beta2, success_threshold, filter_groups, eps: as in
            :func:`entropy_kernels.grpo_s_advantages` (defaults 1.0, 0.1, 0.0, True, 1e-6).
        clip_low, clip_high, dual_clip, kl_coef, entropy_coef, temperature, aggregation,
        normalizer, inplace_backward, validate, backend, objective, tp_group: as in
            :func:`gtpo_loss`.

    Returns:
        `PolicyLossOutput`; `metrics` adds the statistics of :func:`advantage_metrics`.
    """
    return _entropy_shaped_loss(
        logits,
        tokens,
        rewards,
        mask,
        groups,
        shaping=GRPOSShaping(beta1, beta2, success_threshold, eps, filter_groups),
        loss_options=LossOptions(
            clip_low,
            clip_high,
            dual_clip,
            kl_coef,
            entropy_coef,
            aggregation,
            normalizer,
            objective,
        ),
        old_logprobs=old_logprobs,
        old_entropy=old_entropy,
        ref_logprobs=ref_logprobs,
        temperature=temperature,
        inplace_backward=inplace_backward,
        validate=validate,
        backend=backend,
        tp_group=tp_group,
    )
