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

Importing this module never imports OpenRLHF.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import entropy_kernels
from entropy_kernels.weights import is_zero3_param

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
#: OpenRLHF 0.11's ``policy_loss_type`` values: "ppo" is fused, "gspo" runs OpenRLHF's maths.
POLICY_LOSS_TYPES = ("ppo", "gspo")

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


# ---------------------------------------------------------------------------------------------
# Old entropy from the policy workers, shaped advantages in the experience maker


def _patch_launcher(module) -> None:
    # PolicyModelActor is a Ray actor class, rebuilt in the worker from the driver's pickle, so
    # the worker cannot patch it; its base class is imported there by name, and execute_batch
    # finds the method through it.
    _patches.set(module.BaseModelActor, _FORWARD_WITH_ENTROPY, _policy_forward_with_entropy)


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


# ---------------------------------------------------------------------------------------------
# PolicyLoss from logits


class FusedPolicyLoss(torch.nn.Module):
    """OpenRLHF's ``PolicyLoss`` (0.11) from logits, by :func:`entropy_kernels.policy_loss`.

    Same constructor options and return value; the first argument of :meth:`forward` is the
    logits instead of the log-probs. Supported: ``policy_loss_type="ppo"`` with asymmetric
    clipping, ``dual_clip``, token- or sequence-level aggregation (with OpenRLHF's global
    ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` normalisation) and the
    train/rollout importance-sampling correction (``is_correction_*``: its non-negative
    per-token weight is folded into the advantages, which is exact for the clipped surrogate).
    ``policy_loss_type="gspo"`` (a per-sequence ratio) is OpenRLHF's own ``PolicyLoss`` on the
    differentiable log-probs of the fused scoring op (OpenRLHF's numbers and outputs).

    Args:
        temperature: divides the logits inside the kernel (OpenRLHF's actor scales its logits
            before they reach the loss: pass raw logits with the rollout temperature here).
        backend: as for :func:`entropy_kernels.policy_loss`.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Sequence[float] = (0.5, 5.0),
        *,
        temperature: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if policy_loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(
                f"policy_loss_type must be one of {POLICY_LOSS_TYPES}, got {policy_loss_type!r}"
            )
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        for name, value, choices in (
            ("is_correction_level", is_correction_level, ("off", "token", "seq")),
            ("is_correction_mode", is_correction_mode, ("mask", "clip")),
            ("is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if is_correction_mode == "clip" and (
            is_correction_level == "seq" or is_correction_gating != "ratio"
        ):
            raise ValueError(
                "is_correction_mode=clip requires is_correction_level=token and "
                "is_correction_gating=ratio"
            )
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = tuple(is_correction_threshold)
        self.policy_loss_type = policy_loss_type
        self.temperature = temperature
        self.backend = backend

    @classmethod
    def from_openrlhf(cls, loss: torch.nn.Module, **kwargs) -> FusedPolicyLoss:
        """The fused equivalent of an ``openrlhf.models.loss.PolicyLoss`` instance."""
        return cls(
            loss.clip_eps_low,
            loss.clip_eps_high,
            loss.dual_clip,
            loss.token_level_loss,
            loss.policy_loss_type,
            loss.is_correction_level,
            loss.is_correction_mode,
            loss.is_correction_gating,
            loss.is_correction_threshold,
            **kwargs,
        )

    def forward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
    ):
        """Args as ``PolicyLoss.forward``, with the log-probs replaced by:

        Args:
            logits: ``[B, A, V]`` logits predicting the ``A`` action tokens; from a causal LM's
                ``[B, S, V]`` output that is ``logits[:, -A - 1 : -1]`` (a view, read in place).
            tokens: ``[B, A]`` action tokens, ``sequences[:, -A:]``.

        Returns:
            ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` as ``PolicyLoss``; the
            last two are None without importance-sampling correction.
        """
        if self.policy_loss_type != "ppo":
            return self._openrlhf_loss(
                logits,
                tokens,
                old_log_probs,
                advantages,
                action_mask,
                rollout_log_probs,
                dp_size,
                batch_num_tokens,
                global_batch_size,
            )
        vllm_kl = is_filter_ratio = None
        shaped = advantages
        if self.is_correction_level != "off":
            weight, is_filter_ratio, vllm_kl = self._is_correction(
                old_log_probs, rollout_log_probs, action_mask
            )
            shaped = advantages * weight
        scale = None
        normalizer = None
        if self.token_level_loss:
            aggregation = "token-mean"
            if batch_num_tokens is not None:
                normalizer = batch_num_tokens / dp_size
        else:
            aggregation = "seq-mean-token-mean"
            if global_batch_size is not None:
                # policy_loss averages over the local non-empty sequences; OpenRLHF over the
                # global count, times dp_size.
                local = (action_mask.sum(-1) > 0).sum()
                scale = local * dp_size / global_batch_size
        out = self._policy_loss(
            logits,
            tokens,
            shaped,
            action_mask,
            old_logprobs=old_log_probs,
            clip_low=self.clip_eps_low,
            clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            temperature=self.temperature,
            aggregation=aggregation,
            normalizer=normalizer,
            backend=self.backend,
        )
        loss = out.loss if scale is None else out.loss * scale
        # OpenRLHF's metrics, from the log-probs of the same pass.
        log_ratio = out.logprobs - old_log_probs
        ratio = log_ratio.clamp(-20.0, 20.0).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        clip_ratio = _masked_mean(torch.lt(surr2, surr1).float(), action_mask)
        ppo_kl = _masked_mean(-log_ratio, action_mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio

    def _openrlhf_loss(self, logits, tokens, *args):
        """OpenRLHF's ``PolicyLoss`` with these options, on the fused log-probs."""
        from openrlhf.models.loss import PolicyLoss

        loss = PolicyLoss(
            self.clip_eps_low,
            self.clip_eps_high,
            self.dual_clip,
            self.token_level_loss,
            self.policy_loss_type,
            self.is_correction_level,
            self.is_correction_mode,
            self.is_correction_gating,
            self.is_correction_threshold,
        )
        log_probs, _ = self._scores(logits, tokens)
        return loss(log_probs, *args)

    def _policy_loss(self, logits, tokens, advantages, mask, **options):
        return entropy_kernels.policy_loss(logits, tokens, advantages, mask, **options)

    def _scores(self, logits, tokens):
        return entropy_kernels.logprobs_and_entropy(
            logits, tokens, temperature=self.temperature, backend=self.backend
        )

    @torch.no_grad()
    def _is_correction(self, old_log_probs, rollout_log_probs, action_mask):
        """OpenRLHF's train/rollout correction: (per-token weight >= 0, filtered fraction, KL)."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = old_log_probs - rollout_log_probs
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = is_log_ratio
            if seq_level:
                stat = _masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            weight = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            weight = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        if seq_level:
            filter_ratio = filtered.float().mean()
        else:
            filter_ratio = _masked_mean(filtered.float(), action_mask)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
        return weight, filter_ratio, vllm_kl


class FusedLinearPolicyLoss(FusedPolicyLoss):
    """:class:`FusedPolicyLoss` from the last hidden states and the LM head, by
    :func:`entropy_kernels.linear_policy_loss`: no ``[B, A, V]`` logits are ever formed.

    Same constructor (and :meth:`from_openrlhf`) as :class:`FusedPolicyLoss`; ``"gspo"`` runs
    OpenRLHF's ``PolicyLoss`` on the log-probs of the fused linear scoring op.
    """

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
    ):
        """Args as :meth:`FusedPolicyLoss.forward`, with the logits replaced by:

        Args:
            hidden: ``[B, A, H]`` hidden states predicting the ``A`` action tokens (from a
                causal LM's ``[B, S, H]`` last hidden states, ``hidden[:, -A - 1 : -1]``).
            weight: ``[V, H]`` LM head (``lm_head.weight``); bias: ``[V]`` or None. A DTensor
                (FSDP2) weight is accepted (:mod:`entropy_kernels.weights`).
        """
        return super().forward(
            (hidden, weight, bias),
            tokens,
            old_log_probs,
            advantages,
            action_mask,
            rollout_log_probs,
            dp_size,
            batch_num_tokens,
            global_batch_size,
        )

    def _policy_loss(self, inputs, tokens, advantages, mask, **options):
        hidden, weight, bias = inputs
        return entropy_kernels.linear_policy_loss(
            hidden, weight, tokens, advantages, mask, bias=bias, **options
        )

    def _scores(self, inputs, tokens):
        hidden, weight, bias = inputs
        return entropy_kernels.linear_logprobs_and_entropy(
            hidden, weight, tokens, bias=bias, temperature=self.temperature, backend=self.backend
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    if mask is None:
        return values.mean(dim=dim)
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)
