"""TRL adapter: :class:`GTPOConfig` and the tables that map TRL 1.16's options and names onto
``entropy_kernels`` (loss types, objectives, metric names, model inputs), with
:func:`fused_loss_applies`.

Part of :mod:`entropy_kernels.integrations.trl`, which re-exports every public name here (import
them from there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from entropy_kernels.objectives import Objective

ADVANTAGE_SHAPINGS = ("gtpo", "grpo_s", "grpo")
ADVANTAGE_NORMALIZE = ("zero-filled", "separate", "joint", "none")
ADVANTAGE_SCOPES = ("batch", "group")

# TRL loss_type -> policy_loss aggregation (api.md). dapo / bnpo / dr_grpo / cispo differ in the
# normaliser; luspo sums each sequence's tokens.
LOSS_TYPE_AGGREGATION = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "token-mean",
    "cispo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "luspo": "seq-mean-token-sum",
}
# Loss types that are the PPO clip (with TRL's delta); cispo and sapo are their own objectives.
CLIP_LOSS_TYPES = ("dapo", "bnpo", "dr_grpo", "grpo", "luspo")

# Model inputs TRL forwards besides input_ids / attention_mask (multimodal models).
EXTRA_MODEL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# Of those, the ones indexed by sequence, so a batch can be scored in row chunks.
ROW_INDEXED_INPUTS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "tool_mask",
    "token_type_ids",
    "mm_token_type_ids",
)

# policy_loss metrics without meaning here (TRL has no dual clip).
UNLOGGED_METRICS = ("dual_clip_fraction",)
# policy_loss metric -> the name GRPOTrainer logs the same quantity under.
TRL_METRIC_NAMES = {
    "clip_low_fraction": "clip_ratio/low_mean",
    "clip_high_fraction": "clip_ratio/high_mean",
    "clip_fraction": "clip_ratio/region_mean",
}


@dataclass
class GTPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the advantage shaping of GTPO / GRPO-S (see ``algorithms.md``).

    Everything else has ``GRPOConfig``'s meaning and default, except ``use_bias_correction_kl``,
    which defaults to ``False`` here (the fused loss uses the plain k3 KL term; ``True`` runs
    TRL's own loss on the fused scoring). Every option is accepted (see the docstring of
    :mod:`entropy_kernels.integrations.trl`).
    """

    advantage_shaping: str = field(
        default="gtpo",
        metadata={
            "help": "'gtpo': token-level entropy-shaped advantages (Eq. 3, 5, 6); 'grpo_s': "
            "sequence-level (Eq. 8, 9); 'grpo': TRL's own advantages, fused loss only."
        },
    )
    gtpo_alpha1: float = field(default=1.0, metadata={"help": "GTPO base reward a1 (Eq. 3, 5)."})
    gtpo_alpha2: float = field(default=0.1, metadata={"help": "GTPO entropy weight a2 (Eq. 3, 5)."})
    grpo_s_beta1: float = field(default=1.0, metadata={"help": "GRPO-S base reward b1 (Eq. 9)."})
    grpo_s_beta2: float = field(default=0.1, metadata={"help": "GRPO-S entropy weight b2 (Eq. 9)."})
    success_threshold: float = field(
        default=0.0,
        metadata={"help": "A completion succeeds when its weighted reward sum exceeds this."},
    )
    advantage_normalize: str = field(
        default="zero-filled",
        metadata={
            "help": "How GTPO's shaped rewards become advantages: 'zero-filled' (default: each "
            "outcome's field whitened over all tokens, outcome sign kept), 'separate', 'joint' "
            "or 'none' (see entropy_kernels.gtpo_advantages)."
        },
    )
    filter_groups: bool = field(
        default=True,
        metadata={
            "help": "GTPO / GRPO-S: groups whose completions all succeeded or all failed get "
            "advantage 0 and stay out of every statistic (DAPO's dynamic-sampling filter)."
        },
    )
    advantage_scope: str = field(
        default="batch",
        metadata={"help": "Where GTPO's whitening statistics are taken: 'batch' or 'group'."},
    )
    fused_lm_head: bool | None = field(
        default=None,
        metadata={
            "help": "Score and train from the backbone's last hidden states and the LM head "
            "weight (entropy_kernels.linear_*: no [B, T, V] logits, float32 accumulation). None "
            "(default): where the model allows it, else the logits path with a warning; True: a "
            "ValueError when it does not; False: the logits path."
        },
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={
            "help": "TRL's bias-corrected KL (k3 times the ratio). True with beta != 0 runs TRL's "
            "loss on the fused scoring instead of the fused loss."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (
            ("advantage_shaping", ADVANTAGE_SHAPINGS),
            ("advantage_normalize", ADVANTAGE_NORMALIZE),
            ("advantage_scope", ADVANTAGE_SCOPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")


def trl_objective(args: GRPOConfig) -> Objective:
    """The objective of :mod:`entropy_kernels.objectives` that TRL's ``loss_type`` (token level)
    computes: TRL's cispo bounds the ratio by ``epsilon_high`` alone (``1 + clip_high``)."""
    if args.loss_type == "cispo":
        return Objective("cispo", cispo_two_sided=False)
    if args.loss_type == "sapo":
        return Objective(
            "sapo",
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
        )
    # TRL applies delta to the clip loss types only.
    return Objective(delta=args.delta)


def fused_loss_applies(args: GRPOConfig, aux_loss_enabled: bool = False) -> bool:
    """Whether :func:`entropy_kernels.policy_loss` expresses the loss these options ask for;
    otherwise ``GTPOTrainer`` runs ``GRPOTrainer._compute_loss`` on the fused scoring."""
    return (
        args.loss_type in LOSS_TYPE_AGGREGATION
        and args.importance_sampling_level == "token"
        and (args.delta is None or args.delta > 0)
        # TRL's cispo bound epsilon_high is 1 + clip_high (clip_high >= 0).
        and (args.loss_type != "cispo" or args.epsilon_high >= 1.0)
        and args.top_entropy_quantile == 1.0
        and args.off_policy_mask_threshold is None
        and not args.use_adaptive_entropy
        and not (args.beta != 0.0 and args.use_bias_correction_kl)
        and not aux_loss_enabled
    )
