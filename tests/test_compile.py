"""torch.compile: the ops are custom ops, so the loss compiles as one graph (no graph break)."""

import pytest
import torch

import entropy_kernels as ek

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_compiles_without_graph_breaks(backend):
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

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x = logits.clone().requires_grad_()
    loss = compiled(x, tokens, advantages, old)
    loss.backward()
    y = logits.clone().requires_grad_()
    want = loss_fn(y, tokens, advantages, old)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scoring_compiles_and_differentiates(backend):
    torch._dynamo.reset()
    logits = torch.randn(3, 40, requires_grad=True)
    tokens = torch.randint(0, 40, (3,))

    def score(logits, tokens):
        logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend=backend)
        return (logp + 0.5 * entropy).sum()

    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")
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
