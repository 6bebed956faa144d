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


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(aggregation="seq-mean-token-sum-norm", entropy_coef=0.01, temperature=0.7),
        dict(aggregation="seq-mean-token-mean", dual_clip=3.0, kl_coef=0.1),
        dict(objective="cispo", entropy_coef=0.02),
        dict(objective="sapo", normalizer=11.0),
    ],
    ids=["clip", "seq-sum-norm", "dual-kl", "cispo", "sapo"],
)
def test_gradient_formed_in_the_forward_equals_the_recomputing_backward(monkeypatch, options):
    """float32 on CPU with the torch backend forms the gradient in the forward pass (three
    matmul passes); its loss, scores, metrics and gradients equal the recomputing backward's,
    over several row blocks, with a masked vocabulary entry and ignored tokens."""
    from entropy_kernels import linear_fused_loss, linear_loss
    from entropy_kernels.backends import torch_scoring

    hidden, weight, bias, tokens = make_head(3, 7, 20, 90)
    bias[5] = float("-inf")
    tokens[0, 2] = -100
    generator = torch.Generator().manual_seed(3)
    advantages = torch.randn(3, 7, generator=generator)
    mask = (torch.rand(3, 7, generator=generator) > 0.2).float() * 0.5
    old = -torch.rand(3, 7, generator=generator) * 3
    ref = -torch.rand(3, 7, generator=generator) * 3
    monkeypatch.setattr(linear_fused_loss, "BLOCK_BYTES", 4 * 90 * 4)  # 4 rows per block
    monkeypatch.setattr(torch_scoring, "GROUP_BYTES", 3 * 90 * 4)  # in groups of 3 and 1
    calls = []
    original = linear_fused_loss.fused_rows
    monkeypatch.setattr(linear_fused_loss, "fused_rows", lambda *a: calls.append(1) or original(*a))

    def run(fused):
        monkeypatch.setattr(
            linear_loss, "applies", linear_fused_loss.applies if fused else lambda *a: False
        )
        leaf = leaves((hidden, weight, bias))
        out = ek.linear_policy_loss(
            leaf[0],
            leaf[1],
            tokens,
            advantages,
            mask,
            bias=leaf[2],
            old_logprobs=old,
            ref_logprobs=ref,
            backend="torch",
            **options,
        )
        (2.5 * out.loss).backward()
        return out, [t.grad for t in leaf]

    fused, fused_grads = run(True)
    assert len(calls) == 6  # 21 rows in blocks of 4
    plain, plain_grads = run(False)
    assert len(calls) == 6  # the second run took the recomputing backward
    assert_output(fused, plain)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradient_formed_in_the_forward_is_handed_over_once(monkeypatch):
    hidden, weight, bias, tokens = make_head(2, 3, 8, 30)
    leaf = leaves((hidden, weight, bias))
    out = ek.linear_policy_loss(
        leaf[0], leaf[1], tokens, torch.randn(2), bias=leaf[2], backend="torch"
    )
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        out.loss.backward()
