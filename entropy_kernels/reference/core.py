"""Plain PyTorch references for scoring and the policy loss, written to be read.

They materialise ``[..., V]`` tensors and compute in the input's precision promoted to at least
float32 (pass float64 logits for a float64 truth). Tests and benchmarks compare against them.
Like the whole reference package they import only torch and the standard library, so that
they share no code, constant or check with what they are compared with.
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch

from .parallel import gather_vocab

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


# The fields of entropy_kernels.PolicyLossOutput.
PolicyLossOutput = namedtuple("PolicyLossOutput", ["loss", "logprobs", "entropy", "metrics"])


def check_options(clip_low, clip_high, dual_clip, aggregation, normalizer, temperature):
    """The option checks of the public loss, restated (ValueError naming the argument)."""
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must lie in [0, 1), got {clip_low!r}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be None or a number > 1, got {dual_clip!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if normalizer is not None and aggregation not in ("token-mean", "seq-mean-token-sum-norm"):
        raise ValueError(f"normalizer does not apply to aggregation {aggregation!r}")
    if isinstance(normalizer, (int, float)) and not 0 < normalizer < math.inf:
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def logprobs_and_entropy(
    logits,
    tokens,
    *,
    temperature=1.0,
    ignore_index=-100,
    validate=True,
    backend="auto",
    tp_group=None,
):
    """Reference of :func:`entropy_kernels.logprobs_and_entropy`; validate/backend are unused.
    With ``tp_group`` the logits shards are all-gathered first (``reference/parallel.py``)."""
    logits = gather_vocab(logits, tp_group)
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    probs = log_probs.exp()
    # Masked (-inf) vocabulary entries contribute 0 * 0, not 0 * -inf (also in the gradient).
    entropy = -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1)
    vocab_size = logits.shape[-1]
    in_range = (tokens >= 0) & (tokens < vocab_size)
    token_logp = log_probs.gather(-1, tokens.clamp(0, vocab_size - 1).unsqueeze(-1)).squeeze(-1)
    token_logp = torch.where(in_range, token_logp, torch.nan)
    ignored = tokens == ignore_index
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(ignored, zero, token_logp), torch.where(ignored, zero, entropy)


def aggregate(per_token, weights, aggregation, normalizer=None):
    """verl's ``agg_loss`` definitions, one sequence at a time."""
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.reshape(())
    if aggregation == "token-mean":
        total = (per_token * weights).sum()
        count = weights.sum() if normalizer is None else normalizer
        return total / count if count != 0 else total * 0
    seq_values = []
    for row_loss, row_weights in zip(per_token, weights, strict=True):
        if row_weights.sum() == 0:
            continue
        row_sum = (row_loss * row_weights).sum()
        if aggregation == "seq-mean-token-mean":
            seq_values.append(row_sum / row_weights.sum())
        else:
            seq_values.append(row_sum)
    if not seq_values:
        return (per_token * weights).sum() * 0
    loss = torch.stack(seq_values).mean()
    if aggregation == "seq-mean-token-sum-norm":
        loss = loss / (max(per_token.shape[-1], 1) if normalizer is None else normalizer)
    return loss


def policy_loss(
    logits,
    tokens,
    advantages,
    mask=None,
    *,
    old_logprobs=None,
    ref_logprobs=None,
    clip_low=0.2,
    clip_high=0.2,
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
    """Reference of :func:`entropy_kernels.policy_loss`; metrics as Python-free 0-dim tensors."""
    logits = gather_vocab(logits, tp_group)
    check_options(clip_low, clip_high, dual_clip, aggregation, normalizer, temperature)
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs [B, T] is required when kl_coef != 0")
    logp, entropy = logprobs_and_entropy(logits, tokens, temperature=temperature)
    scored = (logp.detach(), entropy.detach())
    if logits.dim() == 2:
        logp, entropy, tokens = logp[None], entropy[None], tokens[None]
        advantages = advantages[None]
        mask = None if mask is None else mask[None]
        old_logprobs = None if old_logprobs is None else old_logprobs[None]
        ref_logprobs = None if ref_logprobs is None else ref_logprobs[None]
    weights = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
    weights = weights * (tokens != -100)  # ignored tokens are never active

    def at_active(x):
        # Inactive positions take no part (verl's masked sums), also where x is -inf or NaN.
        return torch.where(weights != 0, x.to(logp.dtype), 0.0)

    logp, entropy = at_active(logp), at_active(entropy)
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    adv = at_active(adv)
    old = logp.detach() if old_logprobs is None else at_active(old_logprobs)

    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    loss_per_token = pg
    kl = None
    if ref_logprobs is not None:
        delta = at_active(ref_logprobs) - logp
        kl = torch.exp(delta) - delta - 1
        if kl_coef != 0:
            loss_per_token = loss_per_token + kl_coef * kl
    loss_per_token = loss_per_token - entropy_coef * entropy
    loss = aggregate(loss_per_token, weights, aggregation, normalizer)

    def mean(x):
        return (x.to(logp.dtype) * weights).sum() / weights.sum().clamp_min(1e-30)

    metrics = {
        "clip_fraction": mean(pg_clipped > pg_unclipped),
        "clip_low_fraction": mean((ratio < 1 - clip_low) & (adv < 0)),
        "clip_high_fraction": mean((ratio > 1 + clip_high) & (adv > 0)),
        "approx_kl": mean(old - logp),
        "entropy": mean(entropy),
    }
    metrics["dual_clip_fraction"] = (
        mean((adv < 0) & (torch.maximum(pg_unclipped, pg_clipped) > -adv * dual_clip))
        if dual_clip is not None
        else mean(torch.zeros_like(adv, dtype=torch.bool))
    )
    if kl is not None:
        metrics["kl"] = mean(kl)
    # The scored values themselves, at every position, shaped like tokens.
    return PolicyLossOutput(loss, *scored, {k: v.detach() for k, v in metrics.items()})
