"""The fused linear kernels on a CUDA device (skipped without one): the tensor-core paths the
interpreter cannot run (bfloat16 ``tl.dot``, the bfloat16 split and TF32x3 gradient matmuls,
16-byte vector loads, vocabulary splits over many SMs), against the float64 reference."""

import pytest
import torch
from test_linear import VALUE_TOL, assert_grads, leaves, make_head
from test_linear_rounding import failures

import entropy_kernels as ek
from entropy_kernels import kernel_config, reference

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def _head(dtype, batch, seq, size, vocab, seed=0):
    return [None if t is None else t.cuda() for t in make_head(batch, seq, size, vocab, seed=seed)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 97, 200, 5003), (16, 64, 1024, 32011)])
def test_linear_policy_loss_against_float64(dtype, shape, backend):
    check_policy_loss(dtype, shape, backend)


@pytest.mark.parametrize(
    "forward, backward",
    [("tiles", "tiles"), ("tiles", "blas-triton-fold"), ("blas-triton-fold", "blas"),
     ("blas-triton-fold", "blas-triton-fold"), ("tiles", "blas"), ("blas-triton-fold", "tiles")],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_gpu_route_against_float64(monkeypatch, forward, backward, dtype):
    """Each pair of GPU routes (kernel_config.LINEAR_GPU_FORWARD / LINEAR_GPU_BACKWARD), at a
    vocabulary spanning several cuBLAS tiles."""
    monkeypatch.setattr(kernel_config, "LINEAR_GPU_FORWARD", forward)
    monkeypatch.setattr(kernel_config, "LINEAR_GPU_BACKWARD", backward)
    check_policy_loss(dtype, (3, 97, 200, 40009), "triton")


@pytest.mark.parametrize("forward", ["tiles", "blas-triton-fold"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounded_dlogits_route_within_its_bound(monkeypatch, forward, dtype):
    """The opt-in route with ``dlogits`` rounded to bfloat16 (outside the spec's tolerance),
    within its own rounding bound, at a vocabulary spanning several cuBLAS tiles."""
    from test_linear_routes import assert_rounded_gradients

    monkeypatch.setattr(kernel_config, "LINEAR_GPU_FORWARD", forward)
    monkeypatch.setattr(kernel_config, "LINEAR_GPU_BACKWARD", "blas-bf16-dlogits")
    hidden, weight, bias, tokens = (t.to(dtype) if t.is_floating_point() else t
                                    for t in _head(dtype, 3, 97, 200, 40009))  # fmt: skip
    tokens[1, 2] = -100
    assert_rounded_gradients(hidden, weight, bias, tokens, "triton")


def check_policy_loss(dtype, shape, backend):
    hidden, weight, bias, tokens = _head(dtype, *shape)
    generator = torch.Generator(device="cuda").manual_seed(1)
    advantages = torch.randn(tokens.shape, device="cuda", generator=generator)
    options = dict(temperature=0.7, entropy_coef=0.01, backend=backend)
    mask = torch.ones(tokens.shape, device="cuda")
    mask[:, -3:] = 0.0
    with torch.no_grad():
        old = ek.linear_logprobs_and_entropy(
            hidden.to(dtype), weight.to(dtype), tokens, bias=bias.to(dtype), temperature=0.7
        )[0]
    old = old + 0.05 * torch.randn(old.shape, device="cuda", generator=generator)
    old = old.clamp_max(0.0)
    ours = leaves((hidden, weight, bias), dtype)
    out = ek.linear_policy_loss(
        ours[0], ours[1], tokens, advantages, mask, old_logprobs=old, bias=ours[2], **options
    )
    out.loss.backward()
    refs = leaves((hidden, weight, bias), dtype)
    del options["backend"]
    want = reference.linear_policy_loss(
        refs[0], refs[1], tokens, advantages, mask, old_logprobs=old, bias=refs[2], **options
    )
    want.loss.backward()
    torch.testing.assert_close(out.loss.double(), want.loss.double(), **VALUE_TOL)
    torch.testing.assert_close(out.logprobs.double(), want.logprobs.double(), **VALUE_TOL)
    torch.testing.assert_close(out.entropy.double(), want.entropy.double(), **VALUE_TOL)
    assert_grads(ours, refs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_gradients_are_deterministic(backend):
    hidden, weight, bias, tokens = _head(torch.bfloat16, 8, 257, 512, 40003)
    runs = []
    for _ in range(2):
        leaf = leaves((hidden, weight, bias), torch.bfloat16)
        logprobs, entropy = ek.linear_logprobs_and_entropy(
            leaf[0], leaf[1], tokens, bias=leaf[2], backend=backend
        )
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
        runs.append([t.grad for t in leaf])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backward", ["blas-triton-fold", "tiles", "blas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7, 5, 37), (64, 96, 3001)], ids=str)
def test_rounded_gradients_meet_the_spec_on_the_gpu(monkeypatch, backward, dtype, shape):
    """The spec's own comparison of half-precision gradients (see test_linear_rounding) on each
    GPU backward, whose tensor-core matmuls take ``dlogits`` in three bf16 parts."""
    monkeypatch.setattr(kernel_config, "LINEAR_GPU_BACKWARD", backward)
    assert not failures(dtype, "triton", "cuda", shape)
