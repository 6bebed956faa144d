"""torch.compile: the ops are custom ops, so the loss compiles as one graph (no graph break),
with AOT autograd alone (`aot_eager`) and with Inductor generating code around the ops. And
Triton's compiler on the advantage-shaping kernels, which the interpreter alone cannot check."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import entropy_kernels as ek

BACKENDS = ["torch", "triton"]
COMPILERS = ["aot_eager", "inductor"]


@functools.cache
def _inductor_cpu_unavailable() -> str | None:
    """Why Inductor cannot generate CPU code on this machine, or None when it can.

    Its CPU backend compiles C++: without a working compiler every Inductor test would fail for
    a reason that is not the library's. Only that is a skip; a failure to compile the library's
    own graphs fails the tests.
    """
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
    except Exception as exc:  # torch raises its own error types for a missing compiler
        return f"Inductor's CPU backend found no C++ compiler: {type(exc).__name__}: {exc}"
    try:
        probe = torch.compile(lambda x: x * 2.0 + 1.0, backend="inductor", fullgraph=True)
        probe(torch.ones(3))
    except Exception as exc:
        return f"Inductor's CPU backend cannot build with {compiler}: {type(exc).__name__}: {exc}"
    return None


def _compile(fn, compiler, **options):
    if compiler == "inductor":
        reason = _inductor_cpu_unavailable()
        if reason is not None:
            pytest.skip(reason)
    return torch.compile(fn, fullgraph=True, backend=compiler, **options)


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_compiles_without_graph_breaks(backend, compiler):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 64, generator=generator)
    tokens = torch.randint(0, 64, (2, 5), generator=generator)
    advantages = torch.randn(2, generator=generator)
    old = torch.randn(2, 5, generator=generator) - 4.0

    def loss_fn(logits, tokens, advantages, old):
        out = ek.policy_loss(
            logits, tokens, advantages, old_logprobs=old, entropy_coef=0.01, backend=backend
        )
        return out.loss

    explanation = torch._dynamo.explain(loss_fn)(logits, tokens, advantages, old)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    compiled = _compile(loss_fn, compiler)
    x = logits.clone().requires_grad_()
    loss = compiled(x, tokens, advantages, old)
    loss.backward()
    y = logits.clone().requires_grad_()
    want = loss_fn(y, tokens, advantages, old)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scoring_compiles_and_differentiates(backend, compiler):
    torch._dynamo.reset()
    logits = torch.randn(3, 40, requires_grad=True)
    tokens = torch.randint(0, 40, (3,))

    def score(logits, tokens):
        logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend=backend)
        return (logp + 0.5 * entropy).sum()

    compiled = _compile(score, compiler)
    compiled(logits, tokens).backward()
    grad = logits.grad.clone()
    logits.grad = None
    score(logits, tokens).backward()
    torch.testing.assert_close(grad, logits.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_dynamic_shapes_and_inplace_backward_compile(backend, inplace):
    """dynamic=True traces floats and sizes symbolically: the option checks (temperature) and
    the in-place overlap check must not break the graph. Two sequence lengths, one graph."""
    torch._dynamo.reset()
    head = torch.nn.Linear(8, 50)

    def step(hidden, tokens, advantages):
        logits = head(hidden)  # an op's output, as inplace_backward requires
        out = ek.policy_loss(
            logits,
            tokens,
            advantages,
            temperature=0.9,
            inplace_backward=inplace,
            backend=backend,
        )
        return out.loss

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(1)
    for seq_len in (3, 5):
        hidden = torch.randn(2, seq_len, 8, generator=generator)
        tokens = torch.randint(0, 50, (2, seq_len), generator=generator)
        advantages = torch.randn(2, generator=generator)
        loss = compiled(hidden, tokens, advantages)
        (grad,) = torch.autograd.grad(loss, head.weight)
        want = step(hidden, tokens, advantages)
        (want_grad,) = torch.autograd.grad(want, head.weight)
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


# Triton's own compiler on the advantage-shaping kernels: the interpreter runs their Python, so
# only a real compile checks what it cannot (constexpr sweeps, loop-carried types). Without a
# GPU they are compiled for one (sm_90) down to a cubin, with the ptxas Triton ships, in a fresh
# interpreter: under TRITON_INTERPRET=1 `triton.jit` makes interpreted functions instead.
COMPILE_FOR_A_GPU = textwrap.dedent(
    """
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    POINTER_TYPES = {
        "entropy_ptr": "*bf16",
        "mask_ptr": "*u8",
        "row_order_ptr": "*i64",
        "group_start_ptr": "*i64",
        "group_size_ptr": "*i64",
        "scores_ptr": "*fp64",
    }
    FLOAT_ARGS = ("base", "alpha2", "beta2", "eps")
    KERNELS = [
        ("gtpo_token_rewards", dict(HAS_MASK=True, WITH_MOMENTS=True, BLOCK_T=512)),
        ("gtpo_token_rewards", dict(HAS_MASK=False, WITH_MOMENTS=False, BLOCK_T=16)),
        ("whiten_rows", dict(HAS_MASK=True, BLOCK_T=512)),
        ("sequence_mean_entropy", dict(HAS_MASK=True, BLOCK_T=512)),
        ("group_sequence_advantages", dict(SHAPE_BY_ENTROPY=True, ZSCORE=True,
                                           SCALE_BY_STD=True, BLOCK_R=64)),
        ("group_sequence_advantages", dict(SHAPE_BY_ENTROPY=True, ZSCORE=False,
                                           SCALE_BY_STD=True, BLOCK_R=64)),
        ("group_sequence_advantages", dict(SHAPE_BY_ENTROPY=False, ZSCORE=True,
                                           SCALE_BY_STD=False, BLOCK_R=64)),
    ]
    for name, constants in KERNELS:
        module = importlib.import_module(f"entropy_kernels.kernels.{name}")
        kernel = getattr(module, f"{name}_kernel")
        while not isinstance(kernel, JITFunction):  # under triton.heuristics
            kernel = kernel.fn
        signature, constexprs = {}, {}
        for index, arg in enumerate(kernel.arg_names):
            if arg in constants:
                signature[arg], constexprs[(index,)] = "constexpr", constants[arg]
            elif arg.endswith("_ptr"):
                signature[arg] = POINTER_TYPES.get(arg, "*fp32")
            else:
                signature[arg] = "fp32" if arg in FLOAT_ARGS else "i64"
        assert len(constexprs) == len(constants), (name, kernel.arg_names)
        source = ASTSource(kernel, signature, constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name
    print("ok")
    """
)


def test_advantage_shaping_kernels_compile_for_a_gpu(tmp_path):
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_A_GPU],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "TRITON_CACHE_DIR": str(tmp_path)},  # a fresh cache: really compile
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
