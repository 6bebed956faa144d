"""Fused linear losses: policy loss, GTPO and GRPO-S from hidden states against the float64
reference on materialised logits (both backends; helpers and tolerances in test_linear.py)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_linear import (
    BACKENDS,
    DTYPES,
    VALUE_TOL,
    assert_grads,
    assert_output,
    compare_loss,
    leaves,
    make_head,
    small_tiles,  # noqa: F401  (autouse fixture: several torch-backend tiles)
)

import entropy_kernels as ek
from entropy_kernels import reference
from entropy_kernels.policy_loss import AGGREGATIONS


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_rows_and_flat_hidden(backend):
    hidden, weight, bias, tokens = make_head(3, 1, 19, 70)
    compare_loss(
        ek.linear_policy_loss,
        reference.linear_policy_loss,
        (hidden, weight, bias, tokens),
        torch.randn(3),
        aggregation="seq-mean-token-mean",
        backend=backend,
    )
    flat = (hidden[:, 0], weight, bias, tokens[:, 0])  # [N, H] rows with stride T * H
    out = compare_loss(
        ek.linear_policy_loss,
        reference.linear_policy_loss,
        flat,
        torch.randn(3),
        entropy_coef=0.1,
        backend=backend,
    )
    assert out.logprobs.shape == (3,)


def loss_inputs(head, *, seed=0, per_token=True):
    """Advantages of both signs, a mask, old log-probs hitting every clip branch, ref log-probs."""
    hidden, weight, bias, tokens = head
    batch, seq = tokens.shape
    generator = torch.Generator().manual_seed(seed)
    sign = torch.tensor([1.0, -1.0]).repeat(batch * seq)[: batch * seq].view(batch, seq)
    advantages = (torch.rand(batch, seq, generator=generator) + 0.1) * sign
    if not per_token:
        advantages = advantages[:, 0]
    mask = torch.rand(batch, seq, generator=generator) > 0.25
    logits = reference.linear_logits(hidden, weight, bias)
    true_logp, _ = reference.logprobs_and_entropy(logits, tokens)
    shifts = torch.tensor([-1.0, -0.4, 0.0, 0.4, 1.0], dtype=torch.float64)
    pick = (torch.arange(seq) + torch.arange(batch).unsqueeze(-1)) % len(shifts)
    # Log-probabilities stay <= 0 (validate rejects positive ones: probabilities passed instead).
    old = (true_logp - shifts[pick]).clamp(max=0.0).float()
    ref = (true_logp + 0.3 * torch.randn(batch, seq, generator=generator)).clamp(max=0.0).float()
    return advantages, mask, old, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_every_aggregation(backend, aggregation):
    head = make_head(3, 6, 21, 150, seed=2)
    advantages, mask, old, ref = loss_inputs(head, per_token=aggregation != "token-mean")
    mask[1] = False  # a sequence without active tokens
    normalizer = 7.0 if aggregation in ("token-mean", "seq-mean-token-sum-norm") else None
    compare_loss(
        ek.linear_policy_loss,
        reference.linear_policy_loss,
        head,
        advantages,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=2.0,
        kl_coef=0.05,
        entropy_coef=0.01,
        temperature=0.9,
        aggregation=aggregation,
        normalizer=normalizer,
        backend=backend,
    )


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 20), st.integers(2, 90)),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    aggregation=st.sampled_from(AGGREGATIONS),
    off_policy=st.booleans(),
    dual_clip=st.sampled_from([None, 1.5, 3.0]),
    kl_coef=st.sampled_from([0.0, 0.1]),
    entropy_coef=st.sampled_from([0.0, 0.02]),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    per_token=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "float"]),
    seed=st.integers(0, 2**16),
)
def test_policy_loss_options_property(
    shape,
    dtype,
    bias,
    aggregation,
    off_policy,
    dual_clip,
    kl_coef,
    entropy_coef,
    temperature,
    per_token,
    mask_kind,
    seed,
):
    batch, seq, size, vocab = shape
    head = make_head(batch, seq, size, vocab, dtype=dtype, bias=bias, seed=seed)
    advantages, mask, old, ref = loss_inputs(head, seed=seed, per_token=per_token)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "float":
        mask = mask * torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed))
    compare_loss(
        ek.linear_policy_loss,
        reference.linear_policy_loss,
        head,
        advantages,
        mask,
        old_logprobs=old if off_policy else None,
        ref_logprobs=ref,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        entropy_coef=entropy_coef,
        temperature=temperature,
        aggregation=aggregation,
        backend="torch",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["gtpo", "grpo_s"])
@pytest.mark.parametrize("old_entropy", [False, True], ids=["own-entropy", "old-entropy"])
def test_entropy_shaped_losses(backend, loss, old_entropy):
    head = make_head(4, 5, 17, 97, seed=3)
    hidden, weight, bias, tokens = head
    _, mask, old, _ = loss_inputs(head, seed=3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    options = dict(old_logprobs=old, entropy_coef=0.01, temperature=0.8, backend=backend)
    if old_entropy:
        logits = reference.linear_logits(hidden, weight, bias)
        options["old_entropy"] = reference.logprobs_and_entropy(logits, tokens)[1].float() * 1.1
    if loss == "gtpo":
        options.update(scope="group", normalize="joint", alpha2=0.2)
        functions = (ek.linear_gtpo_loss, reference.linear_gtpo_loss)
    else:
        options.update(beta2=0.3)
        functions = (ek.linear_grpo_s_loss, reference.linear_grpo_s_loss)
    out = compare_loss(*functions, head, rewards, mask, 2, **options)
    assert "success_advantage_mean" in out.metrics


def test_gradient_reaches_advantages_too():
    head = make_head(2, 5, 13, 90, seed=4)
    hidden, weight, bias, tokens = head
    advantages, mask, old, _ = loss_inputs(head, seed=4)
    mine = leaves((hidden, weight, bias, advantages))
    refs = leaves((hidden, weight, bias), torch.float64)
    ref_advantages = advantages.double().requires_grad_()
    options = dict(old_logprobs=old, entropy_coef=0.05, aggregation="seq-mean-token-mean")
    ours = ek.linear_policy_loss(
        *mine[:2], tokens, mine[3], mask, bias=mine[2], backend="torch", **options
    )
    ref = reference.linear_policy_loss(
        *refs[:2], tokens, ref_advantages, mask, bias=refs[2], **options
    )
    ours.loss.backward()
    ref.loss.backward()
    assert_output(ours, ref)
    assert_grads(mine[:3], refs)
    torch.testing.assert_close(mine[3].grad.double(), ref_advantages.grad, **VALUE_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_scaled_by_the_outer_gradient(backend):
    head = make_head(2, 4, 12, 70, seed=5)
    hidden, weight, bias, tokens = head
    advantages, mask, old, _ = loss_inputs(head, seed=5)
    grads = []
    for scale in (1.0, 2.5):
        mine = leaves((hidden, weight, bias))
        out = ek.linear_policy_loss(
            *mine[:2], tokens, advantages, mask, bias=mine[2], old_logprobs=old, backend=backend
        )
        (out.loss * scale).backward()
        grads.append([t.grad for t in mine])
    for plain, scaled in zip(*grads, strict=True):
        # Rounding differs only where the scale enters before the matmuls (the scoring op).
        assert (scaled - plain * 2.5).norm() <= 1e-6 * (plain * 2.5).norm()
