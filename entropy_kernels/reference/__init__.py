"""Plain PyTorch references of every public function, for tests and benchmarks."""

from .advantages import grpo_advantages, grpo_s_advantages, gtpo_advantages
from .core import logprobs_and_entropy, policy_loss
from .linear import (
    linear_grpo_s_loss,
    linear_gtpo_loss,
    linear_logits,
    linear_logprobs_and_entropy,
    linear_policy_loss,
)
from .packing import packed_shift_labels
from .shaped_losses import grpo_s_loss, gtpo_loss

__all__ = [
    "grpo_advantages",
    "grpo_s_advantages",
    "grpo_s_loss",
    "gtpo_advantages",
    "gtpo_loss",
    "linear_grpo_s_loss",
    "linear_gtpo_loss",
    "linear_logits",
    "linear_logprobs_and_entropy",
    "linear_policy_loss",
    "logprobs_and_entropy",
    "packed_shift_labels",
    "policy_loss",
]
