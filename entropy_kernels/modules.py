"""``torch.nn.Module`` wrappers that hold loss options, for plain PyTorch training loops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch

from ._validation import check_backend, check_positive_float
from .gtpo import PAPER_CLIP_HIGH, GRPOSShaping, GTPOShaping, grpo_s_loss, gtpo_loss
from .policy_loss import LossOptions, PolicyLossOutput, policy_loss


class _OptionsModule(torch.nn.Module):
    """A loss function's keyword options, fixed at construction and shown in the repr."""

    options: dict

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class PolicyLoss(_OptionsModule):
    """:func:`entropy_kernels.policy_loss` with its keyword options fixed at construction.

    ``PolicyLoss(clip_high=0.28)(logits, tokens, advantages, mask, old_logprobs=old)``
    """

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
    ) -> PolicyLossOutput:
        return policy_loss(
            logits,
            tokens,
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            **self.options,
        )


# Keyword options of the one-call losses that are neither shaping nor surrogate options.
_CALL_OPTIONS = {
    "temperature": 1.0,
    "inplace_backward": False,
    "validate": True,
    "backend": "auto",
    "tp_group": None,
}


def _checked_options(shaping_type: type, options: dict) -> dict:
    """Reject unknown keywords and bad values at construction rather than at the first call."""
    loss_defaults = {"clip_high": PAPER_CLIP_HIGH}
    known = (
        {f.name for f in fields(shaping_type)}
        | {f.name for f in fields(LossOptions)}
        | set(_CALL_OPTIONS)
    )
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown options {unknown}; expected some of {sorted(known)}")
    shaping_type(**{f.name: options[f.name] for f in fields(shaping_type) if f.name in options})
    LossOptions(
        **{
            **loss_defaults,
            **{f.name: options[f.name] for f in fields(LossOptions) if f.name in options},
        }
    )
    if "temperature" in options:
        check_positive_float("temperature", options["temperature"])
    if "backend" in options:
        check_backend(options["backend"])
    return dict(options)


class _ShapedLossModule(_OptionsModule):
    _loss: Callable[..., PolicyLossOutput]  # the one-call loss, a staticmethod

    def __init__(self, shaping_type: type, **options):
        super().__init__()
        self.options = _checked_options(shaping_type, options)

    def forward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        rewards: torch.Tensor,
        mask: torch.Tensor | None,
        groups: int | torch.Tensor,
        old_logprobs: torch.Tensor | None = None,
        old_entropy: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
    ) -> PolicyLossOutput:
        return self._loss(
            logits,
            tokens,
            rewards,
            mask,
            groups,
            old_logprobs=old_logprobs,
            old_entropy=old_entropy,
            ref_logprobs=ref_logprobs,
            **self.options,
        )


class GTPOLoss(_ShapedLossModule):
    """:func:`gtpo_loss` with its keyword options fixed at construction.

    `GTPOLoss(scope="group")(logits, tokens, rewards, mask, groups, old_entropy=h)`
    """

    _loss = staticmethod(gtpo_loss)

    def __init__(self, **options):
        super().__init__(GTPOShaping, **options)


class GRPOSLoss(_ShapedLossModule):
    """:func:`grpo_s_loss` with its keyword options fixed at construction.

    `GRPOSLoss(beta2=0.2)(logits, tokens, rewards, mask, groups, old_logprobs=old)`
    """

    _loss = staticmethod(grpo_s_loss)

    def __init__(self, **options):
        super().__init__(GRPOSShaping, **options)
