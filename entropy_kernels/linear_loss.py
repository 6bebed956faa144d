"""Policy losses from hidden states and the LM head: the logits functions' losses with the
scoring done by :mod:`entropy_kernels.linear_scoring`, so no ``[N, V]`` tensor is ever formed.

Each public function validates its arguments once and hands them to the private cores that the
logits functions use too (``policy_loss_core``, ``shaped_loss_core``): the per-token surrogate,
the aggregation and the advantage shaping are defined once, in torch, on ``[B, T]``.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from ._validation import IGNORE_INDEX
from .gtpo import (
    PAPER_CLIP_HIGH,
    GRPOSShaping,
    GTPOShaping,
    check_shaped_loss_inputs,
    shaped_loss_core,
)
from .linear_fused_loss import applies, fused_linear_policy_loss
from .linear_scoring import check_linear_inputs, linear_options, linear_score
from .policy_loss import (
    LossOptions,
    PolicyLossOutput,
    check_loss_inputs,
    check_loss_rows,
    policy_loss_core,
)
from .weights import plain_linear_weights

# Keywords of the linear losses besides the surrogate's (LossOptions) and the shaping's.
_CALL_DEFAULTS = {"temperature": 1.0, "validate": True, "backend": "auto", "tp_group": None}
_POLICY_TENSORS = ("old_logprobs", "ref_logprobs")
_SHAPED_TENSORS = ("old_logprobs", "old_entropy", "ref_logprobs")


def _split_options(options: dict, shaping_type: type | None):
    """``(tensors, shaping, loss_options, call)`` from keywords; ``call``: the linear options'
    ``(temperature, validate, backend, tp_group)``."""
    tensor_names = _POLICY_TENSORS if shaping_type is None else _SHAPED_TENSORS
    shaping_names = () if shaping_type is None else tuple(f.name for f in fields(shaping_type))
    loss_names = tuple(f.name for f in fields(LossOptions))
    known = {*tensor_names, *shaping_names, *loss_names, *_CALL_DEFAULTS}
    unknown = sorted(set(options) - known)
    if unknown:
        hint = " (the linear losses have no logits to overwrite)" * ("inplace_backward" in unknown)
        raise ValueError(f"unknown options {unknown}{hint}; expected some of {sorted(known)}")
    loss_defaults = {} if shaping_type is None else {"clip_high": PAPER_CLIP_HIGH}
    loss_options = LossOptions(
        **{**loss_defaults, **{name: options[name] for name in loss_names if name in options}}
    )
    shaping = None
    if shaping_type is not None:
        shaping = shaping_type(**{name: options[name] for name in shaping_names if name in options})
    call = {**_CALL_DEFAULTS, **{name: options[name] for name in _CALL_DEFAULTS if name in options}}
    tensors = tuple(options.get(name) for name in tensor_names)
    return tensors, shaping, loss_options, tuple(call[name] for name in _CALL_DEFAULTS)


def _linear_call_options(hidden, weight, tokens, call, **checks):
    """``linear_options`` of a loss call; ``call`` from :func:`_split_options`."""
    temperature, validate, backend, tp_group = call
    return linear_options(
        hidden, weight, tokens, temperature, IGNORE_INDEX, validate, backend, tp_group, **checks
    )


def _linear_scorers(hidden, weight, bias, options):
    """``(scorer, fused)`` for the loss cores; ``fused`` (the gradient formed in the forward,
    :mod:`entropy_kernels.linear_fused_loss`) where it applies, else None."""
    rows = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden

    def scorer(tokens):
        return linear_score(rows, weight, bias, tokens, options)

    if not applies(hidden, weight, bias, options):
        return scorer, None

    def fused(*loss_arguments):  # (tokens, advantages, mask, old, ref, loss options)
        return fused_linear_policy_loss(rows, weight, bias, options, *loss_arguments)

    return scorer, fused


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    **policy_loss_options,
) -> PolicyLossOutput:
    """:func:`entropy_kernels.policy_loss` of ``hidden @ weight.T + bias``, no logits formed.

    Args:
        hidden: ``[B, T, H]`` (or ``[N, H]`` with ``aggregation="token-mean"``) float16 /
            bfloat16 / float32; leading dimensions with any strides (``hidden[:, :-1]`` is read
            in place).
        weight: ``[V, H]`` LM head, hidden's dtype. bias: ``[V]`` or None, hidden's dtype.
        tokens, advantages, mask: as in :func:`entropy_kernels.policy_loss`.
        policy_loss_options: the keywords of :func:`entropy_kernels.policy_loss` with the same
            meanings and defaults (``old_logprobs``, ``ref_logprobs``, ``clip_low``,
            ``clip_high``, ``dual_clip``, ``kl_coef``, ``entropy_coef``, ``temperature``,
            ``aggregation``, ``normalizer``, ``validate``, ``backend``, ``tp_group``: see
            :func:`linear_logprobs_and_entropy`), except ``inplace_backward`` (there are no
            logits to overwrite).

    Returns:
        :class:`PolicyLossOutput`; the gradient of the loss reaches hidden, weight and bias
        (those that require grad), the weight and bias gradients accumulated in float32.
    """
    tensors, _, options, call = _split_options(policy_loss_options, None)
    old_logprobs, ref_logprobs = tensors
    weight, bias = plain_linear_weights(hidden, weight, bias, call[-1])
    tokens = check_linear_inputs(hidden, weight, bias, tokens)
    check_loss_rows("hidden", "H", tuple(hidden.shape), options)
    check_loss_inputs(tokens, advantages, mask, old_logprobs, ref_logprobs, options)
    log_probs = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
    scoring = _linear_call_options(hidden, weight, tokens, call, mask=mask, log_probs=log_probs)
    scorers = _linear_scorers(hidden, weight, bias, scoring)
    return policy_loss_core(scorers, tokens, advantages, mask, old_logprobs, ref_logprobs, options)


def _linear_shaped_loss(hidden, weight, bias, tokens, rewards, mask, groups, options, shaping):
    tensors, shaping, loss_options, call = _split_options(options, shaping)
    old_logprobs, old_entropy, ref_logprobs = tensors
    weight, bias = plain_linear_weights(hidden, weight, bias, call[-1])
    tokens = check_linear_inputs(hidden, weight, bias, tokens)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H] (rows are grouped), got {tuple(hidden.shape)}")
    companions = (rewards, mask, groups, old_logprobs, old_entropy, ref_logprobs)
    checked_rewards = check_shaped_loss_inputs(tokens, *companions, loss_options, call[0])
    scoring = _linear_call_options(
        hidden,
        weight,
        tokens,
        call,
        mask=mask,
        log_probs={"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs},
        non_negative={"old_entropy": old_entropy},
    )
    return shaped_loss_core(
        _linear_scorers(hidden, weight, bias, scoring),
        tokens,
        (checked_rewards, *companions[1:]),
        shaping,
        loss_options,
        scoring.backend,
    )


def linear_gtpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int | torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **gtpo_loss_options,
) -> PolicyLossOutput:
    """:func:`entropy_kernels.gtpo_loss` of ``hidden @ weight.T + bias``, no logits formed.

    Args:
        hidden: ``[B, T, H]`` float16 / bfloat16 / float32 (leading dimensions with any
            strides). weight: ``[V, H]``. bias: ``[V]`` or None (hidden's dtype).
        tokens, rewards, mask, groups: as in :func:`entropy_kernels.gtpo_loss`.
        gtpo_loss_options: the keywords of :func:`entropy_kernels.gtpo_loss` with the same
            meanings and defaults (``old_logprobs``, ``old_entropy``, ``ref_logprobs``, the
            shaping options ``alpha1`` ... ``eps``, the surrogate options with
            ``clip_high=0.28``, ``temperature``, ``validate``, ``backend``, ``tp_group``),
            except ``inplace_backward``.

    Returns:
        ``PolicyLossOutput`` with the advantage statistics in ``metrics``.
    """
    options = gtpo_loss_options
    return _linear_shaped_loss(
        hidden, weight, bias, tokens, rewards, mask, groups, options, GTPOShaping
    )


def linear_grpo_s_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int | torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **grpo_s_loss_options,
) -> PolicyLossOutput:
    """:func:`entropy_kernels.grpo_s_loss` of ``hidden @ weight.T + bias``, no logits formed.

    Args:
        hidden, weight, bias, tokens, rewards, mask, groups: as in :func:`linear_gtpo_loss`.
        grpo_s_loss_options: the keywords of :func:`entropy_kernels.grpo_s_loss` with the same
            meanings and defaults (shaping options ``beta1``, ``beta2``,
            ``success_threshold``, ``eps``), except ``inplace_backward``.

    Returns:
        ``PolicyLossOutput`` with the advantage statistics in ``metrics``.
    """
    options = grpo_s_loss_options
    return _linear_shaped_loss(
        hidden, weight, bias, tokens, rewards, mask, groups, options, GRPOSShaping
    )
