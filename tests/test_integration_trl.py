"""GTPOTrainer against TRL's own GRPOTrainer, on CPU with a tiny Qwen2 built in code."""

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

import entropy_kernels  # noqa: E402
from entropy_kernels.integrations.trl import GTPOConfig, GTPOTrainer  # noqa: E402

CHARS = "abc"


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_config(config_type, tokenizer, **options):
    return config_type(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        # Wider than the default 0.02, so entropies differ between tokens: with near-equal
        # entropies GTPO's whitening divides by a tiny spread and amplifies rounding.
        initializer_range=0.2,
        **options,
    )


def save_tiny_model(tmp_path_factory, name, model):
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 saved locally, so TRL can also load it as the reference model (beta > 0)."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config(Qwen2Config, char_tokenizer()))
    return save_tiny_model(tmp_path_factory, "tiny-qwen2", model)


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    """A tiny Qwen2-MoE: TRL adds its router load-balancing loss to the policy loss."""
    torch.manual_seed(0)
    config = tiny_config(
        Qwen2MoeConfig,
        char_tokenizer(),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        router_aux_loss_coef=0.05,
    )
    return save_tiny_model(tmp_path_factory, "tiny-qwen2-moe", Qwen2MoeForCausalLM(config))


def reward_more_a_than_b(completions, **kwargs):
    # Spread-out rewards: groups rarely tie, so advantages (and the surrogate) rarely vanish.
    return [float(c.count("a") - c.count("b")) for c in completions]


# GRPOTrainer state its _compute_loss updates (adaptive entropy control): every loss computed
# for a check starts from the state before the micro-batch, training goes on from the first's.
ENTROPY_STATE = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")


class CheckedGTPOTrainer(GTPOTrainer):
    """Checks, on every micro-batch, the fused loss and its gradient against GRPOTrainer's."""

    checked_batches = 0
    ragged_batches = 0  # batches whose completions differ in length: the normalisers then differ
    fused_scoring_calls = 0  # scoring passes of GRPOTrainer's own loss served by the fused op

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        self.fused_scoring_calls += int(self._fused_scoring)
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _compute_loss(self, model, inputs):
        before = {name: getattr(self, name) for name in ENTROPY_STATE}
        fused = super()._compute_loss(model, inputs)
        after = {name: getattr(self, name) for name in ENTROPY_STATE}
        try:
            checked = fused
            if self._fused_loss:
                # The fused linear loss forms its gradient in the forward pass and hands it over
                # once (to training): the checks differentiate a second, equal evaluation.
                self._restore(before)
                checked = super()._compute_loss(model, inputs)
                torch.testing.assert_close(checked, fused, rtol=0, atol=0)
            self._checks(model, inputs, checked, before)
        finally:
            for name, value in after.items():
                setattr(self, name, value)
        return fused

    def _checks(self, model, inputs, fused, state):
        lengths = inputs["completion_mask"].sum(1)
        self.ragged_batches += int(bool((lengths != lengths[0]).any()))
        self._assert_matches_trl(model, inputs, fused, state)
        # The same batch off-policy, with a vLLM-style importance-sampling ratio: clipping acts.
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model,
                torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                inputs["completion_ids"].size(1),
            )
        generator = torch.Generator().manual_seed(self.checked_batches)
        off_policy = {
            **inputs,
            # Perturbed log-probs stay log-probs (<= 0): policy_loss rejects positive ones.
            "old_per_token_logps": (
                logps + 0.3 * torch.randn(logps.shape, generator=generator)
            ).clamp_max(0.0),
            "importance_sampling_ratio": 2 * torch.rand(logps.shape, generator=generator),
        }
        self.use_vllm = self.vllm_importance_sampling_correction = True
        try:
            self._restore(state)
            fused_off_policy = super()._compute_loss(model, off_policy)
            self._assert_matches_trl(model, off_policy, fused_off_policy, state)
        finally:
            self.use_vllm = False
        self.checked_batches += 1

    def _restore(self, state):
        for name, value in state.items():
            setattr(self, name, value)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.advantage_shaping != "grpo":
            self._assert_shaped_from_rollout_entropy(output)
        return output

    def _assert_shaped_from_rollout_entropy(self, output):
        """The shaped advantages, recomputed from the entropy of TRL's own scoring."""
        with torch.no_grad():
            _, entropy, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
                torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                output["completion_ids"].size(1),
                compute_entropy=True,
            )
        rewards = self._rewards_per_func.sum(dim=1)
        mask = output["completion_mask"].bool()
        shaping = {
            "gtpo": entropy_kernels.gtpo_advantages,
            "grpo_s": entropy_kernels.grpo_s_advantages,
        }
        expected = shaping[self.args.advantage_shaping](
            rewards, entropy, mask, self.num_generations
        )
        assert expected.abs().sum() > 0
        # A whitening set whose shaped rewards are equal up to eps (e.g. lone failures) divides
        # float32 rounding by sqrt(1e-8): agreement to 1e-3, not to the entropy's 1e-6.
        torch.testing.assert_close(output["advantages"], expected, rtol=1e-4, atol=1e-3)

    def _assert_matches_trl(self, model, inputs, fused, state):
        # TRL's loss with TRL's own scoring (its fused LM head), from the same controller state.
        self._restore(state)
        expected = trl.GRPOTrainer._compute_loss(self, model, inputs)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
        params = [p for p in model.parameters() if p.requires_grad]
        fused_grads = torch.autograd.grad(fused, params, retain_graph=True)
        expected_grads = torch.autograd.grad(expected, params)
        for got, want in zip(fused_grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def reward_mixed_outcomes(completions, **kwargs):
    # Every group (consecutive completions of one prompt) holds successes and failures, so
    # filter_groups (the default) leaves shaped advantages to check: the tiny model's
    # completions of one prompt are often alike, which would make any text-based reward tie.
    return [float(i % 2) for i in range(len(completions))]


def run_trainer(model, tmp_path, reward_funcs=None, processing_class=None, max_steps=2, **options):
    if reward_funcs is None:
        # Entropy shaping filters uniform groups (its default): give it groups of both outcomes.
        shaped = options.get("advantage_shaping", "gtpo") != "grpo"
        reward_funcs = reward_mixed_outcomes if shaped else reward_more_a_than_b
    args = GTPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=max_steps,
        learning_rate=2e-3,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **options,
    )
    dataset = Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc", "ca", "abc"]})
    trainer = CheckedGTPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=processing_class,
    )
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    return trainer, initial


GRPO_CASES = {
    "dapo": dict(
        loss_type="dapo",
        beta=0.04,
        gradient_accumulation_steps=2,
        num_iterations=2,
        epsilon_high=0.28,
        entropy_coef=0.01,
    ),
    "grpo": dict(
        loss_type="grpo",
        beta=0.04,
        gradient_accumulation_steps=2,
        temperature=0.7,
        entropy_coef=0.01,
        mask_truncated_completions=True,
    ),
    "bnpo": dict(loss_type="bnpo", steps_per_generation=2, entropy_coef=0.01),
    "dr_grpo": dict(
        loss_type="dr_grpo", beta=0.04, gradient_accumulation_steps=2, entropy_coef=0.01
    ),
}


@pytest.mark.parametrize("loss_type", sorted(GRPO_CASES))
def test_grpo_shaping_loss_equals_trl(model_dir, tmp_path, loss_type):
    trainer, _ = run_trainer(model_dir, tmp_path, advantage_shaping="grpo", **GRPO_CASES[loss_type])
    assert trainer._fused_loss and trainer.fused_scoring_calls == 0
    assert trainer._linear_head  # the default: hidden states and the head weight, no logits
    micro_batches = 2 * trainer.args.gradient_accumulation_steps
    assert trainer.checked_batches == micro_batches
    assert trainer.ragged_batches > 0
    assert trainer.state.global_step == 2
    logged = trainer.state.log_history[0]
    assert "clip_ratio/region_mean" in logged and "entropy" in logged


@pytest.mark.parametrize("shaping", ["gtpo", "grpo_s"])
def test_entropy_shaping_trains(model_dir, tmp_path, shaping):
    # Also checked on every batch: the shaped advantages against TRL's own entropy, and the loss
    # against GRPOTrainer's, which takes [B, T] (GTPO) as well as [B] (GRPO-S) advantages.
    trainer, initial = run_trainer(
        model_dir,
        tmp_path,
        advantage_shaping=shaping,
        gradient_accumulation_steps=2,
        epsilon_high=0.28,
        temperature=0.8,
    )
    assert trainer.checked_batches == 4
    params = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, initial, strict=True))
    assert f"{shaping}/rollout_entropy" in trainer.state.log_history[0]
    assert f"{shaping}/filtered_fraction" in trainer.state.log_history[0]


# Options beyond the clip. Fused: objectives of entropy_kernels.objectives; the others run
# GRPOTrainer's own loss on the fused scoring. Either way checked against GRPOTrainer with its
# own scoring on every micro-batch (on- and off-policy). Grouped so that each option runs at
# least once, each with entropy shaping or TRL's advantages. Case -> (options, fused).
OBJECTIVE_CASES = {
    "cispo-gspo-entropy_quantile-gtpo": (
        dict(
            loss_type="cispo",
            importance_sampling_level="sequence",
            top_entropy_quantile=0.5,
            epsilon_high=5.0,
            advantage_shaping="gtpo",
        ),
        False,
    ),
    "sapo-off_policy_mask-bias_corrected_kl": (
        dict(
            loss_type="sapo",
            off_policy_mask_threshold=0.05,
            beta=0.04,
            use_bias_correction_kl=True,
            advantage_shaping="grpo",
        ),
        False,
    ),
    "vespo-adaptive_entropy-grpo_s": (
        dict(
            loss_type="vespo",
            use_adaptive_entropy=True,
            entropy_coef=0.01,
            entropy_target=10.0,
            advantage_shaping="grpo_s",
        ),
        False,
    ),
    "luspo-delta-gtpo": (
        dict(loss_type="luspo", delta=1.1, entropy_coef=0.01, advantage_shaping="gtpo"),
        True,
    ),
    "cispo-grpo_s": (
        dict(loss_type="cispo", epsilon_high=1.1, beta=0.04, advantage_shaping="grpo_s"),
        True,
    ),
    "sapo-gtpo": (
        dict(
            loss_type="sapo",
            sapo_temperature_neg=1.5,
            entropy_coef=0.01,
            advantage_shaping="gtpo",
        ),
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(OBJECTIVE_CASES))
def test_objectives_equal_trl_loss(model_dir, tmp_path, case):
    options, fused = OBJECTIVE_CASES[case]
    trainer, initial = run_trainer(
        model_dir, tmp_path, gradient_accumulation_steps=2, max_steps=1, **options
    )
    assert trainer._fused_loss == fused
    assert trainer.checked_batches == 2
    # Each check runs our loss twice (on- and off-policy), each with one fused scoring pass
    # when GRPOTrainer's own loss computes it.
    assert trainer.fused_scoring_calls == (0 if fused else 2 * trainer.checked_batches)
    params = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, initial, strict=True))


def test_moe_router_loss_runs_trl_loss_on_fused_scoring(moe_model_dir, tmp_path):
    trainer, _ = run_trainer(
        moe_model_dir, tmp_path, loss_type="dapo", advantage_shaping="gtpo", max_steps=1
    )
    assert trainer.aux_loss_enabled and not trainer._fused_loss
    assert trainer.fused_scoring_calls == 2 * trainer.checked_batches == 2
    assert "aux_loss" in trainer.state.log_history[0]


def test_unknown_options_raise(tmp_path):
    with pytest.raises(ValueError, match="must be one of"):
        GTPOConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            bf16=False,
            report_to="none",
            advantage_shaping="gspo",
        )
