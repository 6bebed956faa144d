"""The fused policy loss's autograd: the gradient the kernel wrote in the forward pass is
attached to the loss value (:func:`fused_policy_loss`), over a new tensor or, with
``inplace_backward``, over the logits themselves.

The op is :mod:`entropy_kernels.ops.policy_loss`; the values and metrics come from
:func:`entropy_kernels.surrogate.loss_from_logprobs` on the kernel's log-probs.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .objectives import OBJECTIVE_CODES, Objective
from .ops.policy_loss import policy_loss_fused_out
from .ops.scoring import gradient_buffer
from .surrogate import PolicyLossOutput, aggregation_weights, loss_from_logprobs


def _hand_over(ctx, grad_logits: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """The stored gradient, handed over once and scaled in place by ``grad_loss`` if not 1."""
    if torch.compiler.is_compiling():  # a host read would break the graph: scale there
        return grad_logits * grad_loss
    if ctx.consumed:
        raise RuntimeError(
            "policy_loss's fused Triton path computed its gradient in the forward pass and "
            "it was already used: a second backward needs backend='torch'"
        )
    ctx.consumed = True
    scale = float(grad_loss)
    if scale != 1.0:
        grad_logits.mul_(scale)
    return grad_logits


class _LossWithGradient(torch.autograd.Function):
    """Attach a gradient computed in the forward pass to a loss value.

    The stored gradient is handed over once (a second backward through the same graph raises):
    it is scaled in place when the incoming gradient is not 1 (gradient accumulation), with
    the scale in float32 and one rounding, so no second logits-sized buffer appears.
    """

    @staticmethod
    def forward(ctx, loss, logits, grad_logits):
        ctx.save_for_backward(grad_logits)
        ctx.consumed = False
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad_logits,) = ctx.saved_tensors
        return None, _hand_over(ctx, grad_logits, grad_loss), None


class _GradientSlot:
    """Where the in-place kernel's gradient (the logits' own storage) is put once written."""

    grad: torch.Tensor | None = None


class _InplaceGradientEdge(torch.autograd.Function):
    """A zero whose gradient is the slot's: applied to the logits *before* the kernel overwrites
    them. After an in-place write, autograd would rebuild a view's grad_fn as a generic
    as_strided backward that allocates a zero-filled logits-sized buffer (measured on an
    H200: the in-place loss peaked at twice the logits); an edge taken first keeps the
    original backward."""

    @staticmethod
    def forward(ctx, logits, slot):
        ctx.slot = slot
        ctx.consumed = False
        return torch.zeros((), dtype=torch.float32, device=logits.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return _hand_over(ctx, ctx.slot.grad, grad_loss), None


def fused_policy_loss(
    logits, tokens, advantages, mask, old_logprobs, ref_logprobs, scoring, options
):
    """Triton path: one kernel computes log-probs, entropy and ``d loss / d logits`` together,
    for the plain clip or a token-local ``options.objective``."""
    objective = options.objective or Objective()
    # CISPO without its lower bound: clip(r, 1 - 1, ...) = min(r, ...) since r > 0.
    kernel_clip_low = options.clip_low
    if objective.name == "cispo" and not objective.cispo_two_sided:
        kernel_clip_low = 1.0
    weights = torch.ones_like(tokens, dtype=torch.float32) if mask is None else mask.float()
    token_advantages = advantages.float()
    if token_advantages.dim() == 1:
        token_advantages = token_advantages.unsqueeze(-1)

    def as_float(tensor):
        return None if tensor is None else tensor.float().contiguous()

    args = (
        tokens,
        token_advantages.expand(tokens.shape).contiguous(),
        aggregation_weights(weights, options).contiguous(),
        as_float(old_logprobs),
        as_float(ref_logprobs) if options.kl_coef != 0.0 else None,
        scoring.temperature,
        scoring.ignore_index,
        float(kernel_clip_low),
        float(options.clip_high),
        None if options.dual_clip is None else float(options.dual_clip),
        float(options.kl_coef),
        float(options.entropy_coef),
        OBJECTIVE_CODES[objective.name],
        None if objective.delta is None else float(objective.delta),
        float(objective.sapo_temperature_pos),
        float(objective.sapo_temperature_neg),
    )
    inplace = scoring.inplace_backward and not torch.compiler.is_compiling()
    grad_logits = gradient_buffer(logits.detach(), inplace)
    if inplace:
        slot = _GradientSlot()
        edge = _InplaceGradientEdge.apply(logits, slot)
    logprobs, entropy = policy_loss_fused_out(logits.detach(), *args, grad_logits)
    with torch.no_grad():
        out = loss_from_logprobs(
            logprobs,
            entropy,
            advantages,
            mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            options=options,
        )
    if inplace:
        slot.grad = grad_logits
        loss = edge + out.loss
    else:
        loss = _LossWithGradient.apply(out.loss, logits, grad_logits)
    return PolicyLossOutput(loss, logprobs, entropy, out.metrics)


def check_inplace_backward(logits: torch.Tensor, inplace_backward: bool) -> None:
    if not inplace_backward:
        return
    if logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "inplace_backward=True overwrites logits with their gradient: pass logits produced "
            "by an operation (e.g. the lm_head), not a leaf tensor that requires grad"
        )
    # Under torch.compile the in-place variant is functionalised into a copy: nothing overlaps.
    if not torch.compiler.is_compiling() and _may_overlap(logits):
        raise ValueError(
            "inplace_backward=True needs logits whose elements do not share memory, got a view "
            f"with strides {logits.stride()} (e.g. from expand() or unfold()); pass a "
            "materialised tensor"
        )


def _may_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of `tensor` may share memory: some dimension's stride, taken in
    increasing order, is smaller than the span of the dimensions before it. Views that only
    leave gaps (``logits[:, :-1]``) pass; ``expand()`` and ``unfold()`` views do not."""
    span = 1
    for stride, size in sorted(zip(tensor.stride(), tensor.shape, strict=True)):
        if size == 1:
            continue
        if stride < span:
            return True
        span += stride * (size - 1)
    return False
