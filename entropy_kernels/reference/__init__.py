"""Plain PyTorch references of every public function, for tests and benchmarks."""

from .advantages import (
    grpo_advantages,
    grpo_s_advantages,
    grpo_s_loss,
    gtpo_advantages,
    gtpo_loss,
)
from .core import logprobs_and_entropy, policy_loss

__all__ = [
    "grpo_advantages",
    "grpo_s_advantages",
    "grpo_s_loss",
    "gtpo_advantages",
    "gtpo_loss",
    "logprobs_and_entropy",
    "policy_loss",
]
