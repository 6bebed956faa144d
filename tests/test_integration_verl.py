"""verl adapter against verl's real code on CPU (run in the verl environment, see README)."""

import importlib
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("verl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tensordict import NonTensorStack, TensorDict  # noqa: E402

import entropy_kernels  # noqa: E402
from entropy_kernels.integrations import _verl_loss  # noqa: E402
from entropy_kernels.integrations import verl as adapter  # noqa: E402
from entropy_kernels.objectives import Objective  # noqa: E402

# api.md's float32 tolerances.
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
PATCHED_MODULES = (
    "verl.trainer.ppo.core_algos",
    "verl.trainer.ppo.ray_trainer",
    "verl.trainer.ppo.v1.trainer_base",
    "verl.workers.engine.fsdp.transformer_impl",
)


def _patched(modules) -> dict:
    def from_adapter(function):
        return function.__code__.co_filename == adapter.__file__

    return {
        "estimators": {"gtpo", "grpo_s"} <= modules.core_algos.ADV_ESTIMATOR_REGISTRY.keys(),
        "legacy_trainer": from_adapter(modules.ray_trainer.RayPPOTrainer._compute_old_log_prob)
        and from_adapter(modules.ray_trainer.compute_advantage),
        "v1_trainer": from_adapter(modules.trainer_base.PPOTrainer._compute_advantage),
        "fsdp_engine": from_adapter(
            modules.transformer_impl.FSDPEngineWithLMHead.prepare_model_outputs
        ),
    }


@pytest.fixture(scope="module")
def verl():
    """verl's modules, imported after the Ray setup hook ran as it does in a worker."""
    module_name, _, hook = adapter.SETUP_HOOK.rpartition(".")
    getattr(importlib.import_module(module_name), hook)()
    fresh = [name for name in PATCHED_MODULES if name not in sys.modules]
    try:
        modules = SimpleNamespace(
            **{name.rpartition(".")[2]: importlib.import_module(name) for name in PATCHED_MODULES}
        )
        modules.fresh = fresh
        modules.patched_on_import = _patched(modules)
        modules.torch_functional = importlib.import_module("verl.utils.torch_functional")
        modules.protocol = importlib.import_module("verl.protocol")
        modules.workers_config = importlib.import_module("verl.workers.config")
        yield modules
    finally:
        adapter.uninstall()


@pytest.fixture
def installed(verl):
    adapter.install()
    yield verl
    adapter.uninstall()


def rollout(seed=0, n_prompts=3, n_samples=4, width=6):
    """Responses of a shuffled batch: uid groups interleaved, varying lengths, outcome rewards
    on the last response token (verl's layout), and the old-log-prob pass's entropy."""
    generator = torch.Generator().manual_seed(seed)
    batch = n_prompts * n_samples
    order = torch.randperm(batch, generator=generator)
    uids = np.array([f"prompt-{i // n_samples}" for i in order.tolist()], dtype=object)
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    mask = (torch.arange(width) < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (batch,), generator=generator).float()
    token_level_rewards = torch.zeros(batch, width)
    token_level_rewards[torch.arange(batch), lengths - 1] = rewards
    entropy = torch.rand(batch, width, generator=generator) * 3 * mask
    return uids, mask, token_level_rewards, entropy


def expected_advantages(name, uids, mask, token_level_rewards, entropy, **options):
    groups = torch.as_tensor(np.unique(uids, return_inverse=True)[1])
    shape = getattr(entropy_kernels, f"{name}_advantages")
    advantages = shape(token_level_rewards.sum(-1), entropy, mask.bool(), groups, **options)
    return advantages if name == "gtpo" else advantages[:, None] * mask.bool()


SHAPING = {"gtpo": dict(alpha2=0.2, normalize="joint"), "grpo_s": dict(beta2=0.3)}


def test_setup_hook_patches_modules_when_imported(verl):
    assert verl.fresh == list(PATCHED_MODULES), "verl was imported before the hook ran"
    assert all(verl.patched_on_import.values()), verl.patched_on_import


def test_install_and_uninstall(verl):
    adapter.uninstall()
    assert not any(_patched(verl).values())
    adapter.install()
    adapter.install()  # idempotent
    assert all(_patched(verl).values())
    assert verl.core_algos.get_adv_estimator_fn("gtpo") is adapter.compute_gtpo_advantage
    assert verl.core_algos.get_adv_estimator_fn("grpo_s") is adapter.compute_grpo_s_advantage
    adapter.install(fused_scoring=False)
    assert not _patched(verl)["fsdp_engine"]
    adapter.uninstall()
    assert not any(_patched(verl).values())


@pytest.mark.parametrize("name", sorted(SHAPING))
def test_estimator_matches_entropy_kernels(installed, name):
    uids, mask, token_level_rewards, entropy = rollout()
    config = OmegaConf.create({"adv_estimator": name, name: SHAPING[name]})
    estimator = installed.core_algos.get_adv_estimator_fn(name)
    advantages, returns = estimator(
        token_level_rewards=token_level_rewards,
        response_mask=mask,
        index=uids,
        config=config,
        old_entropy=entropy,
    )
    expected = expected_advantages(name, uids, mask, token_level_rewards, entropy, **SHAPING[name])
    torch.testing.assert_close(advantages, expected, **VALUE_TOL)
    assert returns is advantages
    assert advantages.abs().sum() > 0


def test_estimator_errors(installed):
    uids, mask, token_level_rewards, entropy = rollout()
    with pytest.raises(ValueError, match="install"):
        adapter.compute_gtpo_advantage(token_level_rewards, mask, uids)
    config = OmegaConf.create({"gtpo": {"beta2": 0.1}})
    with pytest.raises(ValueError, match="beta2"):
        adapter.compute_gtpo_advantage(token_level_rewards, mask, uids, config, entropy)


@pytest.mark.parametrize("name", sorted(SHAPING))
def test_legacy_trainer_passes_old_entropy(installed, monkeypatch, name):
    uids, mask, token_level_rewards, entropy = rollout(seed=1)
    verl = installed
    config = OmegaConf.create({"adv_estimator": name, name: SHAPING[name]})

    # _compute_old_log_prob keeps the entropy verl computes (the worker call is faked).
    def old_log_prob_pass(self, batch):
        return verl.protocol.DataProto.from_dict(
            {"old_log_probs": torch.zeros_like(entropy), "entropys": entropy}
        ), 0.0

    adapter.uninstall()
    monkeypatch.setattr(verl.ray_trainer.RayPPOTrainer, "_compute_old_log_prob", old_log_prob_pass)
    adapter.install()
    trainer = SimpleNamespace(config=OmegaConf.create({"algorithm": config}))
    old_log_prob, _ = verl.ray_trainer.RayPPOTrainer._compute_old_log_prob(trainer, None)
    old_log_prob.batch.pop("entropys")  # as RayPPOTrainer.fit does

    data = verl.protocol.DataProto.from_dict(
        {"token_level_rewards": token_level_rewards, "response_mask": mask},
        non_tensors={"uid": uids},
    ).union(old_log_prob)
    data = verl.ray_trainer.compute_advantage(data, adv_estimator=name, config=config)
    expected = expected_advantages(name, uids, mask, token_level_rewards, entropy, **SHAPING[name])
    torch.testing.assert_close(data.batch["advantages"], expected, **VALUE_TOL)


class TransferQueue:
    """The TransferQueue client calls of the V1 trainer, over an in-memory TensorDict."""

    def __init__(self, fields):
        self.store = TensorDict(fields, batch_size=[len(fields["uid"])])

    def kv_batch_get(self, keys, partition_id, select_fields):
        present = self.store.keys()  # TensorDict has no `in`
        return self.store.select(*[f for f in select_fields if f in present])

    def kv_batch_put(self, keys, partition_id, fields):
        self.store.update(fields)
        return SimpleNamespace(keys=keys, partition_id=partition_id)


class KVBatch:
    """TransferQueue's batch handle: sample keys and a partition."""

    def __init__(self, keys, partition_id):
        self.keys, self.partition_id = keys, partition_id

    def __len__(self):
        return len(self.keys)


def nested(rows):
    return torch.nested.nested_tensor(list(rows), layout=torch.jagged)


@pytest.mark.parametrize("name", sorted(SHAPING))
def test_v1_trainer_reads_old_entropy(installed, monkeypatch, name):
    uids, mask, token_level_rewards, entropy = rollout(seed=2)
    verl = installed
    lengths = mask.sum(-1).tolist()
    queue = TransferQueue(
        {
            "uid": NonTensorStack(*uids.tolist()),
            "response_mask": nested(row[:n] for row, n in zip(mask, lengths, strict=True)),
            "rm_scores": nested(
                row[:n] for row, n in zip(token_level_rewards, lengths, strict=True)
            ),
            "old_log_probs": nested(torch.zeros(n) for n in lengths),
            "entropy": nested(row[:n] for row, n in zip(entropy, lengths, strict=True)),
        }
    )
    monkeypatch.setattr(verl.trainer_base, "tq", queue)
    trainer = SimpleNamespace(
        config=OmegaConf.create(
            {
                "algorithm": {
                    "adv_estimator": name,
                    "use_kl_in_reward": False,
                    "gamma": 1.0,
                    "lam": 1.0,
                    name: SHAPING[name],
                },
                "actor_rollout_ref": {"rollout": {"n": 4}},
            }
        )
    )
    batch = KVBatch([f"{uid}_0_{i}" for i, uid in enumerate(uids)], partition_id="train")
    verl.trainer_base.PPOTrainer._compute_advantage(trainer, batch, metrics={})

    advantages = queue.store["advantages"].to_padded_tensor(padding=0.0)
    expected = expected_advantages(name, uids, mask, token_level_rewards, entropy, **SHAPING[name])
    torch.testing.assert_close(advantages, expected[:, : advantages.shape[1]], **VALUE_TOL)


# ---------------------------------------------------------------------------------------------
# Loss path: policy_loss against compute_policy_loss_vanilla + agg_loss


def loss_inputs(seed=0, batch=4, seq=7, vocab=13):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator) * 2
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    old = (logp + 0.4 * torch.randn(batch, seq, generator=generator)).clamp(max=0.0)
    advantages = torch.randn(batch, seq, generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > 0.3
    mask[1] = False  # an empty response
    weights = torch.rand(batch, seq, generator=generator) * (torch.rand(batch, seq) > 0.2)
    return logits, tokens, old, advantages, mask, weights


def actor_config(verl, policy_loss=None, actor=None, **global_batch_info):
    """verl's FSDP actor config (frozen): ``policy_loss`` holds options of its
    ``PolicyLossConfig``, ``actor`` other actor options."""
    config = verl.workers_config.FSDPActorConfig(
        **(actor or {}),
        policy_loss=verl.workers_config.PolicyLossConfig(**(policy_loss or {})),
        strategy="fsdp",
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=2.0,
        ppo_micro_batch_size_per_gpu=1,
        ppo_mini_batch_size=2,
        rollout_n=1,
    )
    config.global_batch_info.update(global_batch_info)
    return config


AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
]
BATCH_INFO = {
    "local": {},
    "global": dict(dp_size=2, batch_num_tokens=31, global_batch_size=7, loss_scale_factor=5),
}


CASES = [
    (mode, rollout_is, info, "auto")
    for mode in AGG_MODES
    for rollout_is in (False, True)
    for info in sorted(BATCH_INFO)
]
# The Triton kernel (the path CUDA tensors take), run by the interpreter.
CASES += [
    ("token-mean", True, "global", "triton"),
    ("seq-mean-token-sum-norm", True, "global", "triton"),
]


def assert_fused_equals_verl(loss_fn, inputs, loss_agg_mode, config, weights, backend="auto"):
    """``fused_policy_loss`` against verl's ``loss_fn`` on float32 log_softmax log-probs: loss,
    gradient w.r.t. the logits and metrics; both draw from torch's generator after one seed."""
    logits, tokens, old, advantages, mask = inputs
    reference_logits = logits.clone().requires_grad_(True)
    log_prob = torch.log_softmax(reference_logits, -1).gather(-1, tokens[..., None])[..., 0]
    torch.manual_seed(11)
    expected_loss, expected_metrics = loss_fn(
        old, log_prob, advantages, mask, loss_agg_mode, config, weights
    )
    expected_loss.backward()

    fused_logits = logits.clone().requires_grad_(True)
    torch.manual_seed(11)
    loss, metrics = adapter.fused_policy_loss(
        fused_logits,
        tokens,
        old,
        advantages,
        mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=weights,
        backend=backend,
    )
    loss.backward()
    # A loss that does not depend on the logits would make the comparison vacuous.
    assert reference_logits.grad.abs().sum() > 0
    torch.testing.assert_close(loss, expected_loss, **VALUE_TOL)
    torch.testing.assert_close(fused_logits.grad, reference_logits.grad, **GRAD_TOL)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("loss_agg_mode, rollout_is, batch_info, backend", CASES)
def test_fused_policy_loss_matches_vanilla(verl, loss_agg_mode, rollout_is, batch_info, backend):
    logits, tokens, old, advantages, mask, weights = loss_inputs()
    config = actor_config(verl, **BATCH_INFO[batch_info])
    assert_fused_equals_verl(
        verl.core_algos.compute_policy_loss_vanilla,
        (logits, tokens, old, advantages, mask),
        loss_agg_mode,
        config,
        weights if rollout_is else None,
        backend,
    )


# Every loss_mode verl 0.9.1 registers, vanilla (the fused path, tested above) aside. Listed
# here: importing verl while collecting would precede the setup hook the tests above check.
LOSS_MODES = (
    "bypass_mode",
    "cispo",
    "clip_cov",
    "dppo_kl",
    "dppo_tv",
    "dro",
    "geo_mean",
    "gpg",
    "gspo",
    "kl_cov",
    "sapo",
)


def test_loss_modes_are_verls_registry(verl):
    assert set(LOSS_MODES) | {"vanilla"} == set(verl.core_algos.POLICY_LOSS_REGISTRY)


# Options some modes need (verl's own defaults otherwise). clip_cov / kl_cov select tokens by
# covariance: a wide band and large ratios, so that their selection acts on this small batch.
MODE_OPTIONS = {
    "dro": dict(dro_beta=0.3),
    "clip_cov": dict(clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0),
    "kl_cov": dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5),
}


@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
@pytest.mark.parametrize("loss_mode", LOSS_MODES)
def test_fused_policy_loss_honours_every_loss_mode(verl, loss_mode, loss_agg_mode):
    """Every other registered mode: verl's own function on the fused log-probs, with verl's
    numbers, gradient and metrics; clip_cov's random token selection draws from torch's global
    generator, so under the same seed it selects the same tokens."""
    logits, tokens, old, advantages, mask, weights = loss_inputs(seed=5)
    policy_loss = {"loss_mode": loss_mode, **MODE_OPTIONS.get(loss_mode, {})}
    config = actor_config(verl, policy_loss, **BATCH_INFO["global"])
    assert_fused_equals_verl(
        verl.core_algos.get_policy_loss_fn(loss_mode),
        (logits, tokens, old, advantages, mask),
        loss_agg_mode,
        config,
        weights,
    )


@pytest.mark.parametrize("loss_mode", ["cispo", "sapo", "gpg"])
def test_token_local_modes_are_fused(verl, loss_mode):
    """cispo / sapo / gpg run policy_loss's fused objectives (here the Triton kernel, run by the
    interpreter), not verl's function, with verl's numbers; modes that need a reduction across
    tokens run verl's own function."""
    config = actor_config(verl, {"loss_mode": loss_mode}, **BATCH_INFO["global"])
    assert _verl_loss._fused_objective(loss_mode, config) is not None
    for other in ("gspo", "clip_cov", "geo_mean"):
        assert _verl_loss._fused_objective(other, actor_config(verl, {"loss_mode": other})) is None
    logits, tokens, old, advantages, mask, weights = loss_inputs(seed=9, batch=3, seq=4)
    assert_fused_equals_verl(
        verl.core_algos.get_policy_loss_fn(loss_mode),
        (logits, tokens, old, advantages, mask),
        "token-mean",
        config,
        weights,
        backend="triton",
    )


# verl's loss_mode -> the same objective of entropy_kernels.policy_loss, and the aggregations it
# honours (sapo always aggregates "seq-mean-token-mean"; geo_mean averages sequence losses).
OBJECTIVE_MODES = {
    "gspo": (Objective(ratio_level="sequence-token"), AGG_MODES),
    "sapo": (
        Objective("sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.3),
        ["seq-mean-token-mean"],
    ),
    "gpg": (Objective("gpg"), AGG_MODES),
    "geo_mean": (Objective("geo_mean"), ["seq-mean-token-mean"]),
    "cispo": (Objective("cispo"), AGG_MODES),
    "clip_cov": (Objective("clip_cov", cov_fraction=0.2, clip_cov_bounds=(-10.0, 10.0)), AGG_MODES),
    "kl_cov": (Objective("kl_cov", cov_fraction=0.2, kl_cov_coef=0.5), AGG_MODES),
}
OBJECTIVE_CASES = [
    (mode, agg) for mode, (_, aggs) in sorted(OBJECTIVE_MODES.items()) for agg in aggs
]


@pytest.mark.parametrize("loss_mode, loss_agg_mode", OBJECTIVE_CASES)
def test_policy_loss_objectives_match_verl(verl, loss_mode, loss_agg_mode):
    """ek.policy_loss(objective=...) against verl's loss_mode function, with the same seed
    (clip_cov's random selection), on log-probs of float32 log_softmax."""
    objective, _ = OBJECTIVE_MODES[loss_mode]
    logits, tokens, old, advantages, mask, _ = loss_inputs(seed=6)
    mask[1, :3] = True  # geo_mean averages over every sequence, policy_loss over non-empty ones
    config = actor_config(
        verl,
        {**MODE_OPTIONS.get(loss_mode, {}), "loss_mode": loss_mode},
        {"tau_pos": 0.9, "tau_neg": 1.3},
    )

    reference_logits = logits.clone().requires_grad_(True)
    log_prob = torch.log_softmax(reference_logits, -1).gather(-1, tokens[..., None])[..., 0]
    torch.manual_seed(3)
    expected, _ = verl.core_algos.get_policy_loss_fn(loss_mode)(
        old, log_prob, advantages, mask, loss_agg_mode, config
    )
    expected.backward()

    aggregation, normalizer, _ = _verl_loss._aggregation(loss_agg_mode, mask)
    got_logits = logits.clone().requires_grad_(True)
    torch.manual_seed(3)
    out = entropy_kernels.policy_loss(
        got_logits,
        tokens,
        advantages,
        mask,
        old_logprobs=old,
        clip_low=0.2,
        clip_high=0.28,
        aggregation=aggregation,
        normalizer=normalizer,
        objective=objective,
    )
    out.loss.backward()
    assert reference_logits.grad.abs().sum() > 0
    torch.testing.assert_close(out.loss, expected, **VALUE_TOL)
    torch.testing.assert_close(got_logits.grad, reference_logits.grad, **GRAD_TOL)
    if loss_mode.endswith("_cov"):
        assert 0 < out.metrics["objective_clipped_fraction"] < 1, "the selection should act"


def test_fused_policy_loss_mode_differs_from_vanilla(verl):
    """The issue's measurement: cispo is not the vanilla clip, and no longer computed as one."""
    logits, tokens, old, advantages, mask, _ = loss_inputs(seed=5)
    losses = {}
    for mode in ("vanilla", "cispo"):
        config = actor_config(verl, {"loss_mode": mode})
        losses[mode], _ = adapter.fused_policy_loss(
            logits, tokens, old, advantages, mask, config=config
        )
    assert not torch.allclose(losses["vanilla"], losses["cispo"])


def test_fused_policy_loss_unknown_mode_raises(verl):
    logits, tokens, old, advantages, mask, _ = loss_inputs()
    config = actor_config(verl, {"loss_mode": "no-such-mode"})
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        adapter.fused_policy_loss(logits, tokens, old, advantages, mask, config=config)


def test_seq_mean_token_sum_norm_is_the_spec_mode(verl):
    """verl 0.9's seq-mean-token-sum-norm is api.md's: the seq-mean-token-sum divided by T."""
    logits, tokens, old, advantages, mask, _ = loss_inputs(seed=3)
    log_prob = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    loss, _ = verl.core_algos.compute_policy_loss_vanilla(
        old,
        log_prob,
        advantages,
        mask,
        loss_agg_mode="seq-mean-token-sum-norm",
        config=actor_config(verl),
    )
    out = entropy_kernels.policy_loss(
        logits,
        tokens,
        advantages,
        mask,
        old_logprobs=old,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=2.0,
        aggregation="seq-mean-token-sum-norm",
    )
    torch.testing.assert_close(out.loss, loss, **VALUE_TOL)


# ---------------------------------------------------------------------------------------------
# Scoring drop-ins and the FSDP engine


def test_drop_ins_match_verl(verl):
    logits = (torch.randn(5, 9, 17) * 3).requires_grad_(True)
    labels = torch.randint(0, 17, (5, 9))
    weights = torch.randn(2, 5, 9)
    vf = verl.torch_functional
    for ours, theirs in (
        (adapter.logprobs_from_logits, vf.logprobs_from_logits),
        (lambda x, _: adapter.entropy_from_logits(x), lambda x, _: vf.entropy_from_logits(x)),
    ):
        got = ours(logits, labels)
        (grad,) = torch.autograd.grad((got * weights[0]).sum(), logits)
        want = theirs(logits, labels)
        (want_grad,) = torch.autograd.grad((want * weights[0]).sum(), logits)
        torch.testing.assert_close(got, want, **VALUE_TOL)
        torch.testing.assert_close(grad, want_grad, **GRAD_TOL)


def engine_outputs(verl, entropy_checkpointing=False, seed=0):
    """verl's FSDPEngineWithLMHead.prepare_model_outputs on a packed micro-batch (no padding,
    no sequence parallelism), with entropy; returns log-probs, entropy and their gradient."""
    tu = importlib.import_module("verl.utils.tensordict_utils")
    padding = importlib.import_module("verl.utils.dataset.dataset_utils")
    generator = torch.Generator().manual_seed(seed)
    lengths, vocab = [4, 7, 3], 19
    input_ids = nested(torch.randint(0, vocab, (n,), generator=generator) for n in lengths)
    micro_batch = TensorDict({"input_ids": input_ids}, batch_size=[len(lengths)])
    tu.assign_non_tensor(
        micro_batch,
        use_remove_padding=True,
        calculate_entropy=True,
        pad_mode=padding.DatasetPadMode.NO_PADDING,
        use_fused_kernels=False,
    )
    total = sum(lengths)
    logits = (torch.randn(1, total, vocab, generator=generator) * 2).requires_grad_(True)
    output_args = {
        "input_ids_rmpad_rolled": torch.roll(input_ids.values(), shifts=-1, dims=0),
        "temperature_rmpad": torch.full((total,), 0.7),
        "pad_size": 0,
        "temperature_is_one": False,
    }
    engine_class = verl.transformer_impl.FSDPEngineWithLMHead
    engine = engine_class.__new__(engine_class)
    engine.engine_config = SimpleNamespace(
        entropy_checkpointing=entropy_checkpointing, entropy_from_logits_with_chunking=False
    )
    engine.compute_entropy_from_logits = verl.torch_functional.entropy_from_logits
    engine.use_ulysses_sp = False
    out = engine.prepare_model_outputs(
        SimpleNamespace(logits=logits), output_args, micro_batch, None
    )
    assert engine.compute_entropy_from_logits is verl.torch_functional.entropy_from_logits
    log_probs, entropy = out["log_probs"].values(), out["entropy"].values()
    weights = torch.randn(2, total, generator=generator)
    # .backward(), not autograd.grad: verl's entropy checkpointing is reentrant.
    (log_probs * weights[0] + entropy * weights[1]).sum().backward()
    return log_probs, entropy, logits.grad


@pytest.mark.parametrize("entropy_checkpointing", [False, True])
def test_fsdp_engine_scores_with_the_fused_pass(verl, monkeypatch, entropy_checkpointing):
    adapter.uninstall()
    expected = engine_outputs(verl, entropy_checkpointing)
    adapter.install()
    try:
        calls = []
        fused = entropy_kernels.logprobs_and_entropy
        monkeypatch.setattr(
            entropy_kernels,
            "logprobs_and_entropy",
            lambda *a, **k: calls.append(1) or fused(*a, **k),
        )
        got = engine_outputs(verl, entropy_checkpointing)
    finally:
        adapter.uninstall()
    if not entropy_checkpointing:
        assert len(calls) == 1, "entropy and log-probs should come from one fused pass"
    for value, want in zip(got[:2], expected[:2], strict=True):
        torch.testing.assert_close(value, want, **VALUE_TOL)
    torch.testing.assert_close(got[2], expected[2], **GRAD_TOL)
