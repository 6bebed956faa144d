"""The clipped-surrogate policy loss from logits.

The vocabulary-sized work (log-softmax, entropy and their gradient) is the kernels': on the
Triton backend with a gradient, one fused kernel that also writes ``d loss / d logits`` in the
forward pass (:mod:`entropy_kernels.ops.policy_loss`); otherwise the differentiable scoring op. What
remains here is per token and per sequence, on ``[B, T]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from ._validation import (
    check_companion,
    check_logits_and_tokens,
    check_mask_dtype,
    check_positive_float,
    check_values,
    resolve_backend,
)
from .objectives import LOG_RATIO_LIMIT, OBJECTIVE_CODES, Objective, as_objective, objective_loss
from .ops.policy_loss import policy_loss_fused_out
from .ops.scoring import ScoringOptions, gradient_buffer
from .parallel import VocabShard, score_shard, vocab_shard

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


def _hand_over(ctx, grad_logits: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """The stored gradient, handed over once and scaled in place by ``grad_loss`` if not 1."""
    if torch.compiler.is_compiling():  # a host read would break the graph: scale there
        return grad_logits * grad_loss
    if ctx.consumed:
        raise RuntimeError(
            "policy_loss's fused Triton path computed its gradient in the forward pass and "
            "it was already used: a second backward needs backend='torch'"
        )
    ctx.consumed = True
    scale = float(grad_loss)
    if scale != 1.0:
        grad_logits.mul_(scale)
    return grad_logits


class _LossWithGradient(torch.autograd.Function):
    """Attach a gradient computed in the forward pass to a loss value.

    The stored gradient is handed over once (a second backward through the same graph raises):
    it is scaled in place when the incoming gradient is not 1 (gradient accumulation), with
    the scale in float32 and one rounding, so no second logits-sized buffer appears.
    """

    @staticmethod
    def forward(ctx, loss, logits, grad_logits):
        ctx.save_for_backward(grad_logits)
        ctx.consumed = False
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad_logits,) = ctx.saved_tensors
        return None, _hand_over(ctx, grad_logits, grad_loss), None


class _GradientSlot:
    """Where the in-place kernel's gradient (the logits' own storage) is put once written."""

    grad: torch.Tensor | None = None


class _InplaceGradientEdge(torch.autograd.Function):
    """A zero whose gradient is the slot's: applied to the logits *before* the kernel overwrites
    them. After an in-place write, autograd would rebuild a view's grad_fn as a generic
    as_strided backward that allocates a zero-filled logits-sized buffer (measured on an
    H200: the in-place loss peaked at twice the logits); an edge taken first keeps the
    original backward."""

    @staticmethod
    def forward(ctx, logits, slot):
        ctx.slot = slot
        ctx.consumed = False
        return torch.zeros((), dtype=torch.float32, device=logits.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return _hand_over(ctx, ctx.slot.grad, grad_loss), None


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


def _fused_policy_loss(
    logits, tokens, advantages, mask, old_logprobs, ref_logprobs, scoring, options
):
    """Triton path: one kernel computes log-probs, entropy and ``d loss / d logits`` together,
    for the plain clip or a token-local ``options.objective``."""
    objective = options.objective or Objective()
    # CISPO without its lower bound: clip(r, 1 - 1, ...) = min(r, ...) since r > 0.
    kernel_clip_low = options.clip_low
    if objective.name == "cispo" and not objective.cispo_two_sided:
        kernel_clip_low = 1.0
    weights = torch.ones_like(tokens, dtype=torch.float32) if mask is None else mask.float()
    token_advantages = advantages.float()
    if token_advantages.dim() == 1:
        token_advantages = token_advantages.unsqueeze(-1)

    def as_float(tensor):
        return None if tensor is None else tensor.float().contiguous()

    args = (
        tokens,
        token_advantages.expand(tokens.shape).contiguous(),
        aggregation_weights(weights, options).contiguous(),
        as_float(old_logprobs),
        as_float(ref_logprobs) if options.kl_coef != 0.0 else None,
        scoring.temperature,
        scoring.ignore_index,
        float(kernel_clip_low),
        float(options.clip_high),
        None if options.dual_clip is None else float(options.dual_clip),
        float(options.kl_coef),
        float(options.entropy_coef),
        OBJECTIVE_CODES[objective.name],
        None if objective.delta is None else float(objective.delta),
        float(objective.sapo_temperature_pos),
        float(objective.sapo_temperature_neg),
    )
    inplace = scoring.inplace_backward and not torch.compiler.is_compiling()
    grad_logits = gradient_buffer(logits.detach(), inplace)
    if inplace:
        slot = _GradientSlot()
        edge = _InplaceGradientEdge.apply(logits, slot)
    logprobs, entropy = policy_loss_fused_out(logits.detach(), *args, grad_logits)
    with torch.no_grad():
        out = loss_from_logprobs(
            logprobs,
            entropy,
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            options=options,
        )
    if inplace:
        slot.grad = grad_logits
        loss = edge + out.loss
    else:
        loss = _LossWithGradient.apply(out.loss, logits, grad_logits)
    return PolicyLossOutput(loss, logprobs, entropy, out.metrics)


def check_inplace_backward(logits: torch.Tensor, inplace_backward: bool) -> None:
    if not inplace_backward:
        return
    if logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "inplace_backward=True overwrites logits with their gradient: pass logits produced "
            "by an operation (e.g. the lm_head), not a leaf tensor that requires grad"
        )
    # Under torch.compile the in-place variant is functionalised into a copy: nothing overlaps.
    if not torch.compiler.is_compiling() and _may_overlap(logits):
        raise ValueError(
            "inplace_backward=True needs logits whose elements do not share memory, got a view "
            f"with strides {logits.stride()} (e.g. from expand() or unfold()); pass a "
            "materialised tensor"
        )


def _may_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of `tensor` may share memory: some dimension's stride, taken in
    increasing order, is smaller than the span of the dimensions before it. Views that only
    leave gaps (``logits[:, :-1]``) pass; ``expand()`` and ``unfold()`` views do not."""
    span = 1
    for stride, size in sorted(zip(tensor.stride(), tensor.shape, strict=True)):
        if size == 1:
            continue
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def without_ignored_tokens(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """The mask with tokens equal to -100 made inactive."""
    kept = tokens != -100
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
        check_values(tokens, shard.total, -100, mask, log_probs)
    scoring = ScoringOptions(float(temperature), -100, backend, inplace_backward)
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
        return _fused_policy_loss(
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
