"""GTPOTrainer's fused-linear path (hidden states and the LM head weight, no logits) against
TRL's GRPOTrainer: loss and gradient on every micro-batch, untied heads with a bias, scaled
logits, and the models it hands to the logits path."""

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from test_integration_trl import (  # noqa: E402
    char_tokenizer,
    model_dir,  # noqa: F401 (fixture)
    run_trainer,
    tiny_config,
)
from transformers import (  # noqa: E402
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from entropy_kernels.integrations._trl_head import resolve_linear_head  # noqa: E402

FUSED_CLIP = dict(
    loss_type="dapo", advantage_shaping="grpo", gradient_accumulation_steps=2, entropy_coef=0.01
)
TRL_MATHS = dict(
    loss_type="cispo",
    importance_sampling_level="sequence",
    epsilon_high=5.0,
    advantage_shaping="gtpo",
    gradient_accumulation_steps=2,
)


def untied_model_with_bias():
    """A tiny Qwen2 whose LM head is its own matrix plus a bias (TRL's head reads both)."""
    torch.manual_seed(1)
    config = tiny_config(Qwen2Config, char_tokenizer())
    config.tie_word_embeddings = False
    model = Qwen2ForCausalLM(config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
        model.lm_head.bias.normal_(0.0, 1.0)
    return model


def run_linear(model, tmp_path, **options):
    trainer, initial = run_trainer(model, tmp_path, processing_class=char_tokenizer(), **options)
    assert trainer._linear_head
    assert trainer.checked_batches == 4
    params = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, initial, strict=True))
    return trainer


@pytest.mark.parametrize("options", [FUSED_CLIP, TRL_MATHS], ids=["fused-clip", "trl-maths"])
def test_untied_head_with_bias_equals_trl(tmp_path, options):
    model = untied_model_with_bias()
    bias = model.lm_head.bias.detach().clone()
    trainer = run_linear(model, tmp_path, **options)
    assert trainer.model.get_output_embeddings().bias is not None
    # The bias is trained: its gradient came through the linear head.
    assert not torch.equal(trainer.model.get_output_embeddings().bias, bias)
    assert trainer._fused_loss == (options is FUSED_CLIP)


def test_scaled_logits_equal_trl(tmp_path):
    # Cohere multiplies its logits by logit_scale: folded into the linear head's temperature.
    torch.manual_seed(2)
    config = tiny_config(CohereConfig, char_tokenizer(), logit_scale=0.5)
    run_linear(CohereForCausalLM(config), tmp_path, temperature=0.8, **FUSED_CLIP)


def test_logits_path_still_equals_trl(model_dir, tmp_path):  # noqa: F811
    trainer, _ = run_trainer(model_dir, tmp_path, fused_lm_head=False, **FUSED_CLIP)
    assert not trainer._linear_head and trainer.checked_batches == 4


def test_softcapped_model_takes_logits_path_or_raises():
    torch.manual_seed(3)
    config = tiny_config(Gemma2Config, char_tokenizer(), head_dim=8, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config)
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        assert not resolve_linear_head(model, None)
    with pytest.raises(ValueError, match="fused_lm_head=True.*softcap"):
        resolve_linear_head(model, True)
    assert not resolve_linear_head(model, False)
    # Remove the softcap: the same model is scored on the linear path, asked or not.
    model.config.final_logit_softcapping = None
    assert resolve_linear_head(model, None) and resolve_linear_head(model, True)


@pytest.mark.parametrize("options", [FUSED_CLIP, TRL_MATHS], ids=["fused-clip", "trl-maths"])
def test_peft_model_equals_trl(tmp_path, options):
    """A LoRA-wrapped model (PEFT) is scored on the linear path from its base model's head;
    the adapters train, the frozen head and embeddings do not, and every micro-batch's loss and
    gradient equal GRPOTrainer's."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    base = Qwen2ForCausalLM(tiny_config(Qwen2Config, char_tokenizer()))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, lora)
    head = model.get_output_embeddings().weight.detach().clone()
    trainer = run_linear(model, tmp_path, **options)
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name for name in names)
    assert torch.equal(trainer.model.get_output_embeddings().weight, head)
