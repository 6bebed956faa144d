"""Policy-gradient objectives besides the PPO clip, each defined once in torch on ``[B, T]``.

:func:`entropy_kernels.policy_loss` takes ``objective=`` (a name or an :class:`Objective`).
Token-local objectives (``clip`` with or without ``delta``, ``cispo``, ``sapo``, ``gpg``, on
token ratios, without masks) are fused on the Triton backend: the kernel writes their
derivative in the forward pass, as for the clip. The others need a reduction across tokens
first and take the two-pass route: a scoring pass (log-probs and entropy), this module's
``[B, T]`` maths under autograd, and the scoring op's gradient kernel in the backward. The
torch backend runs every objective through this module's maths.

Notation, per active token ``t`` of sequence ``i``: ``A`` the advantage, ``l = clamp(logp -
old, -20, 20)``, ``r = exp(l)``, ``n_i`` the active tokens of ``i``, ``sg`` stop-gradient,
``eps_low`` / ``eps_high`` the ``clip_low`` / ``clip_high`` of ``policy_loss``.

Ratio levels (``ratio_level``), for ``clip``, ``cispo`` and ``sapo``:

- ``"token"``: ``r``.
- ``"sequence"``: GSPO (Zheng et al. 2025, arXiv 2507.18071) as TRL 1.16 computes it
  (``importance_sampling_level="sequence"``): ``s_i = exp(sum_t l / n_i)`` on every token of
  ``i``, differentiated through the mean.
- ``"sequence-token"``: GSPO-token, as verl 0.9's ``gspo``: the value ``s_i`` with the gradient
  of the token's own log-prob, ``s_i * exp(logp - sg(logp))``. The two levels have the same
  gradient when the advantage and the mask weight are constant along each sequence.

Objectives (``name``); the per-token loss, before masks, KL, entropy bonus and aggregation:

- ``"clip"``: PPO (Schulman et al. 2017): ``max(-A u, -A clip(r, 1 - eps_low, 1 + eps_high))``
  with ``u = min(r, delta)`` under TRL's two-sided clipping ``delta`` (INTELLECT-2, arXiv
  2505.07291; else ``u = r``).
- ``"cispo"``: CISPO (MiniMax-M1, arXiv 2506.13585): ``-sg(clip(r, 1 - eps_low, 1 + eps_high))
  A logp`` (verl's ``cispo``); ``cispo_two_sided=False`` drops the lower bound: TRL's
  ``cispo``, whose bound ``epsilon_high`` is ``1 + clip_high``.
- ``"sapo"``: SAPO (arXiv 2511.20347): ``-(4 / tau) sigmoid(tau (r - 1)) A`` with
  ``tau = sapo_temperature_pos`` where ``A > 0``, else ``sapo_temperature_neg``.
- ``"gpg"``: GPG (arXiv 2504.02546): ``-A logp``.
- ``"geo_mean"``: GMPO (arXiv 2507.20673), verl's ``geo_mean``: ``-A exp(sum_t c / n_i)`` with
  ``c = sign(A) min(sign(A) l, sign(A) clip(l, -eps_low, eps_high))``: the clip acts on each
  token's log-ratio, then the geometric mean of the sequence's ratios.
- ``"vespo"``: VESPO (arXiv 2602.10693) as TRL 1.16's ``vespo``: ``-sg(phi_i) A logp``,
  ``phi(w) = exp(lambda + k log w - lambda w)`` of the sequence ratio
  ``w_i = exp(clamp(sum_t l, log 1e-8, 20))``, with ``(k, lambda)`` the ``vespo_*_pos`` pair
  where ``A >= 0``, else the ``vespo_*_neg`` pair.
- ``"clip_cov"``: Clip-Cov (Cui et al. 2025, arXiv 2505.22617), verl's ``clip_cov``: the
  ``"clip"`` loss with the gradient cut (loss 0) at ``max(int(cov_fraction N), 1)`` tokens
  drawn at random (torch's global generator, as verl) among the active, unclipped tokens
  whose ``(A - mean A)(logp - mean logp)`` lies strictly inside ``clip_cov_bounds`` (means
  over the ``N`` active tokens of the batch).
- ``"kl_cov"``: KL-Cov (same paper), verl's ``kl_cov``: ``-A r`` (no clip), plus
  ``kl_cov_coef |logp - old|`` at the ``max(int(cov_fraction N), 1)`` active tokens of
  largest covariance.

Token masks (any objective): ``off_policy_threshold`` (DeepSeek-V3.2's off-policy sequence
masking, arXiv 2512.02556, TRL's ``off_policy_mask_threshold``) zeroes the loss of
negative-advantage tokens of sequences whose mean ``old - sg(logp)`` exceeds it;
``entropy_quantile = q < 1`` (the 80/20 rule of Wang et al. 2025, arXiv 2506.01939, TRL's
``top_entropy_quantile``) keeps the loss of active tokens whose entropy is at least the
``1 - q`` quantile of the active entropies.
Both act on the objective's term only (not on the KL term or the entropy bonus).

Aggregations are ``policy_loss``'s. TRL's ``luspo`` (LUSPO, arXiv 2602.05261) is ``"clip"``
with ``aggregation="seq-mean-token-sum"`` (TRL averages over every sequence, empty ones too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OBJECTIVES = ("clip", "cispo", "sapo", "gpg", "geo_mean", "vespo", "clip_cov", "kl_cov")
RATIO_LEVELS = ("token", "sequence", "sequence-token")
# The token-local objectives the fused kernel differentiates in registers, by kernel code.
OBJECTIVE_CODES = {"clip": 0, "cispo": 1, "sapo": 2, "gpg": 3}
# Objectives whose ratio is their own (per token or their own sequence form).
_TOKEN_LEVEL_ONLY = ("gpg", "geo_mean", "vespo", "clip_cov", "kl_cov")
# The log of VESPO's lower bound on the sequence ratio (TRL's log(1e-8)).
_VESPO_LOG_MIN = math.log(1e-8)
# The log-ratio is clamped like verl and OpenRLHF do, so the ratio stays finite (the fused
# kernel and every torch objective).
LOG_RATIO_LIMIT = 20.0


def _check(name: str, ok: bool, requirement: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value) -> bool:
    return _is_number(value) and 0 < value < math.inf


@dataclass(frozen=True)
class Objective:
    """An objective of :func:`entropy_kernels.policy_loss` and its options (module docstring)."""

    name: str = "clip"
    ratio_level: str = "token"
    delta: float | None = None
    cispo_two_sided: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    cov_fraction: float = 2e-4
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0)
    kl_cov_coef: float = 1.0
    entropy_quantile: float = 1.0
    off_policy_threshold: float | None = None

    def __post_init__(self):
        _check("objective", self.name in OBJECTIVES, f"one of {OBJECTIVES}", self.name)
        _check(
            "ratio_level",
            self.ratio_level in RATIO_LEVELS,
            f"one of {RATIO_LEVELS}",
            self.ratio_level,
        )
        if self.name in _TOKEN_LEVEL_ONLY:
            _check(
                f"ratio_level of objective {self.name!r}",
                self.ratio_level == "token",
                "'token'",
                self.ratio_level,
            )
        if self.delta is not None:
            _check(
                "delta",
                self.name == "clip" and _positive(self.delta),
                "None, or a finite number > 0 with objective 'clip'",
                self.delta,
            )
        for field in (
            "sapo_temperature_pos",
            "sapo_temperature_neg",
            "vespo_lambda_pos",
            "vespo_lambda_neg",
            "kl_cov_coef",
        ):
            _check(
                field, _positive(getattr(self, field)), "a finite number > 0", getattr(self, field)
            )
        for field in ("vespo_k_pos", "vespo_k_neg"):
            value = getattr(self, field)
            _check(
                field, _is_number(value) and 0 <= value < math.inf, "a finite number >= 0", value
            )
        _check(
            "cispo_two_sided",
            isinstance(self.cispo_two_sided, bool),
            "a bool",
            self.cispo_two_sided,
        )
        _check(
            "cov_fraction",
            _positive(self.cov_fraction) and self.cov_fraction <= 1,
            "in (0, 1]",
            self.cov_fraction,
        )
        bounds = self.clip_cov_bounds
        _check(
            "clip_cov_bounds",
            isinstance(bounds, tuple)
            and len(bounds) == 2
            and all(map(_is_number, bounds))
            and bounds[0] < bounds[1],
            "a tuple (low, high) of numbers with low < high",
            bounds,
        )
        _check(
            "entropy_quantile",
            _positive(self.entropy_quantile) and self.entropy_quantile <= 1,
            "in (0, 1]",
            self.entropy_quantile,
        )
        if self.off_policy_threshold is not None:
            value = self.off_policy_threshold
            _check(
                "off_policy_threshold",
                _is_number(value) and -math.inf < value < math.inf,
                "None or a finite number",
                value,
            )

    @property
    def is_plain_clip(self) -> bool:
        """Whether this is the PPO clip on token ratios, without delta or masks."""
        return self == Objective()

    @property
    def is_token_local(self) -> bool:
        """Whether each token's loss depends on that token alone: the fused kernel's objectives
        (a sequence ratio, a mask or a selection needs a reduction across tokens first)."""
        return (
            self.name in OBJECTIVE_CODES
            and self.ratio_level == "token"
            and self.entropy_quantile == 1.0
            and self.off_policy_threshold is None
        )


def as_objective(objective: str | Objective) -> Objective:
    """``policy_loss``'s ``objective`` argument as an :class:`Objective` (validated)."""
    if isinstance(objective, Objective):
        return objective
    if not isinstance(objective, str):
        raise ValueError(f"objective must be a name or an Objective, got {objective!r}")
    return Objective(objective)


def _masked_mean_per_row(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` mean of ``values`` over each row's active tokens (0 for an empty row)."""
    return (values * active).sum(-1, keepdim=True) / active.sum(-1, keepdim=True).clamp_min(1.0)


def _ratio(logprobs, log_ratio, active, objective: Objective) -> torch.Tensor:
    if objective.ratio_level == "token":
        return torch.exp(log_ratio)
    log_seq = _masked_mean_per_row(log_ratio, active)
    if objective.ratio_level == "sequence":
        return torch.exp(log_seq).expand_as(log_ratio)
    return torch.exp(logprobs - logprobs.detach() + log_seq.detach())


def _clip(advantages, ratio, clip_low, clip_high, delta):
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    unclipped = -advantages * (ratio if delta is None else torch.clamp(ratio, max=delta))
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _covariance(advantages, logprobs, active_bool):
    """``(A - mean A)(logp - mean logp)`` of the active tokens, flattened row-major."""
    adv = advantages.detach()[active_bool]
    logp = logprobs.detach()[active_bool]
    return (adv - adv.mean()) * (logp - logp.mean())


def _clip_cov(per_token, clipped_mask, advantages, logprobs, active_bool, objective):
    low, high = objective.clip_cov_bounds
    cov = torch.full_like(per_token, -math.inf)
    cov[active_bool] = _covariance(advantages, logprobs, active_bool)
    cov[clipped_mask] = -math.inf
    count = max(int(objective.cov_fraction * int(active_bool.sum())), 1)
    candidates = torch.nonzero((cov > low) & (cov < high) & active_bool)
    keep = torch.ones_like(per_token)
    if len(candidates) > 0:
        chosen = candidates[torch.randperm(len(candidates))[: min(count, len(candidates))]]
        keep[chosen[:, 0], chosen[:, 1]] = 0.0
    return per_token * keep, keep == 0


def _kl_cov(per_token, log_ratio, advantages, logprobs, active_bool, objective):
    flat_active = torch.nonzero(active_bool.reshape(-1), as_tuple=True)[0]
    penalised = torch.zeros_like(active_bool)
    if flat_active.numel() > 0:
        cov = _covariance(advantages, logprobs, active_bool).cpu()
        count = max(1, int(len(cov) * objective.cov_fraction))
        chosen = flat_active[torch.topk(cov, count).indices.to(flat_active.device)]
        penalised.view(-1)[chosen] = True
    penalty = objective.kl_cov_coef * log_ratio.abs()
    return torch.where(penalised, per_token + penalty, per_token), penalised


def _vespo_weight(log_ratio, advantages, active, objective):
    """``sg(phi(w_i))`` per token, ``(k, lambda)`` by the token advantage's sign."""
    log_w = torch.clamp((log_ratio.detach() * active).sum(-1, keepdim=True), _VESPO_LOG_MIN, 20.0)
    nonnegative = advantages >= 0
    k = torch.where(nonnegative, objective.vespo_k_pos, objective.vespo_k_neg)
    lam = torch.where(nonnegative, objective.vespo_lambda_pos, objective.vespo_lambda_neg)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def objective_loss(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    old: torch.Tensor,
    advantages: torch.Tensor,
    active: torch.Tensor,
    clip_low: float,
    clip_high: float,
    objective: Objective,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's per-token loss ``[B, T]`` (masks applied) and its ``[B, T]`` bool
    indicators for the metrics: ``clipped`` (the token's clip or cut acts) and ``masked``.

    ``logprobs`` (differentiable), ``entropy``, ``old``, ``advantages`` ``[B, T]`` float32 and
    zero at inactive positions; ``active`` ``[B, T]`` float 0 / 1.
    """
    log_ratio = torch.clamp(logprobs - old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    active_bool = active > 0
    name = objective.name
    clipped = torch.zeros_like(active_bool)
    if name in ("clip", "clip_cov"):
        ratio = _ratio(logprobs, log_ratio, active, objective)
        per_token, clipped = _clip(advantages, ratio, clip_low, clip_high, objective.delta)
        if name == "clip_cov":
            per_token, clipped = _clip_cov(
                per_token, clipped, advantages, logprobs, active_bool, objective
            )
    elif name == "cispo":
        ratio = _ratio(logprobs, log_ratio, active, objective)
        low = 1.0 - clip_low if objective.cispo_two_sided else None
        truncated = torch.clamp(ratio, low, 1.0 + clip_high).detach()
        per_token = -truncated * advantages * logprobs
        clipped = truncated != ratio.detach()
    elif name == "sapo":
        ratio = _ratio(logprobs, log_ratio, active, objective)
        tau = torch.where(
            advantages > 0, objective.sapo_temperature_pos, objective.sapo_temperature_neg
        )
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * advantages
    elif name == "gpg":
        per_token = -advantages * logprobs
    elif name == "geo_mean":
        sign = torch.sign(advantages)
        bounded = torch.clamp(log_ratio, -clip_low, clip_high)
        kept = sign * torch.minimum(sign * log_ratio, sign * bounded)
        per_token = -advantages * torch.exp(_masked_mean_per_row(kept, active))
        clipped = bounded != log_ratio
    elif name == "vespo":
        per_token = -_vespo_weight(log_ratio, advantages, active, objective) * advantages
        per_token = per_token * logprobs
    else:  # kl_cov
        per_token, clipped = _kl_cov(
            -advantages * torch.exp(log_ratio),
            log_ratio,
            advantages,
            logprobs,
            active_bool,
            objective,
        )
    keep = torch.ones_like(active_bool)
    if objective.off_policy_threshold is not None:
        drift = _masked_mean_per_row(old - logprobs.detach(), active)
        keep = keep & ((advantages >= 0) | (drift <= objective.off_policy_threshold))
    if objective.entropy_quantile < 1.0:
        keep = keep & _high_entropy(entropy.detach(), active_bool, objective.entropy_quantile)
    per_token = torch.where(keep, per_token, 0.0)
    return per_token, {"clipped": clipped & active_bool, "masked": ~keep & active_bool}


def _high_entropy(entropy, active_bool, quantile):
    """Active tokens whose entropy is at least the ``1 - quantile`` quantile of the active."""
    values = entropy[active_bool]
    if values.numel() == 0:
        return torch.zeros_like(active_bool)
    threshold = torch.quantile(values.float(), 1.0 - quantile)
    return (entropy >= threshold) & active_bool
