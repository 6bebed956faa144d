"""GTPOTrainer against TRL's own GRPOTrainer, on CPU with a tiny Qwen2 built in code."""

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 saved locally, so TRL can also load it as the reference model (beta > 0)."""
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = Qwen2Config(
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
    )
    path = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def reward_more_a_than_b(completions, **kwargs):
    # Spread-out rewards: groups rarely tie, so advantages (and the surrogate) rarely vanish.
    return [float(c.count("a") - c.count("b")) for c in completions]


class CheckedGTPOTrainer(GTPOTrainer):
    """Checks, on every micro-batch, the fused loss and its gradient against GRPOTrainer's."""

    checked_batches = 0
    ragged_batches = 0  # batches whose completions differ in length: the normalisers then differ

    def _compute_loss(self, model, inputs):
        fused = super()._compute_loss(model, inputs)
        lengths = inputs["completion_mask"].sum(1)
        self.ragged_batches += int(bool((lengths != lengths[0]).any()))
        self._assert_matches_trl(model, inputs, fused)
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
            self._assert_matches_trl(model, off_policy, super()._compute_loss(model, off_policy))
        finally:
            self.use_vllm = False
        self.checked_batches += 1
        return fused

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

    def _assert_matches_trl(self, model, inputs, fused):
        expected = trl.GRPOTrainer._compute_loss(self, model, inputs)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
        params = [p for p in model.parameters() if p.requires_grad]
        fused_grads = torch.autograd.grad(fused, params, retain_graph=True)
        expected_grads = torch.autograd.grad(expected, params)
        for got, want in zip(fused_grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def run_trainer(model_dir, tmp_path, **options):
    args = GTPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
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
        model=model_dir, reward_funcs=reward_more_a_than_b, args=args, train_dataset=dataset
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


@pytest.mark.parametrize(
    "option",
    [
        dict(loss_type="cispo"),
        dict(importance_sampling_level="sequence"),
        dict(top_entropy_quantile=0.2),
        dict(delta=2.0),
        dict(off_policy_mask_threshold=0.5),
        dict(use_adaptive_entropy=True),
        dict(beta=0.04, use_bias_correction_kl=True),
        dict(advantage_shaping="gspo"),
    ],
)
def test_unsupported_options_raise(tmp_path, option):
    with pytest.raises(ValueError, match="does not support|must be one of"):
        GTPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **option)
