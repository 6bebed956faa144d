"""DTensor / ZeRO-3 LM-head weights for the linear functions (``entropy_kernels/weights.py``) and
the reference's ``tp_group`` (``entropy_kernels/reference/parallel.py``): gloo on CPU, 2 ranks.

Failures are collected on each rank and raised after the last collective (ranks stay in step).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from gloo_harness import run_ranks

import entropy_kernels as ek
from entropy_kernels import reference

VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
SIZES = (5, 8)  # uneven vocabulary shards of the reference tp_group checks
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.distributed.tensor"]


class Checks:
    def __init__(self, rank):
        self.rank, self.failures = rank, []

    def close(self, name, actual, expected, tol=VALUE_TOL):
        actual, expected = actual.detach().double(), expected.detach().double()
        if actual.shape != expected.shape or not torch.allclose(actual, expected, **tol):
            self.failures.append(f"rank {self.rank} {name}: {actual} != {expected}")

    def raises(self, name, match, call):
        try:
            call()
        except ValueError as error:
            if match not in str(error):
                self.failures.append(f"rank {self.rank} {name}: message {error}")
        else:
            self.failures.append(f"rank {self.rank} {name}: no ValueError")


def linear_case(seed, vocab=13, size=6):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 4, size, generator=generator)
    weight = torch.randn(vocab, size, generator=generator)
    bias = torch.randn(vocab, generator=generator)
    tokens = torch.randint(0, vocab, (3, 4), generator=generator)
    tokens[0, -1] = -100
    return hidden, weight, bias, tokens


def score(hidden, weight, bias, tokens, **options):
    logp, entropy = ek.linear_logprobs_and_entropy(
        hidden, weight, tokens, bias=bias, temperature=0.8, backend="torch", **options
    )
    return logp, entropy, (logp * 0.7 + entropy * 0.3).sum()


def check_dtensor(checks, rank, world):
    """Without tp_group: any Shard / Replicate weight is gathered; the gradient is the mean over
    the ranks' losses (FSDP2's reduction). With tp_group: a Shard(0) weight is this rank's
    vocabulary shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    _, weight, bias, tokens = linear_case(0)
    # Each rank scores its own hidden rows (data parallel).
    hiddens = [linear_case(10 + r)[0] for r in range(world)]
    for placement in (Shard(0), Shard(1), Replicate()):
        full = [t.clone().requires_grad_() for t in (weight, bias)]
        want_grads = [torch.zeros_like(weight), torch.zeros_like(bias)]
        for r, hidden in enumerate(hiddens):
            logp, entropy, loss = score(hidden, *full, tokens)
            grads = torch.autograd.grad(loss, full)
            want_grads = [a + g / world for a, g in zip(want_grads, grads, strict=True)]
            if r == rank:
                want = (logp, entropy)
        bias_placement = Replicate() if placement == Shard(1) else placement
        d_weight = distribute_tensor(weight, mesh, [placement]).requires_grad_()
        d_bias = distribute_tensor(bias, mesh, [bias_placement]).requires_grad_()
        logp, entropy, loss = score(hiddens[rank], d_weight, d_bias, tokens)
        loss.backward()
        checks.close(f"{placement} logprobs", logp, want[0])
        checks.close(f"{placement} entropy", entropy, want[1])
        checks.close(
            f"{placement} weight grad", d_weight.grad.full_tensor(), want_grads[0], GRAD_TOL
        )
        checks.close(f"{placement} bias grad", d_bias.grad.full_tensor(), want_grads[1], GRAD_TOL)
        # The losses take the DTensor too.
        advantages = torch.randn(3, generator=torch.Generator().manual_seed(1))
        got = ek.linear_policy_loss(hiddens[rank], d_weight, tokens, advantages, bias=d_bias)
        plain = ek.linear_policy_loss(hiddens[rank], weight, tokens, advantages, bias=bias)
        checks.close(f"{placement} linear_policy_loss", got.loss, plain.loss)

    # Vocabulary-parallel: a Shard(0) DTensor on the tp group's mesh is used as the local shard.
    hidden = hiddens[0]
    full = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = score(*full, tokens)
    want[2].backward()
    d_hidden = hidden.clone().requires_grad_()
    d_weight = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    d_bias = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
    got = score(d_hidden, d_weight, d_bias, tokens, tp_group=mesh.get_group())
    got[2].backward()
    checks.close("tp logprobs", got[0], want[0])
    checks.close("tp entropy", got[1], want[1])
    checks.close("tp hidden grad", d_hidden.grad, full[0].grad, GRAD_TOL)
    checks.close("tp weight grad", d_weight.grad.full_tensor(), full[1].grad, GRAD_TOL)
    checks.close("tp bias grad", d_bias.grad.full_tensor(), full[2].grad, GRAD_TOL)
    replicated = distribute_tensor(weight, mesh, [Replicate()])
    checks.raises(
        "tp with a Replicate weight",
        "Shard(0) on a 1-D mesh",
        lambda: score(hidden, replicated, None, tokens, tp_group=mesh.get_group()),
    )
    partial = replicated.redistribute(mesh, [Replicate()]).to_local()
    from torch.distributed.tensor import DTensor

    partial = DTensor.from_local(partial, mesh, [Partial()])
    checks.raises("Partial weight", "Partial", lambda: score(hidden, partial, None, tokens))
    checks.raises(
        "DTensor hidden",
        "hidden must be a plain",
        lambda: score(distribute_tensor(hidden, mesh, [Replicate()]), weight, None, tokens),
    )


def weighted(scores):
    logp, entropy = scores
    return (logp * 0.7 + entropy * 0.3).sum()


def check_reference(checks, rank, group):
    """Reference functions with tp_group (shards all-gathered) equal the unsharded reference."""
    low, high = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    hidden, weight, bias, tokens = linear_case(3, vocab=sum(SIZES))
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 4, sum(SIZES), generator=generator) * 3).double()
    advantages = torch.randn(3, generator=generator)
    rewards, mask = torch.tensor([1.0, 0.0, 1.0]), tokens != -100
    calls = {
        "logprobs_and_entropy": lambda x, **tp: weighted(
            reference.logprobs_and_entropy(x, tokens, **tp)
        ),
        "policy_loss": lambda x, **tp: (
            reference.policy_loss(x, tokens, advantages, entropy_coef=0.1, **tp).loss
        ),
        "gtpo_loss": lambda x, **tp: reference.gtpo_loss(x, tokens, rewards, mask, 3, **tp).loss,
        "grpo_s_loss": lambda x, **tp: (
            reference.grpo_s_loss(x, tokens, rewards, mask, 3, **tp).loss
        ),
    }
    for name, call in calls.items():
        full = logits.clone().requires_grad_()
        local = logits[..., low:high].clone().requires_grad_()
        want, got = call(full), call(local, tp_group=group)
        want.backward()
        got.backward()
        checks.close(f"reference {name}", got, want)
        checks.close(f"reference {name} grad", local.grad, full.grad[..., low:high], GRAD_TOL)
    linear_calls = {
        "linear_logprobs_and_entropy": lambda h, w, b, **tp: weighted(
            reference.linear_logprobs_and_entropy(h, w, tokens, bias=b, **tp)
        ),
        "linear_policy_loss": lambda h, w, b, **tp: (
            reference.linear_policy_loss(h, w, tokens, advantages, bias=b, **tp).loss
        ),
        "linear_grpo_s_loss": lambda h, w, b, **tp: (
            reference.linear_grpo_s_loss(h, w, tokens, rewards, mask, 3, bias=b, **tp).loss
        ),
    }
    for name, call in linear_calls.items():
        full = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        local = [t.clone().requires_grad_() for t in (hidden, weight[low:high], bias[low:high])]
        want, got = call(*full), call(*local, tp_group=group)
        want.backward()
        got.backward()
        checks.close(f"reference {name}", got, want)
        checks.close(f"reference {name} hidden grad", local[0].grad, full[0].grad, GRAD_TOL)
        for i, what in ((1, "weight"), (2, "bias")):
            want_grad = full[i].grad[low:high]
            checks.close(f"reference {name} {what} grad", local[i].grad, want_grad, GRAD_TOL)


def all_checks(rank, world):
    checks = Checks(rank)
    check_dtensor(checks, rank, world)
    check_reference(checks, rank, dist.group.WORLD)
    return checks.failures


def test_dtensor_weights_and_reference_tp_group(tmp_path):
    run_ranks(all_checks, 2, tmp_path, PRELOAD)


class _ZeroStatus:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"ZeroParamStatus.{self.name}"


def zero3_param(tensor, status, numel):
    """A parameter as DeepSpeed ZeRO-3 leaves it (its attributes, not DeepSpeed itself)."""
    param = torch.nn.Parameter(tensor)
    param.ds_status, param.ds_numel = _ZeroStatus(status), numel
    return param


def test_zero3_partitioned_weight_is_refused():
    hidden, weight, bias, tokens = linear_case(0)
    partitioned = zero3_param(torch.empty(0), "NOT_AVAILABLE", weight.numel())
    for call in (
        lambda w: ek.linear_logprobs_and_entropy(hidden, w, tokens),
        lambda w: ek.linear_policy_loss(hidden, w, tokens, torch.zeros(3)),
        lambda w: ek.linear_grpo_s_loss(hidden, w, tokens, torch.zeros(3), None, 3),
    ):
        with pytest.raises(ValueError, match=r"weight .*ZeRO-3.*GatheredParameters"):
            call(partitioned)
    with pytest.raises(ValueError, match="bias is a partitioned"):
        ek.linear_logprobs_and_entropy(
            hidden, weight, tokens, bias=zero3_param(torch.empty(0), "NOT_AVAILABLE", 13)
        )


def test_zero3_gathered_weight_is_used():
    hidden, weight, bias, tokens = linear_case(0)
    gathered = zero3_param(weight.clone(), "AVAILABLE", weight.numel())
    got = ek.linear_logprobs_and_entropy(hidden, gathered, tokens, bias=bias)
    want = reference.linear_logprobs_and_entropy(hidden, weight, tokens, bias=bias)
    for value, expected in zip(got, want, strict=True):
        torch.testing.assert_close(value, expected.float(), **VALUE_TOL)
    sum(v.sum() for v in got).backward()
    assert gathered.grad is not None and gathered.grad.shape == weight.shape


def test_plain_weights_pass_through():
    from entropy_kernels.weights import plain_linear_weights

    hidden, weight, bias, _ = linear_case(0)
    assert plain_linear_weights(hidden, weight, bias) == (weight, bias)
    assert plain_linear_weights(hidden, weight, None, tp_group=SimpleNamespace()) == (weight, None)
    assert not math.isnan(float(weight.sum()))
