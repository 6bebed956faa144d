"""Custom op around the fused policy-loss kernel: log-probs, entropy and ``d loss / d logits``.

The gradient is produced in the forward pass (see :mod:`entropy_kernels.kernels.policy_loss_fused`);
:func:`entropy_kernels.policy_loss` attaches it to the loss value.
"""

from typing import Optional

import torch

from .kernel_config import launch_config, round_bf16_by_hand
from .scoring import contiguous_layout, row_layouts

# The log-ratio is clamped like verl and OpenRLHF do, so the ratio stays finite.
LOG_RATIO_LIMIT = 20.0


def _launch(
    target,
    logits,
    tokens,
    token_advantages,
    loss_weight,
    old_logprobs,
    ref_logprobs,
    constants,
):
    """Run the kernel; ``target`` None allocates the gradient. Returns (logprobs, entropy, grad)."""
    from .kernels.policy_loss_fused import policy_loss_fused_kernel

    temperature, ignore_index, clip_low, clip_high, dual_clip, kl_coef, entropy_coef = constants[:7]
    objective, delta, sapo_tau_pos, sapo_tau_neg = constants[7:]
    source, token_view, logits_layout, tokens_layout = row_layouts(logits, tokens)
    vocab_size = source.shape[-1]
    if target is None:
        target = torch.empty(source.shape, dtype=source.dtype, device=source.device)
        grad_layout = contiguous_layout(logits_layout, vocab_size)
    else:
        grad_layout = logits_layout
    logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    entropy = torch.empty_like(logprobs)
    if logits_layout.n_rows > 0:
        config = launch_config("policy_loss_fused", vocab_size, source.device)
        policy_loss_fused_kernel[(logits_layout.n_rows,)](
            target,
            source,
            token_view,
            token_advantages,
            loss_weight,
            old_logprobs,
            ref_logprobs,
            logprobs,
            entropy,
            logits_layout.n_inner,
            vocab_size,
            logits_layout.stride_outer,
            logits_layout.stride_inner,
            grad_layout.stride_outer,
            grad_layout.stride_inner,
            tokens_layout.stride_outer,
            tokens_layout.stride_inner,
            1.0 / temperature,
            ignore_index,
            clip_low,
            clip_high,
            float(dual_clip or 0.0),
            kl_coef,
            entropy_coef,
            LOG_RATIO_LIMIT,
            float(delta or 0.0),
            sapo_tau_pos,
            sapo_tau_neg,
            BLOCK_V=config.block_v,
            OBJECTIVE=objective,
            HAS_DELTA=delta is not None,
            HAS_DUAL_CLIP=dual_clip is not None,
            ROUND_BF16_BY_HAND=round_bf16_by_hand(target),
            **config.launch_options(),
        )
    return logprobs, entropy, target


@torch.library.custom_op("entropy_kernels::policy_loss_fused", mutates_args=())
def policy_loss_fused(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    token_advantages: torch.Tensor,
    loss_weight: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    kl_coef: float,
    entropy_coef: float,
    objective: int,
    delta: Optional[float],
    sapo_tau_pos: float,
    sapo_tau_neg: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy, dlogits)``; all ``[B, T]`` companions float32 and contiguous.

    ``loss_weight`` is ``d loss / d per_token_loss``; ``ref_logprobs`` is None unless the KL
    term is on. ``objective`` is a code of ``objectives.OBJECTIVE_CODES`` (a token-local
    objective); ``delta`` and the SAPO temperatures are its options. ``dlogits`` is a new
    contiguous tensor in the logits' dtype.
    """
    constants = (temperature, ignore_index, clip_low, clip_high, dual_clip, kl_coef, entropy_coef)
    constants += (objective, delta, sapo_tau_pos, sapo_tau_neg)
    companions = (token_advantages, loss_weight, old_logprobs, ref_logprobs)
    return _launch(None, logits, tokens, *companions, constants)


@policy_loss_fused.register_fake
def _(logits, tokens, *args):
    vector = tokens.new_empty(tokens.shape, dtype=torch.float32)
    return vector, torch.empty_like(vector), logits.new_empty(logits.shape)


@torch.library.custom_op("entropy_kernels::policy_loss_fused_", mutates_args=("logits",))
def policy_loss_fused_(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    token_advantages: torch.Tensor,
    loss_weight: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    kl_coef: float,
    entropy_coef: float,
    objective: int,
    delta: Optional[float],
    sapo_tau_pos: float,
    sapo_tau_neg: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`policy_loss_fused`, with ``dlogits`` written over the logits."""
    constants = (temperature, ignore_index, clip_low, clip_high, dual_clip, kl_coef, entropy_coef)
    constants += (objective, delta, sapo_tau_pos, sapo_tau_neg)
    companions = (token_advantages, loss_weight, old_logprobs, ref_logprobs)
    source = row_layouts(logits, tokens)[0]
    logprobs, entropy, grad = _launch(source, logits, tokens, *companions, constants)
    if grad is not logits:  # the rare layout that needed a contiguous copy
        logits.copy_(grad)
    return logprobs, entropy


@policy_loss_fused_.register_fake
def _(logits, tokens, *args):
    vector = tokens.new_empty(tokens.shape, dtype=torch.float32)
    return vector, torch.empty_like(vector)
