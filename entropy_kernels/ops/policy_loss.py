"""The fused policy-loss op: log-probs, entropy and ``d loss / d logits`` in one kernel.

``entropy_kernels::policy_loss_fused_out`` writes the gradient into ``grad_logits``, which the
caller chooses: a new tensor, or the logits themselves for ``inplace_backward``. The gradient is
produced in the forward pass (see :mod:`entropy_kernels.kernels.policy_loss_fused`);
:func:`entropy_kernels.policy_loss` attaches it to the loss value. Triton only: the torch
backend takes the two-pass route (the scoring op and autograd on ``[B, T]``).
"""

from typing import Optional

import torch

from ..kernel_config import launch_config, round_bf16_by_hand
from ..objectives import LOG_RATIO_LIMIT
from .rows import copy_back, launch_rows, output_rows, row_layouts


@torch.library.custom_op("entropy_kernels::policy_loss_fused_out", mutates_args=("grad_logits",))
def policy_loss_fused_out(
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
    grad_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy)``, float32 shaped like ``tokens``; ``dlogits`` into ``grad_logits``.

    ``token_advantages`` and ``loss_weight`` (``d loss / d per_token_loss``) are float32
    ``[B, T]``, contiguous; ``ref_logprobs`` is None unless the KL term is on. ``objective`` is a
    code of ``objectives.OBJECTIVE_CODES`` (a token-local objective); ``delta`` and the SAPO
    temperatures are its options. ``grad_logits`` is shaped like the logits (it may be them).
    """
    source, token_view, logits_layout, tokens_layout = row_layouts(logits, tokens)
    target, grad_layout = output_rows(grad_logits, logits_layout)
    vocab_size = source.shape[-1]
    logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    entropy = torch.empty_like(logprobs)
    if logits_layout.n_rows > 0:
        from ..kernels.policy_loss_fused import policy_loss_fused_kernel

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
            *launch_rows(vocab_size, logits_layout, grad_layout, tokens_layout),
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
    copy_back(grad_logits, target)
    return logprobs, entropy


@policy_loss_fused_out.register_fake
def _(logits, tokens, *args):
    vector = tokens.new_empty(tokens.shape, dtype=torch.float32)
    return vector, torch.empty_like(vector)
