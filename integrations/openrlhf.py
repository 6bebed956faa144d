"""OpenRLHF adapter (tested with OpenRLHF 0.11.2).

What it provides:

- :func:`install` patches OpenRLHF so that

  * the actor scores tokens with the fused kernel: ``Actor.forward`` gets the log-probs and the
    entropy from one pass over the logits of the positions the caller reads (differentiable,
    so training uses it too, with OpenRLHF's own ``PolicyLoss``, KL and entropy terms);
  * with ``advantage="gtpo"`` or ``"grpo_s"``, the experience maker asks the policy workers
    for the entropy of the old-log-prob pass (same fused pass, no extra forward) and replaces
    the advantages by the entropy-shaped ones of :func:`entropy_kernels.gtpo_advantages` /
    :func:`entropy_kernels.grpo_s_advantages`, over each prompt's ``n_samples_per_prompt``
    group and the whole rollout batch.

  OpenRLHF runs its trainer and models in Ray workers, so the call must happen in every worker:
  pass :func:`ray_runtime_env` to ``ray.init`` or to ``ray job submit --runtime-env-json``.
  Patches apply when OpenRLHF itself imports the patched modules (rollout workers stay free of
  DeepSpeed imports) and :func:`uninstall` reverts them.

- :class:`FusedPolicyLoss`: ``openrlhf.models.loss.PolicyLoss`` computed from logits, for
  training loops that hold the logits: ``policy_loss_type="ppo"`` by the fused
  :func:`entropy_kernels.policy_loss`, ``"gspo"`` by OpenRLHF's own ``PolicyLoss`` on log-probs
  from the fused scoring op.

The actor that :func:`install` patches keeps OpenRLHF's own ``PolicyLoss``: only its scoring is
replaced, so every ``policy_loss_type`` keeps OpenRLHF's maths.

:class:`FusedPolicyLoss` and :class:`FusedLinearPolicyLoss` live in ``_openrlhf_loss.py``
and the scoring that the patched actor and workers run in ``_openrlhf_scoring.py``; this
module holds :func:`install` and the patches it applies, and re-exports the two classes.

Importing this module never imports OpenRLHF.
"""

from __future__ import annotations

import functools
import inspect
import json
import os

import torch
import torch.nn.functional as F

import entropy_kernels

from ._openrlhf_loss import POLICY_LOSS_TYPES as POLICY_LOSS_TYPES
from ._openrlhf_loss import FusedLinearPolicyLoss, FusedPolicyLoss
from ._openrlhf_scoring import (
    _backbone_and_head,
    _entropy_of_logits,
    _linear_scores,
    _log_probs_of_labels,
    _logits_scores,
    _policy_forward_with_entropy,
)
from ._patching import Patches

__all__ = [
    "CONFIG_ENV",
    "SETUP_HOOK",
    "FusedLinearPolicyLoss",
    "FusedPolicyLoss",
    "install",
    "ray_runtime_env",
    "uninstall",
]

#: Environment variable carrying :func:`install`'s options (JSON) into the Ray workers.
CONFIG_ENV = "ENTROPY_KERNELS_OPENRLHF"
#: Ray ``worker_process_setup_hook``: called with no arguments in every worker.
SETUP_HOOK = f"{__name__}.install"

# Actor-worker method returning (action log-probs, entropy) of one pass; see _patch_launcher.
_FORWARD_WITH_ENTROPY = "entropy_kernels_forward_with_entropy"
# Per-batch list of old entropies on the experience maker while a rollout batch is scored.
_OLD_ENTROPY = "_entropy_kernels_old_entropy"
_ADVANTAGES = ("gtpo", "grpo_s")

_patches = Patches()


def ray_runtime_env(
    advantage: str | None = None,
    *,
    fused_scoring: bool = True,
    runtime_env: dict | None = None,
    **shaping,
) -> dict:
    """A Ray ``runtime_env`` that calls :func:`install` with these options in every worker.

    Args:
        advantage, fused_scoring, shaping: as for :func:`install` (validated here).
        runtime_env: an existing runtime env to extend (not modified); its ``env_vars`` are kept.

    Returns:
        ``{"worker_process_setup_hook": SETUP_HOOK, "env_vars": {CONFIG_ENV: <json>, ...}, ...}``
    """
    options = _options(advantage, fused_scoring, shaping)
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), CONFIG_ENV: json.dumps(options)}
    env["worker_process_setup_hook"] = SETUP_HOOK
    return env


def install(
    advantage: str | None = None,
    *,
    fused_scoring: bool | None = None,
    **shaping,
) -> None:
    """Patch OpenRLHF in this process (idempotent; a second call replaces the options).

    Called with no arguments (as Ray's setup hook does), the options come from the JSON in
    ``$ENTROPY_KERNELS_OPENRLHF`` that :func:`ray_runtime_env` sets (none: fused scoring only).

    Args:
        advantage: ``None`` (keep OpenRLHF's advantages), ``"gtpo"`` or ``"grpo_s"``. Run
            OpenRLHF with a group estimator (``--algo.advantage.estimator group_norm``,
            ``n_samples_per_prompt > 1``) and with the KL in the loss (``--algo.kl.use_loss``)
            or off: a KL folded into the rewards would be silently dropped, so it raises.
        fused_scoring: score tokens with the fused kernel in ``Actor.forward`` (default True).
        shaping: keyword options of :func:`entropy_kernels.gtpo_advantages` (``alpha1``,
            ``alpha2``, ``success_threshold``, ``normalize``, ``scope``, ``filter_groups``,
            ``eps``) or of :func:`entropy_kernels.grpo_s_advantages` (``beta1``, ``beta2``,
            ``success_threshold``, ``filter_groups``, ``eps``), with the library's defaults.
            Rewards are OpenRLHF's after its length penalties.
    """
    if advantage is None and fused_scoring is None and not shaping:
        options = json.loads(os.environ.get(CONFIG_ENV, "{}"))
        advantage = options.get("advantage")
        fused_scoring = options.get("fused_scoring", True)
        shaping = options.get("shaping", {})
    options = _options(advantage, True if fused_scoring is None else fused_scoring, shaping)
    uninstall()
    if options["fused_scoring"]:
        _patches.on_import("openrlhf.models.actor", _patch_actor)
    if options["advantage"] is not None:
        _patches.on_import("openrlhf.trainer.ray.launcher", _patch_launcher)
        _patches.on_import(
            "openrlhf.trainer.ppo_utils.experience_maker",
            functools.partial(_patch_experience_maker, options=options),
        )


def uninstall() -> None:
    """Revert every patch of :func:`install` (and forget the ones still waiting for an import)."""
    _patches.undo()


def _options(advantage: str | None, fused_scoring: bool, shaping: dict) -> dict:
    if advantage is not None and advantage not in _ADVANTAGES:
        raise ValueError(f"advantage must be None, 'gtpo' or 'grpo_s', got {advantage!r}")
    if advantage is None and shaping:
        raise ValueError(f"shaping options {sorted(shaping)} need advantage='gtpo' or 'grpo_s'")
    if advantage is not None:
        accepted = {
            name
            for name, p in inspect.signature(_shaping_function(advantage)).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        unknown = set(shaping) - accepted
        if unknown:
            raise ValueError(
                f"unknown {advantage} option(s) {sorted(unknown)}; accepted: {sorted(accepted)}"
            )
    return {"advantage": advantage, "fused_scoring": bool(fused_scoring), "shaping": shaping}


def _shaping_function(advantage: str):
    return getattr(entropy_kernels, f"{advantage}_advantages")


# ---------------------------------------------------------------------------------------------
# Fused scoring in the actor


def _patch_actor(module) -> None:
    _patches.set(module.Actor, "forward", _fused_actor_forward(module.Actor.forward))
    # Packed samples keep OpenRLHF's forward, which calls these two module functions.
    _patches.set(module, "compute_entropy", _entropy_of_logits)
    _patches.set(module, "log_probs_from_logits", _log_probs_of_labels)


def _fused_actor_forward(original):
    @functools.wraps(original)
    def forward(
        self,
        sequences,
        action_mask=None,
        attention_mask=None,
        return_output=False,
        allgather_logits=False,
        return_logprobs=False,
        ring_attn_group=None,
        packed_seq_lens=None,
        return_entropy=False,
        **mm_inputs,
    ):
        if self.packing_samples or (action_mask is None and not return_logprobs):
            return original(
                self,
                sequences,
                action_mask,
                attention_mask,
                return_output=return_output,
                allgather_logits=allgather_logits,
                return_logprobs=return_logprobs,
                ring_attn_group=ring_attn_group,
                packed_seq_lens=packed_seq_lens,
                return_entropy=return_entropy,
                **mm_inputs,
            )
        # Score only what the caller reads: the response window (or every next token).
        start = 0 if action_mask is None else sequences.shape[1] - 1 - action_mask.shape[1]
        parts = _backbone_and_head(self)
        if parts is not None:
            # Hidden states and the LM head: no logits at all (float32 or otherwise).
            output, logprobs, entropy = _linear_scores(
                self, *parts, sequences, attention_mask, start, mm_inputs
            )
        else:
            output, logprobs, entropy = _logits_scores(
                self,
                original,
                sequences,
                attention_mask,
                start,
                ring_attn_group,
                packed_seq_lens,
                mm_inputs,
            )
        if return_entropy:
            # OpenRLHF's layout: [B, S - 1], read back as entropy[:, -num_actions:].
            output.entropy = F.pad(entropy, (start, 0))
        if action_mask is not None:
            logprobs = logprobs * action_mask.float()
        return (logprobs, output) if return_output else logprobs

    return forward


# ---------------------------------------------------------------------------------------------
# Old entropy from the policy workers, shaped advantages in the experience maker


def _patch_launcher(module) -> None:
    # PolicyModelActor is a Ray actor class, rebuilt in the worker from the driver's pickle, so
    # the worker cannot patch it; its base class is imported there by name, and execute_batch
    # finds the method through it.
    _patches.set(module.BaseModelActor, _FORWARD_WITH_ENTROPY, _policy_forward_with_entropy)


class _ForwardWithEntropy:
    """The actor group as seen by ``_dispatch_forward``: ``forward`` also returns the entropy."""

    def __init__(self, group) -> None:
        self._group = group

    def async_run_method_batch(self, method_name, **kwargs):
        if method_name == "forward":
            method_name = _FORWARD_WITH_ENTROPY
        return self._group.async_run_method_batch(method_name=method_name, **kwargs)

    def __getattr__(self, name):
        return getattr(self._group, name)


def _patch_experience_maker(module, options: dict) -> None:
    maker = module.RemoteExperienceMaker
    dispatch, flatten, make_batch = (
        maker._dispatch_forward,
        maker._flatten_results,
        maker.make_experience_batch,
    )

    @functools.wraps(dispatch)
    def _dispatch_forward(self, group, sync_condition, **kwargs):
        if group is self.actor_model_group and getattr(self, _OLD_ENTROPY, None) is not None:
            group = _ForwardWithEntropy(group)
        return dispatch(self, group, sync_condition, **kwargs)

    @functools.wraps(flatten)
    def _flatten_results(self, refs, duplicate_factor):
        results = flatten(self, refs, duplicate_factor)
        old_entropy = getattr(self, _OLD_ENTROPY, None)
        if old_entropy is None or not results or not isinstance(results[0], tuple):
            return results
        old_entropy.extend(entropy for _, entropy in results)
        return [logprobs for logprobs, _ in results]

    @functools.wraps(make_batch)
    def make_experience_batch(self, rollout_samples):
        _check_supported(self)
        setattr(self, _OLD_ENTROPY, [])
        try:
            experiences = make_batch(self, rollout_samples)
            old_entropy = getattr(self, _OLD_ENTROPY)
        finally:
            delattr(self, _OLD_ENTROPY)
        _shape_advantages(
            experiences, old_entropy, self.strategy.args.rollout.n_samples_per_prompt, options
        )
        return experiences

    _patches.set(maker, "_dispatch_forward", _dispatch_forward)
    _patches.set(maker, "_flatten_results", _flatten_results)
    _patches.set(maker, "make_experience_batch", make_experience_batch)


def _check_supported(maker) -> None:
    args = maker.strategy.args
    if maker.advantage_estimator == "gae":
        raise ValueError(
            "entropy_kernels GTPO / GRPO-S replace group advantages: run OpenRLHF with "
            "--algo.advantage.estimator group_norm (not gae)"
        )
    kl_in_reward = maker.initial_model_group is not None and not args.algo.kl.use_loss
    if kl_in_reward and args.algo.kl.init_coef > 0:
        raise ValueError(
            "entropy_kernels GTPO / GRPO-S shape the outcome rewards only; put the KL in the "
            "loss (--algo.kl.use_loss) or set --algo.kl.init_coef 0"
        )


@torch.no_grad()
def _shape_advantages(experiences, old_entropy, n_samples_per_prompt: int, options: dict) -> None:
    """Overwrite each experience's advantages ``[b, A]`` with the shaped ones, computed over the
    whole rollout batch; a row's group is its prompt (OpenRLHF's ``index // n_samples``)."""
    if len(old_entropy) != len(experiences):
        raise RuntimeError(
            f"got the old entropy of {len(old_entropy)} micro-batches for {len(experiences)}"
        )
    widths = [e.action_mask.shape[1] for e in experiences]
    width = max(widths)
    entropy = torch.cat([F.pad(h.float(), (0, width - h.shape[1])) for h in old_entropy])
    mask = (
        torch.cat(
            [F.pad(e.action_mask.float(), (0, width - e.action_mask.shape[1])) for e in experiences]
        )
        > 0
    )
    rewards = torch.cat([e.rewards.float() for e in experiences])
    groups = torch.tensor([i // n_samples_per_prompt for e in experiences for i in e.index])
    shape = _shaping_function(options["advantage"])
    advantages = shape(rewards, entropy, mask, groups, **options["shaping"])
    if advantages.dim() == 1:  # GRPO-S: one advantage per sequence, on every active token
        advantages = advantages[:, None] * mask
    mean_entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    rows = [len(e.index) for e in experiences]
    per_batch = zip(
        experiences, advantages.split(rows), mean_entropy.split(rows), widths, strict=True
    )
    for e, a, h, w in per_batch:
        e.advantages = a[:, :w].contiguous()
        e.info["old_entropy"] = h
