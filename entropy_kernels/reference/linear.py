"""References of the fused linear functions: the logits materialised in float64, then the
logits references. Gradients reach hidden, weight and bias through plain autograd."""

from __future__ import annotations

from .core import logprobs_and_entropy, policy_loss
from .parallel import gather_vocab
from .shaped_losses import grpo_s_loss, gtpo_loss


def linear_logits(hidden, weight, bias=None, tp_group=None):
    """``hidden @ weight.T + bias`` in float64, ``[..., V]``; with ``tp_group``, ``weight`` and
    ``bias`` are this rank's vocabulary rows, all-gathered into the full LM head first."""
    weight, bias = gather_vocab(weight, tp_group, 0), gather_vocab(bias, tp_group, 0)
    logits = hidden.double() @ weight.double().T
    return logits if bias is None else logits + bias.double()


def linear_logprobs_and_entropy(hidden, weight, tokens, *, bias=None, **options):
    """Reference of :func:`entropy_kernels.linear_logprobs_and_entropy`."""
    logits = linear_logits(hidden, weight, bias, options.pop("tp_group", None))
    return logprobs_and_entropy(logits, tokens, **options)


def linear_policy_loss(hidden, weight, tokens, advantages, mask=None, *, bias=None, **options):
    """Reference of :func:`entropy_kernels.linear_policy_loss`."""
    logits = linear_logits(hidden, weight, bias, options.pop("tp_group", None))
    return policy_loss(logits, tokens, advantages, mask, **options)


def linear_gtpo_loss(hidden, weight, tokens, rewards, mask, groups, *, bias=None, **options):
    """Reference of :func:`entropy_kernels.linear_gtpo_loss`."""
    logits = linear_logits(hidden, weight, bias, options.pop("tp_group", None))
    return gtpo_loss(logits, tokens, rewards, mask, groups, **options)


def linear_grpo_s_loss(hidden, weight, tokens, rewards, mask, groups, *, bias=None, **options):
    """Reference of :func:`entropy_kernels.linear_grpo_s_loss`."""
    logits = linear_logits(hidden, weight, bias, options.pop("tp_group", None))
    return grpo_s_loss(logits, tokens, rewards, mask, groups, **options)


__all__ = [
    "linear_grpo_s_loss",
    "linear_gtpo_loss",
    "linear_logits",
    "linear_logprobs_and_entropy",
    "linear_policy_loss",
]
