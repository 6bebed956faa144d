"""A tiny randomly initialised HF causal LM for adapter tests (no download)."""

from __future__ import annotations

import pytest
import torch


def tiny_causal_lm(seed=0, vocab=29):
    """A two-layer Qwen2 causal LM in float32 with an untied, widely spread LM head."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen2Config"):
        pytest.skip("transformers is stubbed here")
    config = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits with realistic spread
    return model
