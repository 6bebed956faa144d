"""Reference one-call GTPO / GRPO-S losses: the shaping entropy (logits or ``old_entropy``),
the reference advantages of :mod:`entropy_kernels.reference.advantages`, then the reference
``policy_loss`` with the shaped advantages and the loss metrics."""

from __future__ import annotations

from .advantages import (
    _active_mask,
    _mean,
    advantage_metrics,
    grpo_s_advantages,
    gtpo_advantages,
    uniform_group_rows,
)
from .core import logprobs_and_entropy, policy_loss
from .parallel import gather_vocab

__all__ = ["grpo_s_loss", "gtpo_loss"]


def _filtered(rewards, groups, success_threshold, filter_groups) -> list[bool]:
    if not filter_groups:
        return [False] * rewards.shape[0]
    return uniform_group_rows(rewards, groups, success_threshold)


def _policy_loss_with(
    advantages,
    logits,
    tokens,
    mask,
    shaping_entropy,
    rewards,
    success_threshold,
    filtered,
    loss_options,
):
    out = policy_loss(logits, tokens, advantages, mask, **loss_options)
    out.metrics.update(
        advantage_metrics(advantages, rewards, shaping_entropy, mask, success_threshold)
    )
    out.metrics["filtered_fraction"] = _mean([float(f) for f in filtered]) if filtered else 0.0
    return out


def _shaping_entropy(logits, tokens, old_entropy, temperature):
    if old_entropy is not None:
        return old_entropy.detach()
    return logprobs_and_entropy(logits.detach(), tokens, temperature=temperature)[1]


def gtpo_loss(
    logits,
    tokens,
    rewards,
    mask,
    groups,
    *,
    old_logprobs=None,
    old_entropy=None,
    ref_logprobs=None,
    alpha1=1.0,
    alpha2=0.1,
    success_threshold=0.0,
    normalize="zero-filled",
    scope="batch",
    filter_groups=True,
    eps=1e-6,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=None,
    kl_coef=0.0,
    entropy_coef=0.0,
    temperature=1.0,
    aggregation="token-mean",
    normalizer=None,
    inplace_backward=False,
    validate=True,
    backend="auto",
    tp_group=None,
):
    """Reference GTPO loss: reference `policy_loss` with `gtpo_advantages` (Eq. 6, 7)."""
    loss = {name: value for name, value in locals().items() if name in _LOSS_OPTIONS}

    def advantages_of(shaping_entropy, mask):
        return gtpo_advantages(
            rewards,
            shaping_entropy,
            mask,
            groups,
            alpha1=alpha1,
            alpha2=alpha2,
            success_threshold=success_threshold,
            normalize=normalize,
            scope=scope,
            filter_groups=filter_groups,
            eps=eps,
        )

    filtering = (success_threshold, filter_groups)
    logits = gather_vocab(logits, tp_group)
    return _shaped_loss(
        advantages_of, logits, tokens, rewards, mask, groups, old_entropy, filtering, loss
    )


def grpo_s_loss(
    logits,
    tokens,
    rewards,
    mask,
    groups,
    *,
    old_logprobs=None,
    old_entropy=None,
    ref_logprobs=None,
    beta1=1.0,
    beta2=0.1,
    success_threshold=0.0,
    filter_groups=True,
    eps=1e-6,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=None,
    kl_coef=0.0,
    entropy_coef=0.0,
    temperature=1.0,
    aggregation="token-mean",
    normalizer=None,
    inplace_backward=False,
    validate=True,
    backend="auto",
    tp_group=None,
):
    """Reference GRPO-S loss: reference `policy_loss` with `grpo_s_advantages` on every token."""
    loss = {name: value for name, value in locals().items() if name in _LOSS_OPTIONS}

    def advantages_of(shaping_entropy, mask):
        return grpo_s_advantages(
            rewards,
            shaping_entropy,
            mask,
            groups,
            beta1=beta1,
            beta2=beta2,
            success_threshold=success_threshold,
            filter_groups=filter_groups,
            eps=eps,
        )

    filtering = (success_threshold, filter_groups)
    logits = gather_vocab(logits, tp_group)
    return _shaped_loss(
        advantages_of, logits, tokens, rewards, mask, groups, old_entropy, filtering, loss
    )


# The reference policy_loss options that the one-call losses pass on.
_LOSS_OPTIONS = (
    "old_logprobs",
    "ref_logprobs",
    "clip_low",
    "clip_high",
    "dual_clip",
    "kl_coef",
    "entropy_coef",
    "temperature",
    "aggregation",
    "normalizer",
)


def _shaped_loss(
    advantages_of, logits, tokens, rewards, mask, groups, old_entropy, filtering, loss
):
    """The one-call loss: shaping entropy, ``advantages_of(entropy, mask)``, reference loss."""
    mask = _active_mask(mask, tokens)
    shaping_entropy = _shaping_entropy(logits, tokens, old_entropy, loss["temperature"])
    success_threshold, filter_groups = filtering
    return _policy_loss_with(
        advantages_of(shaping_entropy, mask),
        logits,
        tokens,
        mask,
        shaping_entropy,
        rewards,
        success_threshold,
        _filtered(rewards, groups, success_threshold, filter_groups),
        loss,
    )
