"""The clipped-surrogate policy loss from logits.

The vocabulary-sized work (log-softmax, entropy and their gradient) is the kernels': on the
Triton backend with a gradient, one fused kernel that also writes ``d loss / d logits`` in the
forward pass (:mod:`entropy_kernels.fused_loss` around :mod:`entropy_kernels.ops.policy_loss`);
otherwise the differentiable scoring op. What remains is per token and per sequence, on
``[B, T]`` (:mod:`entropy_kernels.surrogate`). This module validates and picks the route.
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
from .fused_loss import check_inplace_backward, fused_policy_loss
from .objectives import Objective
from .ops.scoring import ScoringOptions
from .parallel import VocabShard, score_shard, vocab_shard
from .surrogate import (
    AGGREGATIONS,
    LossOptions,
    PolicyLossOutput,
    aggregation_weights,
    loss_from_logprobs,
)

# Names of the surrogate's module that callers reach through this one.
__all__ = [
    "AGGREGATIONS",
    "LossOptions",
    "PolicyLossOutput",
    "aggregation_weights",
    "check_inplace_backward",
    "check_loss_inputs",
    "check_loss_rows",
    "logits_scorers",
    "loss_from_logprobs",
    "policy_loss",
    "policy_loss_core",
    "without_ignored_tokens",
]


def without_ignored_tokens(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """The mask with tokens equal to -100 made inactive."""
    kept = tokens != IGNORE_INDEX
    if mask is None:
        return kept
    return mask & kept if mask.dtype == torch.bool else mask * kept


def check_loss_inputs(
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    options: LossOptions,
) -> None:
    """Shapes of the ``[B, T]`` / ``[B]`` companions of ``tokens [B, T]``; ref with kl_coef."""
    shape, device = tuple(tokens.shape), tokens.device
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a tensor of shape {shape} or {shape[:1]}")
    if tuple(advantages.shape) not in (shape, shape[:1]):
        raise ValueError(
            f"advantages must have shape {shape} (per token) or {shape[:1]} (per sequence), "
            f"got {tuple(advantages.shape)}"
        )
    if not advantages.dtype.is_floating_point:
        raise ValueError(f"advantages must be a floating tensor, got dtype {advantages.dtype}")
    check_companion("advantages", advantages, advantages.shape, device)
    check_companion("mask", mask, shape, device)
    check_mask_dtype(mask)
    check_companion("old_logprobs", old_logprobs, shape, device)
    check_companion("ref_logprobs", ref_logprobs, shape, device)
    if options.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs [B, T] is required when kl_coef != 0")


def policy_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
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
    """Clipped-surrogate policy-gradient loss straight from logits.

    Args:
        logits: ``[B, T, V]`` float16 / bfloat16 / float32 (or ``[N, V]`` with
            ``aggregation="token-mean"``); vocabulary dimension with unit stride, leading
            dimensions with any strides (``logits[:, :-1]`` is read in place).
        tokens: ``[B, T]`` integer tokens whose log-probs are scored; ``-100`` marks ignored
            positions (never active, zero gradient).
        advantages: ``[B]`` (one per sequence) or ``[B, T]`` (per token).
        mask: ``[B, T]`` bool or non-negative float weights, None for all active.
        old_logprobs: ``[B, T]`` log-probs of the behaviour policy; None is on-policy
            (``ratio = exp(logp - logp.detach())``).
        ref_logprobs: ``[B, T]`` reference-policy log-probs, required when ``kl_coef != 0``.
        clip_low, clip_high: ``ratio`` is clipped to ``[1 - clip_low, 1 + clip_high]``
            (``clip_low`` in ``[0, 1)``; default 0.2 / 0.2).
        dual_clip: ``c > 1`` bounds the loss of negative-advantage tokens by ``-A * c``.
        kl_coef: weight of the k3 estimator ``exp(ref - logp) - (ref - logp) - 1``.
        entropy_coef: weight of the (differentiable) entropy bonus, subtracted from the loss.
        temperature: the logits are divided by it inside the kernel (``> 0``).
        aggregation: ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"`` (verl's names and definitions).
        normalizer: replaces the active-token count (``"token-mean"``) or ``T``
            (``"seq-mean-token-sum-norm"``).
        inplace_backward: the gradient overwrites the logits' storage (saves one ``[B, T, V]``
            buffer, destroys the caller's logits: on the fused Triton path already during the
            forward call). Logits must then be an op's output, not a leaf requiring grad.
        validate: check, in one host sync, that tokens lie in ``[0, V)`` (or are -100), that
            mask weights are ``>= 0`` and that ``old_logprobs`` / ``ref_logprobs`` are
            ``<= 0`` at active positions (NaN passes and propagates).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        objective: ``"clip"`` (the default, fused on the Triton backend) or another objective of
            :mod:`entropy_kernels.objectives` (``"cispo"``, ``"sapo"``, ``"gpg"``,
            ``"geo_mean"``, ``"vespo"``, ``"clip_cov"``, ``"kl_cov"``), or an
            :class:`~entropy_kernels.objectives.Objective` with its options (GSPO's sequence
            ratio, TRL's ``delta``, the entropy-quantile and off-policy masks...). Anything but
            the token-local objectives (``clip`` with or without ``delta``, ``cispo``,
            ``sapo``, ``gpg``, on token ratios, without masks: fused on Triton like the clip)
            takes the two-pass route (scoring pass, torch maths, gradient kernel).
            ``dual_clip`` applies to ``"clip"`` only.
        tp_group: process group over which the vocabulary is sharded (``logits`` is this
            rank's ``[..., V_r]`` shard; ``tokens``, global ids, and the other arguments are the
            same on every rank); every rank gets the loss, values and metrics of the unsharded
            call and its shard's gradient. None (default): unsharded.

    Per active token, with ``ratio = exp(clamp(logp - old, -20, 20))``:
    ``max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))``, bounded by ``-A c`` where
    ``A < 0`` under ``dual_clip = c``, ``+ kl_coef * k3 - entropy_coef * H``.

    Returns:
        :class:`PolicyLossOutput`. A batch without active tokens has loss 0 and zero gradient.
    """
    tokens = check_logits_and_tokens(logits, tokens)
    check_positive_float("temperature", temperature)
    options = LossOptions(
        clip_low, clip_high, dual_clip, kl_coef, entropy_coef, aggregation, normalizer, objective
    )
    check_loss_rows("logits", "V", tuple(logits.shape), options)
    check_loss_inputs(tokens, advantages, mask, old_logprobs, ref_logprobs, options)
    check_inplace_backward(logits, inplace_backward)
    backend = resolve_backend(backend, logits.device)
    shard = vocab_shard(logits.shape[-1], logits.device, tp_group)
    if validate:
        log_probs = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
        check_values(tokens, shard.total, IGNORE_INDEX, mask, log_probs)
    scoring = ScoringOptions(float(temperature), IGNORE_INDEX, backend, inplace_backward)
    rows = logits.unsqueeze(0) if logits.dim() == 2 else logits
    return policy_loss_core(
        logits_scorers(rows, scoring, shard),
        tokens,
        advantages,
        mask,
        old_logprobs,
        ref_logprobs,
        options,
    )


def check_loss_rows(name: str, last: str, shape: tuple, options: LossOptions) -> None:
    """``name`` is ``[B, T, last]``, or ``[N, last]`` under ``"token-mean"``."""
    if len(shape) == 2 and options.aggregation != "token-mean":
        raise ValueError(
            f"{name} [N, {last}] needs aggregation='token-mean' (no sequences), got "
            f"{options.aggregation!r}; pass {name} [B, T, {last}] instead"
        )
    if len(shape) not in (2, 3):
        raise ValueError(f"{name} must be [B, T, {last}] or [N, {last}], got {shape}")


def logits_scorers(logits: torch.Tensor, scoring: ScoringOptions, shard: VocabShard):
    """``(scorer, fused)`` of ``[B, T, V]`` logits for :func:`policy_loss_core`."""

    def scorer(tokens):
        return score_shard(logits, tokens, scoring, shard)

    fusable = scoring.backend == "triton" and logits.requires_grad and torch.is_grad_enabled()
    if not fusable or shard.group is not None:  # the fused kernel needs the whole vocabulary
        return scorer, None

    def fused(tokens, advantages, mask, old_logprobs, ref_logprobs, options):
        return fused_policy_loss(
            logits, tokens, advantages, mask, old_logprobs, ref_logprobs, scoring, options
        )

    return scorer, fused


def policy_loss_core(
    scorers, tokens, advantages, mask, old_logprobs, ref_logprobs, options: LossOptions
) -> PolicyLossOutput:
    """The loss of validated arguments; ``tokens`` ``[B, T]`` or ``[N]`` (one sequence).

    ``scorers``: ``(scorer, fused)``; ``scorer(tokens [B, T])`` returns differentiable
    ``(logprobs, entropy)``; ``fused``, None or a function of the ``[B, T]`` arguments and
    ``options`` that returns the output with a gradient reaching the scored tensor only.
    """
    scorer, fused = scorers
    flat_tokens = tokens.dim() == 1
    if flat_tokens:
        # [N] tokens are the token-mean loss of one sequence of N tokens.
        tokens, advantages = tokens.unsqueeze(0), advantages[None]
        mask, old_logprobs, ref_logprobs = (
            None if t is None else t.unsqueeze(0) for t in (mask, old_logprobs, ref_logprobs)
        )
    # Tokens equal to -100 are ignored: they are no active tokens, whatever the mask says.
    mask = without_ignored_tokens(mask, tokens)
    companions = (advantages, old_logprobs, ref_logprobs, options.normalizer)
    # The fused kernel computes token-local objectives only (a sequence ratio, a mask or a
    # selection needs a reduction across tokens first), and its gradient reaches only the logits.
    if (
        fused is not None
        and (options.objective is None or options.objective.is_token_local)
        and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in companions)
    ):
        out = fused(tokens, advantages, mask, old_logprobs, ref_logprobs, options)
    else:
        logprobs, entropy = scorer(tokens)
        out = loss_from_logprobs(
            logprobs,
            entropy,
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            options=options,
        )
    if flat_tokens:
        return PolicyLossOutput(out.loss, out.logprobs[0], out.entropy[0], out.metrics)
    return out
