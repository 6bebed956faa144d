"""Policy loss with the gradient produced in the forward pass.

When advantages and old log-probs are inputs, ``d loss / d logits`` depends on nothing but the
row itself: one pass gives log-prob and entropy, the per-token surrogate derivative follows in
registers, and a second pass over the same row (served from cache) writes ``dlogits``. DRAM
traffic is one read of the logits and one write of the gradient; with ``inplace_backward`` the
gradient overwrites the logits in place.

The surrogate is a token-local objective of :mod:`entropy_kernels.objectives`, chosen by the
constexpr ``OBJECTIVE`` (``OBJECTIVE_CODES`` there): the PPO clip (with TRL's ``delta`` and the
dual clip), CISPO (``clip_low = 1`` drops its lower bound), SAPO or GPG. Each derivative is
that of the objective's torch definition, which the tests differentiate with autograd.

``loss_weight`` is ``d loss / d per_token_loss`` (the aggregation's weight of each token, mask
included), computed on ``[B, T]`` by the launcher. The derivative of the surrogate follows
PyTorch's autograd conventions exactly, so the fused and unfused paths agree: ``clamp`` passes
the gradient on its closed interval, ``maximum`` / ``minimum`` split it evenly on ties.
"""

import triton
import triton.language as tl

from .rows import load_token, row_coordinates
from .scoring_bwd import write_row_gradient
from .scoring_fwd import score_row


@triton.jit
def _max_gradient(a, b, grad_a, grad_b):
    """Gradient of ``maximum(a, b)`` as PyTorch defines it (half to each on a tie)."""
    return tl.where(a > b, grad_a, tl.where(a < b, grad_b, 0.5 * (grad_a + grad_b)))


@triton.jit
def _clip_gradient(
    advantage,
    ratio,
    grad_ratio,
    clip_low,
    clip_high,
    delta,
    dual_clip,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
):
    """``d/dlogp`` of the PPO clip ``max(-A min(r, delta), -A clip(r))``, dual-clipped."""
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    in_clip = (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high)
    grad_raw = -advantage * grad_ratio
    unclipped = -advantage * ratio
    grad_unclipped = grad_raw
    if HAS_DELTA:
        unclipped = -advantage * tl.minimum(ratio, delta)
        grad_unclipped = tl.where(ratio <= delta, grad_raw, 0.0)
    clipped = -advantage * clipped_ratio
    grad_clipped = tl.where(in_clip, grad_raw, 0.0)
    grad_pg = _max_gradient(unclipped, clipped, grad_unclipped, grad_clipped)
    if HAS_DUAL_CLIP:
        pg = tl.maximum(unclipped, clipped)
        bound = -advantage * dual_clip
        grad_bounded = _max_gradient(-pg, -bound, grad_pg, 0.0)
        grad_pg = tl.where(advantage < 0, grad_bounded, grad_pg)
    return grad_pg


@triton.jit
def _objective_gradient(
    advantage,
    ratio,
    grad_ratio,
    clip_low,
    clip_high,
    delta,
    dual_clip,
    sapo_tau_pos,
    sapo_tau_neg,
    OBJECTIVE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
):
    """``d per_token_loss / d logp`` of the objective (codes as ``objectives.OBJECTIVE_CODES``)."""
    if OBJECTIVE == 0:  # clip
        grad_pg = _clip_gradient(
            advantage,
            ratio,
            grad_ratio,
            clip_low,
            clip_high,
            delta,
            dual_clip,
            HAS_DELTA,
            HAS_DUAL_CLIP,
        )
    elif OBJECTIVE == 1:  # cispo: -sg(clip(r)) A logp
        grad_pg = -advantage * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    elif OBJECTIVE == 2:  # sapo: -(4 / tau) sigmoid(tau (r - 1)) A
        tau = tl.where(advantage > 0, sapo_tau_pos, sapo_tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        grad_pg = -4.0 * gate * (1.0 - gate) * advantage * grad_ratio
    else:  # gpg: -A logp
        grad_pg = -advantage
    return grad_pg


@triton.heuristics(
    {
        "HAS_OLD_LOGPROBS": lambda args: args["old_logprobs_ptr"] is not None,
        "HAS_REF_LOGPROBS": lambda args: args["ref_logprobs_ptr"] is not None,
    }
)
# Shapes that follow B and T are not specialised, so new batch shapes never recompile.
@triton.jit(
    do_not_specialize=["n_inner", "ignore_index", "tokens_stride_outer", "tokens_stride_inner"],
    # Token views such as input_ids[:, 1:] start mid-vector: do not key binaries on alignment.
    do_not_specialize_on_alignment=["tokens_ptr"],
)
def policy_loss_fused_kernel(
    # pointers
    grad_logits_ptr,
    logits_ptr,
    tokens_ptr,
    advantages_ptr,
    loss_weight_ptr,
    old_logprobs_ptr,
    ref_logprobs_ptr,
    logprobs_ptr,
    entropy_ptr,
    # shapes
    n_inner,
    vocab_size,
    # strides (in elements)
    logits_stride_outer,
    logits_stride_inner,
    grad_stride_outer,
    grad_stride_inner,
    tokens_stride_outer,
    tokens_stride_inner,
    # constants
    inv_temperature,
    ignore_index,
    clip_low,
    clip_high,
    dual_clip,
    kl_coef,
    entropy_coef,
    log_ratio_limit,
    delta,
    sapo_tau_pos,
    sapo_tau_neg,
    BLOCK_V: tl.constexpr,
    OBJECTIVE: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    HAS_OLD_LOGPROBS: tl.constexpr,
    HAS_REF_LOGPROBS: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
):
    row, outer, inner = row_coordinates(n_inner)
    row_ptr = logits_ptr + outer * logits_stride_outer + inner * logits_stride_inner
    grad_row_ptr = grad_logits_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    token = load_token(tokens_ptr, outer, inner, tokens_stride_outer, tokens_stride_inner)
    n_cols, row_max, log_norm, entropy, logprob = score_row(
        row_ptr, token, vocab_size, ignore_index, inv_temperature, BLOCK_V
    )
    tl.store(logprobs_ptr + row, logprob)
    tl.store(entropy_ptr + row, entropy)

    advantage = tl.load(advantages_ptr + row)
    weight = tl.load(loss_weight_ptr + row)
    old_logprob = logprob
    if HAS_OLD_LOGPROBS:
        old_logprob = tl.load(old_logprobs_ptr + row)
    # ratio = exp(clamp(logp - old)); d ratio / d logp = ratio inside the clamp, else 0.
    log_ratio = logprob - old_logprob
    in_clamp = (log_ratio >= -log_ratio_limit) & (log_ratio <= log_ratio_limit)
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -log_ratio_limit), log_ratio_limit))
    grad_ratio = tl.where(in_clamp, ratio, 0.0)
    grad_pg = _objective_gradient(
        advantage,
        ratio,
        grad_ratio,
        clip_low,
        clip_high,
        delta,
        dual_clip,
        sapo_tau_pos,
        sapo_tau_neg,
        OBJECTIVE,
        HAS_DELTA,
        HAS_DUAL_CLIP,
    )
    grad_logprob = grad_pg
    if HAS_REF_LOGPROBS:
        # d/dlogp of the k3 term exp(ref - logp) - (ref - logp) - 1.
        ref_minus_logp = tl.load(ref_logprobs_ptr + row) - logprob
        grad_logprob += kl_coef * (1.0 - tl.exp(ref_minus_logp))
    # An inactive token (weight 0) contributes nothing, even where its terms are not finite
    # (a -inf log-prob, NaN padding in old log-probs): 0 * NaN must not reach the gradient.
    grad_logprob = tl.where(weight != 0.0, weight * grad_logprob, 0.0)
    grad_entropy = -entropy_coef * weight

    write_row_gradient(
        grad_row_ptr,
        grad_row_ptr,
        0,
        row_ptr,
        n_cols,
        vocab_size,
        token,
        row_max,
        log_norm,
        entropy,
        grad_logprob * inv_temperature,
        grad_entropy * inv_temperature,
        inv_temperature,
        BLOCK_V,
        ROUND_BF16_BY_HAND,
        1,
    )
