"""The LM head of a TRL policy for ``GTPOTrainer``'s fused-linear path.

TRL 1.16 scores through ``add_fused_lm_head``: the model's forward, patched, runs the backbone
and multiplies its last hidden states by ``get_output_embeddings().weight`` (and bias) in tiles.
This module mirrors that layout for the linear functions of ``entropy_kernels``: the forward of
the (PEFT-unwrapped) model gains a ``linear_head`` keyword, a callable that receives a
:class:`LinearScorer` built from the backbone's last hidden states and the head's weight and
bias. The call goes through ``model(...)``, so wrappers (DDP, FSDP2, PEFT, accelerate's
autocast) see a forward, as with TRL's head.

Handled as TRL handles them: tied embeddings (the head weight is the embedding matrix, its
gradient reaches both uses), PEFT adapters outside the head (TRL itself refuses one on the
head), FSDP2 DTensor weights (gathered with ``full_tensor``, gradients flow back to the
shards), logit scaling (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``,
``logits_scaling``: a positive scale ``s`` folds into the temperature, ``T / s``) and the MoE
router loss. Not handled, hence the logits path (a one-time warning with
``fused_lm_head=None``, a ``ValueError`` with ``fused_lm_head=True``): final-logit
softcapping, a non-positive logit scale, vision-language models (a text config apart from the
model's), DeepSpeed ZeRO-3 (the head weight is partitioned outside its module's forward), and
any head that is not an ``nn.Linear`` with a ``[V, H]`` weight.

The head is applied outside autocast with the hidden states cast to the weight's dtype, so the
logits are formed from the head's own precision with float32 accumulation (bf16 under autocast
for TRL's head unless ``cast_lm_head_to_fp32``).
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model

import entropy_kernels


@dataclass(frozen=True)
class LogitsScorer:
    """Scores from materialised completion logits ``[B, T, V]``."""

    logits: torch.Tensor
    temperature: float

    def logprobs_and_entropy(self, tokens):
        return entropy_kernels.logprobs_and_entropy(
            self.logits, tokens, temperature=self.temperature
        )

    def policy_loss(self, tokens, advantages, mask, **options):
        return entropy_kernels.policy_loss(
            self.logits, tokens, advantages, mask, temperature=self.temperature, **options
        )


@dataclass(frozen=True)
class LinearScorer:
    """Scores from hidden states ``[B, T, H]`` and the head: no ``[B, T, V]`` tensor."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    temperature: float

    def logprobs_and_entropy(self, tokens):
        return entropy_kernels.linear_logprobs_and_entropy(
            self.hidden, self.weight, tokens, bias=self.bias, temperature=self.temperature
        )

    def policy_loss(self, tokens, advantages, mask, **options):
        return entropy_kernels.linear_policy_loss(
            self.hidden,
            self.weight,
            tokens,
            advantages,
            mask,
            bias=self.bias,
            temperature=self.temperature,
            **options,
        )


def logit_scale(text_config) -> float:
    """The factor the model multiplies its logits by, read as TRL 1.16 reads it."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    scaling = getattr(text_config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else float(scale)


def unsupported_reason(model) -> str | None:
    """Why the linear path cannot score ``model`` (a ``PreTrainedModel``), or None."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    text_config = model.config.get_text_config()
    head = model.get_output_embeddings()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        return "the model softcaps its logits (final_logit_softcapping)"
    if not logit_scale(text_config) > 0:
        return f"the model's logit scale is {logit_scale(text_config)}, not positive"
    if text_config is not model.config:
        return "vision-language models (a separate text config) are not handled"
    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions the head weight outside its forward"
    if type(head) is not torch.nn.Linear or head.weight.dim() != 2:
        return f"the output embeddings are a {type(head).__name__}, not an nn.Linear"
    return None


def resolve_linear_head(model, requested: bool | None) -> bool:
    """Whether ``GTPOTrainer`` scores ``model`` on the linear path (``fused_lm_head``)."""
    if requested is False:
        return False
    base = model.get_base_model() if is_peft_model(model) else model
    reason = unsupported_reason(base)
    if reason is None:
        return True
    if requested:
        raise ValueError(f"fused_lm_head=True cannot be honoured: {reason}.")
    warnings.warn(
        f"GTPOTrainer scores through the model's logits, not the fused linear head: {reason}.",
        stacklevel=3,
    )
    return False


def add_linear_head(model, temperature: float) -> None:
    """Patch ``model.forward``: ``model(..., linear_head=fn)`` returns ``(fn(scorer), aux_loss)``.

    ``scorer`` is a :class:`LinearScorer` over the hidden states predicting the last
    ``logits_to_keep`` tokens (keyword required), ``aux_loss`` the MoE router loss when
    ``output_router_logits=True``, else None. Without ``linear_head`` the forward is unchanged.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    original_forward = base.forward
    text_config = base.config.get_text_config()
    temperature = temperature / logit_scale(text_config)

    @functools.wraps(type(base).forward)
    def forward(self, *args, linear_head=None, **kwargs):
        if linear_head is None:
            return original_forward(*args, **kwargs)
        keep = kwargs.pop("logits_to_keep")
        kwargs["use_cache"] = False
        outputs = self.base_model(*args, **kwargs)
        head = self.get_output_embeddings()
        weight, bias = _whole(head.weight), _whole(head.bias)
        hidden = outputs.last_hidden_state[:, -keep - 1 : -1]
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            result = linear_head(LinearScorer(hidden, weight, bias, temperature))
        return result, _router_loss(self, text_config, outputs, kwargs)

    base.forward = types.MethodType(forward, base)


def _whole(param):
    """An FSDP2 DTensor parameter gathered whole (differentiable, as TRL's head does)."""
    return param.full_tensor() if type(param).__name__ == "DTensor" else param


def _router_loss(model, text_config, outputs, kwargs):
    """The MoE load-balancing loss the model's own forward would return (TRL's choice)."""
    if not kwargs.get("output_router_logits"):
        return None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(
        outputs.router_logits,
        getattr(model, "num_experts", None) or text_config.num_experts,
        getattr(model, "num_experts_per_tok", None) or text_config.num_experts_per_tok,
        kwargs.get("attention_mask"),
    )
