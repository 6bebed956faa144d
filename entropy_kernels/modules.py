"""``torch.nn.Module`` wrappers that hold loss options, for plain PyTorch training loops."""

from __future__ import annotations

import torch

from .policy_loss import PolicyLossOutput, policy_loss


class PolicyLoss(torch.nn.Module):
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

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
