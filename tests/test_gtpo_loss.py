"""One-call GTPO / GRPO-S losses: equal to `policy_loss` fed with the shaped advantages (values,
gradients, metrics), to the float64 reference, and the module wrappers; bad input.

The scoring pass dominates under the Triton interpreter (a few hundred ms per small call), so
hypothesis runs the torch backend over random shapes and the Triton backend gets a few fixed,
small cases (the shaping kernels themselves are covered by tests/test_advantages.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entropy_kernels as ek
import entropy_kernels.reference
from entropy_kernels.advantages import grpo_s_advantages, gtpo_advantages
from entropy_kernels.gtpo import grpo_s_loss, gtpo_loss
from entropy_kernels.modules import GRPOSLoss, GTPOLoss
from entropy_kernels.policy_loss import policy_loss
from entropy_kernels.reference import advantages as ref
from entropy_kernels.reference import shaped_losses as ref_losses
from entropy_kernels.scoring import logprobs_and_entropy

ADVANTAGE_METRICS = (
    "success_advantage_mean",
    "success_advantage_std",
    "success_entropy",
    "failure_advantage_mean",
    "failure_advantage_std",
    "failure_entropy",
    "success_fraction",
)
# Loss tolerances of the spec against the float64 reference; gradients 1e-4 relative.
ATOL = RTOL = 1e-5


def make_batch(seed, n_groups, group_size, seq_len, vocab, id_groups, mask_kind, balanced=False):
    """Logits, tokens, rewards, mask, groups, old log-probs and old entropy of a batch.

    `balanced`: every group holds two success and two failure rows and the mask is a prefix
    shared within the group, so each position's P_t and N_t have 0 or 2 rows: the whitening
    sets then have a real spread and float32 agrees with float64 to the spec's tolerances.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = n_groups * group_size
    logits = torch.randn(batch, seq_len, vocab, generator=gen) * 2.0
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    if balanced:
        rewards = torch.cat(
            [
                torch.tensor([1.0, 1.0, 0.0, 0.0])[torch.randperm(4, generator=gen)]
                for _ in range(n_groups)
            ]
        )
        lengths = torch.randint(1, seq_len + 1, (n_groups,), generator=gen)
        mask = torch.arange(seq_len)[None, :] < lengths.repeat_interleave(group_size)[:, None]
    else:
        rewards = (torch.rand(batch, generator=gen) < 0.5).float()
        mask = torch.rand(batch, seq_len, generator=gen) < 0.8
    if mask_kind == "none":
        mask = None
    elif mask_kind == "float":
        mask = mask.float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    # Perturbed log-probs stay log-probs (<= 0): the losses reject positive ones.
    old_logprobs = (logprobs + 0.3 * torch.randn(batch, seq_len, generator=gen)).clamp_max(0.0)
    old_entropy = torch.rand(batch, seq_len, generator=gen) * 3.0
    groups = group_size
    if id_groups:
        order = torch.randperm(batch, generator=gen)
        ids = torch.arange(batch) // group_size * 7 - 3
        groups = torch.empty_like(ids)
        groups[order] = ids
        # Keep each group's rewards and mask with its rows.
        rewards = rewards[torch.argsort(order)]
        mask = None if mask is None else mask[torch.argsort(order)]
    return logits, tokens, rewards, mask, groups, old_logprobs, old_entropy


batches = st.builds(
    make_batch,
    seed=st.integers(0, 2**31 - 1),
    n_groups=st.integers(1, 3),
    group_size=st.integers(1, 4),
    seq_len=st.integers(1, 7),
    vocab=st.sampled_from([3, 16]),
    id_groups=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "float"]),
)


def grad_of(loss, logits):
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def assert_same_output(out, expected, logits):
    """Same loss, gradient and base metrics (computed the same way: equal to rounding)."""
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        grad_of(out.loss, logits), grad_of(expected.loss, logits), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(out.logprobs, expected.logprobs)
    torch.testing.assert_close(out.entropy, expected.entropy)
    for name, value in expected.metrics.items():
        torch.testing.assert_close(out.metrics[name], value, rtol=1e-6, atol=1e-7)


def assert_advantage_metrics(out, advantages, rewards, entropy, mask):
    expected = ref.advantage_metrics(advantages, rewards, entropy, mask)
    for name in ADVANTAGE_METRICS:
        value = out.metrics[name]
        assert isinstance(value, torch.Tensor) and value.dim() == 0
        assert value.item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


# ---------------------------------------------------------------------------------------------
# The one-call losses are policy_loss with the shaped advantages and the paper's defaults


@settings(max_examples=15)
@given(
    batch=batches,
    normalize=st.sampled_from(["zero-filled", "separate", "joint", "none"]),
    scope=st.sampled_from(["batch", "group"]),
    on_policy=st.booleans(),
)
def test_gtpo_loss_equals_policy_loss_with_gtpo_advantages(batch, normalize, scope, on_policy):
    logits, tokens, rewards, mask, groups, old_logprobs, old_entropy = batch
    logits.requires_grad_(True)
    old = None if on_policy else old_logprobs
    out = gtpo_loss(
        logits,
        tokens,
        rewards,
        mask,
        groups,
        old_logprobs=old,
        old_entropy=old_entropy,
        normalize=normalize,
        scope=scope,
        backend="torch",
    )
    advantages = gtpo_advantages(
        rewards, old_entropy, mask, groups, normalize=normalize, scope=scope, backend="torch"
    )
    expected = policy_loss(
        logits,
        tokens,
        advantages,
        mask,
        old_logprobs=old,
        clip_low=0.2,
        clip_high=0.28,
        backend="torch",
    )
    assert_same_output(out, expected, logits)
    assert_advantage_metrics(out, advantages, rewards, old_entropy, mask)


@settings(max_examples=15)
@given(batch=batches, on_policy=st.booleans())
def test_grpo_s_loss_equals_policy_loss_with_grpo_s_advantages(batch, on_policy):
    logits, tokens, rewards, mask, groups, old_logprobs, old_entropy = batch
    logits.requires_grad_(True)
    old = None if on_policy else old_logprobs
    out = grpo_s_loss(
        logits,
        tokens,
        rewards,
        mask,
        groups,
        old_logprobs=old,
        old_entropy=old_entropy,
        backend="torch",
    )
    advantages = grpo_s_advantages(rewards, old_entropy, mask, groups, backend="torch")
    expected = policy_loss(
        logits,
        tokens,
        advantages,
        mask,
        old_logprobs=old,
        clip_low=0.2,
        clip_high=0.28,
        backend="torch",
    )
    assert_same_output(out, expected, logits)
    assert_advantage_metrics(out, advantages, rewards, old_entropy, mask)


@pytest.mark.parametrize(
    "loss, shape", [(gtpo_loss, gtpo_advantages), (grpo_s_loss, grpo_s_advantages)]
)
@pytest.mark.parametrize("given_entropy", [True, False])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_both_backends_equal_policy_loss(loss, shape, given_entropy, backend):
    # With old_entropy the advantages come from it (on Triton through policy_loss's fused
    # kernel); without, from the scoring pass's entropy as a constant: the gradient is that of
    # policy_loss with those advantages fixed (a gradient through the shaping would add
    # terms). B = 6 in groups of 3 (id tensor), T = 4, V = 16: small for the interpreter, yet
    # every group has both kinds of rows under a ragged mask.
    logits, tokens, rewards, mask, groups, old_logprobs, old_entropy = make_batch(
        3, n_groups=2, group_size=3, seq_len=4, vocab=16, id_groups=True, mask_kind="bool"
    )
    logits.requires_grad_(True)
    if not given_entropy:
        old_entropy = None
    out = loss(
        logits,
        tokens,
        rewards,
        mask,
        groups,
        old_logprobs=old_logprobs,
        old_entropy=old_entropy,
        entropy_coef=0.01,
        backend=backend,
    )
    entropy = logprobs_and_entropy(logits, tokens, backend=backend)[1].detach()
    shaping_entropy = entropy if old_entropy is None else old_entropy
    advantages = shape(rewards, shaping_entropy, mask, groups, backend=backend)
    expected = policy_loss(
        logits,
        tokens,
        advantages,
        mask,
        old_logprobs=old_logprobs,
        clip_high=0.28,
        entropy_coef=0.01,
        backend=backend,
    )
    assert_same_output(out, expected, logits)
    assert_advantage_metrics(out, advantages, rewards, shaping_entropy, mask)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_old_entropy_gets_no_gradient(backend):
    # B = 4 in groups of 2, T = 3, V = 16: the smallest batch with both kinds of rows.
    logits, tokens, rewards, mask, groups, _, old_entropy = make_batch(
        4, n_groups=2, group_size=2, seq_len=3, vocab=16, id_groups=False, mask_kind="none"
    )
    logits.requires_grad_(True)
    old_entropy.requires_grad_(True)
    for loss in (gtpo_loss, grpo_s_loss):
        out = loss(logits, tokens, rewards, mask, groups, old_entropy=old_entropy, backend=backend)
        out.loss.backward()
        assert old_entropy.grad is None
        assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# Against the float64 reference


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_groups=st.integers(1, 3),
    seq_len=st.integers(1, 6),
    id_groups=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool"]),
    given_entropy=st.booleans(),
    scope=st.sampled_from(["batch", "group"]),
    normalize=st.sampled_from(["zero-filled", "separate", "joint", "none"]),
)
def test_losses_match_float64_reference(
    seed, n_groups, seq_len, id_groups, mask_kind, given_entropy, scope, normalize
):
    # Balanced groups of 4 (see make_batch) keep the whitening well conditioned, so the
    # float32 loss meets the spec's 1e-5 and its gradient 1e-4 against float64.
    logits, tokens, rewards, mask, groups, old_logprobs, old_entropy = make_batch(
        seed, n_groups, 4, seq_len, 16, id_groups, mask_kind, balanced=True
    )
    old_entropy = old_entropy if given_entropy else None
    logits64 = logits.double().requires_grad_(True)
    logits.requires_grad_(True)
    cases = [
        (gtpo_loss, ref_losses.gtpo_loss, dict(normalize=normalize, scope=scope)),
        (grpo_s_loss, ref_losses.grpo_s_loss, {}),
    ]
    for loss, reference, options in cases:
        out = loss(
            logits,
            tokens,
            rewards,
            mask,
            groups,
            old_logprobs=old_logprobs,
            old_entropy=old_entropy,
            backend="torch",
            **options,
        )
        expected = reference(
            logits64,
            tokens,
            rewards,
            mask,
            groups,
            old_logprobs=old_logprobs,
            old_entropy=old_entropy,
            **options,
        )
        torch.testing.assert_close(out.loss.double(), expected.loss, rtol=RTOL, atol=ATOL)
        grad, grad64 = grad_of(out.loss, logits), grad_of(expected.loss, logits64)
        torch.testing.assert_close(
            grad.double(), grad64, rtol=1e-4, atol=1e-4 * grad64.abs().max().item() + 1e-7
        )
        for name in ADVANTAGE_METRICS:
            assert out.metrics[name].item() == pytest.approx(
                float(expected.metrics[name]), rel=1e-4, abs=1e-5
            ), name


@pytest.mark.parametrize("given_entropy", [False, True])
@pytest.mark.parametrize("filter_groups", [True, False])
def test_filtered_groups_match_reference(given_entropy, filter_groups):
    # Group 0 made all-success (uniform): with filter_groups its rows get advantage 0 and stay
    # out of the whitening; metrics report the filtered fraction of rows.
    logits, tokens, rewards, mask, groups, old_logprobs, old_entropy = make_batch(
        5, 3, 4, 6, 16, False, "bool", balanced=True
    )
    rewards[:4] = 1.0
    old_entropy = old_entropy if given_entropy else None
    logits64 = logits.double().requires_grad_(True)
    logits.requires_grad_(True)
    options = dict(old_logprobs=old_logprobs, old_entropy=old_entropy, filter_groups=filter_groups)
    for loss, reference in (
        (gtpo_loss, ref_losses.gtpo_loss),
        (grpo_s_loss, ref_losses.grpo_s_loss),
    ):
        out = loss(logits, tokens, rewards, mask, groups, backend="torch", **options)
        expected = reference(logits64, tokens, rewards, mask, groups, **options)
        torch.testing.assert_close(out.loss.double(), expected.loss, rtol=RTOL, atol=ATOL)
        grad, grad64 = grad_of(out.loss, logits), grad_of(expected.loss, logits64)
        torch.testing.assert_close(
            grad.double(), grad64, rtol=1e-4, atol=1e-4 * grad64.abs().max().item() + 1e-7
        )
        fraction = out.metrics["filtered_fraction"].item()
        assert fraction == pytest.approx(4 / 12 if filter_groups else 0.0, rel=1e-6)
        assert expected.metrics["filtered_fraction"] == pytest.approx(fraction, rel=1e-6)
        for name in ADVANTAGE_METRICS:
            assert out.metrics[name].item() == pytest.approx(
                float(expected.metrics[name]), rel=1e-4, abs=1e-5
            ), name
        if filter_groups:
            assert torch.all(grad[:4] == 0), "filtered rows take no part in the loss"


def test_triton_backend_matches_reference():
    # One balanced batch end to end through the Triton scoring and shaping kernels: B = 8 (two
    # groups of 4, id tensor), T = 5, V = 16. (GRPO-S on Triton equals policy_loss on Triton,
    # tested above, and its advantages match the reference in tests/test_advantages.py.)
    logits, tokens, rewards, mask, groups, old_logprobs, _ = make_batch(
        11, 2, 4, 5, 16, True, "bool", balanced=True
    )
    logits64 = logits.double().requires_grad_(True)
    logits.requires_grad_(True)
    out = gtpo_loss(
        logits, tokens, rewards, mask, groups, old_logprobs=old_logprobs, backend="triton"
    )
    expected = ref_losses.gtpo_loss(
        logits64, tokens, rewards, mask, groups, old_logprobs=old_logprobs
    )
    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=RTOL, atol=ATOL)
    grad64 = grad_of(expected.loss, logits64)
    torch.testing.assert_close(
        grad_of(out.loss, logits).double(),
        grad64,
        rtol=1e-4,
        atol=1e-4 * grad64.abs().max().item(),
    )


# ---------------------------------------------------------------------------------------------
# Modules, metrics, bad input


def test_modules_hold_the_options():
    # B = 6 (groups of 3), T = 4, V = 16, torch backend: only the plumbing is under test.
    logits, tokens, rewards, mask, groups, old_logprobs, old_entropy = make_batch(
        5, 2, 3, 4, 16, False, "bool"
    )
    options = dict(
        alpha2=0.3,
        scope="group",
        normalize="joint",
        clip_high=0.25,
        aggregation="seq-mean-token-mean",
        backend="torch",
    )
    module = GTPOLoss(**options)
    assert "scope='group'" in repr(module)
    out = module(logits, tokens, rewards, mask, groups, old_logprobs, old_entropy)
    expected = gtpo_loss(
        logits,
        tokens,
        rewards,
        mask,
        groups,
        old_logprobs=old_logprobs,
        old_entropy=old_entropy,
        **options,
    )
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)

    options = dict(beta1=0.5, beta2=0.4, success_threshold=0.5, backend="torch")
    out = GRPOSLoss(**options)(logits, tokens, rewards, mask, groups, old_logprobs=old_logprobs)
    expected = grpo_s_loss(
        logits, tokens, rewards, mask, groups, old_logprobs=old_logprobs, **options
    )
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)


def test_metrics_are_zero_dim_tensors_and_empty_sets_give_zero():
    # All rows succeed: the failure set is empty and its statistics are 0, not NaN.
    logits, tokens, _, mask, groups, _, old_entropy = make_batch(6, 2, 2, 3, 16, False, "none")
    rewards = torch.ones(4)
    out = gtpo_loss(logits, tokens, rewards, mask, groups, old_entropy=old_entropy, backend="torch")
    for name in ADVANTAGE_METRICS:
        assert isinstance(out.metrics[name], torch.Tensor) and out.metrics[name].dim() == 0
    assert out.metrics["success_fraction"].item() == 1.0
    for name in ("failure_advantage_mean", "failure_advantage_std", "failure_entropy"):
        assert out.metrics[name].item() == 0.0
    assert out.metrics["success_entropy"].item() == pytest.approx(old_entropy.mean().item())


def _bad_calls():
    logits, tokens, rewards, mask, groups, old_logprobs, old_entropy = make_batch(
        7, 2, 2, 3, 16, False, "bool"
    )
    call = dict(backend="torch")
    yield "logits", lambda: gtpo_loss(logits[0], tokens[0], rewards, None, 1, **call)
    yield "rewards", lambda: gtpo_loss(logits, tokens, rewards[:3], mask, 1, **call)
    yield "groups", lambda: gtpo_loss(logits, tokens, rewards, mask, 3, **call)
    yield "groups", lambda: grpo_s_loss(logits, tokens, rewards, mask, torch.ones(3).long(), **call)
    yield "mask", lambda: gtpo_loss(logits, tokens, rewards, mask[:, :2], groups, **call)
    yield (
        "old_entropy",
        lambda: gtpo_loss(
            logits, tokens, rewards, mask, groups, old_entropy=old_entropy[:, :2], **call
        ),
    )
    yield (
        "old_logprobs",
        lambda: grpo_s_loss(
            logits, tokens, rewards, mask, groups, old_logprobs=old_logprobs[1:], **call
        ),
    )
    yield (
        "normalize",
        lambda: gtpo_loss(logits, tokens, rewards, mask, groups, normalize="batch", **call),
    )
    yield "scope", lambda: gtpo_loss(logits, tokens, rewards, mask, groups, scope="all", **call)
    yield (
        "clip_low",
        lambda: grpo_s_loss(logits, tokens, rewards, mask, groups, clip_low=1.0, **call),
    )
    yield (
        "ref_logprobs",
        lambda: gtpo_loss(logits, tokens, rewards, mask, groups, kl_coef=0.1, **call),
    )
    yield (
        "temperature",
        lambda: gtpo_loss(logits, tokens, rewards, mask, groups, temperature=0.0, **call),
    )
    yield "tokens", lambda: gtpo_loss(logits, tokens + 16, rewards, mask, groups, **call)
    yield "backend", lambda: grpo_s_loss(logits, tokens, rewards, mask, groups, backend="jax")
    yield "normalize", lambda: GTPOLoss(normalize="z")
    yield "clip_low", lambda: GRPOSLoss(clip_low=-0.1)
    yield "alpha1", lambda: GRPOSLoss(alpha1=1.0)  # GTPO's option on the GRPO-S module
    yield "unknown", lambda: GTPOLoss(clip=0.2)


@pytest.mark.parametrize("argument, call", list(_bad_calls()))
def test_bad_input_raises_value_error(argument, call):
    with pytest.raises(ValueError, match=argument):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["gtpo", "grpo_s"])
def test_ignored_tokens_leave_the_shaping(backend, loss):
    """Tokens equal to -100 are inactive for the shaping as for the loss, also in the reference,
    so the one-call loss equals policy_loss with advantages shaped on mask & (tokens != -100)."""
    generator = torch.Generator().manual_seed(21)
    batch, seq, vocab = 8, 5, 40
    logits = torch.randn(batch, seq, vocab, generator=generator)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    tokens[1, 3:] = -100
    tokens[6, 1:] = -100
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    mask = torch.ones(batch, seq, dtype=torch.bool)
    old_entropy = torch.rand(batch, seq, generator=generator) + 0.1
    one_call = ek.gtpo_loss if loss == "gtpo" else ek.grpo_s_loss
    shape = ek.gtpo_advantages if loss == "gtpo" else ek.grpo_s_advantages
    reference_loss = getattr(ek.reference, f"{loss}_loss")
    for entropy in (old_entropy, None):
        out = one_call(logits, tokens, rewards, mask, 4, old_entropy=entropy, backend=backend)
        ref = reference_loss(logits.double(), tokens, rewards, mask, 4, old_entropy=entropy)
        torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    active = mask & (tokens != -100)
    advantages = shape(rewards, old_entropy, active, 4)
    want = ek.policy_loss(logits, tokens, advantages, active, clip_high=0.28, backend=backend)
    got = one_call(logits, tokens, rewards, mask, 4, old_entropy=old_entropy, backend=backend)
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("loss", ["gtpo", "grpo_s"])
def test_one_call_losses_validate_once(monkeypatch, loss):
    """The one-call losses check the rewards once (their shaping runs on the checked values),
    not once more inside the public advantage functions."""
    from entropy_kernels import advantage_groups, advantages, gtpo, sequence_advantages

    calls = []

    def counted(rewards):
        calls.append(1)
        return advantage_groups.check_rewards(rewards)

    monkeypatch.setattr(gtpo, "check_rewards", counted)
    monkeypatch.setattr(advantages, "check_rewards", counted)
    monkeypatch.setattr(sequence_advantages, "check_rewards", counted)
    logits, tokens, rewards, mask, groups, old_logprobs, _ = make_batch(
        0, 2, 4, 5, 30, False, "bool", balanced=True
    )
    function = gtpo_loss if loss == "gtpo" else grpo_s_loss
    function(logits, tokens, rewards, mask, groups, old_logprobs=old_logprobs, backend="torch")
    assert len(calls) == 1
