"""OpenRLHF adapter: the scoring that the patched actor and policy workers run.

- The two paths of the patched ``Actor.forward``: from the float32 logits of OpenRLHF's own
  forward (:func:`_logits_scores`), or from the backbone's last hidden states and the LM head
  without any logits (:func:`_backbone_and_head`, :func:`_linear_scores`).
- The module functions that packed samples keep calling (``compute_entropy``,
  ``log_probs_from_logits``).
- The policy worker's forward that also returns the entropy of the old-log-prob pass
  (:func:`_policy_forward_with_entropy`).

Part of :mod:`entropy_kernels.integrations.openrlhf`, which applies the patches. Importing this
module never imports OpenRLHF.
"""

from __future__ import annotations

import torch

import entropy_kernels
from entropy_kernels.weights import is_zero3_param


def _logits_scores(actor, original, sequences, attention_mask, start, ring, packed, mm_inputs):
    """OpenRLHF's forward up to the float32, temperature-scaled logits; scoring is ours."""
    output = original(
        actor,
        sequences,
        None,
        attention_mask,
        return_output=True,
        ring_attn_group=ring,
        packed_seq_lens=packed,
        **mm_inputs,
    )
    logprobs, entropy = entropy_kernels.logprobs_and_entropy(
        output["logits"][:, start:-1], sequences[:, start + 1 :]
    )
    return output, logprobs, entropy


def _backbone_and_head(actor):
    """``(backbone, lm_head)`` when the actor's logits are exactly ``lm_head(backbone(...)[0])``
    (a plain ``nn.Linear`` head on a decoder, as HF causal LMs and their PEFT wrappers are), else
    None: soft-capped or scaled logits, MoE router outputs (their aux loss comes with the
    logits), vision-language models and ZeRO-3-partitioned heads keep the logits path."""
    model = actor.model
    config = getattr(model, "config", None)
    if config is None or getattr(actor, "is_vlm", False):
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(
        config, "output_router_logits", False
    ):
        return None
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    get_head, get_decoder = (
        getattr(model, n, None) for n in ("get_output_embeddings", "get_decoder")
    )
    if not (callable(get_head) and callable(get_decoder)):
        return None
    head, backbone = get_head(), get_decoder()
    if type(head) is not torch.nn.Linear or backbone is None or backbone is model:
        return None
    if is_zero3_param(head.weight):
        return None
    return backbone, head


def _linear_scores(actor, backbone, head, sequences, attention_mask, start, mm_inputs):
    """Log-probs and entropy from the backbone's last hidden states and the LM head, with
    OpenRLHF's position ids and temperature; the output is the backbone's (no logits)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    output = backbone(
        sequences, attention_mask=attention_mask, position_ids=position_ids, **mm_inputs
    )
    hidden = output[0]
    logprobs, entropy = entropy_kernels.linear_logprobs_and_entropy(
        hidden[:, start:-1],
        head.weight,
        sequences[:, start + 1 :],
        bias=head.bias,
        temperature=actor.temperature,
    )
    return output, logprobs, entropy


def _entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return entropy_kernels.logprobs_and_entropy(logits, tokens, validate=False)[1]


def _log_probs_of_labels(logits, labels, temperature: float = 1.0) -> torch.Tensor:
    return entropy_kernels.logprobs_and_entropy(logits, labels, temperature=temperature)[0]


def _policy_forward_with_entropy(
    self,
    sequences,
    action_mask=None,
    attention_mask=None,
    packed_seq_lens=None,
    mm_train_inputs_list=None,
):
    """``PolicyModelActor.forward`` that also returns the entropy of the same pass, both ``[B, A]``
    on the CPU, zero outside ``action_mask``."""
    from openrlhf.utils.vlm_utils import merge_mm_train_inputs

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    mm_inputs = {}
    if mm_train_inputs_list and getattr(self.actor, "is_vlm", False):
        mm_inputs = merge_mm_train_inputs(mm_train_inputs_list, device)
    action_mask = action_mask.to(device)
    self.actor.eval()
    with torch.no_grad():
        action_log_probs, output = self.actor(
            sequences.to(device),
            action_mask,
            attention_mask.to(device),
            return_output=True,
            return_entropy=True,
            ring_attn_group=self.strategy.ring_attn_group,
            **mm_inputs,
        )
    self.actor.train()
    entropy = output.entropy[:, -action_mask.shape[1] :] * action_mask
    return action_log_probs.to("cpu"), entropy.to("cpu")
