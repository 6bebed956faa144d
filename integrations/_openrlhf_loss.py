"""OpenRLHF adapter: :class:`FusedPolicyLoss` and :class:`FusedLinearPolicyLoss`,
OpenRLHF's ``PolicyLoss`` from logits or from the hidden states and the LM head.

Part of :mod:`entropy_kernels.integrations.openrlhf`, which re-exports both classes (import
them from there). Importing this module never imports OpenRLHF.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import entropy_kernels

#: OpenRLHF 0.11's ``policy_loss_type`` values: "ppo" is fused, "gspo" runs OpenRLHF's maths.
POLICY_LOSS_TYPES = ("ppo", "gspo")


class FusedPolicyLoss(torch.nn.Module):
    """OpenRLHF's ``PolicyLoss`` (0.11) from logits, by :func:`entropy_kernels.policy_loss`.

    Same constructor options and return value; the first argument of :meth:`forward` is the
    logits instead of the log-probs. Supported: ``policy_loss_type="ppo"`` with asymmetric
    clipping, ``dual_clip``, token- or sequence-level aggregation (with OpenRLHF's global
    ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` normalisation) and the
    train/rollout importance-sampling correction (``is_correction_*``: its non-negative
    per-token weight is folded into the advantages, which is exact for the clipped surrogate).
    ``policy_loss_type="gspo"`` (a per-sequence ratio) is OpenRLHF's own ``PolicyLoss`` on the
    differentiable log-probs of the fused scoring op (OpenRLHF's numbers and outputs).

    Args:
        temperature: divides the logits inside the kernel (OpenRLHF's actor scales its logits
            before they reach the loss: pass raw logits with the rollout temperature here).
        backend: as for :func:`entropy_kernels.policy_loss`.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Sequence[float] = (0.5, 5.0),
        *,
        temperature: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if policy_loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(
                f"policy_loss_type must be one of {POLICY_LOSS_TYPES}, got {policy_loss_type!r}"
            )
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        for name, value, choices in (
            ("is_correction_level", is_correction_level, ("off", "token", "seq")),
            ("is_correction_mode", is_correction_mode, ("mask", "clip")),
            ("is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if is_correction_mode == "clip" and (
            is_correction_level == "seq" or is_correction_gating != "ratio"
        ):
            raise ValueError(
                "is_correction_mode=clip requires is_correction_level=token and "
                "is_correction_gating=ratio"
            )
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = tuple(is_correction_threshold)
        self.policy_loss_type = policy_loss_type
        self.temperature = temperature
        self.backend = backend

    @classmethod
    def from_openrlhf(cls, loss: torch.nn.Module, **kwargs) -> FusedPolicyLoss:
        """The fused equivalent of an ``openrlhf.models.loss.PolicyLoss`` instance."""
        return cls(
            loss.clip_eps_low,
            loss.clip_eps_high,
            loss.dual_clip,
            loss.token_level_loss,
            loss.policy_loss_type,
            loss.is_correction_level,
            loss.is_correction_mode,
            loss.is_correction_gating,
            loss.is_correction_threshold,
            **kwargs,
        )

    def forward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
    ):
        """Args as ``PolicyLoss.forward``, with the log-probs replaced by:

        Args:
            logits: ``[B, A, V]`` logits predicting the ``A`` action tokens; from a causal LM's
                ``[B, S, V]`` output that is ``logits[:, -A - 1 : -1]`` (a view, read in place).
            tokens: ``[B, A]`` action tokens, ``sequences[:, -A:]``.

        Returns:
            ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` as ``PolicyLoss``; the
            last two are None without importance-sampling correction.
        """
        if self.policy_loss_type != "ppo":
            return self._openrlhf_loss(
                logits,
                tokens,
                old_log_probs,
                advantages,
                action_mask,
                rollout_log_probs,
                dp_size,
                batch_num_tokens,
                global_batch_size,
            )
        vllm_kl = is_filter_ratio = None
        shaped = advantages
        if self.is_correction_level != "off":
            weight, is_filter_ratio, vllm_kl = self._is_correction(
                old_log_probs, rollout_log_probs, action_mask
            )
            shaped = advantages * weight
        scale = None
        normalizer = None
        if self.token_level_loss:
            aggregation = "token-mean"
            if batch_num_tokens is not None:
                normalizer = batch_num_tokens / dp_size
        else:
            aggregation = "seq-mean-token-mean"
            if global_batch_size is not None:
                # policy_loss averages over the local non-empty sequences; OpenRLHF over the
                # global count, times dp_size.
                local = (action_mask.sum(-1) > 0).sum()
                scale = local * dp_size / global_batch_size
        out = self._policy_loss(
            logits,
            tokens,
            shaped,
            action_mask,
            old_logprobs=old_log_probs,
            clip_low=self.clip_eps_low,
            clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            temperature=self.temperature,
            aggregation=aggregation,
            normalizer=normalizer,
            backend=self.backend,
        )
        loss = out.loss if scale is None else out.loss * scale
        # OpenRLHF's metrics, from the log-probs of the same pass.
        log_ratio = out.logprobs - old_log_probs
        ratio = log_ratio.clamp(-20.0, 20.0).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        clip_ratio = _masked_mean(torch.lt(surr2, surr1).float(), action_mask)
        ppo_kl = _masked_mean(-log_ratio, action_mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio

    def _openrlhf_loss(self, logits, tokens, *args):
        """OpenRLHF's ``PolicyLoss`` with these options, on the fused log-probs."""
        from openrlhf.models.loss import PolicyLoss

        loss = PolicyLoss(
            self.clip_eps_low,
            self.clip_eps_high,
            self.dual_clip,
            self.token_level_loss,
            self.policy_loss_type,
            self.is_correction_level,
            self.is_correction_mode,
            self.is_correction_gating,
            self.is_correction_threshold,
        )
        log_probs, _ = self._scores(logits, tokens)
        return loss(log_probs, *args)

    def _policy_loss(self, logits, tokens, advantages, mask, **options):
        return entropy_kernels.policy_loss(logits, tokens, advantages, mask, **options)

    def _scores(self, logits, tokens):
        return entropy_kernels.logprobs_and_entropy(
            logits, tokens, temperature=self.temperature, backend=self.backend
        )

    @torch.no_grad()
    def _is_correction(self, old_log_probs, rollout_log_probs, action_mask):
        """OpenRLHF's train/rollout correction: (per-token weight >= 0, filtered fraction, KL)."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = old_log_probs - rollout_log_probs
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = is_log_ratio
            if seq_level:
                stat = _masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            weight = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            weight = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        if seq_level:
            filter_ratio = filtered.float().mean()
        else:
            filter_ratio = _masked_mean(filtered.float(), action_mask)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
        return weight, filter_ratio, vllm_kl


class FusedLinearPolicyLoss(FusedPolicyLoss):
    """:class:`FusedPolicyLoss` from the last hidden states and the LM head, by
    :func:`entropy_kernels.linear_policy_loss`: no ``[B, A, V]`` logits are ever formed.

    Same constructor (and :meth:`from_openrlhf`) as :class:`FusedPolicyLoss`; ``"gspo"`` runs
    OpenRLHF's ``PolicyLoss`` on the log-probs of the fused linear scoring op.
    """

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
    ):
        """Args as :meth:`FusedPolicyLoss.forward`, with the logits replaced by:

        Args:
            hidden: ``[B, A, H]`` hidden states predicting the ``A`` action tokens (from a
                causal LM's ``[B, S, H]`` last hidden states, ``hidden[:, -A - 1 : -1]``).
            weight: ``[V, H]`` LM head (``lm_head.weight``); bias: ``[V]`` or None. A DTensor
                (FSDP2) weight is accepted (:mod:`entropy_kernels.weights`).
        """
        return super().forward(
            (hidden, weight, bias),
            tokens,
            old_log_probs,
            advantages,
            action_mask,
            rollout_log_probs,
            dp_size,
            batch_num_tokens,
            global_batch_size,
        )

    def _policy_loss(self, inputs, tokens, advantages, mask, **options):
        hidden, weight, bias = inputs
        return entropy_kernels.linear_policy_loss(
            hidden, weight, tokens, advantages, mask, bias=bias, **options
        )

    def _scores(self, inputs, tokens):
        hidden, weight, bias = inputs
        return entropy_kernels.linear_logprobs_and_entropy(
            hidden, weight, tokens, bias=bias, temperature=self.temperature, backend=self.backend
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    if mask is None:
        return values.mean(dim=dim)
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)
