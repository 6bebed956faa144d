"""logprobs_and_entropy: kernel and torch backend against the float64 reference.

The Triton backend runs on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py), with
256-wide vocabulary blocks, so vocabularies around 256 cross block edges.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import entropy_kernels as ek
from entropy_kernels import reference
from entropy_kernels.ops.scoring import ScoringOptions, score

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1: degenerate vocabulary; 7: far below one block; 255/256/257: around the interpreter's block
# width; 600: three blocks, the last partial.
VOCABS = [1, 7, 255, 256, 257, 600]

VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
# One unit in the last place of the gradient dtype: the kernel rounds its float32 gradient once.
ROUNDED_GRAD_TOL = {
    torch.float32: GRAD_TOL,
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}


def random_logits(shape, dtype, *, spread=3.0, neg_inf_fraction=0.0, generator=None):
    logits = torch.randn(shape, generator=generator) * spread
    if neg_inf_fraction:
        hole = torch.rand(shape, generator=generator) < neg_inf_fraction
        logits = logits.masked_fill(hole, float("-inf"))
    return logits.to(dtype)


def truth(logits, tokens, grad_logprobs, grad_entropy, **kwargs):
    """Float64 reference values and gradient, on exactly the (rounded) input values."""
    logits64 = logits.detach().double().requires_grad_()
    logp, entropy = reference.logprobs_and_entropy(logits64, tokens, **kwargs)
    (logp * grad_logprobs.double() + entropy * grad_entropy.double()).sum().backward()
    return logp, entropy, logits64.grad


def check_against_truth(logits, tokens, *, backend, strided=False, same_dtype=True, **kwargs):
    base = logits.clone().requires_grad_()
    view = base[:, :-1] if strided else base
    token_view = tokens[:, 1:] if strided else tokens
    logp, entropy = ek.logprobs_and_entropy(view, token_view, backend=backend, **kwargs)
    assert logp.dtype == entropy.dtype == torch.float32
    assert logp.shape == entropy.shape == token_view.shape

    grad_logp, grad_entropy = torch.randn_like(logp), torch.randn_like(entropy)
    (logp * grad_logp + entropy * grad_entropy).sum().backward()
    grad = base.grad[:, :-1] if strided else base.grad
    want_logp, want_entropy, want_grad = truth(view, token_view, grad_logp, grad_entropy, **kwargs)

    torch.testing.assert_close(logp.double(), want_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), want_entropy, **VALUE_TOL)
    # The same-dtype reference (float32 arithmetic, materialised softmax) meets the same bar.
    if same_dtype:
        same_logp, same_entropy = reference.logprobs_and_entropy(
            view.detach(), token_view, **kwargs
        )
        assert same_logp.dtype == torch.float32
        torch.testing.assert_close(logp, same_logp, **VALUE_TOL)
        torch.testing.assert_close(entropy, same_entropy, **VALUE_TOL)
    assert grad.dtype == logits.dtype
    torch.testing.assert_close(
        grad.float(), want_grad.to(logits.dtype).float(), **ROUNDED_GRAD_TOL[logits.dtype]
    )
    if strided:
        assert torch.all(base.grad[:, -1] == 0), "the row outside the view got a gradient"
    return logp, entropy, grad


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    vocab=st.sampled_from(VOCABS),
    dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([1.0, 0.7, 1.9]),
    strided=st.booleans(),
    ignore_fraction=st.sampled_from([0.0, 0.3]),
    neg_inf_fraction=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(
    backend, batch, seq, vocab, dtype, temperature, strided, ignore_fraction, neg_inf_fraction, seed
):
    generator = torch.Generator().manual_seed(seed)
    width = seq + 1 if strided else seq
    logits = random_logits(
        (batch, width, vocab), dtype, neg_inf_fraction=neg_inf_fraction, generator=generator
    )
    tokens = torch.randint(0, vocab, (batch, width), generator=generator)
    # The sampled token itself is never a masked vocabulary entry (a real sampler cannot pick it).
    view, token_view = (logits[:, :-1], tokens[:, 1:]) if strided else (logits, tokens)
    token_logit = view.gather(-1, token_view.unsqueeze(-1))
    view.scatter_(-1, token_view.unsqueeze(-1), token_logit.nan_to_num(neginf=0.0))
    ignored = torch.rand((batch, width), generator=generator) < ignore_fraction
    tokens = tokens.masked_fill(ignored, -100)

    logp, entropy, grad = check_against_truth(
        logits, tokens, backend=backend, strided=strided, temperature=temperature
    )

    token_view = tokens[:, 1:] if strided else tokens
    active = token_view != -100
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.all(logp[active] <= 1e-6)
    view = logits[:, :-1] if strided else logits
    finite_vocab = view.isfinite().sum(-1)
    assert torch.all(entropy >= -1e-6)
    assert torch.all(entropy <= torch.log(finite_vocab.double()).float() + 1e-5)
    # Ignored rows: exactly zero outputs and gradient.
    assert torch.all(logp[~active] == 0) and torch.all(entropy[~active] == 0)
    assert torch.all(grad[~active] == 0)
    # Masked vocabulary entries get no gradient.
    assert torch.all(grad[view == float("-inf")] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_each_output_alone(backend):
    """Each output's gradient on its own (the other output's grad is None in autograd)."""
    generator = torch.Generator().manual_seed(1)
    logits = random_logits((2, 3, 300), torch.float32, generator=generator)
    tokens = torch.randint(0, 300, (2, 3), generator=generator)
    for pick in (0, 1):
        x = logits.clone().requires_grad_()
        out = ek.logprobs_and_entropy(x, tokens, backend=backend)[pick]
        out.sum().backward()
        grads = [torch.zeros(2, 3), torch.zeros(2, 3)]
        grads[pick] = torch.ones(2, 3)
        _, _, want = truth(logits, tokens, *grads)
        torch.testing.assert_close(x.grad.double(), want, **GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_flat_and_4d_inputs(backend):
    """[N, V] and [A, B, C, V] layouts, including a 4-D view whose leading dims do not collapse."""
    generator = torch.Generator().manual_seed(2)
    flat = random_logits((7, 260), torch.float32, generator=generator)
    tokens = torch.randint(0, 260, (7,), generator=generator)
    check_against_truth(flat, tokens, backend=backend)

    big = random_logits((2, 3, 4, 50), torch.float32, generator=generator)
    view = big[:, ::2, 1:]  # strides no two-level split covers: the kernel gets a copy
    tokens = torch.randint(0, 50, view.shape[:-1], generator=generator)
    logp, entropy = ek.logprobs_and_entropy(view, tokens, backend=backend)
    want_logp, want_entropy = reference.logprobs_and_entropy(view.double(), tokens)
    torch.testing.assert_close(logp.double(), want_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), want_entropy, **VALUE_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_view_is_not_copied(backend, monkeypatch):
    """logits[:, :-1] reaches the backend as the caller's storage, not a copy."""
    from entropy_kernels.ops import scoring

    seen = []
    original = scoring.row_layouts

    def spy(logits, tokens):
        result = original(logits, tokens)
        seen.append(result[0].data_ptr())
        return result

    monkeypatch.setattr(scoring, "row_layouts", spy)
    logits = torch.randn(2, 5, 40)
    tokens = torch.randint(0, 40, (2, 5))
    ek.logprobs_and_entropy(logits[:, :-1], tokens[:, 1:], backend=backend)
    assert seen == [logits.data_ptr()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = torch.randn(0, 4, 33, requires_grad=True)
    tokens = torch.zeros(0, 4, dtype=torch.long)
    logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend=backend)
    assert logp.shape == entropy.shape == (0, 4)
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    logits = torch.randn(2, 3, 70, requires_grad=True)
    tokens = torch.full((2, 3), -100)
    logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend=backend)
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    (logp.sum() + entropy.sum()).backward()
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_with_non_finite_logits_get_zero_gradient(backend):
    # Padding rows may hold anything: their outputs and gradient are exactly 0 all the same,
    # and the other rows are untouched (their gradient is finite).
    logits = torch.randn(2, 3, 70)
    tokens = torch.randint(0, 70, (2, 3))
    tokens[0, 1] = tokens[1, 2] = -100
    logits[0, 1, 5], logits[0, 1, 6], logits[1, 2] = float("nan"), float("inf"), 1e4
    logits.requires_grad_()
    logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    ignored = tokens == -100
    assert torch.all(logp[ignored] == 0) and torch.all(entropy[ignored] == 0)
    assert torch.all(logits.grad[ignored] == 0)
    assert torch.isfinite(logits.grad[~ignored]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_finite_logit_has_zero_entropy(backend):
    logits = torch.full((1, 1, 300), float("-inf"))
    logits[0, 0, 123] = 4.0
    logp, entropy = ek.logprobs_and_entropy(logits, torch.tensor([[123]]), backend=backend)
    assert logp.item() == 0.0 and entropy.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_logits_have_entropy_log_v(backend):
    vocab = 513
    logits = torch.full((2, vocab), 0.25)
    logp, entropy = ek.logprobs_and_entropy(logits, torch.tensor([0, 512]), backend=backend)
    torch.testing.assert_close(entropy, torch.full((2,), math.log(vocab)), **VALUE_TOL)
    torch.testing.assert_close(logp, torch.full((2,), -math.log(vocab)), **VALUE_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_logits_do_not_lose_precision(backend, temperature):
    """Logits around 1e4 with O(1) spread: differences to the row max are taken before the
    temperature scaling, so nothing cancels (scaling first would lose ~1e-4)."""
    generator = torch.Generator().manual_seed(3)
    logits = 1e4 + torch.randn(3, 300, generator=generator)
    tokens = torch.randint(0, 300, (3,), generator=generator)
    # The float32 reference scales before subtracting and misses by ~4e-4 here: only float64.
    check_against_truth(logits, tokens, backend=backend, temperature=temperature, same_dtype=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_tokens(backend, dtype):
    logits = torch.randn(2, 3, 200)
    tokens = torch.randint(0, 200, (2, 3))
    want = ek.logprobs_and_entropy(logits, tokens, backend=backend)
    got = ek.logprobs_and_entropy(logits, tokens.to(dtype), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend):
    logits = torch.randn(4, 300)
    logits[0, 17] = float("nan")
    logits[1, 250] = float("inf")
    logits[2] = float("-inf")  # no distribution at all
    logp, entropy = ek.logprobs_and_entropy(logits, torch.tensor([3, 3, 3, 3]), backend=backend)
    assert torch.isnan(logp[:3]).all() and torch.isnan(entropy[:3]).all()
    assert torch.isfinite(logp[3]) and torch.isfinite(entropy[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_give_nan_gradient(backend):
    logits = torch.randn(2, 300)
    logits[0, 5] = float("nan")
    logits.requires_grad_()
    logp, entropy = ek.logprobs_and_entropy(logits, torch.tensor([1, 1]), backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert torch.isnan(logits.grad[0]).any()
    assert torch.isfinite(logits.grad[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_token_without_validation_is_nan(backend):
    logits = torch.randn(3, 40)
    tokens = torch.tensor([5, 40, -7])
    logp, entropy = ek.logprobs_and_entropy(logits, tokens, validate=False, backend=backend)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()
    assert torch.isfinite(entropy).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_matches_and_overwrites(backend, dtype):
    generator = torch.Generator().manual_seed(4)
    logits = random_logits((2, 4, 270), dtype, generator=generator)
    tokens = torch.randint(0, 270, (2, 4), generator=generator)
    grad_logp = torch.randn(2, 4, generator=generator)

    fresh = logits.clone().requires_grad_()
    logp, entropy = ek.logprobs_and_entropy(fresh, tokens, backend=backend)
    (logp * grad_logp + entropy).sum().backward()

    leaf = logits.clone().requires_grad_()
    hidden = leaf * 1  # a non-leaf, like the output of an lm_head, whose storage is reused
    logp2, entropy2 = score(hidden, tokens, ScoringOptions(1.0, -100, backend, True))
    (logp2 * grad_logp + entropy2).sum().backward()
    assert torch.equal(leaf.grad, fresh.grad)
    assert torch.equal(hidden.detach(), fresh.grad), "gradient was not written in place"


def test_bad_inputs_raise_value_error():
    logits = torch.randn(2, 3, 10)
    tokens = torch.randint(0, 10, (2, 3))
    cases = {
        "tokens": [
            (logits, tokens.float()),
            (logits, tokens.bool()),
            (logits, tokens[:, :2]),
            (logits, torch.tensor([[0, 1, 10], [0, 0, 0]])),
            (logits, torch.tensor([[0, 1, -1], [0, 0, 0]])),
        ],
        "logits": [
            (logits.double(), tokens),
            (logits.transpose(1, 2).contiguous().transpose(1, 2), tokens),
            (torch.randn(2, 3, 0), tokens),
        ],
    }
    for name, pairs in cases.items():
        for bad_logits, bad_tokens in pairs:
            with pytest.raises(ValueError, match=name):
                ek.logprobs_and_entropy(bad_logits, bad_tokens)
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            ek.logprobs_and_entropy(logits, tokens, temperature=temperature)
    with pytest.raises(ValueError, match="backend"):
        ek.logprobs_and_entropy(logits, tokens, backend="cuda")
