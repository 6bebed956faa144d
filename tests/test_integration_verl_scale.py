"""verl adapter beyond the logits: the ``use_fused_kernels`` forward of verl's HF models on the
fused linear op, and Megatron's vocabulary-parallel scoring on ``tp_group`` (gloo, 2 ranks),
against verl's real code on CPU (run in the verl environment, see README; the Megatron checks
need ``megatron-core``, which ``.ci/setup-verl.sh`` installs)."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from gloo_harness import run_ranks  # noqa: E402
from tiny_models import tiny_causal_lm  # noqa: E402

import entropy_kernels  # noqa: E402
from entropy_kernels.integrations import _verl_scoring  # noqa: E402
from entropy_kernels.integrations import verl as adapter  # noqa: E402

VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def installed():
    adapter.install()
    yield
    adapter.uninstall()


def logits_path_scores(model, input_ids, temperature):
    """verl's logits path: log-probs of the rolled ids and entropy under logits / temperature."""
    logits = model(input_ids=input_ids).logits.float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    labels = torch.roll(input_ids, shifts=-1, dims=-1)
    logp = logp_all.gather(-1, labels[..., None])[..., 0]
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("fused_kernels_backend", ["torch", "triton"])
def test_use_fused_kernels_forward_runs_on_the_linear_op(
    installed, monkeypatch, fused_kernels_backend
):
    """verl's own ``patch_forward_with_backends`` (what ``use_fused_kernels=True`` applies) makes
    the model score from hidden states and the LM head: that scoring is ours (the ``"triton"``
    backend's kernel needs CUDA in verl; ours runs here), with verl's temperature."""
    monkey_patch = importlib.import_module("verl.models.transformers.monkey_patch")
    model = tiny_causal_lm(vocab=37)
    input_ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    temperature = 0.7
    want = logits_path_scores(model, input_ids, temperature)
    weights = torch.randn(2, 2, 9, generator=torch.Generator().manual_seed(2))
    (want[0] * weights[0] + want[1] * weights[1]).sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    calls = []
    linear = entropy_kernels.linear_logprobs_and_entropy
    monkeypatch.setattr(
        entropy_kernels,
        "linear_logprobs_and_entropy",
        lambda *a, **k: calls.append(a[1].shape) or linear(*a, **k),
    )
    model_class = type(model)
    monkeypatch.setattr(model_class, "forward", model_class.forward)  # restored afterwards
    monkey_patch.patch_forward_with_backends(
        model, use_fused_kernels=True, fused_kernels_backend=fused_kernels_backend
    )
    out = model(input_ids=input_ids, temperature=temperature, return_dict=True)
    assert calls == [model.lm_head.weight.shape], "the LM head's weight reaches the fused op"
    assert getattr(out, "logits", None) is None
    log_probs, entropy = (t.reshape(want[0].shape) for t in (out.log_probs, out.entropy))
    torch.testing.assert_close(log_probs, want[0], **VALUE_TOL)
    torch.testing.assert_close(entropy, want[1], **VALUE_TOL)
    (log_probs * weights[0] + entropy * weights[1]).sum().backward()
    for got, expected in zip([p.grad for p in model.parameters()], want_grads, strict=True):
        torch.testing.assert_close(got, expected, **GRAD_TOL)


def test_fused_linear_drop_in_matches_verls(installed):
    torch_functional = importlib.import_module("verl.utils.experimental.torch_functional")
    assert torch_functional.FusedLinearForPPO is adapter.FusedLinearForPPO
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=generator).requires_grad_()
    weight = (torch.randn(23, 8, generator=generator) * 2).requires_grad_()
    labels = torch.randint(0, 23, (2, 5), generator=generator)
    grads_out = torch.randn(2, 2, 5, generator=generator)
    results = []
    for run in (
        lambda: adapter.FusedLinearForPPO(chunk_size=3)(hidden, weight, labels, 0.6),
        lambda: torch_functional.FusedLinearForPPOFunction.apply(hidden, weight, labels, 0.6, 3),
    ):
        logp, entropy = run()
        grads = torch.autograd.grad(
            (logp * grads_out[0] + entropy * grads_out[1]).sum(), (hidden, weight)
        )
        results.append((logp, entropy, *grads))
    tolerances = (VALUE_TOL, VALUE_TOL, GRAD_TOL, GRAD_TOL)
    for got, want, tol in zip(results[0], results[1], tolerances, strict=True):
        torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match="backend"):
        adapter.FusedLinearForPPO(impl_backend="cuda")
    logp, entropy = adapter.linear_cross_entropy(hidden, weight, labels, 0.6, "none")
    assert logp.shape == entropy.shape == (10,)
    torch.testing.assert_close(logp, results[0][0].reshape(-1), **VALUE_TOL)
    total, _ = adapter.linear_cross_entropy(hidden, weight, labels, 0.6, "mean")
    torch.testing.assert_close(total, logp.mean(), **VALUE_TOL)
    with pytest.raises(ValueError, match="reduction"):
        adapter.linear_cross_entropy(hidden, weight, labels, 0.6, "max")


# ---------------------------------------------------------------------------------------------
# Megatron: tensor-parallel group of 2 gloo ranks

# Megatron's own functions assume equal shards (it pads the vocabulary); ours need not.
SHARDS = (9, 9)


def megatron_checks(rank, failures):
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    group = mpu.get_tensor_model_parallel_group()
    tensor_parallel = importlib.import_module("verl.utils.megatron.tensor_parallel")
    engine_module = importlib.import_module("verl.workers.engine.megatron.transformer_impl")
    low, high = sum(SHARDS[:rank]), sum(SHARDS[: rank + 1])
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 7, sum(SHARDS), generator=generator) * 3
    labels = torch.randint(0, sum(SHARDS), (1, 7), generator=generator)
    weights = torch.randn(2, 1, 7, generator=generator)

    def close(name, got, want, tol):
        if not torch.allclose(got.double(), want.double(), **tol):
            failures.append(f"rank {rank} {name}: {got} != {want}")

    def engine_scores():
        """verl's MegatronEngineWithLMHead._lm_head_logits_processor on this rank's shard."""
        shard = logits[..., low:high].clone().requires_grad_()
        engine = engine_module.MegatronEngineWithLMHead.__new__(
            engine_module.MegatronEngineWithLMHead
        )
        engine.engine_config = type("Config", (), {"entropy_from_logits_with_chunking": False})
        ret = engine._lm_head_logits_processor(
            shard * 1.0,  # verl scales the logits in place: keep the leaf intact
            labels,
            torch.full((1, 7), 0.8),
            calculate_sum_pi_squared=False,
            calculate_entropy=True,
            distillation_use_topk=False,
            distillation_only=False,
            logits_processor_func=None,
            batch=None,
            data_format=None,
        )
        (ret["log_probs"] * weights[0] + ret["entropy"] * weights[1]).sum().backward()
        return ret["log_probs"], ret["entropy"], shard.grad

    adapter.uninstall()
    originals = {name: getattr(tensor_parallel, name) for name in _verl_scoring._MEGATRON_SCORING}
    want = engine_scores()
    adapter.install()
    try:
        for name, drop_in in _verl_scoring._MEGATRON_SCORING.items():
            if getattr(tensor_parallel, name) is not drop_in or getattr(
                engine_module, name
            ) is not (drop_in):
                failures.append(f"rank {rank} {name} not patched")
        got = engine_scores()
    finally:
        adapter.uninstall()
    for name, g, w, tol in zip(
        ("engine log_probs", "engine entropy", "engine logits grad"),
        got,
        want,
        (VALUE_TOL, VALUE_TOL, GRAD_TOL),
        strict=True,
    ):
        close(name, g, w, tol)

    # Each drop-in against verl's function of the same name (and Megatron's cross entropy).
    for name, original in originals.items():
        drop_in = _verl_scoring._MEGATRON_SCORING[name]
        outs = []
        for function in (drop_in, original):
            shard = logits[..., low:high].clone().requires_grad_()
            args = (shard, labels) if "log_probs" in name else (shard,)
            value = function(*args)
            (value * weights[0]).sum().backward()
            outs.append((value, shard.grad))
        close(f"{name} value", outs[0][0], outs[1][0], VALUE_TOL)
        close(f"{name} grad", outs[0][1], outs[1][1], GRAD_TOL)

    # Megatron's fused forward: linear_cross_entropy with the tensor-parallel group.
    hidden = torch.randn(1, 7, 8, generator=generator).requires_grad_()
    weight = (torch.randn(sum(SHARDS), 8, generator=generator) * 2).requires_grad_()
    shard = weight[low:high].detach().clone().requires_grad_()
    local_hidden = hidden.detach().clone().requires_grad_()
    got = adapter.linear_cross_entropy(local_hidden, shard, labels, 0.8, "none", group)
    want = adapter.linear_cross_entropy(hidden, weight, labels, 0.8, "none")
    for value, expected, what in zip(got, want, ("logprobs", "entropy"), strict=True):
        close(f"linear_cross_entropy {what}", value, expected, VALUE_TOL)
    (got[0] * weights[0, 0] + got[1] * weights[1, 0]).sum().backward()
    (want[0] * weights[0, 0] + want[1] * weights[1, 0]).sum().backward()
    close("linear_cross_entropy weight grad", shard.grad, weight.grad[low:high], GRAD_TOL)
    # As in verl's kernel, the hidden gradient is this shard's part: the parts sum to the whole.
    summed = local_hidden.grad.clone()
    dist.all_reduce(summed, group=group)
    close("linear_cross_entropy hidden grad (summed)", summed, hidden.grad, GRAD_TOL)
    mpu.destroy_model_parallel()


def megatron_rank(rank, world):
    # verl's entropy compiles a helper with torch.compile; eager is the same maths on CPU.
    torch._dynamo.config.disable = True
    failures = []
    megatron_checks(rank, failures)
    return failures


def test_megatron_vocab_parallel_scoring_runs_on_tp_group(tmp_path):
    pytest.importorskip("megatron.core")
    run_ranks(megatron_rank, 2, tmp_path, ["torch", "torch.distributed", "verl"])
