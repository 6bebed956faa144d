"""The clipped surrogate and its aggregation on ``[B, T]``: everything of the policy loss after
the vocabulary-sized work, in torch on per-token log-probs and entropy.

:func:`loss_from_logprobs` is the loss of the two-pass route (and the values and metrics of the
fused one); :func:`aggregation_weights` is ``d loss / d per_token_loss`` in closed form, which
the fused kernel reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._validation import check_positive_float, check_real
from .objectives import LOG_RATIO_LIMIT, Objective, as_objective, objective_loss

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


@dataclass
class PolicyLossOutput:
    """``loss``: scalar, differentiable. ``logprobs`` / ``entropy``: ``[B, T]`` float32, detached.

    ``metrics``: 0-dim tensors (no host sync), means over active tokens.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossOptions:
    """Options of the per-token surrogate and its aggregation (see :func:`policy_loss`)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    normalizer: float | torch.Tensor | None = None
    # A name or Objective of entropy_kernels.objectives; stored as None for the plain clip
    # (the fused kernel's), an Objective otherwise.
    objective: str | Objective | None = None

    def __post_init__(self):
        chosen = as_objective("clip" if self.objective is None else self.objective)
        if self.dual_clip is not None and chosen.name != "clip":
            raise ValueError(f"dual_clip applies to objective 'clip' only, not {chosen.name!r}")
        object.__setattr__(self, "objective", None if chosen.is_plain_clip else chosen)
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef"):
            check_real(name, getattr(self, name))
        if self.dual_clip is not None:
            check_real("dual_clip", self.dual_clip)
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must lie in [0, 1), got {self.clip_low!r}")
        if not self.clip_high >= 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high!r}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be None or a number > 1, got {self.dual_clip!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.normalizer is not None:
            if self.aggregation not in ("token-mean", "seq-mean-token-sum-norm"):
                raise ValueError(
                    "normalizer applies to aggregation 'token-mean' or 'seq-mean-token-sum-norm', "
                    f"not {self.aggregation!r}"
                )
            if isinstance(self.normalizer, torch.Tensor):
                if self.normalizer.numel() != 1:
                    raise ValueError(
                        "normalizer must be a number or a one-element tensor, got shape "
                        f"{tuple(self.normalizer.shape)}"
                    )
                # A [1] normalizer must not turn the scalar loss into a [1] tensor.
                object.__setattr__(self, "normalizer", self.normalizer.reshape(()))
            else:
                check_positive_float("normalizer", self.normalizer)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / total


def _aggregate(per_token: torch.Tensor, weights: torch.Tensor, options: LossOptions):
    """verl's ``agg_loss`` (one data-parallel rank) with the spec's normalisers."""
    tiny = torch.finfo(torch.float32).tiny
    weighted = per_token * weights
    if options.aggregation == "token-mean":
        if options.normalizer is None:
            return weighted.sum() / weights.sum().clamp_min(tiny)
        return weighted.sum() / options.normalizer
    tokens_per_seq = weights.sum(-1)
    seq_active = (tokens_per_seq > 0).float()
    n_seqs = seq_active.sum().clamp_min(1.0)
    seq_sum = weighted.sum(-1)
    if options.aggregation == "seq-mean-token-mean":
        return (seq_sum / tokens_per_seq.clamp_min(tiny) * seq_active).sum() / n_seqs
    loss = (seq_sum * seq_active).sum() / n_seqs
    if options.aggregation == "seq-mean-token-sum-norm":
        loss = loss / _length_normalizer(per_token.shape[-1], options)
    return loss


def _length_normalizer(seq_len: int, options: LossOptions):
    """``T`` (at least 1, so an empty batch stays 0) or the user's normalizer."""
    return max(seq_len, 1) if options.normalizer is None else options.normalizer


def loss_from_logprobs(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    options: LossOptions,
) -> PolicyLossOutput:
    """The surrogate loss from differentiable ``[B, T]`` log-probs and entropy (validated inputs).

    ``advantages`` is ``[B]`` or ``[B, T]``; ``mask`` is ``[B, T]`` bool/float or None.
    ``options.objective`` (None: the PPO clip) replaces the clipped surrogate by
    :func:`entropy_kernels.objectives.objective_loss`.
    """
    objective = options.objective
    if options.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs [B, T] is required when kl_coef != 0")
    weights = torch.ones_like(logprobs) if mask is None else mask.to(torch.float32)
    active = weights != 0

    def at_active(values: torch.Tensor) -> torch.Tensor:
        # Inactive positions take no part, as in verl's masked sums: a -inf log-prob or NaN
        # padding there must reach neither the loss, the metrics nor (through the backward of
        # exp or the ratio) the gradient.
        return torch.where(active, values.to(torch.float32), 0.0)

    scored = (logprobs.detach(), entropy.detach())
    logprobs, entropy = at_active(logprobs), at_active(entropy)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = at_active(advantages)
    old = logprobs.detach() if old_logprobs is None else at_active(old_logprobs)

    log_ratio = torch.clamp(logprobs - old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - options.clip_low, 1.0 + options.clip_high)
    if objective is None:
        per_token = torch.maximum(unclipped, clipped)
    else:
        per_token, indicators = objective_loss(
            logprobs,
            entropy,
            old,
            advantages,
            active.float(),
            options.clip_low,
            options.clip_high,
            objective,
        )
    negative = advantages < 0
    if options.dual_clip is not None:
        dual_bound = -advantages * options.dual_clip
        dual_clipped = negative & (per_token > dual_bound)
        per_token = torch.where(negative, torch.minimum(per_token, dual_bound), per_token)
    kl = None
    if ref_logprobs is not None:
        ref_minus_logp = at_active(ref_logprobs) - logprobs
        kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1.0
        if options.kl_coef != 0.0:
            per_token = per_token + options.kl_coef * kl
    if options.entropy_coef != 0.0:
        per_token = per_token - options.entropy_coef * entropy

    loss = _aggregate(per_token, weights, options)

    with torch.no_grad():
        total = weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
        ratio = ratio.detach()
        metrics = {
            "clip_fraction": _masked_mean((clipped > unclipped).float(), weights, total),
            "clip_low_fraction": _masked_mean(
                ((ratio < 1.0 - options.clip_low) & negative).float(), weights, total
            ),
            "clip_high_fraction": _masked_mean(
                ((ratio > 1.0 + options.clip_high) & (advantages > 0)).float(),
                weights,
                total,
            ),
            "dual_clip_fraction": (
                _masked_mean(dual_clipped.float(), weights, total)
                if options.dual_clip is not None
                else torch.zeros((), device=weights.device)
            ),
            "approx_kl": _masked_mean(old - logprobs.detach(), weights, total),
            "entropy": _masked_mean(entropy.detach(), weights, total),
        }
        if kl is not None:
            metrics["kl"] = _masked_mean(kl.detach(), weights, total)
        if objective is not None:
            for name, indicator in indicators.items():
                metrics[f"objective_{name}_fraction"] = _masked_mean(
                    indicator.float(), weights, total
                )
    # The scored values themselves, at every position.
    return PolicyLossOutput(loss, *scored, metrics)


def aggregation_weights(weights: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """``d loss / d per_token_loss`` of :func:`_aggregate`, ``[B, T]``, in closed form."""
    tiny = torch.finfo(torch.float32).tiny
    if options.aggregation == "token-mean":
        if options.normalizer is None:
            return weights / weights.sum().clamp_min(tiny)
        return weights / options.normalizer
    tokens_per_seq = weights.sum(-1, keepdim=True)
    seq_active = (tokens_per_seq > 0).float()
    scale = seq_active / seq_active.sum().clamp_min(1.0)
    if options.aggregation == "seq-mean-token-mean":
        scale = scale / tokens_per_seq.clamp_min(tiny)
    elif options.aggregation == "seq-mean-token-sum-norm":
        scale = scale / _length_normalizer(weights.shape[-1], options)
    return weights * scale
