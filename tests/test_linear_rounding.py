"""Half-precision gradients under the spec's own comparison (api.md, "Numerical tolerances"):
the float64 reference gradient rounded to the input dtype, ours within 2e-4 of it by norm.

``test_linear.assert_grads`` allows each element its half unit of rounding; this holds the
rounded gradients themselves to the spec. On gradients of a few dozen elements one element a
unit off the rounded reference is already 4e-4 by norm, so the float32 gradient must sit far
closer to the truth than 2e-4: ``dlogits`` in two bfloat16 parts (2^-16) missed it on 3 of
these 40 seeds, three parts (``split_matmuls.DLOGITS_PARTS``) on none. Fixed seeds, so that
the test is exactly repeatable: float32 products themselves land a unit off now and then (1 of
1,200 random gradients here).
"""

from functools import partial

import pytest
import torch

import entropy_kernels as ek
from entropy_kernels import linear_scoring, reference
from entropy_kernels.backends import torch_linear

SEEDS = range(40)
ROWS, SIZE, VOCAB = 7, 5, 37
GRAD_RTOL = 2e-4


def rounded_errors(dtype, seed: int, backend: str, device="cpu", shape=(ROWS, SIZE, VOCAB)):
    """Norm-relative error of each gradient against the rounded float64 reference."""
    rows, size, vocab = shape
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(dims, generator=generator).to(dtype).to(device)
        for dims in ((rows, size), (vocab, size), (vocab,))
    ]
    tokens = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    tokens[rows // 2] = -100
    weights = torch.randn(2, rows, generator=generator).to(device)
    ours = [t.clone().requires_grad_() for t in tensors]
    refs = [t.double().requires_grad_() for t in tensors]
    options = dict(temperature=0.7)
    logp, entropy = ek.linear_logprobs_and_entropy(
        *ours[:2], tokens, bias=ours[2], backend=backend, **options
    )
    ((logp * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
    ref_logp, ref_entropy = reference.linear_logprobs_and_entropy(
        *refs[:2], tokens, bias=refs[2], **options
    )
    weights = weights.double()
    ((ref_logp * weights[0]).sum() + (ref_entropy * weights[1]).sum()).backward()
    errors = {}
    for name, mine, ref in zip(("hidden", "weight", "bias"), ours, refs, strict=True):
        rounded = ref.grad.to(dtype).double()
        errors[name] = float((mine.grad.double() - rounded).norm() / rounded.norm())
    return errors


def failures(dtype, backend, device="cpu", shape=(ROWS, SIZE, VOCAB)) -> list:
    """``(seed, gradient, error)`` of every gradient over :data:`SEEDS` beyond 2e-4."""
    return [
        (seed, name, f"{error:.2e}")
        for seed in SEEDS
        for name, error in rounded_errors(dtype, seed, backend, device, shape).items()
        if not error <= GRAD_RTOL
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("route", ["triton", "torch", "split-fold"])
def test_rounded_gradients_meet_the_spec_on_fixed_seeds(monkeypatch, route, dtype):
    """``triton``: the tl.dot kernels (interpreter); ``torch``: the CPU backend (float32
    products); ``split-fold``: the GPU's cuBLAS route, the rows kept in their half dtype and
    ``dlogits`` written as bfloat16 parts by the Triton fold."""
    backend = "torch" if route == "torch" else "triton"
    if route == "split-fold":
        backend = "torch"
        monkeypatch.setattr(torch_linear, "matmul_rows", lambda block: block)
        monkeypatch.setattr(
            linear_scoring,
            "torch_linear_backward",
            partial(torch_linear.torch_linear_backward, fold="triton"),
        )
    assert not failures(dtype, backend)
