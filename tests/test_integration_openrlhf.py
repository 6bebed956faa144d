"""OpenRLHF adapter against OpenRLHF's real source (``pip install --no-deps openrlhf``).

OpenRLHF imports DeepSpeed, flash-attn, vLLM and Ray at module level; the test stubs those
(and import-only CPU dependencies that are not installed) for the duration of this module.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import sys
import types
from types import SimpleNamespace

import pytest

pytest.importorskip("openrlhf")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tiny_models import tiny_causal_lm  # noqa: E402

import entropy_kernels  # noqa: E402
from entropy_kernels.integrations import openrlhf as adapter  # noqa: E402

# GPU-only or cluster frameworks: never executed by the code under test.
ALWAYS_STUBBED = ("deepspeed", "flash_attn", "vllm", "ray")
# CPU dependencies imported (not used) by the modules under test; stubbed when not installed.
STUBBED_IF_MISSING = ("transformers", "peft", "pylatexenc", "aiohttp", "torchdata")
MODULES = {
    "loss": "openrlhf.models.loss",
    "actor": "openrlhf.models.actor",
    "launcher": "openrlhf.trainer.ray.launcher",
    "experience_maker": "openrlhf.trainer.ppo_utils.experience_maker",
    "experience": "openrlhf.trainer.ppo_utils.experience",
}
# api.md's float32 tolerances.
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


class _Stub:
    """Any call returns a stub, except decorating: ``@ray.remote(num_gpus=1)`` keeps the class."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return _Stub()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Stub,), {})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = frozenset(roots)

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def _from_adapter(function) -> bool:
    return function.__code__.co_filename == adapter.__file__


def _is_patched(modules) -> dict:
    maker = modules.experience_maker.RemoteExperienceMaker
    return {
        "actor": _from_adapter(modules.actor.Actor.forward),
        "launcher": hasattr(modules.launcher.BaseModelActor, adapter._FORWARD_WITH_ENTROPY),
        "experience_maker": _from_adapter(maker.make_experience_batch),
    }


def _forget_cached_availability():
    """transformers caches its ``is_*_available()`` answers (``is_peft_available`` only looks for
    an importable module): forget those taken while the stubs were importable."""
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for value in vars(import_utils).values() if import_utils else ():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


@pytest.fixture(scope="module")
def openrlhf():
    """OpenRLHF's modules, imported after Ray's setup hook ran as it does in a worker."""
    missing = {name for name in STUBBED_IF_MISSING if importlib.util.find_spec(name) is None}
    finder = _StubFinder(set(ALWAYS_STUBBED) | missing)
    sys.meta_path.insert(0, finder)
    env = pytest.MonkeyPatch()
    try:
        runtime_env = adapter.ray_runtime_env("gtpo")
        env.setenv(adapter.CONFIG_ENV, runtime_env["env_vars"][adapter.CONFIG_ENV])
        module_name, _, hook = adapter.SETUP_HOOK.rpartition(".")
        getattr(importlib.import_module(module_name), hook)()
        env.undo()
        modules = SimpleNamespace(
            **{key: importlib.import_module(name) for key, name in MODULES.items()}
        )
        modules.patched_on_import = _is_patched(modules)
        adapter.uninstall()
        yield modules
    finally:
        env.undo()
        adapter.uninstall()
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.partition(".")[0] in finder.roots | {"openrlhf"}]:
            del sys.modules[name]
        _forget_cached_availability()


@pytest.fixture
def installed():
    yield adapter.install
    adapter.uninstall()


# ---------------------------------------------------------------------------------------------
# FusedPolicyLoss against PolicyLoss


def loss_inputs(seed=0, batch=4, seq=7, vocab=13):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator) * 2
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    old = logp + 0.4 * torch.randn(batch, seq, generator=generator)
    rollout = old + 0.2 * torch.randn(batch, seq, generator=generator)
    advantages = torch.randn(batch, seq, generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > 0.3
    mask[1] = False  # an empty sequence
    return logits, tokens, old, rollout, advantages, mask


def openrlhf_loss(loss_fn, logits, tokens, *args, **kwargs):
    """OpenRLHF's path: log-probs from float32 logits, then PolicyLoss; grads w.r.t. logits."""
    logits = logits.clone().requires_grad_(True)
    log_probs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    out = loss_fn(log_probs, *args, **kwargs)
    out[0].backward()
    return out, logits.grad


def fused_loss(loss_fn, logits, *args, **kwargs):
    logits = logits.clone().requires_grad_(True)
    out = loss_fn(logits, *args, **kwargs)
    out[0].backward()
    return out, logits.grad


def assert_same_outputs(fused, expected):
    (fused_out, fused_grad), (expected_out, expected_grad) = fused, expected
    for got, want in zip(fused_out, expected_out, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got.detach().float(), want.detach().float(), **VALUE_TOL)
    torch.testing.assert_close(fused_grad, expected_grad, **GRAD_TOL)


NORMALISATIONS = {
    "local": {},
    "global": dict(dp_size=2, batch_num_tokens=torch.tensor(31.0), global_batch_size=7.0),
}


@pytest.mark.parametrize("normalisation", sorted(NORMALISATIONS))
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28)])
def test_fused_policy_loss_matches_policy_loss(
    openrlhf, clip, dual_clip, token_level_loss, normalisation
):
    logits, tokens, old, _, advantages, mask = loss_inputs()
    options = dict(
        clip_eps_low=clip[0],
        clip_eps_high=clip[1],
        dual_clip=dual_clip,
        token_level_loss=token_level_loss,
    )
    batch_info = NORMALISATIONS[normalisation]
    expected = openrlhf_loss(
        openrlhf.loss.PolicyLoss(**options),
        logits,
        tokens,
        old,
        advantages,
        action_mask=mask,
        **batch_info,
    )
    fused = fused_loss(
        adapter.FusedPolicyLoss(**options),
        logits,
        tokens,
        old,
        advantages,
        action_mask=mask,
        **batch_info,
    )
    assert_same_outputs(fused, expected)


IS_CORRECTIONS = [
    ("token", "mask", "ratio", (0.8, 1.2)),
    ("token", "clip", "ratio", (0.8, 1.2)),
    ("seq", "mask", "ratio", (0.9, 1.1)),
    ("token", "mask", "binary_kl", (0.0, 3e-4)),
    ("seq", "mask", "tv", (0.0, 0.01)),
]


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("level, mode, gating, threshold", IS_CORRECTIONS)
def test_fused_policy_loss_matches_is_correction(
    openrlhf, level, mode, gating, threshold, token_level_loss
):
    logits, tokens, old, rollout, advantages, mask = loss_inputs(seed=1)
    options = dict(
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        dual_clip=3.0,
        token_level_loss=token_level_loss,
        is_correction_level=level,
        is_correction_mode=mode,
        is_correction_gating=gating,
        is_correction_threshold=threshold,
    )
    reference_loss = openrlhf.loss.PolicyLoss(**options)
    expected = openrlhf_loss(
        reference_loss, logits, tokens, old, advantages, action_mask=mask, rollout_log_probs=rollout
    )
    assert 0 < expected[0][4] < 1, "the threshold should filter some units, not all"
    fused = fused_loss(
        adapter.FusedPolicyLoss.from_openrlhf(reference_loss),
        logits,
        tokens,
        old,
        advantages,
        action_mask=mask,
        rollout_log_probs=rollout,
    )
    assert_same_outputs(fused, expected)


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_fused_policy_loss_triton_backend(openrlhf, token_level_loss):
    """The Triton kernel (the path CUDA tensors take), run by the interpreter."""
    logits, tokens, old, rollout, advantages, mask = loss_inputs(seed=2)
    options = dict(
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        dual_clip=2.0,
        token_level_loss=token_level_loss,
        is_correction_level="token",
    )
    batch_info = NORMALISATIONS["global"]
    expected = openrlhf_loss(
        openrlhf.loss.PolicyLoss(**options),
        logits,
        tokens,
        old,
        advantages,
        action_mask=mask,
        rollout_log_probs=rollout,
        **batch_info,
    )
    fused = fused_loss(
        adapter.FusedPolicyLoss(**options, backend="triton"),
        logits,
        tokens,
        old,
        advantages,
        action_mask=mask,
        rollout_log_probs=rollout,
        **batch_info,
    )
    assert_same_outputs(fused, expected)


@pytest.mark.parametrize("normalisation", sorted(NORMALISATIONS))
@pytest.mark.parametrize("is_correction_level", ["off", "token"])
def test_fused_policy_loss_gspo_is_openrlhfs(openrlhf, is_correction_level, normalisation):
    """GSPO (per-sequence ratio): OpenRLHF's PolicyLoss on the fused log-probs."""
    logits, tokens, old, rollout, advantages, mask = loss_inputs(seed=3)
    reference_loss = openrlhf.loss.PolicyLoss(
        clip_eps_low=3e-4,
        clip_eps_high=4e-4,
        policy_loss_type="gspo",
        is_correction_level=is_correction_level,
    )
    args = (old, advantages)
    kwargs = dict(action_mask=mask, rollout_log_probs=rollout, **NORMALISATIONS[normalisation])
    expected = openrlhf_loss(reference_loss, logits, tokens, *args, **kwargs)
    assert expected[1].abs().sum() > 0
    fused_module = adapter.FusedPolicyLoss.from_openrlhf(reference_loss)
    assert fused_module.policy_loss_type == "gspo"
    assert_same_outputs(fused_loss(fused_module, logits, tokens, *args, **kwargs), expected)


def test_fused_policy_loss_rejects_unknown_type(openrlhf):
    with pytest.raises(ValueError, match="policy_loss_type"):
        adapter.FusedPolicyLoss(policy_loss_type="grpo")


# ---------------------------------------------------------------------------------------------
# The install hook


class LMOutput(dict):
    """Stands in for transformers' ModelOutput: items and attributes."""


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, hidden=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return LMOutput(logits=self.head(torch.tanh(self.embed(input_ids))) * 3)


def make_actor(openrlhf, temperature=0.7, seed=0):
    torch.manual_seed(seed)
    actor = openrlhf.actor.Actor(TinyLM(), temperature=temperature)
    actor.packing_samples = False  # set by Actor.__init__ only for models loaded by name
    return actor


def reference_scores(actor, sequences):
    """Log-probs and entropy of every next token, ``[B, S - 1]``, by plain PyTorch."""
    logits = actor.model(sequences)["logits"][:, :-1] / actor.temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, sequences[:, 1:, None])[..., 0]
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def test_setup_hook_patches_modules_when_imported(openrlhf):
    assert openrlhf.patched_on_import == {"actor": True, "launcher": True, "experience_maker": True}
    assert _is_patched(openrlhf) == {"actor": False, "launcher": False, "experience_maker": False}


def test_install_and_uninstall(openrlhf, installed):
    actor_forward = openrlhf.actor.Actor.forward
    compute_entropy = openrlhf.actor.compute_entropy
    maker_methods = dict(vars(openrlhf.experience_maker.RemoteExperienceMaker))
    installed()
    assert _is_patched(openrlhf) == {"actor": True, "launcher": False, "experience_maker": False}
    installed("grpo_s", fused_scoring=False, beta2=0.2)
    assert _is_patched(openrlhf) == {"actor": False, "launcher": True, "experience_maker": True}
    adapter.uninstall()
    assert openrlhf.actor.Actor.forward is actor_forward
    assert openrlhf.actor.compute_entropy is compute_entropy
    assert dict(vars(openrlhf.experience_maker.RemoteExperienceMaker)) == maker_methods
    assert not hasattr(openrlhf.launcher.BaseModelActor, adapter._FORWARD_WITH_ENTROPY)


def test_install_rejects_bad_options():
    with pytest.raises(ValueError, match="advantage"):
        adapter.install("ppo")
    with pytest.raises(ValueError, match="alpha2"):
        adapter.ray_runtime_env(alpha2=0.2)
    with pytest.raises(ValueError, match="beta3"):
        adapter.ray_runtime_env("grpo_s", beta3=1.0)


def test_fused_actor_forward(openrlhf, installed):
    installed()
    actor = make_actor(openrlhf)
    sequences = torch.randint(0, 11, (3, 9))
    action_mask = torch.rand(3, 6) > 0.2
    logp, output = actor(
        sequences, action_mask, torch.ones_like(sequences), return_output=True, return_entropy=True
    )
    expected_logp, expected_entropy = reference_scores(actor, sequences)
    torch.testing.assert_close(logp, expected_logp[:, -6:] * action_mask, **VALUE_TOL)
    torch.testing.assert_close(output.entropy[:, -6:], expected_entropy[:, -6:], **VALUE_TOL)
    assert output.entropy.shape == (3, 8)

    # Training backpropagates through both outputs of the fused pass.
    weights = torch.randn(3, 6)
    (logp * weights + output.entropy[:, -6:]).sum().backward()
    fused_grads = [p.grad.clone() for p in actor.parameters()]
    actor.zero_grad()
    expected_logp, expected_entropy = reference_scores(actor, sequences)
    (expected_logp[:, -6:] * action_mask * weights + expected_entropy[:, -6:]).sum().backward()
    for got, want in zip(fused_grads, [p.grad for p in actor.parameters()], strict=True):
        torch.testing.assert_close(got, want, **GRAD_TOL)

    all_logp = actor(sequences, attention_mask=torch.ones_like(sequences), return_logprobs=True)
    torch.testing.assert_close(all_logp, reference_scores(actor, sequences)[0], **VALUE_TOL)


class LocalActorGroup:
    """A Ray actor group of one policy worker, run in-process (Ray's ``get`` is the identity)."""

    def __init__(self, worker):
        self.worker = worker
        self.methods = []

    def async_run_method_batch(self, method_name, **kwargs):
        self.methods.append(method_name)
        method = getattr(self.worker, method_name)
        rows = zip(*kwargs.values(), strict=True)
        return [[method(**dict(zip(kwargs, row, strict=True))) for row in rows]]


def rollout_samples(openrlhf, n_prompts=3, n_samples=4, seed=0):
    """Single-sample experiences as OpenRLHF's sample generator makes them: a prompt shared by
    its group, responses of different lengths, binary rewards."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_prompts):
        prompt = torch.randint(1, 11, (3,), generator=generator)
        for _ in range(n_samples):
            length = int(torch.randint(2, 7, (), generator=generator))
            response = torch.randint(1, 11, (length,), generator=generator)
            sequences = torch.cat([prompt, response])
            action_mask = torch.zeros(len(sequences) - 1, dtype=torch.long)
            action_mask[len(prompt) - 1 :] = 1
            samples.append(
                openrlhf.experience.Experience(
                    sequences=sequences[None],
                    attention_mask=torch.ones_like(sequences)[None],
                    action_mask=action_mask[None],
                    rewards=torch.randint(0, 2, (1,), generator=generator).float(),
                    info={},
                )
            )
    return samples


def experience_maker(openrlhf, worker, n_samples, micro_batch_size):
    args = SimpleNamespace(
        train=SimpleNamespace(
            dynamic_batch_enable=False,
            colocate_all=False,
            colocate_actor_ref=False,
            colocate_critic_reward=False,
        ),
        ds=SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1),
        rollout=SimpleNamespace(micro_batch_size=micro_batch_size, n_samples_per_prompt=n_samples),
        algo=SimpleNamespace(
            kl=SimpleNamespace(use_loss=True, init_coef=0.0, estimator="k1"),
            advantage=SimpleNamespace(estimator="group_norm", gamma=1.0, no_std_norm=False),
        ),
        reward=SimpleNamespace(clip_range=(-10, 10)),
    )
    maker = openrlhf.experience_maker.RemoteExperienceMaker(
        LocalActorGroup(worker),
        None,
        None,
        None,
        SimpleNamespace(value=0.0),
        SimpleNamespace(args=args),
        SimpleNamespace(pad_token_id=0),
    )
    return maker


@pytest.mark.parametrize("advantage, shaping", [("gtpo", dict(alpha2=0.2)), ("grpo_s", {})])
def test_experience_maker_shapes_advantages(openrlhf, installed, monkeypatch, advantage, shaping):
    installed(advantage, **shaping)
    ray = sys.modules["ray"]
    monkeypatch.setattr(ray, "get", lambda refs: refs, raising=False)
    monkeypatch.setattr(ray, "put", lambda value: value, raising=False)
    worker = openrlhf.launcher.BaseModelActor.__new__(openrlhf.launcher.BaseModelActor)
    worker.actor = make_actor(openrlhf)
    worker.strategy = SimpleNamespace(ring_attn_group=None)
    n_samples = 4
    maker = experience_maker(openrlhf, worker, n_samples, micro_batch_size=5)
    samples = rollout_samples(openrlhf, n_samples=n_samples)

    experiences = maker.make_experience_batch(samples)

    assert maker.actor_model_group.methods == [adapter._FORWARD_WITH_ENTROPY]
    width = max(e.action_mask.shape[1] for e in experiences)
    logp, entropy, masks = [], [], []
    for e in experiences:
        mask = e.action_mask.bool()
        expected_logp, expected_entropy = reference_scores(worker.actor, e.sequences)
        torch.testing.assert_close(e.action_log_probs, expected_logp * mask, **VALUE_TOL)
        entropy.append(F.pad(expected_entropy * mask, (0, width - mask.shape[1])))
        masks.append(F.pad(mask, (0, width - mask.shape[1])))
        logp.append(e.action_log_probs)
    entropy, mask = torch.cat(entropy), torch.cat(masks)
    rewards = torch.cat([e.rewards for e in experiences])
    groups = torch.tensor(list(itertools.chain(*(e.index for e in experiences)))) // n_samples
    shape = getattr(entropy_kernels, f"{advantage}_advantages")
    expected = shape(rewards, entropy, mask, groups, **shaping)
    if advantage == "grpo_s":
        expected = expected[:, None] * mask
    got = torch.cat([F.pad(e.advantages, (0, width - e.advantages.shape[1])) for e in experiences])
    torch.testing.assert_close(got, expected, **VALUE_TOL)
    assert got.abs().sum() > 0


def test_experience_maker_rejects_kl_in_reward(openrlhf, installed):
    installed("gtpo")
    maker = experience_maker(openrlhf, None, n_samples=4, micro_batch_size=4)
    maker.initial_model_group = object()
    maker.strategy.args.algo.kl = SimpleNamespace(use_loss=False, init_coef=0.01)
    with pytest.raises(ValueError, match="use_loss"):
        maker.make_experience_batch([])


# ---------------------------------------------------------------------------------------------
# The fused linear path: hidden states and the LM head, no logits


def actor_scores(actor, sequences, action_mask, weights):
    logp, output = actor(
        sequences,
        action_mask,
        torch.ones_like(sequences),
        return_output=True,
        return_entropy=True,
    )
    entropy = output.entropy[:, -action_mask.shape[1] :]
    actor.zero_grad()
    (logp * weights[0] + entropy * weights[1]).sum().backward()
    return logp, output.entropy, [p.grad.clone() for p in actor.parameters()], output


def test_actor_scores_from_hidden_states(openrlhf, installed, monkeypatch):
    """With an HF causal LM the patched actor scores from the backbone's hidden states and
    ``lm_head.weight`` (no logits), equal to OpenRLHF's own logits path, gradients included."""
    actor = openrlhf.actor.Actor(tiny_causal_lm(), temperature=0.7)
    actor.packing_samples = False
    generator = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, 29, (3, 10), generator=generator)
    action_mask = torch.rand(3, 6, generator=generator) > 0.2
    weights = torch.randn(2, 3, 6, generator=generator)
    # OpenRLHF's maths (its logits path, in plain PyTorch: flash-attn is stubbed here).
    want_logp, want_entropy = reference_scores(actor, sequences)
    want_logp = want_logp[:, -6:] * action_mask
    (want_logp * weights[0] + want_entropy[:, -6:] * weights[1]).sum().backward()
    want = (want_logp, want_entropy, [p.grad.clone() for p in actor.parameters()])

    installed()
    calls = []
    for name in ("logprobs_and_entropy", "linear_logprobs_and_entropy"):
        function = getattr(entropy_kernels, name)
        monkeypatch.setattr(
            entropy_kernels,
            name,
            lambda *a, _f=function, _n=name, **k: calls.append(_n) or _f(*a, **k),
        )
    got = actor_scores(actor, sequences, action_mask, weights)
    assert calls == ["linear_logprobs_and_entropy"], calls
    assert "logits" not in got[3], "the linear path forms no logits"
    torch.testing.assert_close(got[0], want[0], **VALUE_TOL)
    # OpenRLHF's layout [B, S - 1]; the caller reads the response window.
    assert got[1].shape == want[1].shape == (3, 9)
    torch.testing.assert_close(got[1][:, -6:], want[1][:, -6:], **VALUE_TOL)
    for value, expected in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(value, expected, **GRAD_TOL)

    # Heads the linear path cannot express keep the fused logits path.
    calls.clear()
    actor.model.config.final_logit_softcapping = 30.0
    try:
        actor(sequences, action_mask, torch.ones_like(sequences))
    finally:
        del actor.model.config.final_logit_softcapping
    assert calls == ["logprobs_and_entropy"], calls


@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("is_correction_level", ["off", "token"])
def test_fused_linear_policy_loss_matches_policy_loss(
    openrlhf, policy_loss_type, is_correction_level
):
    _, tokens, old, rollout, advantages, mask = loss_inputs(seed=3)
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(4, 7, 6, generator=generator)
    weight = torch.randn(13, 6, generator=generator)
    bias = torch.randn(13, generator=generator)
    options = dict(
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        dual_clip=3.0 if policy_loss_type == "ppo" else None,
        policy_loss_type=policy_loss_type,
        is_correction_level=is_correction_level,
    )
    loss_args = (old, advantages, mask, rollout)
    results = []
    for fused in (True, False):
        inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        if fused:
            loss_fn = adapter.FusedLinearPolicyLoss(**options, temperature=0.9)
            out = loss_fn(*inputs[:2], tokens, *loss_args, bias=inputs[2])
        else:
            logits = (inputs[0] @ inputs[1].T + inputs[2]) / 0.9
            log_probs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
            out = openrlhf.loss.PolicyLoss(**options)(log_probs, *loss_args)
        out[0].backward()
        results.append((out, [t.grad for t in inputs]))
    (got, got_grads), (want, want_grads) = results
    for value, expected in zip(got, want, strict=True):
        if expected is None:
            assert value is None
        else:
            torch.testing.assert_close(value.detach(), expected.detach(), **VALUE_TOL)
    for value, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(value, expected, **GRAD_TOL)
