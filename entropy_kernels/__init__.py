"""Fused Triton kernels for RL-for-LLM policy losses: log-probs, entropy, clipped surrogate,
and the entropy-weighted advantages of GTPO and GRPO-S (arXiv 2508.04349)."""

from .advantages import grpo_advantages, grpo_s_advantages, gtpo_advantages
from .gtpo import grpo_s_loss, gtpo_loss
from .linear_loss import linear_grpo_s_loss, linear_gtpo_loss, linear_policy_loss
from .linear_scoring import linear_logprobs_and_entropy
from .modules import GRPOSLoss, GTPOLoss, PolicyLoss
from .packing import packed_shift_labels
from .policy_loss import PolicyLossOutput, policy_loss
from .scoring import logprobs_and_entropy

__version__ = "0.1.0"

__all__ = [
    "GRPOSLoss",
    "GTPOLoss",
    "PolicyLoss",
    "PolicyLossOutput",
    "grpo_advantages",
    "grpo_s_advantages",
    "grpo_s_loss",
    "gtpo_advantages",
    "gtpo_loss",
    "linear_grpo_s_loss",
    "linear_gtpo_loss",
    "linear_logprobs_and_entropy",
    "linear_policy_loss",
    "logprobs_and_entropy",
    "packed_shift_labels",
    "policy_loss",
]
