"""Fused linear path: both backends against the float64 reference on materialised logits.

Values at rtol 2e-5 / atol 2e-5, gradients of hidden, weight and bias at 2e-4 relative by norm
(half-precision gradients against the same rounding of the reference), as api.md states.
"""

import pytest
import torch

import entropy_kernels as ek
from entropy_kernels import reference
from entropy_kernels.backends import torch_linear, torch_scoring

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VALUE_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_RTOL = 2e-4
# Per element, a few float32 roundings of O(1) terms: a gradient that cancels to ~1e-6 (one
# token, V = 2) cannot hold 2e-4 of itself in float32 (found by hypothesis in CI); the scoring
# tests' gradient tolerance has an absolute floor for the same reason.
GRAD_ATOL = 16 * torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # Test shapes then span several torch-backend tiles of rows and of vocabulary, and the
    # element-wise passes several row groups of a tile (3 rows of a 64-wide tile).
    monkeypatch.setattr(torch_linear, "TILE_ROWS", 8)
    monkeypatch.setattr(torch_linear, "TILE_VOCAB", 64)
    monkeypatch.setattr(torch_scoring, "GROUP_BYTES", 3 * 64 * 4)


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
        if ref is None or not ref.requires_grad:  # no such input, or no gradient wanted for it
            assert mine is None or mine.grad is None, name
            continue
        assert mine.grad.dtype == mine.dtype, name
        assert mine.grad.shape == mine.shape, name
        expected = ref.grad.double()
        error = (mine.grad.double() - expected).abs()
        if mine.dtype != torch.float32:
            # The gradient is rounded once to the half dtype: up to half a unit in the last
            # place of each element is that rounding (so a float32 gradient next to a rounding
            # boundary may land one unit away from the rounded reference); only the error
            # beyond it is the computation's, held to the spec's tolerance.
            exponent = torch.frexp(mine.grad.float())[1].double()
            half_ulp = 0.5 * torch.finfo(mine.dtype).eps * torch.exp2(exponent - 1)
            error = (error - half_ulp).clamp_min(0.0)
        error = error.norm()
        bound = GRAD_RTOL * expected.norm() + GRAD_ATOL * expected.numel() ** 0.5
        assert error <= bound, f"{name}: {error} vs {expected.norm()}"


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
    # The reference differentiates float64 copies of the same (rounded) inputs: its gradient is
    # the unrounded float64 one that assert_grads holds ours to.
    ours_leaves = leaves((hidden, weight, bias))
    ref_leaves = leaves((hidden, weight, bias), torch.float64)
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
    ours, refs = (
        leaves((hidden, weight, head_bias)),
        leaves((hidden, weight, head_bias), torch.float64),
    )
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
    refs = leaves((hidden, weight, bias), torch.float64)
    ref = reference.linear_policy_loss(
        *refs[:2], tokens, advantages, bias=refs[2], entropy_coef=0.1
    )
    ref.loss.backward()
    assert_output(out, ref)
    assert_grads(mine, refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_infinity_in_the_weight_masks_like_the_bias(backend):
    """A -inf weight entry times positive hidden values, or +inf times negative ones, gives -inf
    logits: masked vocabulary entries, as the logits functions read them (reviews found the
    torch fold returning NaN entropy here, checking only the bias, then only for -inf)."""
    hidden, weight, _, tokens = make_head(2, 4, 16, 50)
    hidden = hidden.abs() + 0.1
    hidden[..., 5] = -hidden[..., 5]
    weight[7, 0] = weight[20, 3] = float("-inf")
    weight[33, 5] = float("inf")
    tokens = torch.where((tokens == 7) | (tokens == 20) | (tokens == 33), tokens + 1, tokens)
    advantages = torch.randn(2)
    out = ek.linear_policy_loss(hidden, weight, tokens, advantages, entropy_coef=0.1,
                                backend=backend)  # fmt: skip
    ref = reference.linear_policy_loss(
        hidden.double(), weight.double(), tokens, advantages, entropy_coef=0.1
    )
    assert torch.isfinite(ref.entropy).all()
    assert_output(out, ref)
    with torch.no_grad():
        logp, entropy = ek.linear_logprobs_and_entropy(hidden, weight, tokens, backend=backend)
    torch.testing.assert_close(entropy.double(), ref.entropy, **VALUE_TOL)
    torch.testing.assert_close(logp.double(), ref.logprobs, **VALUE_TOL)


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
    negative = tokens.clone()
    negative[1, 2] = -5  # negative and not the ignore index
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
        ("tokens", lambda: scoring(hidden, weight, negative)),
        ("tokens", lambda: scoring(hidden, weight, out_of_range, backend="triton")),
        ("tokens", lambda: policy(hidden, weight, negative, adv, backend="torch")),
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


def test_memory_bounded_by_a_tile_and_no_kernel_loaded():
    # N = 8192, H = 128, V = 32000 float32: one logits tensor would take 1 GB. The peak RSS of
    # forward + backward of the loss must grow by well under a quarter of that above inputs and
    # gradients (VmHWM, reset before the step). The torch backend never loads Triton kernels.
    code = """
import sys, torch, entropy_kernels as ek
from entropy_kernels.objectives import Objective
torch.set_num_threads(2)
def peak():
    # Peak RSS since the last reset (Linux): VmHWM, reset through clear_refs.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) * 1024
def step(n, size, vocab, objective=None):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, size, generator=g).requires_grad_()
    weight = (torch.randn(vocab, size, generator=g) / size**0.5).requires_grad_()
    bias = torch.zeros(vocab, requires_grad=True)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    advantages = torch.randn(n, generator=g)
    for t in (hidden, weight, bias):  # gradients allocated up front: they count as outputs
        t.grad = torch.zeros_like(t)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = peak()
    out = ek.linear_policy_loss(hidden, weight, tokens, advantages, bias=bias, entropy_coef=0.01,
                                objective=objective, backend="torch")
    out.loss.backward()
    assert torch.isfinite(weight.grad).all()
    return peak() - before
# Both routes: the gradient formed in the forward (token-local loss) and the recomputing
# backward (a sequence-level ratio needs every token's log-prob first).
sequence = Objective("clip", ratio_level="sequence")
for objective in (None, sequence):
    step(64, 128, 32000, objective)  # warm-up: code paths, BLAS buffers
    print(step(8192, 128, 32000, objective))
print(sorted(name for name in sys.modules if name.startswith("entropy_kernels.kernels.linear")))
"""
    *growths, loaded = run_python(code).strip().splitlines()
    assert loaded == "[]"
    for route, growth in zip(("fused", "recomputing"), map(int, growths), strict=True):
        # An eighth of one logits tensor (1000 MiB): well under the quarter.
        assert growth < 125 * 2**20, f"{route}: peak RSS grew by {growth / 2**20:.0f} MiB"


def test_triton_gradients_are_deterministic():
    hidden, weight, bias, tokens = make_head(2, 9, 20, 75, seed=6)
    results = []
    for _ in range(2):
        mine = leaves((hidden, weight, bias))
        logp, entropy = ek.linear_logprobs_and_entropy(
            *mine[:2], tokens, bias=mine[2], backend="triton"
        )
        (logp.sum() + entropy.sum()).backward()
        results.append([t.grad for t in mine])
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_bias(backend):
    """A bias view with a stride (a column of a matrix) or stride 0 (expanded) is read as its
    values, not as memory from its first element on (found by review: the kernels read
    ``bias_ptr + v``)."""
    hidden, weight, _, tokens = make_head(2, 5, 24, 40)
    for bias in (torch.randn(40, 3)[:, 1], torch.randn(1).expand(40)):
        ours = leaves((hidden, weight, bias))
        logprobs, entropy = ek.linear_logprobs_and_entropy(
            ours[0], ours[1], tokens, bias=ours[2], backend=backend
        )
        (logprobs.sum() + entropy.sum()).backward()
        refs = leaves((hidden, weight, bias), torch.float64)
        want = reference.linear_logprobs_and_entropy(refs[0], refs[1], tokens, bias=refs[2])
        (want[0].sum() + want[1].sum()).backward()
        torch.testing.assert_close(logprobs.double(), want[0], **VALUE_TOL)
        torch.testing.assert_close(entropy.double(), want[1], **VALUE_TOL)
        assert_grads(ours, refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    """A non-default ignore index inside the vocabulary's range of ids: its rows score 0 and
    get no gradient; -100 is then an invalid token."""
    hidden, weight, bias, tokens = make_head(2, 4, 16, 50, seed=8)
    tokens[tokens == 7] = 8
    tokens[0, 1] = tokens[1, 3] = 7
    ours = leaves((hidden, weight, bias))
    logp, entropy = ek.linear_logprobs_and_entropy(
        *ours[:2], tokens, bias=ours[2], ignore_index=7, backend=backend
    )
    assert logp[0, 1] == entropy[0, 1] == logp[1, 3] == entropy[1, 3] == 0
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(ours[0].grad[0, 1], torch.zeros(16))
    refs = leaves((hidden, weight, bias), torch.float64)
    keep = tokens != 7
    ref_logp, ref_entropy = reference.linear_logprobs_and_entropy(
        *refs[:2], tokens.masked_fill(~keep, 0), bias=refs[2]
    )
    torch.testing.assert_close(logp[keep].double(), ref_logp[keep], **VALUE_TOL)
    torch.testing.assert_close(entropy[keep].double(), ref_entropy[keep], **VALUE_TOL)
    ((ref_logp + ref_entropy) * keep).sum().backward()
    assert_grads(ours, refs)
    with pytest.raises(ValueError, match="tokens"):
        ek.linear_logprobs_and_entropy(
            hidden, weight, tokens.masked_fill(~keep, -100), ignore_index=7, backend=backend
        )
