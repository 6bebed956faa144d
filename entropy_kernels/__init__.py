"""Fused Triton kernels for RL-for-LLM policy losses: log-probs, entropy, clipped surrogate,
and the entropy-weighted advantages of GTPO and GRPO-S (arXiv 2508.04349)."""

from .modules import PolicyLoss
from .policy_loss import PolicyLossOutput, policy_loss
from .scoring import logprobs_and_entropy

__version__ = "0.1.0"

__all__ = [
    "PolicyLoss",
    "PolicyLossOutput",
    "logprobs_and_entropy",
    "policy_loss",
]
