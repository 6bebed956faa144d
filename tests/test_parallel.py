"""Vocabulary-parallel scoring and losses: gloo process groups on CPU, 2 and 3 ranks.

Every rank builds the same full-vocabulary inputs from a seed, keeps its own (uneven) shard and
calls the function with ``tp_group``; values, metrics and each shard's gradient must equal the
unsharded call's, and the bytes sent through collectives must not depend on the vocabulary.
Failures are collected and raised after the last collective, so that ranks never desynchronise.
"""

from __future__ import annotations

import datetime
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import entropy_kernels as ek
from entropy_kernels import reference
from entropy_kernels.ops.scoring import ScoringOptions, scoring_backward_out
from entropy_kernels.parallel import (
    LOCAL_IGNORE,
    VocabShard,
    _LogitsShard,
    finite_peak,
    global_rows,
    shard_peak,
    shard_rows,
    shard_sums,
    vocab_shard,
)

VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
# One unit in the last place of the gradient dtype: the kernel rounds its float32 gradient once.
ROUNDED_GRAD_TOL = {torch.float32: GRAD_TOL, torch.bfloat16: dict(rtol=2**-7, atol=1e-5)}
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "entropy_kernels.parallel"]
LOSSES = ("policy_loss", "PolicyLoss in place", "gtpo_loss", "GRPOSLoss old_entropy")
LINEAR = ("linear_logprobs_and_entropy", "linear_policy_loss", "linear_gtpo_loss")
METRIC_NAMES = ("clip_fraction", "approx_kl", "entropy", "kl", "success_advantage_mean")


class Run:
    """One rank's view of a world: its shard bounds and the failures found so far."""

    def __init__(self, rank, world, backend):
        self.rank, self.world, self.backend = rank, world, backend
        self.failures: list[str] = []
        self.sent: list[tuple[str, int]] = []

    def close(self, name, actual, expected, tol=VALUE_TOL):
        if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
            actual, expected = actual.detach().double(), expected.detach().double()
            ok = actual.shape == expected.shape and torch.allclose(
                actual, expected, equal_nan=True, **tol
            )
        else:
            ok = math.isclose(float(actual), float(expected), rel_tol=1e-5, abs_tol=1e-5)
        if not ok:
            self.failures.append(f"rank {self.rank} {self.backend} {name}: {actual} != {expected}")

    def check(self, name, condition):
        if not condition:
            self.failures.append(f"rank {self.rank} {self.backend} {name}")


def split(sizes, rank):
    return sum(sizes[:rank]), sum(sizes[:rank]) + sizes[rank]


def inputs(seed, sizes, *, batch=2, seq=3, masked_shard=None):
    generator = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    logits = torch.randn(batch, seq, total, generator=generator) * 3.0
    holes = torch.rand(logits.shape, generator=generator) < 0.15
    logits = logits.masked_fill(holes, -math.inf)
    tokens = torch.randint(0, total, (batch, seq), generator=generator)
    if masked_shard is not None:  # one row with no mass on one shard: a real case (padding)
        low, high = split(sizes, masked_shard)
        logits[0, 0, low:high] = -math.inf
        tokens[0, 0] = high % total
    # Every token has a finite logit (a -inf one has log-prob -inf and an infinite KL term).
    logits.scatter_(-1, tokens.unsqueeze(-1), torch.randn(batch, seq, 1, generator=generator))
    tokens[1, -1] = -100
    return logits, tokens


def shard_and_full(logits, sizes, rank):
    low, high = split(sizes, rank)
    local = logits[..., low:high].clone().requires_grad_()
    full = logits.clone().requires_grad_()
    return local, full


def check_scoring(run, group, sizes, seed, temperature):
    logits, tokens = inputs(seed, sizes, masked_shard=seed % len(sizes))
    local, full = shard_and_full(logits, sizes, run.rank)
    logp, entropy = ek.logprobs_and_entropy(
        local, tokens, temperature=temperature, backend=run.backend, tp_group=group
    )
    want_logp, want_entropy = ek.logprobs_and_entropy(full, tokens, temperature=temperature)
    truth_logp, truth_entropy = reference.logprobs_and_entropy(
        logits.double(), tokens, temperature=temperature
    )
    run.close("logprobs", logp, want_logp)
    run.close("entropy", entropy, want_entropy)
    run.close("logprobs vs float64", logp, truth_logp)
    run.close("entropy vs float64", entropy, truth_entropy)
    weights = torch.randn(2, *tokens.shape, generator=torch.Generator().manual_seed(seed))
    (logp * weights[0] + entropy * weights[1]).sum().backward()
    (want_logp * weights[0] + want_entropy * weights[1]).sum().backward()
    low, high = split(sizes, run.rank)
    run.close("scoring gradient", local.grad, full.grad[..., low:high], GRAD_TOL)


def loss_inputs(seed, tokens):
    generator = torch.Generator().manual_seed(seed + 1)
    shape = tokens.shape
    return dict(
        mask=torch.rand(shape, generator=generator) > 0.2,
        old_logprobs=-torch.rand(shape, generator=generator) * 3,
        ref_logprobs=-torch.rand(shape, generator=generator) * 3,
    )


def check_losses(run, group, sizes, seed, names):
    """The sharded call on ``run.backend`` against the unsharded one on the torch backend."""
    logits, tokens = inputs(seed, sizes, batch=4)
    extra = loss_inputs(seed, tokens)
    advantages = torch.randn(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    calls = {
        "policy_loss": lambda x, backend, **tp: ek.policy_loss(
            x,
            tokens,
            advantages,
            extra["mask"],
            old_logprobs=extra["old_logprobs"],
            ref_logprobs=extra["ref_logprobs"],
            kl_coef=0.1,
            entropy_coef=0.01,
            temperature=0.8,
            aggregation="seq-mean-token-mean",
            backend=backend,
            **tp,
        ),
        "PolicyLoss in place": lambda x, backend, **tp: ek.PolicyLoss(
            entropy_coef=0.05, inplace_backward=True, backend=backend, **tp
        )(x * 1.0, tokens, advantages),
        "gtpo_loss": lambda x, backend, **tp: ek.gtpo_loss(
            x, tokens, rewards, extra["mask"], 2, entropy_coef=0.01, backend=backend, **tp
        ),
        "GRPOSLoss old_entropy": lambda x, backend, **tp: ek.GRPOSLoss(backend=backend, **tp)(
            x,
            tokens,
            rewards,
            None,
            2,
            old_logprobs=extra["old_logprobs"],
            old_entropy=torch.rand(tokens.shape),
        ),
    }
    low, high = split(sizes, run.rank)
    for name in names:
        local, full = shard_and_full(logits, sizes, run.rank)
        out = calls[name](local, run.backend, tp_group=group)
        want = calls[name](full, "torch")
        run.close(f"{name} loss", out.loss, want.loss)
        run.close(f"{name} logprobs", out.logprobs, want.logprobs)
        run.close(f"{name} entropy", out.entropy, want.entropy)
        run.check(f"{name} metric names", set(out.metrics) == set(want.metrics))
        for metric in METRIC_NAMES:
            if metric in want.metrics:
                run.close(f"{name} {metric}", out.metrics[metric], want.metrics[metric])
        out.loss.backward()
        want.loss.backward()
        run.close(f"{name} gradient", local.grad, full.grad[..., low:high], GRAD_TOL)


def check_linear(run, group, sizes, seed, names):
    """The linear functions with a weight (and bias) shard; hidden's gradient is the full one."""
    generator = torch.Generator().manual_seed(seed)
    total, size = sum(sizes), 6
    hidden = torch.randn(4, 3, size, generator=generator)
    weight = torch.randn(total, size, generator=generator)
    bias = torch.randn(total, generator=generator)
    tokens = torch.randint(0, total, (4, 3), generator=generator)
    tokens[0, -1] = -100
    rewards, advantages = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.randn(4, generator=generator)
    low, high = split(sizes, run.rank)
    calls = {
        "linear_logprobs_and_entropy": lambda h, w, b, **tp: ek.linear_logprobs_and_entropy(
            h, w, tokens, bias=b, temperature=0.9, backend=run.backend, **tp
        ),
        "linear_policy_loss": lambda h, w, b, **tp: ek.linear_policy_loss(
            h, w, tokens, advantages, bias=b, entropy_coef=0.1, backend=run.backend, **tp
        ),
        "linear_gtpo_loss": lambda h, w, b, **tp: ek.linear_gtpo_loss(
            h, w, tokens, rewards, None, 2, bias=b, entropy_coef=0.1, backend=run.backend, **tp
        ),
    }
    for name in names:
        call = calls[name]
        inputs_full = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        inputs_local = [
            hidden.clone().requires_grad_(),
            weight[low:high].clone().requires_grad_(),
            bias[low:high].clone().requires_grad_(),
        ]
        out, want = call(*inputs_local, tp_group=group), call(*inputs_full)
        if isinstance(out, tuple):
            run.close(f"{name} logprobs", out[0], want[0])
            run.close(f"{name} entropy", out[1], want[1])
            loss, want_loss = (out[0] + out[1] * 0.5).sum(), (want[0] + want[1] * 0.5).sum()
        else:
            run.close(f"{name} loss", out.loss, want.loss)
            run.close(f"{name} entropy", out.entropy, want.entropy)
            loss, want_loss = out.loss, want.loss
        loss.backward()
        want_loss.backward()
        local_hidden, local_weight, local_bias = (t.grad for t in inputs_local)
        full_hidden, full_weight, full_bias = (t.grad for t in inputs_full)
        run.close(f"{name} hidden gradient", local_hidden, full_hidden, GRAD_TOL)
        run.close(f"{name} weight gradient", local_weight, full_weight[low:high], GRAD_TOL)
        run.close(f"{name} bias gradient", local_bias, full_bias[low:high], GRAD_TOL)


def counting(run, name, collective):
    def wrapper(tensor_or_list, *args, **kwargs):
        tensors = args[0] if name == "all_gather" else tensor_or_list
        tensors = tensors if isinstance(tensors, list) else [tensors]
        run.sent.append((name, sum(t.numel() * t.element_size() for t in tensors)))
        return collective(tensor_or_list, *args, **kwargs)

    wrapper.original = collective
    return wrapper


def check_communication(run, group, sizes):
    """Bytes per call: 4 floats per row in all-reduces, the shard sizes in one all_gather."""
    volumes = []
    for scale in (1, 40):
        logits, tokens = inputs(7, [size * scale for size in sizes], batch=3, seq=5)
        run.sent.clear()
        local = logits[..., slice(*split([s * scale for s in sizes], run.rank))]
        ek.logprobs_and_entropy(local, tokens, tp_group=group, backend=run.backend)
        volumes.append(list(run.sent))
    rows = 15
    expected = [("all_gather", 8), ("all_reduce", 4 * rows), ("all_reduce", 12 * rows)]
    run.check(f"communication {volumes[0]} != {expected}", volumes[0] == expected)
    run.check(f"communication grows with V: {volumes}", volumes[0] == volumes[1])


def check_edges(run, group, sizes):
    logits, tokens = inputs(3, sizes)
    local = logits[..., slice(*split(sizes, run.rank))].clone()
    # NaN on one shard reaches that row on every rank, and only that row.
    if run.rank == run.world - 1:
        local[0, 1, -1] = math.nan
    logp, entropy = ek.logprobs_and_entropy(local, tokens, tp_group=group, backend=run.backend)
    run.check("NaN row", bool(torch.isnan(entropy[0, 1])) and bool(torch.isnan(logp[0, 1])))
    run.check("other rows finite", int(torch.isnan(entropy).sum()) == 1)
    run.check("ignored row is 0", float(logp[1, -1]) == 0.0 == float(entropy[1, -1]))
    empty = local[:0].requires_grad_()
    logp, entropy = ek.logprobs_and_entropy(empty, tokens[:0], tp_group=group, backend=run.backend)
    (logp.sum() + entropy.sum()).backward()
    run.check("empty batch", logp.shape == (0, tokens.shape[1]) and empty.grad.shape == empty.shape)
    # A token of another shard is valid; one past the whole vocabulary is not.
    tokens[0, 0] = sum(sizes) - 1
    ek.logprobs_and_entropy(local, tokens, tp_group=group, backend=run.backend)
    tokens[0, 0] = sum(sizes)
    try:
        ek.logprobs_and_entropy(local, tokens, tp_group=group, backend=run.backend)
        run.check("token past the vocabulary accepted", False)
    except ValueError as error:
        run.check(f"message {error}", f"[0, {sum(sizes)})" in str(error))
    logp, _ = ek.logprobs_and_entropy(
        local, tokens, tp_group=group, backend=run.backend, validate=False
    )
    run.check("unvalidated out-of-range token is NaN", bool(torch.isnan(logp[0, 0])))
    run.check(
        "shard offset",
        vocab_shard(sizes[run.rank], local.device, group).offset == split(sizes, run.rank)[0],
    )


def worker(rank, world, init_file, sizes_per_seed, results):
    torch.manual_seed(0)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    failures = []
    try:
        for backend in ("torch", "triton"):
            run = Run(rank, world, backend)
            dist.all_reduce = counting(run, "all_reduce", dist.all_reduce)
            dist.all_gather = counting(run, "all_gather", dist.all_gather)
            # The interpreter is slow: Triton runs the sharded side of the main cases only.
            interpreted = backend == "triton"
            for seed, sizes in sizes_per_seed[: 1 if interpreted else None]:
                check_scoring(run, dist.group.WORLD, sizes, seed, temperature=0.7 + seed % 3 / 2)
            names = LOSSES[:2] if interpreted else LOSSES
            check_losses(run, dist.group.WORLD, sizes_per_seed[0][1], 11, names)
            names = LINEAR[:1] if interpreted else LINEAR
            check_linear(run, dist.group.WORLD, sizes_per_seed[0][1], 5, names)
            if not interpreted:
                check_communication(run, dist.group.WORLD, sizes_per_seed[0][1])
            check_edges(run, dist.group.WORLD, sizes_per_seed[-1][1])
            dist.all_reduce = dist.all_reduce.original
            dist.all_gather = dist.all_gather.original
            failures += run.failures
    finally:
        dist.destroy_process_group()
    results.put((rank, failures))


def random_shards(world, seed):
    rng = random.Random(seed)
    return [rng.choice([1, 2, 5, 7, 9, 13]) for _ in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_calls_equal_unsharded(world, tmp_path):
    cases = [(seed, random_shards(world, seed)) for seed in range(3)]
    cases[0] = (0, [5, 9, 1][:world])
    # A fork server imports torch (and torch._dynamo, which the first custom-op call imports)
    # once for every rank of both tests, in a process that never ran a parallel region.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    results = context.SimpleQueue()
    mp.start_processes(
        worker,
        args=(world, str(tmp_path / "init"), cases, results),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )
    failures = [failure for _ in range(world) for failure in results.get()[1]]
    assert not failures, "\n".join(failures[:20])


def test_tp_group_must_be_a_process_group():
    logits, tokens = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="tp_group"):
        ek.logprobs_and_entropy(logits, tokens, tp_group="not a group")


def combined_by_hand(logits, tokens, sizes, options, grads):
    """The collectives done by hand over shards of one tensor: max and sum over a list."""
    total, parts, rows = sum(sizes), [], []
    for rank, size in enumerate(sizes):
        offset = sum(sizes[:rank])
        parts.append(logits[..., offset : offset + size])
        shard = VocabShard(None, offset, size, total)
        rows.append(shard_rows(_LogitsShard(options), (parts[-1],), tokens, shard))
    peak = finite_peak(torch.stack([shard_peak(shard) for shard in rows]).amax(0))
    sums = torch.stack([shard_sums(shard, peak, options) for shard in rows]).sum(0)
    logprobs, entropy, normaliser = global_rows(sums, peak, tokens, rows[0], shard)
    consts = (options.temperature, LOCAL_IGNORE, options.backend)
    grad = []
    for part, shard in zip(parts, rows, strict=True):
        grad.append(torch.empty_like(part))
        args = (shard.local_tokens, normaliser, entropy.reshape(-1), *grads, *consts)
        scoring_backward_out(part, *args, grad[-1])
    return logprobs, entropy, torch.cat(grad, -1)


SPLITS = dict(
    batch=st.integers(1, 3),
    seq=st.integers(1, 4),
    sizes=st.lists(st.sampled_from([1, 2, 7, 255, 257]), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    neg_inf_fraction=st.sampled_from([0.0, 0.3]),
    empty_shard=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=12)
@given(**SPLITS)
def test_shard_statistics_combine_torch(**case):
    check_combination("torch", **case)


# The interpreter takes about a second per example: fewer of them.
@settings(max_examples=5)
@given(**SPLITS)
def test_shard_statistics_combine_triton(**case):
    check_combination("triton", **case)


def check_combination(
    backend, batch, seq, sizes, dtype, temperature, neg_inf_fraction, empty_shard, seed
):
    """Any split of the vocabulary gives the float64 truth of the whole (values and gradient)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    logits = torch.randn(batch, seq, total, generator=generator) * 4.0
    logits = logits.masked_fill(
        torch.rand(logits.shape, generator=generator) < neg_inf_fraction, -math.inf
    )
    tokens = torch.randint(0, total, (batch, seq), generator=generator)
    if empty_shard and len(sizes) > 1:  # the first shard holds no mass on the first row
        logits[0, 0, : sizes[0]] = -math.inf
        tokens[0, 0] = total - 1
    logits.scatter_(-1, tokens.unsqueeze(-1), torch.randn(batch, seq, 1, generator=generator))
    tokens[-1, -1] = -100
    logits = logits.to(dtype)
    grads = torch.randn(2, batch * seq, generator=generator)

    options = ScoringOptions(temperature, -100, backend)
    logprobs, entropy, grad = combined_by_hand(logits, tokens, sizes, options, grads)

    exact = logits.double().requires_grad_()
    want_logp, want_entropy = reference.logprobs_and_entropy(exact, tokens, temperature=temperature)
    (want_logp.reshape(-1) * grads[0] + want_entropy.reshape(-1) * grads[1]).sum().backward()
    torch.testing.assert_close(logprobs.double(), want_logp.detach(), **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), **VALUE_TOL)
    assert grad.dtype == dtype
    torch.testing.assert_close(
        grad.float(), exact.grad.to(dtype).float(), **ROUNDED_GRAD_TOL[dtype]
    )
