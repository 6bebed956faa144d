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

Importing this module never imports verl.
"""

from __future__ import annotations

import contextvars
import functools
import inspect

import numpy as np
import torch

import entropy_kernels
from entropy_kernels.objectives import Objective

from ._patching import Patches

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
# Drop-ins for verl.utils.torch_functional


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward=True):
    """Drop-in for ``verl.utils.torch_functional.logprobs_from_logits``: float32 ``log_softmax``
    at ``labels``, shaped like ``labels``, by the fused kernel. ``inplace_backward`` is accepted
    for compatibility; the fused backward stores no ``[..., V]`` float32 tensor either way."""
    return entropy_kernels.logprobs_and_entropy(logits, labels)[0]


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Drop-in for ``entropy_from_logits`` and ``entropy_from_logits_with_chunking`` of
    ``verl.utils.torch_functional``: float32 entropy ``[...]`` of ``softmax(logits)``, by the
    fused kernel (memory-bounded, so ``chunk_size`` is ignored)."""
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return entropy_kernels.logprobs_and_entropy(logits, tokens, validate=False)[1]


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
# Policy loss from logits


def fused_policy_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's policy loss of ``config.policy_loss.loss_mode`` (default ``"vanilla"``) from logits.

    ``"vanilla"`` (``compute_policy_loss_vanilla`` with its ``agg_loss``), ``"cispo"``,
    ``"gpg"`` and ``"sapo"`` are fused (verl's sapo always aggregates ``seq-mean-token-mean``,
    and so does this); any other mode is verl's registered function,
    ``get_policy_loss_fn(loss_mode)``, called with the (differentiable) log-probs of the fused
    scoring op and these arguments: its numbers, metrics and random draws (``clip_cov`` uses
    torch's global generator) are verl's.

    Args:
        logits: ``[B, T, V]`` logits predicting the ``T`` response tokens (verl scales by the
            temperature before scoring; pass ``temperature`` to do it inside the kernel).
        tokens: ``[B, T]`` response tokens.
        old_log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights: as
            ``compute_policy_loss_vanilla``: ``config`` is the actor config (``clip_ratio``,
            ``clip_ratio_low`` / ``_high``, ``clip_ratio_c`` as the dual clip, which verl always
            applies, and ``global_batch_info``); ``rollout_is_weights`` (non-negative) is folded
            into the advantages, which is exact for the clipped surrogate. Every
            ``loss_agg_mode`` of verl 0.9 is supported, ``"token-sum"`` included.

    Returns:
        ``(pg_loss, metrics)``: verl's metrics of the mode (for ``"vanilla"``
        ``actor/pg_clipfrac``, ``actor/ppo_kl`` and ``actor/pg_clipfrac_lower``).
    """
    loss_mode = _loss_mode(config)
    objective = _fused_objective(loss_mode, config)
    if objective is None:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        loss_fn = get_policy_loss_fn(loss_mode)
        log_prob, _ = entropy_kernels.logprobs_and_entropy(
            logits, tokens, temperature=temperature, backend=backend
        )
        return loss_fn(
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            loss_agg_mode,
            config,
            rollout_is_weights,
        )
    clip = config.clip_ratio
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    dual_clip = config.get("clip_ratio_c", 3.0) if loss_mode == "vanilla" else None
    if loss_mode == "sapo":  # verl's sapo aggregates so whatever loss_agg_mode says
        loss_agg_mode = "seq-mean-token-mean"
    aggregation, normalizer, scale = _aggregation(
        loss_agg_mode, response_mask, **getattr(config, "global_batch_info", {})
    )
    # The weights scale each token's loss: for these objectives, exactly their advantage's.
    shaped = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    out = entropy_kernels.policy_loss(
        logits,
        tokens,
        shaped,
        response_mask,
        old_logprobs=old_log_prob,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        temperature=temperature,
        aggregation=aggregation,
        normalizer=normalizer,
        backend=backend,
        objective=objective,
    )
    loss = out.loss if scale is None else out.loss * scale
    metrics = _verl_metrics(
        loss_mode,
        out.logprobs,
        old_log_prob,
        advantages,
        response_mask.float(),
        (clip_low, clip_high, dual_clip),
    )
    return loss, metrics


def _fused_objective(loss_mode: str, config) -> Objective | None:
    """The objective of ``policy_loss`` that computes verl's ``loss_mode``; None for the modes
    that are not token-local (or options ``Objective`` refuses): verl's own function runs."""
    if loss_mode in ("vanilla", "cispo", "gpg"):
        return Objective("clip" if loss_mode == "vanilla" else loss_mode)
    tau_pos, tau_neg = getattr(config, "tau_pos", None), getattr(config, "tau_neg", None)
    if loss_mode == "sapo" and all(
        isinstance(t, (int, float)) and 0 < t < float("inf") for t in (tau_pos, tau_neg)
    ):
        return Objective("sapo", sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg)
    return None


def _verl_metrics(loss_mode, logprobs, old_log_prob, advantages, mask, clips) -> dict:
    """verl's metrics of ``loss_mode``, from the log-probs of the fused pass and the advantages
    it was given (before the rollout weights)."""
    if loss_mode == "gpg":
        return {}
    clip_low, clip_high, dual_clip = clips
    log_ratio = (logprobs - old_log_prob).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    metrics = {"actor/ppo_kl": _masked_mean(-log_ratio, mask)}
    if loss_mode == "vanilla":
        unclipped, clipped = -advantages * ratio, -advantages * clipped_ratio
        bound = -advantages * dual_clip
        metrics["actor/pg_clipfrac"] = _masked_mean(clipped > unclipped, mask)
        metrics["actor/pg_clipfrac_lower"] = _masked_mean(
            (torch.maximum(unclipped, clipped) > bound) & (advantages < 0), mask
        )
    else:
        clipfrac = _masked_mean(ratio != clipped_ratio, mask) if loss_mode == "cispo" else 0.0
        metrics["actor/pg_clipfrac"] = clipfrac
        metrics["actor/pg_clipfrac_lower"] = 0.0
    return metrics


def _loss_mode(config) -> str:
    """``config.policy_loss.loss_mode``, as verl's actor reads it (``"vanilla"`` when unset)."""
    policy_loss = getattr(config, "policy_loss", None)
    if policy_loss is None:
        return "vanilla"
    return policy_loss.get("loss_mode", "vanilla")


def _aggregation(
    loss_agg_mode,
    response_mask,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """``agg_loss``'s arguments as ``policy_loss``'s: (aggregation, normalizer, loss scale)."""
    if loss_agg_mode in ("token-mean", "token-sum"):
        if loss_agg_mode == "token-sum":
            normalizer = 1.0 / dp_size
        elif batch_num_tokens is not None:
            normalizer = batch_num_tokens / dp_size
        elif dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        else:
            normalizer = None
        return "token-mean", normalizer, None
    if loss_agg_mode not in (
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    ):
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    normalizer = loss_scale_factor if loss_agg_mode == "seq-mean-token-sum-norm" else None
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        return loss_agg_mode, normalizer, None
    # policy_loss averages over the local non-empty sequences, verl over the global count.
    local = (response_mask.sum(-1) > 0).sum()
    return loss_agg_mode, normalizer, local * dp_size / global_batch_size


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return ((values * mask).sum() / (mask.sum() + 1e-8)).item()


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
# Fused scoring in the FSDP engine

# The shared pass of the prepare_model_outputs call in progress.
_SHARED_PASS: contextvars.ContextVar[_SharedPass | None] = contextvars.ContextVar(
    "entropy_kernels_verl_shared_pass", default=None
)


class _SharedPass:
    """verl asks for the entropy, then for the log-probs of the same logits: the entropy call
    runs the fused kernel with the labels and keeps the log-probs for the second call."""

    def __init__(self, labels: torch.Tensor | None) -> None:
        self.labels = labels
        self._logits = self._logprobs = None

    def entropy(self, logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        if self.labels is None or self.labels.shape != logits.shape[:-1]:
            return entropy_from_logits(logits)
        logprobs, entropy = entropy_kernels.logprobs_and_entropy(logits, self.labels)
        self._logits, self._logprobs = logits, logprobs
        return entropy

    def take_logprobs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        if logits is not self._logits or labels is not self.labels:
            return None
        logprobs, self._logits, self._logprobs = self._logprobs, None, None
        return logprobs


def _logprobs_of_shared_pass(logits, labels, inplace_backward=True):
    shared = _SHARED_PASS.get()
    logprobs = None if shared is None else shared.take_logprobs(logits, labels)
    return logprobs if logprobs is not None else logprobs_from_logits(logits, labels)


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


# ---------------------------------------------------------------------------------------------
# Fused linear scoring (use_fused_kernels=True) and Megatron vocabulary-parallel scoring


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (the
    ``use_fused_kernels`` forward of verl's HF models, ``fused_kernels_backend`` ``"torch"`` or
    ``"liger"``), by :func:`entropy_kernels.linear_logprobs_and_entropy`: log-probs and entropy
    of ``hidden_states @ vocab_weights.T / temperature`` without forming the logits.

    Same constructor and ``forward`` signature; ``chunk_size`` is accepted and unused (the
    kernel's memory does not grow with the tokens). Both outputs are float32 (verl's torch
    implementation returns its entropy in the hidden states' dtype, after computing it in
    float32). ``vocab_weights`` may be an FSDP2 ``DTensor`` (see :mod:`entropy_kernels.weights`).
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch") -> None:
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(
                f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'."
            )
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return entropy_kernels.linear_logprobs_and_entropy(
            hidden_states, vocab_weights, input_ids.long(), temperature=float(temperature)
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
):
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (the
    ``fused_kernels_backend="triton"`` forward of verl's HF models, and the fused forward of
    its Megatron models): ``(logprobs, entropy)`` of ``hidden @ weight.T / temperature``,
    flattened to ``[N]`` as verl returns them, by the fused linear op.

    ``reduction`` ``"sum"`` / ``"mean"`` reduce the log-probs (the entropy stays per token), as
    verl's kernel does. With ``dist_process_group`` the vocabulary is sharded over the group
    (``weight`` holds this rank's rows) and, as in verl's kernel, ``hidden``'s gradient is this
    shard's part (Megatron's sequence-parallel gather sums the parts in its backward).
    """
    from entropy_kernels.linear_scoring import check_linear_inputs, linear_options
    from entropy_kernels.parallel import linear_score_shard
    from entropy_kernels.weights import plain_linear_weights

    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).long()
    if dist_process_group is None:
        logprobs, entropy = entropy_kernels.linear_logprobs_and_entropy(
            hidden, weight, labels, temperature=float(temperature)
        )
    else:
        weight, _ = plain_linear_weights(hidden, weight, None, dist_process_group)
        labels = check_linear_inputs(hidden, weight, None, labels)
        options = linear_options(
            hidden, weight, labels, float(temperature), -100, True, "auto", dist_process_group
        )
        logprobs, entropy = linear_score_shard(
            hidden, weight, None, labels, options, sum_hidden_grad=False
        )
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


def _megatron_tp_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_entropy(vocab_parallel_logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Drop-in for ``verl.utils.megatron.tensor_parallel.vocab_parallel_entropy``: float32
    entropy ``[...]`` of logits whose vocabulary is sharded over Megatron's tensor-parallel
    group (or ``tp_group``), by :func:`entropy_kernels.logprobs_and_entropy` with ``tp_group``
    (all-reduces of ``O(N)`` floats). The logits are not modified."""
    logits = vocab_parallel_logits
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    group = _megatron_tp_group(tp_group)
    return entropy_kernels.logprobs_and_entropy(logits, tokens, validate=False, tp_group=group)[1]


def vocab_parallel_entropy_with_chunking(
    vocab_parallel_logits: torch.Tensor, chunk_size: int = 2048, tp_group=None
) -> torch.Tensor:
    """Drop-in for ``vocab_parallel_entropy_with_chunking``: :func:`vocab_parallel_entropy` (the
    kernel is memory-bounded, so ``chunk_size`` is ignored)."""
    return vocab_parallel_entropy(vocab_parallel_logits, tp_group)


def vocab_parallel_log_probs_from_logits(logits, labels, tp_group=None) -> torch.Tensor:
    """Drop-in for ``verl.utils.megatron.tensor_parallel.vocab_parallel_log_probs_from_logits``
    (Megatron's ``-vocab_parallel_cross_entropy``): float32 log-probs of the global ``labels``
    under vocabulary-sharded logits, by :func:`entropy_kernels.logprobs_and_entropy`."""
    group = _megatron_tp_group(tp_group)
    return entropy_kernels.logprobs_and_entropy(logits, labels.long(), tp_group=group)[0]


# Module attributes that install() points at the drop-ins above (each module is patched when
# verl imports it; modules that import a function by name are patched too).
_FUSED_LINEAR_PATCHES = {
    "verl.utils.experimental.torch_functional": {"FusedLinearForPPO": FusedLinearForPPO},
    "verl.utils.kernel.linear_cross_entropy": {"linear_cross_entropy": linear_cross_entropy},
    "verl.models.mcore.model_forward_fused": {"linear_cross_entropy": linear_cross_entropy},
    "verl.models.mcore.model_forward_1f1b_overlap": {"linear_cross_entropy": linear_cross_entropy},
}
_MEGATRON_SCORING = {
    "vocab_parallel_entropy": vocab_parallel_entropy,
    "vocab_parallel_entropy_with_chunking": vocab_parallel_entropy_with_chunking,
    "vocab_parallel_log_probs_from_logits": vocab_parallel_log_probs_from_logits,
}
_MEGATRON_PATCHES = {
    "verl.utils.megatron.tensor_parallel": _MEGATRON_SCORING,
    "verl.workers.engine.megatron.transformer_impl": _MEGATRON_SCORING,
}


def _patch_attributes(attributes: dict):
    def apply(module) -> None:
        for name, value in attributes.items():
            if hasattr(module, name):
                _patches.set(module, name, value)

    return apply
