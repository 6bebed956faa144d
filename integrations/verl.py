"""verl adapter (tested with verl 0.9.1, both its V1 trainer and the legacy ``RayPPOTrainer``).

What it provides:

- :func:`compute_gtpo_advantage` / :func:`compute_grpo_s_advantage`: advantage estimators with
  verl's signature, registered as ``"gtpo"`` and ``"grpo_s"`` by :func:`install`. They shape
  the outcome rewards (``token_level_rewards.sum(-1)``) with the entropy of verl's old-log-prob
  pass over each ``uid`` group, by :func:`entropy_kernels.gtpo_advantages` /
  :func:`entropy_kernels.grpo_s_advantages`. Their options come from the algorithm config:
  ``+algorithm.gtpo.alpha2=0.2``, ``+algorithm.grpo_s.beta2=0.2`` (any keyword option of those
  functions).
- :func:`install` makes that entropy reach them (verl computes it in the old-log-prob pass and
  drops it before the advantages: the patch keeps it as ``batch["old_entropy"]`` in the legacy
  trainer and reads the ``entropy`` field the V1 trainer already stores), and swaps the fused
  kernel into the FSDP engine's scoring (log-probs and entropy from one pass over the logits).
  Run it in every Ray worker with verl's ``ray_kwargs``:
  ``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=entropy_kernels.integrations.verl.install``.
- :func:`logprobs_from_logits` / :func:`entropy_from_logits`: drop-ins for the functions of
  ``verl.utils.torch_functional`` of the same names.
- :func:`fused_policy_loss`: verl's policy loss of ``config.policy_loss.loss_mode`` from logits,
  for code that holds the logits: the token-local modes ``"vanilla"``
  (``compute_policy_loss_vanilla`` + ``agg_loss``), ``"cispo"``, ``"gpg"`` and ``"sapo"`` by
  the fused :func:`entropy_kernels.policy_loss` (their objectives); every other registered
  mode (``gspo``, ``clip_cov``, ``kl_cov``, ``geo_mean``, ``dro``, ``dppo_tv``, ``dppo_kl``,
  ``bypass_mode`` and any a user registers) by verl's own ``get_policy_loss_fn(loss_mode)``
  on log-probs from the fused scoring op.

The actor that :func:`install` patches computes its loss with verl's own
``get_policy_loss_fn(loss_mode)``: only its scoring is replaced, so every ``loss_mode`` keeps
verl's maths.

``fused_policy_loss`` lives in ``_verl_loss.py`` and the scoring drop-ins in
``_verl_scoring.py``; this module holds the estimators, :func:`install` and the patches it
applies, and re-exports the rest.

Importing this module never imports verl.
"""

from __future__ import annotations

import contextvars
import functools
import inspect

import numpy as np
import torch

import entropy_kernels

from ._patching import Patches
from ._verl_loss import fused_policy_loss
from ._verl_scoring import (
    _FUSED_LINEAR_PATCHES,
    _MEGATRON_PATCHES,
    _SHARED_PASS,
    FusedLinearForPPO,
    _logprobs_of_shared_pass,
    _SharedPass,
    entropy_from_logits,
    linear_cross_entropy,
    logprobs_from_logits,
    vocab_parallel_entropy,
    vocab_parallel_entropy_with_chunking,
    vocab_parallel_log_probs_from_logits,
)

__all__ = [
    "OLD_ENTROPY_KEY",
    "SETUP_HOOK",
    "FusedLinearForPPO",
    "compute_gtpo_advantage",
    "compute_grpo_s_advantage",
    "entropy_from_logits",
    "fused_policy_loss",
    "install",
    "linear_cross_entropy",
    "logprobs_from_logits",
    "uninstall",
    "vocab_parallel_entropy",
    "vocab_parallel_entropy_with_chunking",
    "vocab_parallel_log_probs_from_logits",
]

#: Ray ``worker_process_setup_hook`` value that installs the adapter in every worker.
SETUP_HOOK = f"{__name__}.install"
#: Batch key under which the legacy trainer keeps the old-log-prob pass's entropy.
OLD_ENTROPY_KEY = "old_entropy"

# The old entropy of the batch whose advantages verl is computing (set by the patched trainers).
_OLD_ENTROPY: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "entropy_kernels_verl_old_entropy", default=None
)

_patches = Patches()


# ---------------------------------------------------------------------------------------------
# Advantage estimators


def compute_gtpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    config=None,
    old_entropy: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GTPO token advantages as a verl advantage estimator (``algorithm.adv_estimator=gtpo``).

    Args:
        token_level_rewards: ``[B, T]``; a response's reward is its sum.
        response_mask: ``[B, T]``.
        index: ``[B]`` prompt uids (verl's ``non_tensor_batch["uid"]``): the groups.
        config: the algorithm config; ``config.gtpo`` (optional) holds keyword options of
            :func:`entropy_kernels.gtpo_advantages`.
        old_entropy: ``[B, T]`` entropy of the old-log-prob pass; by default the one the patched
            trainer passes along (see :func:`install`).

    Returns:
        ``(advantages, returns)``, both the ``[B, T]`` float32 advantages.
    """
    advantages = _shaped_advantages(
        "gtpo", token_level_rewards, response_mask, index, config, old_entropy
    )
    return advantages, advantages


def compute_grpo_s_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    config=None,
    old_entropy: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-S sequence advantages on every response token (``algorithm.adv_estimator=grpo_s``).

    Arguments as :func:`compute_gtpo_advantage`; options from ``config.grpo_s``
    (keyword options of :func:`entropy_kernels.grpo_s_advantages`).
    """
    advantages = _shaped_advantages(
        "grpo_s", token_level_rewards, response_mask, index, config, old_entropy
    )
    return advantages, advantages


ESTIMATORS = {"gtpo": compute_gtpo_advantage, "grpo_s": compute_grpo_s_advantage}


@torch.no_grad()
def _shaped_advantages(name, token_level_rewards, response_mask, index, config, old_entropy):
    if old_entropy is None:
        old_entropy = _OLD_ENTROPY.get()
    if old_entropy is None:
        raise ValueError(
            f"the {name} estimator needs the entropy of the old-log-prob pass: call "
            "entropy_kernels.integrations.verl.install() in the trainer process (Ray setup hook)"
        )
    if old_entropy.shape != response_mask.shape:
        raise ValueError(
            f"old entropy {tuple(old_entropy.shape)} does not match the response mask "
            f"{tuple(response_mask.shape)}"
        )
    shape = getattr(entropy_kernels, f"{name}_advantages")
    options = _shaping_options(config, name, shape)
    mask = response_mask.bool()
    groups = torch.as_tensor(
        np.unique(np.asarray(index), return_inverse=True)[1].reshape(-1), device=mask.device
    )
    rewards = token_level_rewards.sum(-1)
    advantages = shape(rewards, old_entropy.to(mask.device), mask, groups, **options)
    if advantages.dim() == 1:  # GRPO-S: the sequence advantage on every response token
        advantages = advantages[:, None] * mask
    return advantages


def _shaping_options(config, name, shape) -> dict:
    options = config.get(name, None) if config is not None else None
    options = {} if options is None else dict(options)
    accepted = {
        key
        for key, p in inspect.signature(shape).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"unknown algorithm.{name} option(s) {sorted(unknown)}; accepted: {sorted(accepted)}"
        )
    return options


# ---------------------------------------------------------------------------------------------
# install


def install(*, fused_scoring: bool = True) -> None:
    """Register the estimators and patch verl in this process (idempotent).

    As Ray's setup hook (``SETUP_HOOK``) it runs in every worker; each patch applies when verl
    itself imports the patched module, so rollout servers import nothing extra.

    - ``core_algos``: ``register_adv_est("gtpo")`` and ``("grpo_s")``.
    - Legacy ``RayPPOTrainer`` (``trainer.use_v1=False``): ``_compute_old_log_prob`` keeps the
      entropy it computes as ``batch["old_entropy"]`` when the estimator is one of these, and
      ``compute_advantage`` hands it to the estimator.
    - V1 trainer: ``_compute_advantage`` reads the ``entropy`` field that ``_compute_old_log_prob``
      stores in the TransferQueue and hands it to the estimator.
    - ``fused_scoring`` (default True): the FSDP engine's ``prepare_model_outputs`` (the path with
      ``use_remove_padding``, verl's default, and without ``use_fused_kernels``) computes
      log-probs and entropy in one fused pass (two fused passes with
      ``entropy_checkpointing``), for the old-log-prob pass and for training. With
      ``use_fused_kernels=True`` verl's models score from the hidden states and the LM head:
      ``FusedLinearForPPO`` and ``linear_cross_entropy`` (HF models, either
      ``fused_kernels_backend``, and Megatron's fused forward, vocabulary-parallel) become
      :class:`FusedLinearForPPO` / :func:`linear_cross_entropy` on the fused linear op, which
      never forms the logits. The Megatron engine's vocabulary-parallel scoring
      (``vocab_parallel_entropy`` / ``_with_chunking`` / ``vocab_parallel_log_probs_from_logits``)
      becomes the drop-ins of the same names, on :func:`entropy_kernels.logprobs_and_entropy`
      with Megatron's tensor-parallel group as ``tp_group``.
    """
    uninstall()
    _patches.on_import("verl.trainer.ppo.core_algos", _register_estimators)
    _patches.on_import("verl.trainer.ppo.ray_trainer", _patch_legacy_trainer)
    _patches.on_import("verl.trainer.ppo.v1.trainer_base", _patch_v1_trainer)
    if fused_scoring:
        _patches.on_import("verl.workers.engine.fsdp.transformer_impl", _patch_fsdp_engine)
        for module_name, attributes in {**_FUSED_LINEAR_PATCHES, **_MEGATRON_PATCHES}.items():
            _patches.on_import(module_name, _patch_attributes(attributes))


def uninstall() -> None:
    """Revert :func:`install` (estimators unregistered, methods restored)."""
    _patches.undo()


def _register_estimators(core_algos) -> None:
    for name, estimator in ESTIMATORS.items():
        _patches.track_item(core_algos.ADV_ESTIMATOR_REGISTRY, name)
        core_algos.register_adv_est(name)(estimator)


def _estimator_name(adv_estimator) -> str:
    return getattr(adv_estimator, "value", adv_estimator)


def _patch_legacy_trainer(ray_trainer) -> None:
    trainer = ray_trainer.RayPPOTrainer
    compute_old_log_prob = trainer._compute_old_log_prob
    compute_advantage = ray_trainer.compute_advantage

    @functools.wraps(compute_old_log_prob)
    def _compute_old_log_prob(self, batch):
        old_log_prob, mfu = compute_old_log_prob(self, batch)
        # fit() pops "entropys" before merging the result into the batch: keep a copy.
        if _estimator_name(self.config.algorithm.adv_estimator) in ESTIMATORS:
            old_log_prob.batch[OLD_ENTROPY_KEY] = old_log_prob.batch["entropys"]
        return old_log_prob, mfu

    @functools.wraps(compute_advantage)
    def _compute_advantage(data, adv_estimator, *args, **kwargs):
        # The V1 trainer's module imports this function by name, so it may keep this wrapper
        # after uninstall(): stay inert then. (TensorDict has no `in`: it asks for .keys().)
        if (
            not _patches.active
            or _estimator_name(adv_estimator) not in ESTIMATORS
            or OLD_ENTROPY_KEY not in data.batch.keys()  # noqa: SIM118
        ):
            return compute_advantage(data, adv_estimator, *args, **kwargs)
        token = _OLD_ENTROPY.set(data.batch[OLD_ENTROPY_KEY])
        try:
            return compute_advantage(data, adv_estimator, *args, **kwargs)
        finally:
            _OLD_ENTROPY.reset(token)

    _patches.set(trainer, "_compute_old_log_prob", _compute_old_log_prob)
    _patches.set(ray_trainer, "compute_advantage", _compute_advantage)


def _patch_v1_trainer(trainer_base) -> None:
    trainer = trainer_base.PPOTrainer
    compute_advantage = trainer._compute_advantage

    @functools.wraps(compute_advantage)
    def _compute_advantage(self, batch, metrics):
        if _estimator_name(self.config.algorithm.adv_estimator) not in ESTIMATORS:
            return compute_advantage(self, batch, metrics)
        # Same keys, same order and same padding as the fields _compute_advantage fetches.
        fetched = trainer_base.tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy"]
        )
        token = _OLD_ENTROPY.set(fetched.to_padded_tensor()["entropy"])
        try:
            return compute_advantage(self, batch, metrics)
        finally:
            _OLD_ENTROPY.reset(token)

    _patches.set(trainer, "_compute_advantage", _compute_advantage)


# ---------------------------------------------------------------------------------------------
# Patches of verl's scoring (the drop-ins they install are in _verl_scoring)


def _patch_fsdp_engine(transformer_impl) -> None:
    engine = transformer_impl.FSDPEngineWithLMHead
    prepare_model_outputs = engine.prepare_model_outputs

    @functools.wraps(prepare_model_outputs)
    def _prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        shared = _SharedPass(output_args.get("input_ids_rmpad_rolled"))
        # The engine's entropy function is an instance attribute (torch.compile'd at init);
        # swap it for this call only. Checkpointed entropy is recomputed in the backward, so it
        # must not hand log-probs to the later call.
        own_entropy = self.__dict__.get("compute_entropy_from_logits")
        self.compute_entropy_from_logits = (
            entropy_from_logits if self.engine_config.entropy_checkpointing else shared.entropy
        )
        token = _SHARED_PASS.set(shared)
        try:
            return prepare_model_outputs(
                self, output, output_args, micro_batch, logits_processor_func
            )
        finally:
            _SHARED_PASS.reset(token)
            if own_entropy is None:
                del self.compute_entropy_from_logits
            else:
                self.compute_entropy_from_logits = own_entropy

    _patches.set(engine, "prepare_model_outputs", _prepare_model_outputs)
    _patches.set(transformer_impl, "logprobs_from_logits", _logprobs_of_shared_pass)


def _patch_attributes(attributes: dict):
    def apply(module) -> None:
        for name, value in attributes.items():
            if hasattr(module, name):
                _patches.set(module, name, value)

    return apply
