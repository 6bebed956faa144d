"""Fuzzing the public functions: dtypes, shapes, strides and special values.

Each call must end in one of three ways: a ValueError for input the test itself classifies
as bad, or outputs equal to the float64 reference, with NaN exactly where the reference has
NaN (a NaN or +inf input feeds it) and infinities where it has them. Never another exception
and never a silent wrong number.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entropy_kernels as ek
from entropy_kernels import reference

BACKENDS = ["torch", "triton"]
TOKEN_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8]
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
VOCABS = [1, 2, 7, 300, 70_000]
SPECIALS = [math.nan, math.inf, -math.inf]
# Under the interpreter a huge vocabulary costs seconds per row.
HUGE_V_ROWS = {"torch": 4, "triton": 1}


def close(ours, want, rtol=1e-5, atol=1e-5):
    """Equal to the reference within the spec's tolerance, NaN and inf where it has them."""
    torch.testing.assert_close(ours.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)


@st.composite
def logits_cases(draw, backend):
    """(logits, tokens, bad): `bad` is "logits" for a layout or dtype that must raise."""
    vocab = draw(st.sampled_from(VOCABS))
    max_rows = HUGE_V_ROWS[backend] if vocab > 1000 else 12
    batch = draw(st.integers(0, 3))
    seq = draw(st.integers(0, max(0, min(4, max_rows // max(batch, 1)))))
    dtype = draw(st.sampled_from(LOGIT_DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1.0, 8.0]))
    layout = draw(st.sampled_from(["contiguous", "sliced", "transposed", "vocab-strided"]))
    # The layouts are views of a bigger tensor: rows one apart, a seq-major buffer, or every
    # second vocabulary entry (bad: the vocabulary must have unit stride).
    if layout == "sliced":
        base = torch.randn(batch, seq + 1, vocab, generator=generator) * scale
        logits = base.to(dtype)[:, 1:]
    elif layout == "transposed":
        base = torch.randn(seq, batch, vocab, generator=generator) * scale
        logits = base.to(dtype).transpose(0, 1)
    elif layout == "vocab-strided":
        base = torch.randn(batch, seq, 2 * vocab, generator=generator) * scale
        logits = base.to(dtype)[..., ::2]
    else:
        logits = (torch.randn(batch, seq, vocab, generator=generator) * scale).to(dtype)
    n_special = draw(st.integers(0, 3)) if logits.numel() else 0
    for _ in range(n_special):
        flat = draw(st.integers(0, logits.numel() - 1))
        index = torch.unravel_index(torch.tensor(flat), logits.shape)
        logits[tuple(int(i) for i in index)] = draw(st.sampled_from(SPECIALS))
    token_dtype = draw(st.sampled_from(TOKEN_DTYPES))
    high = min(vocab, torch.iinfo(token_dtype).max + 1)
    tokens = torch.randint(0, high, (batch, seq), generator=generator)
    kind = draw(st.sampled_from(["valid", "ignored", "out-of-range"]))
    if tokens.numel() and kind != "valid":
        value = -100 if kind == "ignored" else vocab
        if token_dtype.is_signed and kind == "ignored" or value <= torch.iinfo(token_dtype).max:
            tokens.view(-1)[draw(st.integers(0, tokens.numel() - 1))] = value
    tokens = tokens.to(token_dtype)
    bad = None
    if dtype == torch.float64 or (layout == "vocab-strided" and vocab > 1):
        bad = "logits"
    return logits, tokens, bad


def bad_tokens(logits, tokens, ignore_index=-100):
    wide = tokens.long()
    return bool((((wide < 0) | (wide >= logits.shape[-1])) & (wide != ignore_index)).any())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_scoring_fuzz(backend, data):
    logits, tokens, bad = data.draw(logits_cases(backend))
    options = dict(
        temperature=data.draw(st.sampled_from([1.0, 0.7])),
        ignore_index=data.draw(st.sampled_from([-100, 0, 2**40])),
    )
    bad = bad or ("tokens" if bad_tokens(logits, tokens, options["ignore_index"]) else None)
    if bad is not None:
        with pytest.raises(ValueError, match=bad):
            ek.logprobs_and_entropy(logits, tokens, backend=backend, **options)
        return
    logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend=backend, **options)
    want_logp, want_entropy = reference.logprobs_and_entropy(
        logits.double(), tokens.long(), **options
    )
    close(logp, want_logp)
    close(entropy, want_entropy)


def loss_case(data, backend):
    """A logits case for the losses (tokens -100 are ignored), and a seeded generator."""
    logits, tokens, bad = data.draw(logits_cases(backend))
    bad = bad or ("tokens" if bad_tokens(logits, tokens) else None)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    return logits, tokens, bad, generator


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_policy_loss_fuzz(backend, data):
    logits, tokens, bad, generator = loss_case(data, backend)
    batch, seq = tokens.shape
    advantages = torch.randn(batch, seq, generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > 0.3
    finite = logits.double().clamp(-1e30, 1e30)  # old log-probs from finite logits
    old = reference.logprobs_and_entropy(finite, tokens.long().clamp(0, logits.shape[-1] - 1))[0]
    old = (old.float() - 0.3 * torch.rand(batch, seq, generator=generator)).clamp_max(0.0)
    special = data.draw(st.sampled_from(["none", "nan-advantage", "nan-old", "negative-mask"]))
    if special == "nan-advantage" and advantages.numel():
        advantages.view(-1)[0] = math.nan
    elif special == "nan-old" and old.numel():
        old.view(-1)[-1] = math.nan
    elif special == "negative-mask" and mask.numel():
        mask = mask.float()
        mask.view(-1)[0] = -1.0
        bad = bad or "mask"
    options = dict(
        old_logprobs=old,
        dual_clip=data.draw(st.sampled_from([None, 3.0])),
        aggregation=data.draw(st.sampled_from(["token-mean", "seq-mean-token-mean"])),
    )
    x = logits.detach().requires_grad_()  # the same strides
    if bad is not None:
        with pytest.raises(ValueError, match=bad):
            ek.policy_loss(x, tokens, advantages, mask, backend=backend, **options)
        return
    out = ek.policy_loss(x, tokens, advantages, mask, backend=backend, **options)
    x64 = logits.double().requires_grad_()
    want = reference.policy_loss(x64, tokens.long(), advantages, mask, **options)
    close(out.loss, want.loss)
    close(out.logprobs, want.logprobs)
    for name, value in want.metrics.items():
        close(torch.as_tensor(out.metrics[name]), value)
    out.loss.backward()
    assert x.grad.shape == x.shape
    if bool(torch.isfinite(logits).all()) and bool(torch.isfinite(want.loss)):
        want.loss.backward()
        tol = 1e-4 if logits.dtype == torch.float32 else 2**-7
        close(x.grad.float(), x64.grad.to(logits.dtype).float(), rtol=tol, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_shaped_losses_fuzz(backend, data):
    logits, tokens, bad, generator = loss_case(data, backend)
    batch, seq = tokens.shape
    rewards = (torch.rand(batch, generator=generator) > 0.5).float()
    mask = torch.rand(batch, seq, generator=generator) > 0.3
    old_entropy = None
    if data.draw(st.booleans()):
        old_entropy = torch.rand(batch, seq, generator=generator) * 2
        if old_entropy.numel() and data.draw(st.booleans()):
            old_entropy.view(-1)[0] = data.draw(st.sampled_from(SPECIALS))
            bad = bad or (
                "old_entropy" if old_entropy.view(-1)[0] < 0 and mask.view(-1)[0] else None
            )
    name = data.draw(st.sampled_from(["gtpo_loss", "grpo_s_loss"]))
    groups = data.draw(st.sampled_from([1, max(batch, 1)]))
    x = logits.detach().requires_grad_()
    args = (tokens, rewards, mask, groups)
    if bad is not None:
        with pytest.raises(ValueError, match=bad):
            getattr(ek, name)(x, *args, old_entropy=old_entropy, backend=backend)
        return
    out = getattr(ek, name)(x, *args, old_entropy=old_entropy, backend=backend)
    want = getattr(reference, name)(
        logits.double(), tokens.long(), rewards, mask, groups, old_entropy=old_entropy
    )
    close(out.loss, want.loss)
    for key, value in want.metrics.items():
        close(torch.as_tensor(out.metrics[key]), torch.as_tensor(value))
    out.loss.backward()
    assert x.grad.shape == x.shape


@st.composite
def shaping_cases(draw):
    group = draw(st.integers(1, 3))
    batch = group * draw(st.integers(0, 3))
    seq = draw(st.integers(0, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rewards = (torch.rand(batch, generator=generator) > 0.5).to(
        draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    )
    entropy = torch.rand(batch, seq, generator=generator) * 3
    mask = torch.rand(batch, seq, generator=generator) > 0.3
    for target in draw(st.lists(st.sampled_from(["rewards", "entropy"]), max_size=2)):
        tensor = rewards if target == "rewards" else entropy
        if tensor.numel():
            tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = draw(
                st.sampled_from(SPECIALS)
            )
    if draw(st.booleans()) and seq > 0:
        entropy = entropy.t().contiguous().t()  # column-major strides
    return rewards, entropy, mask, group


@settings(max_examples=15, deadline=None)
@given(case=shaping_cases(), backend=st.sampled_from(BACKENDS))
def test_advantages_fuzz(case, backend):
    rewards, entropy, mask, group = case
    for name in ("gtpo_advantages", "grpo_s_advantages"):
        ours = getattr(ek, name)(rewards, entropy, mask, group, backend=backend)
        want = getattr(reference, name)(rewards, entropy, mask, group)
        close(ours, want)
    close(
        ek.grpo_advantages(rewards, group, backend=backend),
        reference.grpo_advantages(rewards, group),
    )
