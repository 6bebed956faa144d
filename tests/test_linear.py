"""Fused linear path: both backends against the float64 reference on materialised logits.

Values at rtol 2e-5 / atol 2e-5, gradients of hidden, weight and bias at 2e-4 relative by norm
(half-precision gradients against the same rounding of the reference), as api.md states.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import entropy_kernels as ek
from entropy_kernels import linear_scoring, reference
from entropy_kernels.policy_loss import AGGREGATIONS

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VALUE_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_RTOL = 2e-4


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # Test shapes then span several torch-backend tiles of rows and of vocabulary.
    monkeypatch.setattr(linear_scoring, "TILE_ROWS", 8)
    monkeypatch.setattr(linear_scoring, "TILE_VOCAB", 64)


def make_head(batch, seq, size, vocab, *, dtype=torch.float32, bias=True, seed=0):
    """``hidden[:, :-1]`` (a strided view), ``weight``, ``bias``, tokens; logits of spread ~2."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq + 1, size, generator=generator).to(dtype)[:, :-1]
    weight = (torch.randn(vocab, size, generator=generator) * 2 / size**0.5).to(dtype)
    head_bias = torch.randn(vocab, generator=generator).to(dtype) if bias else None
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    return hidden, weight, head_bias, tokens


def leaves(tensors, dtype=None):
    """Fresh leaves requiring grad (None stays None), optionally converted to ``dtype``."""
    return [
        None if t is None else (t if dtype is None else t.to(dtype)).detach().requires_grad_()
        for t in tensors
    ]


def assert_grads(ours, refs):
    for name, mine, ref in zip(("hidden", "weight", "bias"), ours, refs, strict=True):
        if ref is None:
            assert mine is None or mine.grad is None, name
            continue
        assert mine.grad.dtype == mine.dtype, name
        assert mine.grad.shape == mine.shape, name
        expected = ref.grad.to(mine.dtype).double()
        error = (mine.grad.double() - expected).norm()
        assert error <= GRAD_RTOL * expected.norm(), f"{name}: {error} vs {expected.norm()}"


def assert_output(ours, ref):
    torch.testing.assert_close(ours.loss.double(), ref.loss.double(), **VALUE_TOL)
    torch.testing.assert_close(ours.logprobs.double(), ref.logprobs.double(), **VALUE_TOL)
    torch.testing.assert_close(ours.entropy.double(), ref.entropy.double(), **VALUE_TOL)
    for name, value in ref.metrics.items():
        torch.testing.assert_close(
            torch.as_tensor(ours.metrics[name]).double(),
            torch.as_tensor(value).double(),
            **VALUE_TOL,
            msg=name,
        )


def compare_loss(ours_fn, ref_fn, head, *args, **options):
    """Run a linear loss and its reference on the same head; compare outputs and gradients."""
    hidden, weight, bias, tokens = head
    ours_leaves, ref_leaves = leaves((hidden, weight, bias)), leaves((hidden, weight, bias))
    ours = ours_fn(*ours_leaves[:2], tokens, *args, bias=ours_leaves[2], **options)
    options.pop("backend", None)
    ref = ref_fn(*ref_leaves[:2], tokens, *args, bias=ref_leaves[2], **options)
    ours.loss.backward()
    ref.loss.backward()
    assert_output(ours, ref)
    assert_grads(ours_leaves, [None if t is None else t for t in ref_leaves])
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_scoring_values_and_gradients(backend, dtype, bias):
    # H = 37 and V = 203: no multiple of any tile; rows of a strided view; an ignored token.
    hidden, weight, head_bias, tokens = make_head(2, 5, 37, 203, dtype=dtype, bias=bias)
    tokens[1, 2] = -100
    ours, refs = leaves((hidden, weight, head_bias)), leaves((hidden, weight, head_bias))
    logp, entropy = ek.linear_logprobs_and_entropy(
        *ours[:2], tokens, bias=ours[2], temperature=0.7, backend=backend
    )
    ref_logp, ref_entropy = reference.linear_logprobs_and_entropy(
        *refs[:2], tokens, bias=refs[2], temperature=0.7
    )
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), ref_entropy, **VALUE_TOL)
    assert logp[1, 2] == 0 and entropy[1, 2] == 0
    generator = torch.Generator().manual_seed(1)
    grad_logp, grad_entropy = torch.randn(2, 2, 5, generator=generator)
    ((logp * grad_logp).sum() + (entropy * grad_entropy).sum()).backward()
    ((ref_logp * grad_logp).sum() + (ref_entropy * grad_entropy).sum()).backward()
    assert_grads(ours, refs)


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
    old = (true_logp - shifts[pick]).float()
    ref = (true_logp + 0.3 * torch.randn(batch, seq, generator=generator)).float()
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_where_required(backend):
    hidden, weight, bias, tokens = make_head(2, 3, 16, 40)
    frozen_weight = weight.clone()
    hidden_leaf, bias_leaf = leaves((hidden, bias))
    out = ek.linear_policy_loss(
        hidden_leaf, frozen_weight, tokens, torch.randn(2), bias=bias_leaf, backend=backend
    )
    out.loss.backward()
    assert frozen_weight.grad is None
    assert hidden_leaf.grad is not None and bias_leaf.grad is not None
    with torch.no_grad():
        logp, _ = ek.linear_logprobs_and_entropy(hidden, weight, tokens, backend=backend)
    assert not logp.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_and_ignored_rows(backend):
    hidden, weight, bias, tokens = make_head(2, 4, 16, 50)
    bias[::3] = float("-inf")  # masked vocabulary entries (never the token)
    tokens = torch.where(tokens % 3 == 0, tokens + 1, tokens)
    tokens[1, 2] = -100
    poisoned = hidden.clone()
    poisoned[1, 2] = float("nan")  # an ignored row leaves no trace, even a non-finite one
    advantages = torch.randn(2)
    mine = leaves((poisoned, weight, bias))
    out = ek.linear_policy_loss(
        *mine[:2], tokens, advantages, bias=mine[2], entropy_coef=0.1, backend=backend
    )
    out.loss.backward()
    refs = leaves((hidden, weight, bias))
    ref = reference.linear_policy_loss(
        *refs[:2], tokens, advantages, bias=refs[2], entropy_coef=0.1
    )
    ref.loss.backward()
    assert_output(out, ref)
    assert_grads(mine, refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_propagate(backend):
    hidden, weight, bias, tokens = make_head(2, 4, 16, 50)
    hidden = hidden.clone()
    hidden[0, 1] = float("nan")
    logp, entropy = ek.linear_logprobs_and_entropy(
        hidden, weight, tokens, bias=bias, backend=backend
    )
    assert torch.isnan(logp[0, 1]) and torch.isnan(entropy[0, 1])
    keep = ~torch.isnan(hidden).any(-1)
    assert torch.isfinite(logp[keep]).all() and torch.isfinite(entropy[keep]).all()
    # An out-of-range token passed without validation gives NaN, not a read out of bounds.
    tokens[1, 0] = 50
    logp, _ = ek.linear_logprobs_and_entropy(
        hidden, weight, tokens, bias=bias, validate=False, backend=backend
    )
    assert torch.isnan(logp[1, 0]) and torch.isfinite(logp[1, 1])


def bad_calls():
    hidden, weight, bias, tokens = make_head(2, 3, 8, 20)
    adv, rewards = torch.randn(2), torch.tensor([1.0, 0.0])
    scoring = ek.linear_logprobs_and_entropy
    policy = ek.linear_policy_loss
    out_of_range = tokens.clone()
    out_of_range[0, 0] = 20
    return [
        ("hidden", lambda: scoring(hidden.double(), weight.double(), tokens)),
        ("weight", lambda: scoring(hidden, weight[:, :7], tokens)),
        ("weight", lambda: scoring(hidden, weight.half(), tokens)),
        ("weight", lambda: scoring(hidden, weight[0], tokens)),
        ("bias", lambda: scoring(hidden, weight, tokens, bias=bias[:-1])),
        ("bias", lambda: scoring(hidden, weight, tokens, bias=bias.half())),
        ("tokens", lambda: scoring(hidden, weight, tokens[:, :2])),
        ("tokens", lambda: scoring(hidden, weight, tokens.float())),
        ("tokens", lambda: scoring(hidden, weight, out_of_range)),
        ("temperature", lambda: scoring(hidden, weight, tokens, temperature=0.0)),
        ("backend", lambda: scoring(hidden, weight, tokens, backend="cuda")),
        ("inplace_backward", lambda: policy(hidden, weight, tokens, adv, inplace_backward=True)),
        ("aggregation", lambda: policy(hidden, weight, tokens, adv, aggregation="sum")),
        ("clip_low", lambda: policy(hidden, weight, tokens, adv, clip_low=1.0)),
        ("ref_logprobs", lambda: policy(hidden, weight, tokens, adv, kl_coef=0.1)),
        ("advantages", lambda: policy(hidden, weight, tokens, adv[:1])),
        (
            "hidden",
            lambda: policy(hidden[0], weight, tokens[0], adv, aggregation="seq-mean-token-mean"),
        ),
        ("hidden", lambda: ek.linear_gtpo_loss(hidden[0], weight, tokens[0], rewards, None, 1)),
        ("rewards", lambda: ek.linear_grpo_s_loss(hidden, weight, tokens, rewards[:1], None, 2)),
        (
            "normalize",
            lambda: ek.linear_gtpo_loss(hidden, weight, tokens, rewards, None, 2, normalize="x"),
        ),
        (
            "alpha1",
            lambda: ek.linear_grpo_s_loss(hidden, weight, tokens, rewards, None, 2, alpha1=1.0),
        ),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_input_names_the_argument(index):
    name, call = bad_calls()[index]
    with pytest.raises(ValueError, match=name):
        call()


def run_python(code: str) -> str:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_torch_backend_never_loads_the_linear_kernels():
    code = """
import sys, torch, entropy_kernels as ek
hidden, weight = torch.randn(2, 3, 8, requires_grad=True), torch.randn(11, 8)
tokens = torch.randint(0, 11, (2, 3))
ek.linear_policy_loss(hidden, weight, tokens, torch.randn(2), backend="torch").loss.backward()
print(sorted(name for name in sys.modules if name.startswith("entropy_kernels.kernels.linear")))
"""
    assert run_python(code).strip() == "[]"


def test_memory_bounded_by_a_tile():
    # N = 8192, H = 128, V = 32000 float32: one logits tensor would take 1 GB. The peak RSS of
    # forward + backward must grow by well under a quarter of that above inputs and gradients.
    code = """
import resource, torch, entropy_kernels as ek
torch.set_num_threads(2)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def step(n, size, vocab):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, size, generator=g).requires_grad_()
    weight = (torch.randn(vocab, size, generator=g) / size**0.5).requires_grad_()
    bias = torch.zeros(vocab, requires_grad=True)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    for t in (hidden, weight, bias):  # gradients allocated up front: they count as outputs
        t.grad = torch.zeros_like(t)
    before = peak()
    out = ek.linear_policy_loss(hidden, weight, tokens, torch.randn(n, generator=g),
                                bias=bias, entropy_coef=0.01, backend="torch")
    out.loss.backward()
    assert torch.isfinite(weight.grad).all()
    return peak() - before
step(512, 128, 32000)  # warm-up: allocator pools, BLAS buffers, code paths
print(step(8192, 128, 32000))
"""
    growth = int(run_python(code).strip())
    assert growth < 256 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"
