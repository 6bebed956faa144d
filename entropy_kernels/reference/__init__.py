"""Plain PyTorch references of every public function, for tests and benchmarks."""

from .core import logprobs_and_entropy, policy_loss

__all__ = ["logprobs_and_entropy", "policy_loss"]
