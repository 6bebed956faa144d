"""policy_loss: both backends against the float64 reference, clip branches, invariants, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import entropy_kernels as ek
from entropy_kernels import reference
from entropy_kernels.policy_loss import AGGREGATIONS

BACKENDS = ["torch", "triton"]
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
ROUNDED_GRAD_TOL = {
    torch.float32: GRAD_TOL,
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}


def make_batch(batch, seq, vocab, *, dtype=torch.float32, seed=0, per_token=True, mask_p=0.3):
    """Random logits and tokens; old log-probs set so both clip branches and the dual clip fire.

    ``old = logp_true - shift`` with shifts drawn from {-1.0, -0.4, 0, 0.4, 1.0}: ratios of
    e^{+-1} (outside both clip bounds and beyond a dual clip of 2), e^{+-0.4} and 1.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=generator) * 2).to(dtype)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    adv_shape = (batch, seq) if per_token else (batch,)
    advantages = torch.randn(adv_shape, generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > mask_p
    true_logp, _ = reference.logprobs_and_entropy(logits.double(), tokens)
    shifts = torch.tensor([-1.0, -0.4, 0.0, 0.4, 1.0], dtype=torch.float64)
    # Every row cycles through every shift, so each sign of advantage meets each ratio.
    pick = (torch.arange(seq) + torch.arange(batch).unsqueeze(-1)) % len(shifts)
    # Log-probs are <= 0 (policy_loss rejects positive ones): a shift stops at 0.
    old_logprobs = (true_logp - shifts[pick]).clamp_max(0.0).float()
    noise = 0.3 * torch.randn(batch, seq, generator=generator)
    ref_logprobs = (true_logp + noise).clamp_max(0.0).float()
    return logits, tokens, advantages, mask, old_logprobs, ref_logprobs


def run_both(logits, tokens, advantages, mask=None, *, backend, **options):
    """(ours, float64 reference) outputs and logits gradients."""
    ours_logits = logits.clone().requires_grad_()
    ours = ek.policy_loss(ours_logits, tokens, advantages, mask, backend=backend, **options)
    ours.loss.backward()
    options.pop("inplace_backward", None)
    ref_logits = logits.double().requires_grad_()
    ref = reference.policy_loss(ref_logits, tokens, advantages, mask, **options)
    ref.loss.backward()
    return ours, ours_logits.grad, ref, ref_logits.grad


def assert_matches(ours, ours_grad, ref, ref_grad, dtype=torch.float32):
    torch.testing.assert_close(ours.loss.double(), ref.loss, **VALUE_TOL)
    torch.testing.assert_close(ours.logprobs.double(), ref.logprobs, **VALUE_TOL)
    torch.testing.assert_close(ours.entropy.double(), ref.entropy, **VALUE_TOL)
    assert ours_grad.dtype == dtype
    torch.testing.assert_close(
        ours_grad.float(), ref_grad.to(dtype).float(), **ROUNDED_GRAD_TOL[dtype]
    )
    for name, value in ref.metrics.items():
        torch.testing.assert_close(
            torch.as_tensor(ours.metrics[name]).double(), value, **VALUE_TOL, msg=name
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("per_token", [True, False], ids=["adv[B,T]", "adv[B]"])
def test_every_aggregation_off_policy(backend, aggregation, per_token):
    # 4 x 6 tokens over 300 words: enough tokens for every clip branch, two vocab blocks.
    logits, tokens, adv, mask, old, ref = make_batch(4, 6, 300, per_token=per_token)
    # Both signs in every row (per token) or alternating rows (per sequence).
    sign = torch.tensor([1.0, -1.0]).repeat(12)[: adv.numel()].view(adv.shape)
    adv = adv.abs() * sign + 0.1 * sign
    mask[:] = True
    mask[1] = False  # a sequence without active tokens is left out of the sequence means
    outputs = run_both(
        logits,
        tokens,
        adv,
        mask,
        backend=backend,
        old_logprobs=old,
        ref_logprobs=ref,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=2.0,
        kl_coef=0.05,
        entropy_coef=0.01,
        aggregation=aggregation,
    )
    assert_matches(*outputs)
    metrics = outputs[0].metrics
    # The inputs are built so that every branch really fires.
    for name in ("clip_low_fraction", "clip_high_fraction", "dual_clip_fraction"):
        assert float(metrics[name]) > 0, name
    assert float(metrics["clip_fraction"]) >= float(metrics["clip_low_fraction"])


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 4),
    vocab=st.sampled_from([3, 257, 520]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    aggregation=st.sampled_from(AGGREGATIONS),
    on_policy=st.booleans(),
    per_token=st.booleans(),
    dual_clip=st.sampled_from([None, 1.5, 3.0]),
    temperature=st.sampled_from([1.0, 0.6]),
    float_mask=st.booleans(),
    normalizer=st.sampled_from([None, 7.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(
    backend,
    batch,
    seq,
    vocab,
    dtype,
    aggregation,
    on_policy,
    per_token,
    dual_clip,
    temperature,
    float_mask,
    normalizer,
    seed,
):
    logits, tokens, adv, mask, old, _ = make_batch(
        batch, seq, vocab, dtype=dtype, seed=seed, per_token=per_token
    )
    if float_mask:
        mask = mask.float() * 0.5
    if aggregation in ("seq-mean-token-mean", "seq-mean-token-sum"):
        normalizer = None
    outputs = run_both(
        logits,
        tokens,
        adv,
        mask,
        backend=backend,
        old_logprobs=None if on_policy else old,
        dual_clip=dual_clip,
        temperature=temperature,
        aggregation=aggregation,
        normalizer=normalizer,
        clip_high=0.28,
    )
    assert_matches(*outputs, dtype=dtype)
    ours, grad = outputs[:2]
    assert torch.isfinite(ours.loss) and torch.isfinite(grad).all()
    assert torch.all(grad[~mask.bool()] == 0), "a masked token received gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_token_layout(backend):
    """[N, V] logits with per-token advantages are the token-mean loss of one long sequence."""
    logits, tokens, adv, mask, old, _ = make_batch(1, 9, 260)
    flat = run_both(
        logits[0], tokens[0], adv[0], mask[0], backend=backend, old_logprobs=old[0], clip_high=0.3
    )
    assert_matches(*flat)
    batched = ek.policy_loss(logits, tokens, adv, mask, old_logprobs=old, clip_high=0.3)
    torch.testing.assert_close(flat[0].loss, batched.loss)
    with pytest.raises(ValueError, match="aggregation"):
        ek.policy_loss(logits[0], tokens[0], adv[0], aggregation="seq-mean-token-mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_view(backend):
    """logits[:, :-1] scored against tokens[:, 1:], as every trainer slices them."""
    generator = torch.Generator().manual_seed(5)
    full = torch.randn(3, 5, 280, generator=generator)
    input_ids = torch.randint(0, 280, (3, 5), generator=generator)
    adv = torch.randn(3, generator=generator)
    base = full.clone().requires_grad_()
    out = ek.policy_loss(base[:, :-1], input_ids[:, 1:], adv, backend=backend)
    out.loss.backward()
    ref_base = full.double().requires_grad_()
    ref = reference.policy_loss(ref_base[:, :-1], input_ids[:, 1:], adv)
    ref.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss, **VALUE_TOL)
    torch.testing.assert_close(base.grad.double(), ref_base.grad, **GRAD_TOL)
    assert torch.all(base.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_sign_follows_advantage(backend):
    """On-policy, d loss / d logit[token] = -A (1 - p) / n: descent raises good tokens."""
    logits, tokens, _, _, _, _ = make_batch(2, 4, 40)
    adv = torch.tensor([[1.0, -2.0, 0.5, -0.1], [-1.0, 3.0, -0.5, 0.2]])
    x = logits.clone().requires_grad_()
    ek.policy_loss(x, tokens, adv, backend=backend).loss.backward()
    token_grad = x.grad.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(torch.sign(token_grad), -torch.sign(adv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_no_active_tokens_gives_zero_loss_and_gradient(backend, aggregation):
    logits, tokens, adv, _, old, _ = make_batch(2, 3, 50)
    x = logits.clone().requires_grad_()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = ek.policy_loss(
        x, tokens, adv, mask, old_logprobs=old, aggregation=aggregation, backend=backend
    )
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.all(x.grad == 0)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in out.metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 20, requires_grad=True)
    out = ek.policy_loss(x, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0 and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_gives_the_same_gradient(backend):
    logits, tokens, adv, mask, old, _ = make_batch(2, 3, 300, dtype=torch.bfloat16)
    options = dict(old_logprobs=old, entropy_coef=0.1, backend=backend)
    x = logits.clone().requires_grad_()
    ek.policy_loss(x, tokens, adv, mask, **options).loss.backward()
    leaf = logits.clone().requires_grad_()
    hidden = leaf * 1
    ek.policy_loss(hidden, tokens, adv, mask, inplace_backward=True, **options).loss.backward()
    assert torch.equal(leaf.grad, x.grad)
    assert torch.equal(hidden.detach(), x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_propagate_to_loss(backend):
    logits, tokens, adv, _, _, _ = make_batch(2, 3, 30)
    logits[1, 2, 7] = float("nan")
    assert torch.isnan(ek.policy_loss(logits, tokens, adv, backend=backend).loss)


def test_module_holds_options():
    logits, tokens, adv, mask, old, _ = make_batch(2, 3, 30)
    module = ek.PolicyLoss(clip_high=0.28, aggregation="seq-mean-token-mean")
    out = module(logits, tokens, adv, mask, old_logprobs=old)
    want = ek.policy_loss(
        logits,
        tokens,
        adv,
        mask,
        old_logprobs=old,
        clip_high=0.28,
        aggregation="seq-mean-token-mean",
    )
    assert torch.equal(out.loss, want.loss)
    assert "clip_high=0.28" in repr(module)


def test_bad_inputs_raise_value_error():
    logits, tokens, adv, mask, old, ref = make_batch(2, 3, 10)
    cases = [
        ("advantages", dict(advantages=torch.randn(3))),
        ("advantages", dict(advantages=torch.ones(2, 3, dtype=torch.long))),
        ("mask", dict(mask=torch.ones(2, 4, dtype=torch.bool))),
        ("old_logprobs", dict(old_logprobs=torch.zeros(3, 2))),
        ("ref_logprobs", dict(ref_logprobs=torch.zeros(2), kl_coef=0.1)),
        ("ref_logprobs", dict(kl_coef=0.1)),
        ("aggregation", dict(aggregation="mean")),
        ("backend", dict(backend="cuda")),
        ("clip_low", dict(clip_low=1.0)),
        ("clip_low", dict(clip_low=-0.1)),
        ("dual_clip", dict(dual_clip=0.5)),
        ("temperature", dict(temperature=0.0)),
        ("normalizer", dict(normalizer=0.0)),
        ("normalizer", dict(normalizer=3.0, aggregation="seq-mean-token-mean")),
        ("tokens", dict(tokens=tokens + 10)),
        ("tokens", dict(tokens=tokens.float())),
        ("logits", dict(logits=logits[..., :1].expand(2, 3, 10))),
        ("logits", dict(logits=logits.double())),
    ]
    for name, override in cases:
        args = dict(logits=logits, tokens=tokens, advantages=adv, mask=mask)
        args.update(override)
        with pytest.raises(ValueError, match=name):
            ek.policy_loss(**args)


def test_fused_triton_path_matches_unfused_torch_path():
    """The Triton path writes the gradient in the forward pass; the torch path uses autograd.

    Both follow PyTorch's conventions (clamp on its closed interval, ties split evenly), so
    on-policy ratios of exactly 1 (ties of the clipped and unclipped terms) agree too.
    """
    logits, tokens, adv, mask, old, ref = make_batch(3, 5, 300, seed=11)
    results = {}
    for backend in BACKENDS:
        for old_logprobs in (None, old):
            x = logits.clone().requires_grad_()
            out = ek.policy_loss(
                x,
                tokens,
                adv,
                mask,
                old_logprobs=old_logprobs,
                ref_logprobs=ref,
                kl_coef=0.1,
                entropy_coef=0.02,
                dual_clip=2.0,
                clip_high=0.28,
                backend=backend,
            )
            # A scaled loss (as under gradient accumulation) scales the stored gradient.
            (0.25 * out.loss).backward()
            results[backend, old_logprobs is None] = (out.loss.detach(), x.grad)
    for on_policy in (True, False):
        (loss_t, grad_t), (loss_k, grad_k) = (
            results["torch", on_policy],
            results["triton", on_policy],
        )
        torch.testing.assert_close(loss_k, loss_t, **VALUE_TOL)
        torch.testing.assert_close(grad_k, grad_t, **GRAD_TOL)


def test_no_grad_triton_path_scores_without_gradient():
    logits, tokens, adv, mask, old, _ = make_batch(2, 3, 40)
    with torch.no_grad():
        out = ek.policy_loss(logits, tokens, adv, mask, old_logprobs=old, backend="triton")
    want = reference.policy_loss(logits.double(), tokens, adv, mask, old_logprobs=old)
    torch.testing.assert_close(out.loss.double(), want.loss, **VALUE_TOL)
    assert not out.loss.requires_grad


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_closed_form_aggregation_weights_are_the_gradient(aggregation):
    """The fused kernel's per-token weights equal autograd of the aggregation itself."""
    from entropy_kernels.surrogate import LossOptions, _aggregate, aggregation_weights

    generator = torch.Generator().manual_seed(12)
    weights = (torch.rand(5, 7, generator=generator) > 0.4).float()
    weights[2] = 0  # an empty sequence
    weights[3] *= 0.5  # float weights
    normalizer = 9.0 if aggregation in ("token-mean", "seq-mean-token-sum-norm") else None
    for norm in {None, normalizer}:
        options = LossOptions(aggregation=aggregation, normalizer=norm)
        per_token = torch.randn(5, 7, generator=generator, requires_grad=True)
        (want,) = torch.autograd.grad(_aggregate(per_token, weights, options), per_token)
        torch.testing.assert_close(aggregation_weights(weights, options), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_scaled_loss_in_bfloat16(backend, inplace):
    """loss / 3 (gradient accumulation): the gradient is the reference's / 3, rounded once."""
    logits, tokens, adv, mask, old, _ = make_batch(2, 4, 300, dtype=torch.bfloat16, seed=13)
    leaf = logits.clone().requires_grad_()
    hidden = leaf * 1
    out = ek.policy_loss(
        hidden, tokens, adv, mask, old_logprobs=old, inplace_backward=inplace, backend=backend
    )
    (out.loss / 3).backward()
    ref_logits = logits.double().requires_grad_()
    (reference.policy_loss(ref_logits, tokens, adv, mask, old_logprobs=old).loss / 3).backward()
    want = ref_logits.grad.to(torch.bfloat16).float()
    torch.testing.assert_close(leaf.grad.float(), want, **ROUNDED_GRAD_TOL[torch.bfloat16])
    if inplace:
        assert torch.equal(hidden.detach(), leaf.grad), "the scaled gradient left the storage"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_entries(backend):
    """-inf logits (masked vocabulary) through the loss: finite loss, no gradient there."""
    logits, tokens, adv, mask, old, _ = make_batch(3, 4, 300, seed=14)
    hole = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    hole.scatter_(-1, tokens.unsqueeze(-1), False)
    logits = logits.masked_fill(hole, float("-inf"))
    outputs = run_both(
        logits,
        tokens,
        adv,
        mask,
        backend=backend,
        old_logprobs=old,
        entropy_coef=0.05,
        temperature=0.8,
        dual_clip=2.0,
    )
    assert_matches(*outputs)
    assert torch.all(outputs[1][hole] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_are_not_active(backend):
    """Tokens equal to -100 leave every mean, even with mask=None."""
    logits, tokens, adv, _, old, _ = make_batch(2, 5, 60, seed=15)
    ignored = torch.zeros(2, 5, dtype=torch.bool)
    ignored[0, 3:] = True
    tokens = tokens.masked_fill(ignored, -100)
    outputs = run_both(logits, tokens, adv, None, backend=backend, old_logprobs=old)
    assert_matches(*outputs)
    ours = outputs[0]
    want_entropy = ours.entropy[~ignored].mean()
    torch.testing.assert_close(torch.as_tensor(ours.metrics["entropy"]), want_entropy)
    assert torch.all(outputs[1][ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_sequences(backend):
    x = torch.randn(3, 0, 20, requires_grad=True)
    for aggregation in AGGREGATIONS:
        out = ek.policy_loss(
            x,
            torch.zeros(3, 0, dtype=torch.long),
            torch.randn(3),
            aggregation=aggregation,
            backend=backend,
        )
        assert out.loss.item() == 0.0, aggregation


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_with_gradient(backend):
    logits, tokens, adv, _, _, _ = make_batch(2, 3, 30)
    logits[1, 2, 7] = float("nan")
    x = logits.clone().requires_grad_()
    out = ek.policy_loss(x, tokens, adv, backend=backend)
    out.loss.backward()
    assert torch.isnan(out.loss)
    assert torch.isnan(x.grad[1, 2]).all()


def test_fused_gradient_is_used_once():
    logits, tokens, adv, _, _, _ = make_batch(2, 3, 30)
    x = logits.clone().requires_grad_()
    out = ek.policy_loss(x, tokens, adv, backend="triton")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()


def test_gradient_to_advantages_takes_the_autograd_path():
    """A tensor option that needs a gradient routes the Triton backend through autograd."""
    logits, tokens, adv, _, old, _ = make_batch(2, 3, 30)
    adv = adv.clone().requires_grad_()
    ek.policy_loss(
        logits.requires_grad_(), tokens, adv, old_logprobs=old, backend="triton"
    ).loss.backward()
    assert adv.grad is not None and torch.isfinite(adv.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_leaves_logits_untouched(backend):
    """Errors are raised before any kernel runs, even with inplace_backward."""
    logits, tokens, adv, mask, old, _ = make_batch(2, 3, 10)
    leaf = logits.clone().requires_grad_()
    hidden = leaf * 1
    before = hidden.detach().clone()
    for bad in (dict(kl_coef=0.1), dict(normalizer=torch.ones(2)), dict(clip_low=2.0)):
        with pytest.raises(ValueError):
            ek.policy_loss(hidden, tokens, adv, mask, inplace_backward=True, backend=backend, **bad)
    assert torch.equal(hidden.detach(), before)
    with pytest.raises(ValueError, match="inplace_backward"):
        ek.policy_loss(leaf, tokens, adv, inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_inactive_positions_take_no_part(backend, aggregation):
    """As in verl's masked sums: an inactive token whose log-prob is -inf (its logit masked) or
    whose old log-prob is NaN padding changes neither loss, metrics nor gradient."""
    logits, tokens, adv, mask, old, ref = make_batch(3, 5, 40, seed=21)
    mask[0, 2] = mask[1, 4] = False
    poisoned_logits, poisoned_old = logits.clone(), old.clone()
    poisoned_ref, poisoned_adv = ref.clone(), adv.clone()
    poisoned_logits[0, 2, tokens[0, 2]] = float("-inf")
    poisoned_old[1, 4] = poisoned_ref[0, 2] = poisoned_adv[1, 4] = float("nan")
    options = dict(kl_coef=0.1, entropy_coef=0.01, aggregation=aggregation)
    results = []
    for x, old_logprobs, ref_logprobs, advantages in (
        (logits, old, ref, adv),
        (poisoned_logits, poisoned_old, poisoned_ref, poisoned_adv),
    ):
        for on_policy in (False, True):
            leaf = x.clone().requires_grad_()
            out = ek.policy_loss(
                leaf,
                tokens,
                advantages,
                mask,
                old_logprobs=None if on_policy else old_logprobs,
                ref_logprobs=ref_logprobs,
                backend=backend,
                **options,
            )
            out.loss.backward()
            results.append((out, leaf.grad))
    for (clean, clean_grad), (poisoned, poisoned_grad) in zip(
        results[:2], results[2:], strict=True
    ):
        assert torch.isfinite(poisoned.loss) and torch.isfinite(poisoned_grad).all()
        torch.testing.assert_close(poisoned.loss, clean.loss, **VALUE_TOL)
        torch.testing.assert_close(poisoned_grad, clean_grad, **GRAD_TOL)
        for name, value in clean.metrics.items():
            torch.testing.assert_close(
                torch.as_tensor(poisoned.metrics[name]), torch.as_tensor(value), msg=name
            )
    # The reference agrees, and its float64 gradient is finite too.
    x64 = poisoned_logits.double().requires_grad_()
    want = reference.policy_loss(
        x64,
        tokens,
        poisoned_adv,
        mask,
        old_logprobs=poisoned_old,
        ref_logprobs=poisoned_ref,
        **options,
    )
    want.loss.backward()
    torch.testing.assert_close(results[2][0].loss.double(), want.loss, **VALUE_TOL)
    torch.testing.assert_close(results[2][1].double(), x64.grad, **GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_one_element_normalizer_gives_a_scalar_loss(backend, aggregation):
    logits, tokens, adv, mask, _, _ = make_batch(2, 3, 30, seed=22)
    for normalizer in (torch.tensor([6.0]), torch.tensor(6.0), 6.0):
        out = ek.policy_loss(
            logits.clone().requires_grad_(),
            tokens,
            adv,
            mask,
            aggregation=aggregation,
            normalizer=normalizer,
            backend=backend,
        )
        assert out.loss.shape == ()
        want = reference.policy_loss(
            logits.double(), tokens, adv, mask, aggregation=aggregation, normalizer=normalizer
        )
        assert want.loss.shape == ()
        torch.testing.assert_close(out.loss.double(), want.loss, **VALUE_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_rejects_overlapping_rows(backend):
    """Rows that share memory (an expand()ed view) would overwrite each other's gradient."""
    logits, tokens, adv, _, _, _ = make_batch(3, 4, 30, seed=23)
    shared = (logits[:1, :1].clone().requires_grad_() * 1).expand(3, 4, 30)
    before = shared.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        ek.policy_loss(shared, tokens, adv, inplace_backward=True, backend=backend)
    assert torch.equal(shared.detach(), before)
    # Without inplace_backward the same view is fine.
    ek.policy_loss(shared, tokens, adv, backend=backend).loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", [False, True])
def test_bfloat16_gradient_is_rounded_to_nearest(backend, loss):
    """The float32 gradient is rounded to nearest-even once: it then equals the bfloat16
    rounding of the float64 gradient except where float32 error straddles a rounding boundary
    (a fraction ~1e-3 of elements). Truncation (the interpreter's own cast) would miss about
    half of them by one unit."""
    logits, tokens, adv, mask, old, _ = make_batch(4, 6, 500, dtype=torch.bfloat16, seed=24)
    x = logits.clone().requires_grad_()
    x64 = logits.double().requires_grad_()
    if loss:  # the fused kernel on the Triton backend
        ek.policy_loss(x, tokens, adv, mask, old_logprobs=old, backend=backend).loss.backward()
        reference.policy_loss(x64, tokens, adv, mask, old_logprobs=old).loss.backward()
    else:
        logp, entropy = ek.logprobs_and_entropy(x, tokens, backend=backend)
        (logp.sum() + 0.5 * entropy.sum()).backward()
        want_logp, want_entropy = reference.logprobs_and_entropy(x64, tokens)
        (want_logp.sum() + 0.5 * want_entropy.sum()).backward()
    nonzero = x64.grad != 0
    mismatched = (x.grad != x64.grad.to(torch.bfloat16)) & nonzero
    assert int(nonzero.sum()) > 1000
    assert int(mismatched.sum()) <= 0.01 * int(nonzero.sum())


def test_reference_validates_and_reports_every_metric():
    logits, tokens, adv, mask, _, ref = make_batch(2, 3, 20, seed=25)
    out = reference.policy_loss(logits, tokens, adv, mask)
    assert set(out.metrics) >= {
        "clip_fraction",
        "clip_low_fraction",
        "clip_high_fraction",
        "dual_clip_fraction",
        "approx_kl",
        "entropy",
    }
    for bad, name in (
        (dict(aggregation="bogus"), "aggregation"),
        (dict(kl_coef=0.1), "ref_logprobs"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(temperature=0.0), "temperature"),
    ):
        with pytest.raises(ValueError, match=name):
            reference.policy_loss(logits, tokens, adv, mask, **bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_accepts_gapped_views_and_rejects_unfolded_ones(backend):
    """logits[:, :-1] leaves gaps between rows (fine); unfold() makes rows share elements."""
    logits, tokens, _, _, _, _ = make_batch(2, 5, 30, seed=26)
    adv = torch.randn(2)
    hidden = logits.clone().requires_grad_() * 1
    ek.policy_loss(hidden[:, :-1], tokens[:, 1:], adv, inplace_backward=True, backend=backend)
    flat = torch.randn(2 * 4 + 29).requires_grad_() * 1
    windows = flat.unfold(0, 30, 1)[:8].view(2, 4, 30)  # rows one element apart
    with pytest.raises(ValueError, match="share memory"):
        ek.policy_loss(windows, tokens[:, :4], adv, inplace_backward=True, backend=backend)
