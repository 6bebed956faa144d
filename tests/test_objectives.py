"""policy_loss's objectives (entropy_kernels.objectives) against TRL 1.16's formulas, run as
``GRPOTrainer._compute_loss`` itself on a stand-in trainer, and their own properties.

verl's ``loss_mode`` functions are compared in tests/test_integration_verl.py (verl's venv).
"""

import functools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entropy_kernels as ek
from entropy_kernels.objectives import OBJECTIVES, Objective

VALUE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def loss_inputs(seed=0, batch=4, seq=6, vocab=11, per_token_advantages=True):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator) * 2
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    old = (logp + 0.3 * torch.randn(batch, seq, generator=generator)).clamp(max=0.0)
    shape = (batch, seq) if per_token_advantages else (batch,)
    advantages = torch.randn(shape, generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > 0.25
    mask[:, 0] = True  # no empty sequence: TRL's luspo averages over all of them
    return logits, tokens, old, advantages, mask


def _identity(tensor, *args, **kwargs):
    return tensor


def trl_loss(logits, tokens, old, advantages, mask, **config):
    """``trl.GRPOTrainer._compute_loss`` on a one-process stand-in trainer that scores with
    float32 ``log_softmax``; returns the loss and its gradient w.r.t. the logits."""
    trl = pytest.importorskip("trl")
    logits = logits.clone().requires_grad_(True)
    log_softmax = torch.log_softmax(logits, -1)
    logps = log_softmax.gather(-1, tokens[..., None])[..., 0]
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    args = SimpleNamespace(
        delta=None,
        use_bias_correction_kl=False,
        steps_per_generation=1,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
    )
    trainer_options = dict(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        epsilon_low=0.2,
        epsilon_high=0.28,
    )
    for key, value in config.items():
        if key in trainer_options or key == "loss_type":
            trainer_options[key] = value
        else:
            setattr(args, key, value)
    accelerator = SimpleNamespace(
        num_processes=1,
        pad_across_processes=_identity,
        gather=_identity,
        gather_for_metrics=_identity,
        reduce=_identity,
    )
    stand_in = SimpleNamespace(
        args=args,
        accelerator=accelerator,
        beta=0.0,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=tokens.shape[1],
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropy, None),
        get_off_policy_mask=trl.GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=trl.GRPOTrainer.get_gamma_weights,
        **trainer_options,
    )
    stand_in.get_high_entropy_mask = functools.partial(
        trl.GRPOTrainer.get_high_entropy_mask, stand_in
    )
    float_mask = mask.float()
    inputs = {
        "prompt_ids": tokens[:, :0],
        "prompt_mask": float_mask[:, :0],
        "completion_ids": tokens,
        "completion_mask": float_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": float_mask.sum(),
    }
    loss = trl.GRPOTrainer._compute_loss(stand_in, None, inputs)
    loss.backward()
    return loss.detach(), logits.grad


def ek_loss(logits, tokens, old, advantages, mask, **options):
    logits = logits.clone().requires_grad_(True)
    out = ek.policy_loss(logits, tokens, advantages, mask, old_logprobs=old, **options)
    out.loss.backward()
    return out.loss.detach(), logits.grad


# TRL options -> the same objective in policy_loss's terms. TRL's epsilon_low / epsilon_high are
# clip_low / clip_high; its token-mean loss types use token-mean (num_items_in_batch = all active
# tokens here), "grpo" / "sapo" seq-mean-token-mean, "luspo" seq-mean-token-sum.
TRL_CASES = {
    "dapo": (dict(loss_type="dapo"), dict()),
    "dapo-delta": (dict(loss_type="dapo", delta=1.1), dict(objective=Objective(delta=1.1))),
    "gspo": (
        dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-2),
        dict(
            clip_low=3e-2,
            aggregation="seq-mean-token-mean",
            objective=Objective(ratio_level="sequence"),
        ),
    ),
    "cispo": (
        dict(loss_type="cispo", epsilon_high=1.1),
        dict(clip_high=0.1, objective=Objective("cispo", cispo_two_sided=False)),
    ),
    "cispo-gspo": (
        dict(loss_type="cispo", epsilon_high=1.05, importance_sampling_level="sequence"),
        dict(
            clip_high=0.05,
            objective=Objective("cispo", ratio_level="sequence", cispo_two_sided=False),
        ),
    ),
    "sapo": (
        dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
        dict(
            aggregation="seq-mean-token-mean",
            objective=Objective("sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
        ),
    ),
    "vespo": (
        dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
        dict(objective=Objective("vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5)),
    ),
    "luspo-gspo": (
        dict(loss_type="luspo", importance_sampling_level="sequence"),
        dict(aggregation="seq-mean-token-sum", objective=Objective(ratio_level="sequence")),
    ),
    "entropy_quantile": (
        dict(loss_type="dapo", top_entropy_quantile=0.4),
        dict(objective=Objective(entropy_quantile=0.4)),
    ),
    "off_policy_mask": (
        dict(loss_type="bnpo", off_policy_mask_threshold=0.02),
        dict(objective=Objective(off_policy_threshold=0.02)),
    ),
    "cispo-entropy_quantile-off_policy_mask": (
        dict(
            loss_type="cispo",
            epsilon_high=1.2,
            top_entropy_quantile=0.6,
            off_policy_mask_threshold=0.0,
        ),
        dict(
            clip_high=0.2,
            objective=Objective(
                "cispo", cispo_two_sided=False, entropy_quantile=0.6, off_policy_threshold=0.0
            ),
        ),
    ),
}


@pytest.mark.parametrize("per_token_advantages", [True, False])
@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_objective_matches_trl(case, per_token_advantages):
    trl_options, ek_options = TRL_CASES[case]
    inputs = loss_inputs(seed=len(case), per_token_advantages=per_token_advantages)
    expected_loss, expected_grad = trl_loss(*inputs, **trl_options)
    options = {"clip_low": 0.2, "clip_high": 0.28, **ek_options}
    loss, grad = ek_loss(*inputs, **options)
    assert expected_grad.abs().sum() > 0
    torch.testing.assert_close(loss, expected_loss, **VALUE_TOL)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOL)


def test_masks_and_clips_act_in_the_trl_cases():
    """The cases above exercise what they name: some tokens masked or clipped, not all."""
    inputs = loss_inputs(seed=3)
    for objective in (
        Objective(entropy_quantile=0.4),
        Objective(off_policy_threshold=0.02),
        Objective("cispo", cispo_two_sided=False),
    ):
        out = ek.policy_loss(
            inputs[0],
            inputs[1],
            inputs[3],
            inputs[4],
            old_logprobs=inputs[2],
            clip_high=0.1,
            objective=objective,
        )
        acted = out.metrics["objective_masked_fraction"] + out.metrics["objective_clipped_fraction"]
        assert 0 < acted < 1, objective


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(1, 7),
    vocab=st.integers(2, 9),
    seed=st.integers(0, 2**16),
    # clip_cov / kl_cov select tokens by a covariance whose ties (two tokens: always) rounding
    # breaks either way; their selection is compared with verl's on the same log-probs.
    name=st.sampled_from([n for n in OBJECTIVES if not n.endswith("_cov")]),
)
def test_two_pass_route_matches_float64_autograd(batch, seq, vocab, seed, name):
    """policy_loss's scoring op + objective maths against the same maths on log-probs and
    entropy from float64 log_softmax (autograd end to end, through the objective's float32
    maths): the scoring pass and its gradient kernel add nothing but rounding."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator) * 2
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    advantages = torch.randn(batch, seq, generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > 0.3
    old = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    old = (old + 0.3 * torch.randn(batch, seq, generator=generator).double()).float()
    old = old.clamp(max=0.0)  # log-probabilities, as validate checks
    objective = Objective(name)
    options = dict(clip_low=0.2, clip_high=0.28, entropy_coef=0.01, objective=objective)

    got_logits = logits.clone().requires_grad_(True)
    out = ek.policy_loss(got_logits, tokens, advantages, mask, old_logprobs=old, **options)
    out.loss.backward()

    want_logits = logits.double().requires_grad_(True)
    log_softmax = torch.log_softmax(want_logits, -1)
    logprobs = log_softmax.gather(-1, tokens[..., None])[..., 0]
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    from entropy_kernels.policy_loss import LossOptions, loss_from_logprobs

    want = loss_from_logprobs(
        logprobs.float(),
        entropy.float(),
        advantages,
        mask,
        old_logprobs=old,
        options=LossOptions(0.2, 0.28, entropy_coef=0.01, objective=objective),
    )
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_logits.grad, want_logits.grad.float(), rtol=1e-4, atol=1e-6)


def test_sequence_levels_share_the_gradient_for_sequence_advantages():
    """GSPO as TRL (through the mean) and GSPO-token as verl: same value, and the same gradient
    when the advantage is one per sequence and the mask is 0 / 1 (the GSPO paper's remark)."""
    logits, tokens, old, advantages, mask = loss_inputs(seed=7, per_token_advantages=False)
    results = [
        ek_loss(logits, tokens, old, advantages, mask, objective=Objective(ratio_level=level))
        for level in ("sequence", "sequence-token")
    ]
    torch.testing.assert_close(results[0][0], results[1][0], **VALUE_TOL)
    torch.testing.assert_close(results[0][1], results[1][1], **GRAD_TOL)
    token = ek_loss(logits, tokens, old, advantages, mask)
    assert not torch.allclose(token[0], results[0][0])


def test_plain_clip_objective_is_the_default_loss():
    logits, tokens, old, advantages, mask = loss_inputs(seed=2)
    default = ek_loss(logits, tokens, old, advantages, mask, dual_clip=2.0)
    named = ek_loss(logits, tokens, old, advantages, mask, dual_clip=2.0, objective="clip")
    # The same objective through the two-pass route (a no-op mask forces it).
    routed = ek_loss(
        logits,
        tokens,
        old,
        advantages,
        mask,
        dual_clip=2.0,
        objective=Objective(off_policy_threshold=float("1e30")),
    )
    for got in (named, routed):
        torch.testing.assert_close(got[0], default[0], **VALUE_TOL)
        torch.testing.assert_close(got[1], default[1], **GRAD_TOL)


def test_objectives_on_the_triton_backend():
    """The Triton scoring op (run by the interpreter) under the two-pass route."""
    logits, tokens, old, advantages, mask = loss_inputs(seed=4, batch=2, seq=3)
    for name in ("cispo", "sapo"):
        torch_route = ek_loss(logits, tokens, old, advantages, mask, objective=name)
        triton_route = ek_loss(
            logits, tokens, old, advantages, mask, objective=name, backend="triton"
        )
        torch.testing.assert_close(triton_route[0], torch_route[0], **VALUE_TOL)
        torch.testing.assert_close(triton_route[1], torch_route[1], **GRAD_TOL)


@pytest.mark.parametrize(
    "objective, match",
    [
        ("ppo", "objective"),
        (3, "objective"),
        (Objective, "objective"),
    ],
)
def test_bad_objective_raises(objective, match):
    logits, tokens, old, advantages, mask = loss_inputs()
    with pytest.raises(ValueError, match=match):
        ek.policy_loss(logits, tokens, advantages, mask, objective=objective)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(name="gpg", ratio_level="sequence"), "ratio_level"),
        (dict(ratio_level="seq"), "ratio_level"),
        (dict(delta=0.0), "delta"),
        (dict(name="cispo", delta=2.0), "delta"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
        (dict(vespo_k_pos=-1.0), "vespo_k_pos"),
        (dict(vespo_lambda_pos=float("nan")), "vespo_lambda_pos"),
        (dict(cov_fraction=0.0), "cov_fraction"),
        (dict(clip_cov_bounds=(5.0, 1.0)), "clip_cov_bounds"),
        (dict(clip_cov_bounds=1.0), "clip_cov_bounds"),
        (dict(kl_cov_coef=-1.0), "kl_cov_coef"),
        (dict(entropy_quantile=0.0), "entropy_quantile"),
        (dict(entropy_quantile=1.5), "entropy_quantile"),
        (dict(off_policy_threshold=float("inf")), "off_policy_threshold"),
        (dict(cispo_two_sided="no"), "cispo_two_sided"),
    ],
)
def test_bad_objective_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        Objective(**options)


def test_dual_clip_needs_the_clip_objective():
    logits, tokens, old, advantages, mask = loss_inputs()
    with pytest.raises(ValueError, match="dual_clip"):
        ek.policy_loss(logits, tokens, advantages, mask, dual_clip=2.0, objective="sapo")


@pytest.mark.parametrize("same_pass_entropy", [False, True])
def test_one_call_losses_take_the_objective(same_pass_entropy):
    """GTPO / GRPO-S advantages under another objective: the one-call losses equal policy_loss
    on the shaped advantages, with the rollout entropy or with the entropy of the same pass."""
    logits, tokens, old, _, mask = loss_inputs(seed=8)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    entropy = ek.logprobs_and_entropy(logits, tokens)[1]
    objective = Objective("cispo", ratio_level="sequence")
    for one_call, shaping in (
        (ek.gtpo_loss, ek.gtpo_advantages),
        (ek.grpo_s_loss, ek.grpo_s_advantages),
    ):
        got = one_call(
            logits,
            tokens,
            rewards,
            mask,
            2,
            old_logprobs=old,
            old_entropy=None if same_pass_entropy else entropy,
            objective=objective,
        )
        advantages = shaping(rewards, entropy, mask, 2)
        want = ek.policy_loss(
            logits, tokens, advantages, mask, old_logprobs=old, clip_high=0.28, objective=objective
        )
        torch.testing.assert_close(got.loss, want.loss, **VALUE_TOL)
        assert "objective_clipped_fraction" in got.metrics


def test_loss_modules_validate_the_objective():
    assert ek.GTPOLoss(objective="sapo").options["objective"] == "sapo"
    with pytest.raises(ValueError, match="objective"):
        ek.GRPOSLoss(objective="nope")
    with pytest.raises(ValueError, match="dual_clip"):
        ek.GTPOLoss(objective="gpg", dual_clip=2.0)


TOKEN_LOCAL = [
    Objective(),
    Objective(delta=1.15),
    Objective("cispo"),
    Objective("cispo", cispo_two_sided=False),
    Objective("sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.6),
    Objective("gpg"),
]


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    vocab=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    objective=st.sampled_from(TOKEN_LOCAL),
    kl=st.booleans(),
    aggregation=st.sampled_from(["token-mean", "seq-mean-token-mean"]),
)
def test_fused_kernel_derivative_matches_autograd(
    batch, seq, vocab, seed, objective, kl, aggregation
):
    """Token-local objectives on the fused Triton path (derivative written by the kernel, run by
    the interpreter) against autograd through the objective's torch definition."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator) * 2
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    old = (logp + 0.3 * torch.randn(batch, seq, generator=generator)).clamp(max=0.0)
    ref = (logp + 0.2 * torch.randn(batch, seq, generator=generator)).clamp(max=0.0)
    advantages = torch.randn(batch, seq, generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > 0.3
    options = dict(
        old_logprobs=old,
        ref_logprobs=ref if kl else None,
        kl_coef=0.05 if kl else 0.0,
        entropy_coef=0.01,
        clip_high=0.28,
        dual_clip=2.0 if objective.name == "clip" else None,
        aggregation=aggregation,
        objective=objective,
    )
    results = {}
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_(True)
        out = ek.policy_loss(leaf * 1.0, tokens, advantages, mask, backend=backend, **options)
        out.loss.backward()
        results[backend] = out, leaf.grad
    fused_out = results["triton"][0]
    assert type(fused_out.loss.grad_fn).__name__ == "_LossWithGradientBackward"
    torch.testing.assert_close(fused_out.loss, results["torch"][0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-4, atol=1e-6)
    assert fused_out.metrics.keys() == results["torch"][0].metrics.keys()


def test_non_local_objectives_are_not_fused():
    logits, tokens, old, advantages, mask = loss_inputs(batch=2, seq=3)
    for objective in (Objective(ratio_level="sequence"), Objective("vespo")):
        leaf = logits.clone().requires_grad_(True)
        out = ek.policy_loss(
            leaf * 1.0,
            tokens,
            advantages,
            mask,
            old_logprobs=old,
            backend="triton",
            objective=objective,
        )
        assert type(out.loss.grad_fn).__name__ != "_LossWithGradientBackward"


def test_linear_losses_take_the_objective():
    """The hidden-state losses run the same objectives as the logits ones."""
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(4, 5, 8, generator=generator)
    weight = torch.randn(11, 8, generator=generator) * 0.5
    _, tokens, old, advantages, mask = loss_inputs(seed=12, batch=4, seq=5)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    objective = Objective("sapo", ratio_level="sequence-token", off_policy_threshold=0.0)
    logits = hidden @ weight.T
    got = ek.linear_policy_loss(
        hidden, weight, tokens, advantages, mask, old_logprobs=old, objective=objective
    )
    want = ek.policy_loss(logits, tokens, advantages, mask, old_logprobs=old, objective=objective)
    torch.testing.assert_close(got.loss, want.loss, **VALUE_TOL)
    got = ek.linear_gtpo_loss(
        hidden, weight, tokens, rewards, mask, 2, old_logprobs=old, objective="gpg"
    )
    want = ek.gtpo_loss(logits, tokens, rewards, mask, 2, old_logprobs=old, objective="gpg")
    torch.testing.assert_close(got.loss, want.loss, **VALUE_TOL)
    with pytest.raises(ValueError, match="objective"):
        ek.linear_grpo_s_loss(hidden, weight, tokens, rewards, mask, 2, objective="nope")
