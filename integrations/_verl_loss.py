"""verl adapter: :func:`fused_policy_loss`, verl's policy loss from logits.

Part of :mod:`entropy_kernels.integrations.verl`, which re-exports :func:`fused_policy_loss`
(import it from there). Importing this module never imports verl.
"""

from __future__ import annotations

import torch

import entropy_kernels
from entropy_kernels.objectives import Objective


def fused_policy_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's policy loss of ``config.policy_loss.loss_mode`` (default ``"vanilla"``) from logits.

    ``"vanilla"`` (``compute_policy_loss_vanilla`` with its ``agg_loss``), ``"cispo"``,
    ``"gpg"`` and ``"sapo"`` are fused (verl's sapo always aggregates ``seq-mean-token-mean``,
    and so does this); any other mode is verl's registered function,
    ``get_policy_loss_fn(loss_mode)``, called with the (differentiable) log-probs of the fused
    scoring op and these arguments: its numbers, metrics and random draws (``clip_cov`` uses
    torch's global generator) are verl's.

    Args:
        logits: ``[B, T, V]`` logits predicting the ``T`` response tokens (verl scales by the
            temperature before scoring; pass ``temperature`` to do it inside the kernel).
        tokens: ``[B, T]`` response tokens.
        old_log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights: as
            ``compute_policy_loss_vanilla``: ``config`` is the actor config (``clip_ratio``,
            ``clip_ratio_low`` / ``_high``, ``clip_ratio_c`` as the dual clip, which verl always
            applies, and ``global_batch_info``); ``rollout_is_weights`` (non-negative) is folded
            into the advantages, which is exact for the clipped surrogate. Every
            ``loss_agg_mode`` of verl 0.9 is supported, ``"token-sum"`` included.

    Returns:
        ``(pg_loss, metrics)``: verl's metrics of the mode (for ``"vanilla"``
        ``actor/pg_clipfrac``, ``actor/ppo_kl`` and ``actor/pg_clipfrac_lower``).
    """
    loss_mode = _loss_mode(config)
    objective = _fused_objective(loss_mode, config)
    if objective is None:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        loss_fn = get_policy_loss_fn(loss_mode)
        log_prob, _ = entropy_kernels.logprobs_and_entropy(
            logits, tokens, temperature=temperature, backend=backend
        )
        return loss_fn(
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            loss_agg_mode,
            config,
            rollout_is_weights,
        )
    clip = config.clip_ratio
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    dual_clip = config.get("clip_ratio_c", 3.0) if loss_mode == "vanilla" else None
    if loss_mode == "sapo":  # verl's sapo aggregates so whatever loss_agg_mode says
        loss_agg_mode = "seq-mean-token-mean"
    aggregation, normalizer, scale = _aggregation(
        loss_agg_mode, response_mask, **getattr(config, "global_batch_info", {})
    )
    # The weights scale each token's loss: for these objectives, exactly their advantage's.
    shaped = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    out = entropy_kernels.policy_loss(
        logits,
        tokens,
        shaped,
        response_mask,
        old_logprobs=old_log_prob,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        temperature=temperature,
        aggregation=aggregation,
        normalizer=normalizer,
        backend=backend,
        objective=objective,
    )
    loss = out.loss if scale is None else out.loss * scale
    metrics = _verl_metrics(
        loss_mode,
        out.logprobs,
        old_log_prob,
        advantages,
        response_mask.float(),
        (clip_low, clip_high, dual_clip),
    )
    return loss, metrics


def _fused_objective(loss_mode: str, config) -> Objective | None:
    """The objective of ``policy_loss`` that computes verl's ``loss_mode``; None for the modes
    that are not token-local (or options ``Objective`` refuses): verl's own function runs."""
    if loss_mode in ("vanilla", "cispo", "gpg"):
        return Objective("clip" if loss_mode == "vanilla" else loss_mode)
    tau_pos, tau_neg = getattr(config, "tau_pos", None), getattr(config, "tau_neg", None)
    if loss_mode == "sapo" and all(
        isinstance(t, (int, float)) and 0 < t < float("inf") for t in (tau_pos, tau_neg)
    ):
        return Objective("sapo", sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg)
    return None


def _verl_metrics(loss_mode, logprobs, old_log_prob, advantages, mask, clips) -> dict:
    """verl's metrics of ``loss_mode``, from the log-probs of the fused pass and the advantages
    it was given (before the rollout weights)."""
    if loss_mode == "gpg":
        return {}
    clip_low, clip_high, dual_clip = clips
    log_ratio = (logprobs - old_log_prob).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    metrics = {"actor/ppo_kl": _masked_mean(-log_ratio, mask)}
    if loss_mode == "vanilla":
        unclipped, clipped = -advantages * ratio, -advantages * clipped_ratio
        bound = -advantages * dual_clip
        metrics["actor/pg_clipfrac"] = _masked_mean(clipped > unclipped, mask)
        metrics["actor/pg_clipfrac_lower"] = _masked_mean(
            (torch.maximum(unclipped, clipped) > bound) & (advantages < 0), mask
        )
    else:
        clipfrac = _masked_mean(ratio != clipped_ratio, mask) if loss_mode == "cispo" else 0.0
        metrics["actor/pg_clipfrac"] = clipfrac
        metrics["actor/pg_clipfrac_lower"] = 0.0
    return metrics


def _loss_mode(config) -> str:
    """``config.policy_loss.loss_mode``, as verl's actor reads it (``"vanilla"`` when unset)."""
    policy_loss = getattr(config, "policy_loss", None)
    if policy_loss is None:
        return "vanilla"
    return policy_loss.get("loss_mode", "vanilla")


def _aggregation(
    loss_agg_mode,
    response_mask,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """``agg_loss``'s arguments as ``policy_loss``'s: (aggregation, normalizer, loss scale)."""
    if loss_agg_mode in ("token-mean", "token-sum"):
        if loss_agg_mode == "token-sum":
            normalizer = 1.0 / dp_size
        elif batch_num_tokens is not None:
            normalizer = batch_num_tokens / dp_size
        elif dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        else:
            normalizer = None
        return "token-mean", normalizer, None
    if loss_agg_mode not in (
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    ):
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    normalizer = loss_scale_factor if loss_agg_mode == "seq-mean-token-sum-norm" else None
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        return loss_agg_mode, normalizer, None
    # policy_loss averages over the local non-empty sequences, verl over the global count.
    local = (response_mask.sum(-1) > 0).sum()
    return loss_agg_mode, normalizer, local * dp_size / global_batch_size


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return ((values * mask).sum() / (mask.sum() + 1e-8)).item()
