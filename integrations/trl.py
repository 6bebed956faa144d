"""TRL adapter: ``GRPOTrainer`` with the fused policy loss and GTPO / GRPO-S advantage shaping.

``GTPOTrainer`` replaces two pieces of ``trl.GRPOTrainer`` (tested with TRL 1.16):

- ``_compute_loss``: the backbone's last hidden states at the completion positions and the LM
  head go into :func:`entropy_kernels.linear_policy_loss` (or, on the logits path, the logits
  as a strided view into :func:`entropy_kernels.policy_loss`), which computes the clipped
  surrogate, the k3 KL term and the entropy bonus in one pass over the vocabulary. With
  ``advantage_shaping="grpo"`` the loss equals the one ``GRPOTrainer`` computes for
  ``loss_type`` in ``dapo``, ``grpo``, ``bnpo``, ``dr_grpo``, ``luspo`` (with or without
  ``delta``), ``cispo`` and ``sapo`` (objectives of :mod:`entropy_kernels.objectives`, fused
  like the clip on the Triton backend), including gradient accumulation and vLLM
  importance-sampling correction.
- ``_generate_and_score_completions`` (``"gtpo"`` / ``"grpo_s"`` only): after TRL has generated
  and rewarded the completions, a no-grad scoring pass of the policy over the generation batch
  (``linear_logprobs_and_entropy`` / ``logprobs_and_entropy``) yields the rollout entropy, and
  the advantages are reshaped over complete prompt groups, gathered across processes like
  TRL's rewards.

The scoring pass costs one extra no-grad forward of the policy over every generated sequence
(prompt + completion), chunked by ``per_device_train_batch_size``, plus one read of the
completion logits: about a third of the forward + backward of one optimisation pass over the
same batch. It is not shared with TRL's own old-log-prob pass (run when
``gradient_accumulation_steps`` is not a multiple of ``steps_per_generation * num_iterations``,
or with vLLM importance sampling).

Like TRL 1.16's chunked fused LM head, the adapter never materialises the logits
(``GTPOConfig.fused_lm_head``, on by default where the model allows it): the loss and both
scoring passes run the backbone and hand its last hidden states and the LM head weight (and
bias) to the ``entropy_kernels.linear_*`` functions, which form the logits tile by tile with
float32 accumulation (``_trl_head`` lists what is handled: tied embeddings, PEFT, FSDP2 DTensor
weights, logit scaling; softcapping, ZeRO-3 and vision-language models take the logits path).
On the logits path (``fused_lm_head=False``) the completion logits ``[B, T + 1, V]`` are
materialised in the model's dtype; under bf16, ``cast_lm_head_to_fp32=True`` then gives logits,
hence losses, identical to TRL's.

Every other ``GRPOConfig`` option of TRL 1.16 is accepted; the loss is then TRL's own
``GRPOTrainer._compute_loss`` (its maths, its metrics), served with log-probs and entropy from
the fused scoring op instead of TRL's LM head: ``loss_type="vespo"``,
``importance_sampling_level="sequence"`` (GSPO), ``top_entropy_quantile < 1``,
``off_policy_mask_threshold``, ``use_adaptive_entropy``, ``use_bias_correction_kl=True`` with
``beta != 0``, the MoE router auxiliary loss, ``cispo`` with ``epsilon_high < 1``.
:func:`fused_loss_applies` tells which path a configuration takes.

:class:`GTPOConfig`, :func:`fused_loss_applies` and the tables of TRL's names live in
``_trl_config.py``, the fused LM head in ``_trl_head.py``; this module holds ``GTPOTrainer``
and re-exports the rest.
"""

from __future__ import annotations

import inspect

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

import entropy_kernels
from entropy_kernels.advantages import group_layout, success_outcomes, uniform_group_rows

from ._trl_config import ADVANTAGE_NORMALIZE as ADVANTAGE_NORMALIZE
from ._trl_config import ADVANTAGE_SCOPES as ADVANTAGE_SCOPES
from ._trl_config import ADVANTAGE_SHAPINGS as ADVANTAGE_SHAPINGS
from ._trl_config import (
    CLIP_LOSS_TYPES,
    EXTRA_MODEL_INPUTS,
    LOSS_TYPE_AGGREGATION,
    ROW_INDEXED_INPUTS,
    TRL_METRIC_NAMES,
    UNLOGGED_METRICS,
    GTPOConfig,
    fused_loss_applies,
    trl_objective,
)
from ._trl_head import LogitsScorer, add_linear_head, resolve_linear_head


class GTPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is :func:`entropy_kernels.policy_loss` and whose advantages are
    shaped by GTPO / GRPO-S from the rollout entropy (``args.advantage_shaping``).

    Takes the arguments of ``trl.GRPOTrainer``; ``args`` must be a :class:`GTPOConfig`.
    """

    def __init__(self, model, reward_funcs=None, args: GTPOConfig | None = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GTPOConfig(f"{name.split('/')[-1] or 'model'}-GTPO")
        if not isinstance(args, GTPOConfig):
            raise TypeError(f"GTPOTrainer needs a GTPOConfig, got {type(args).__name__}.")
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self._fused_loss = fused_loss_applies(args, self.aux_loss_enabled)
        # Set while GRPOTrainer._compute_loss runs: its scoring is then the fused op.
        self._fused_scoring = False
        base_model = self.model.get_base_model() if is_peft_model(self.model) else self.model
        # Models that accept logits_to_keep project only the completion positions through the head.
        self._accepts_logits_to_keep = (
            "logits_to_keep" in inspect.signature(type(base_model).forward).parameters
        )
        self._rewards_per_func = None
        # Fused linear head (_trl_head): the loss and scoring read hidden states, never logits.
        self._linear_head = resolve_linear_head(self.model, args.fused_lm_head)
        if self._linear_head:
            add_linear_head(self.model, self.temperature)

    # The loss ------------------------------------------------------------------------------

    def _completion_scores(self, model, inputs: dict, score, aux_loss: bool = False):
        """``score(scorer)`` for the completion tokens, and (``aux_loss=True``) the MoE router loss
        of the same pass. The scorer reads the completion logits ``[B, T, V]`` (a strided view,
        never a copy) or, with the fused linear head, the hidden states and the head weight."""
        completion_ids = inputs["completion_ids"]
        logits_to_keep = completion_ids.size(1)
        model_inputs = {
            "input_ids": torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            "use_cache": False,
        }
        model_inputs.update({k: inputs[k] for k in EXTRA_MODEL_INPUTS if inputs.get(k) is not None})
        if aux_loss:
            model_inputs["output_router_logits"] = True
        if self._linear_head:
            model_inputs["logits_to_keep"] = logits_to_keep
            with self.accelerator.autocast():
                return model(**model_inputs, linear_head=score)
        if self._accepts_logits_to_keep:
            # One more position than the completion: logits at t predict the token at t + 1.
            model_inputs["logits_to_keep"] = logits_to_keep + 1
        with self.accelerator.autocast():
            output = model(**model_inputs)
        logits = output.logits[:, -logits_to_keep - 1 : -1]
        return score(LogitsScorer(logits, self.temperature)), output.aux_loss if aux_loss else None

    def _compute_loss(self, model, inputs):
        if not self._fused_loss:
            self._fused_scoring = True
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._fused_scoring = False
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mask = mask.bool()
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1

        advantages = inputs["advantages"]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL scales the surrogate (not the KL term) by the detached, non-negative IS ratio;
            # the surrogate is positively homogeneous in the advantage: scaling it is exact.
            per_token = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
            advantages = (per_token * inputs["importance_sampling_ratio"]).expand(mask.shape)

        # TRL's entropy bonus is coef * (mean entropy over active tokens) / accumulation, whatever
        # the loss type. Under "token-mean" with normaliser N, policy_loss adds
        # entropy_coef * sum(H) / N, so rescaling the coefficient reproduces it exactly.
        active_tokens = max(int(mask.sum()), 1)
        aggregation = LOSS_TYPE_AGGREGATION[self.loss_type]
        normalizer = self._token_mean_normalizer(inputs, mask, mode, accumulation)
        clip_high = self.epsilon_high - 1.0 if self.loss_type == "cispo" else self.epsilon_high
        entropy_coef = 0.0
        if aggregation == "token-mean":
            entropy_coef = self.entropy_coef * normalizer / (active_tokens * accumulation)

        # seq-mean weighting cannot carry a token-mean bonus: score the entropy once more.
        seq_entropy = aggregation != "token-mean" and self.entropy_coef != 0.0

        def score(scorer):
            out = scorer.policy_loss(
                completion_ids,
                advantages,
                mask,
                old_logprobs=inputs.get("old_per_token_logps"),
                ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                clip_low=self.epsilon_low,
                clip_high=clip_high,
                kl_coef=self.beta,
                entropy_coef=entropy_coef,
                aggregation=aggregation,
                normalizer=normalizer,
                objective=trl_objective(self.args),
            )
            masked_tokens = completion_ids.masked_fill(~mask, -100)
            return out, scorer.logprobs_and_entropy(masked_tokens)[1] if seq_entropy else None

        (out, entropy), _ = self._completion_scores(model, inputs, score)
        loss = out.loss
        if aggregation != "token-mean":
            # TRL averages over all B sequences (empty ones count 0), policy_loss over non-empty.
            nonempty = int(mask.any(dim=1).sum())
            loss = loss * (nonempty / mask.size(0)) / accumulation
            if seq_entropy:
                loss = loss - self.entropy_coef * entropy.sum() / active_tokens / accumulation

        metrics = out.metrics
        if self.loss_type not in CLIP_LOSS_TYPES:  # TRL logs no clip ratios for cispo / sapo
            metrics = {k: v for k, v in metrics.items() if not k.startswith("clip_")}
        self._log_metrics(mode, metrics)
        return loss

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **model_inputs,
    ):
        """TRL's scoring, by the fused op while ``GRPOTrainer._compute_loss`` runs for options
        the fused loss does not express (differentiable log-probs and entropy)."""
        if not self._fused_scoring:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **model_inputs,
            )
        prompt_length = input_ids.size(1) - logits_to_keep
        completion_ids = input_ids[:, prompt_length:]
        inputs = {
            **{k: v for k, v in model_inputs.items() if k in EXTRA_MODEL_INPUTS},
            "prompt_ids": input_ids[:, :prompt_length],
            "prompt_mask": attention_mask[:, :prompt_length],
            # Positions TRL does not score (padding) get log-prob and entropy 0, as in TRL.
            "completion_ids": completion_ids,
            "completion_mask": attention_mask[:, prompt_length:],
        }
        labels = completion_ids.masked_fill(inputs["completion_mask"] == 0, -100)
        (logprobs, entropy), aux_loss = self._completion_scores(
            model, inputs, lambda scorer: scorer.logprobs_and_entropy(labels), compute_aux_loss
        )
        return logprobs, entropy if compute_entropy else None, aux_loss

    def _token_mean_normalizer(self, inputs, mask, mode, accumulation) -> float | None:
        """The denominator GRPOTrainer divides the summed token losses by, for token-mean types."""
        if self.loss_type in ("dapo", "cispo"):
            # num_items_in_batch: active tokens of the whole generation batch, all processes.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0).item()
            normalizer = num_items / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            return normalizer
        if self.loss_type == "bnpo":
            return max(int(mask.sum()), 1) * accumulation
        if self.loss_type == "dr_grpo":
            return mask.size(0) * self.max_completion_length * accumulation
        return None

    def _log_metrics(self, mode: str, metrics: dict) -> None:
        names = sorted(n for n in metrics if n not in UNLOGGED_METRICS)
        device = self.accelerator.device
        local = torch.stack([torch.as_tensor(metrics[n], device=device).float() for n in names])
        gathered = self.accelerator.gather(local.unsqueeze(0)).nanmean(dim=0)
        for name, value in zip(names, gathered.tolist(), strict=True):
            self._metrics[mode][TRL_METRIC_NAMES.get(name, name)].append(value)

    # Advantage shaping ----------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Keep the raw per-function rewards (already gathered across processes) for the shaping.
        self._rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.advantage_shaping != "grpo":
            output["advantages"] = self._shaped_advantages(output)
        return output

    def _shaped_advantages(self, output: dict) -> torch.Tensor:
        """GTPO ``[B, T]`` or GRPO-S ``[B]`` advantages of this process's rows, shaped over the
        complete prompt groups of the generation batch gathered from all processes."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        local_rows, local_len = mask.shape

        entropy = self._rollout_entropy(output, mode)
        entropy = self.accelerator.gather(self.accelerator.pad_across_processes(entropy, dim=1))
        mask = self.accelerator.gather(self.accelerator.pad_across_processes(mask, dim=1)).bool()

        rewards_per_func = self._rewards_per_func
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        groups = num_generations
        if unscorable.any():
            # Completions no reward function scored leave their group and every token set: a
            # group of their own and no active tokens give them advantage 0, as in TRL.
            rows = torch.arange(rewards.numel(), device=rewards.device)
            groups = rows // num_generations
            groups[unscorable] = rewards.numel() + rows[: int(unscorable.sum())]
            mask = mask & ~unscorable.unsqueeze(1)

        if args.advantage_shaping == "gtpo":
            advantages = entropy_kernels.gtpo_advantages(
                rewards,
                entropy,
                mask,
                groups,
                alpha1=args.gtpo_alpha1,
                alpha2=args.gtpo_alpha2,
                success_threshold=args.success_threshold,
                normalize=args.advantage_normalize,
                scope=args.advantage_scope,
                filter_groups=args.filter_groups,
            )
            row_advantages = (advantages * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            advantages = entropy_kernels.grpo_s_advantages(
                rewards,
                entropy,
                mask,
                groups,
                beta1=args.grpo_s_beta1,
                beta2=args.grpo_s_beta2,
                success_threshold=args.success_threshold,
                filter_groups=args.filter_groups,
            )
            row_advantages = advantages

        # Replace the GRPO advantages TRL put in the completions table by the shaped ones.
        for _ in range(min(rewards.numel(), len(self._logs["advantages"]))):
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(row_advantages.tolist())
        active_entropy = entropy[mask]
        prefix = args.advantage_shaping
        self._metrics[mode][f"{prefix}/rollout_entropy"].append(
            active_entropy.mean().item() if active_entropy.numel() else 0.0
        )
        self._metrics[mode][f"{prefix}/success_fraction"].append(
            (rewards[~unscorable] > args.success_threshold).float().mean().nan_to_num().item()
        )
        self._metrics[mode][f"{prefix}/filtered_fraction"].append(
            _filtered_fraction(rewards, groups, args) if args.filter_groups else 0.0
        )

        start = self.accelerator.process_index * local_rows
        local = advantages[start : start + local_rows]
        return local[:, :local_len] if advantages.dim() == 2 else local

    @torch.no_grad()
    def _rollout_entropy(self, output: dict, mode: str) -> torch.Tensor:
        """``[B, T]`` entropy of the policy that generated the completions (fused, no grad)."""
        rows = output["completion_ids"].size(0)
        if mode == "train":
            chunk = self.args.per_device_train_batch_size
        else:
            chunk = self.args.per_device_eval_batch_size
        if any(
            output.get(k) is not None for k in EXTRA_MODEL_INPUTS if k not in ROW_INDEXED_INPUTS
        ):
            chunk = rows  # image tensors are not indexed by sequence: score in one piece
        entropies = []
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for start in range(0, rows, chunk):
                piece = {
                    k: v[start : start + chunk] if k in ROW_INDEXED_INPUTS and v is not None else v
                    for k, v in output.items()
                }
                tokens = piece["completion_ids"]
                (_, entropy), _ = self._completion_scores(
                    self.model, piece, lambda scorer, t=tokens: scorer.logprobs_and_entropy(t)
                )
                entropies.append(entropy)
        return torch.cat(entropies)


def _filtered_fraction(rewards: torch.Tensor, groups, args: GTPOConfig) -> float:
    """Fraction of completions in groups that `filter_groups` removed (DAPO users watch it)."""
    outcomes = success_outcomes(rewards, args.success_threshold)
    uniform = uniform_group_rows(outcomes, group_layout(groups, rewards.numel(), rewards.device))
    return uniform.float().mean().nan_to_num().item()
