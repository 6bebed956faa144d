"""The defaults that learn (algorithms.md, properties 6, 10 and 11): GTPO's "zero-filled"
normalisation and `filter_groups`, for GTPO and GRPO-S, both backends against the reference.

The whitening checks here are built from the shaped rewards `r` (`normalize="none"`, whose
Eq. 3 / 5 properties test_advantages.py covers) with plain float64 tensor maths, not from the
reference's loops, so they check the definition itself.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_advantages import ATOL, BACKENDS, RTOL, SCOPES, Case, cases, gtpo, gtpo_reference

from entropy_kernels.advantages import grpo_s_advantages, gtpo_advantages
from entropy_kernels.reference import advantages as ref_advantages


def scope_rows(case: Case, scope: str) -> list[list[int]]:
    return case.rows if scope == "group" else [list(range(case.rewards.shape[0]))]


def zero_filled_fields(case: Case, scope: str, alpha1: float, alpha2: float):
    """Per scope: (S [B, T] bool, w_S(u+) and w_S(u-) [B, T] float64), straight from
    algorithms.md: u+ is r on success tokens and 0 on failure tokens, u- the mirror."""
    r = gtpo_reference(case, alpha1=alpha1, alpha2=alpha2, normalize="none")
    success = case.success[:, None].expand_as(r)
    for rows in scope_rows(case, scope):
        in_scope = torch.zeros(case.rewards.shape[0], dtype=torch.bool)
        in_scope[rows] = True
        s_tokens = case.kept & in_scope[:, None]
        fields = []
        for own in (success, ~success):
            u = torch.where(own, r, 0.0)[s_tokens]
            whitened = torch.zeros_like(r)
            if u.numel() >= 2:
                whitened[s_tokens] = (u - u.mean()) / torch.sqrt(u.var() + 1e-8)
            fields.append(whitened)
        yield s_tokens, *fields


@settings(max_examples=15, deadline=None)
@given(
    case=cases(filtering=True),
    backend=st.sampled_from(BACKENDS),
    scope=st.sampled_from(SCOPES),
    alpha1=st.sampled_from([1.0, 0.3]),
    alpha2=st.sampled_from([0.1, 0.7]),
)
def test_property_6_zero_filled_takes_each_outcomes_whitened_field(
    case, backend, scope, alpha1, alpha2
):
    # w_S(u+) and w_S(u-) have mean 0 and variance ~1 over S by construction (above); the
    # library must give each token of S its own outcome's field, and 0 elsewhere.
    advantages = gtpo(case, backend, alpha1=alpha1, alpha2=alpha2, scope=scope).double()
    success = case.success[:, None].expand_as(advantages)
    assert torch.all(advantages[~case.kept] == 0)
    for s_tokens, w_success, w_failure in zero_filled_fields(case, scope, alpha1, alpha2):
        expected = torch.where(success, w_success, w_failure)[s_tokens]
        actual = advantages[s_tokens]
        assert torch.all((actual - expected).abs() <= ATOL + RTOL * expected.abs())


@settings(max_examples=20, deadline=None)
@given(
    case=cases(filtering=True, zero_entropy=False),
    backend=st.sampled_from(BACKENDS),
    scope=st.sampled_from(SCOPES),
    alpha2=st.sampled_from([0.1, 0.5]),
)
def test_property_10_zero_filled_keeps_the_outcome_sign(case, backend, scope, alpha2):
    # When each outcome holds less than a1 / (a1 + a2) of S's tokens, success tokens are
    # positive and failure tokens negative: r >= a1 on successes, and the zero-filled field's
    # mean is at most that share of (a1 + a2). A margin of 1e-3 keeps rounding out of it.
    alpha1 = 1.0
    advantages = gtpo(case, backend, alpha2=alpha2, scope=scope)
    checked = 0
    for rows in scope_rows(case, scope):
        in_scope = torch.zeros(case.rewards.shape[0], dtype=torch.bool)
        in_scope[rows] = True
        s_tokens = case.kept & in_scope[:, None]
        n = int(s_tokens.sum())
        if n < 2:
            continue
        success_tokens = s_tokens & case.success[:, None]
        failure_tokens = s_tokens & ~case.success[:, None]
        share = max(int(success_tokens.sum()), int(failure_tokens.sum())) / n
        if share >= alpha1 / (alpha1 + alpha2) - 1e-3:
            continue
        assert torch.all(advantages[success_tokens] > 0)
        assert torch.all(advantages[failure_tokens] < 0)
        checked += 1
    assume(checked > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_mode_loses_the_sign_that_zero_filled_keeps(backend):
    # The defect behind the default: whitening each outcome on its own centres it, so about
    # half of the success tokens get negative advantages.
    gen = torch.Generator().manual_seed(11)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    entropy = torch.rand(8, 13, generator=gen) * 3 + 0.1
    success = (rewards > 0)[:, None].expand(8, 13)
    separate = gtpo_advantages(rewards, entropy, None, 4, normalize="separate", backend=backend)
    assert (separate[success] < 0).float().mean() > 0.25
    default = gtpo_advantages(rewards, entropy, None, 4, backend=backend)
    assert torch.all(default[success] > 0) and torch.all(default[~success] < 0)


def without_uniform_groups(case: Case) -> tuple[Case, torch.Tensor]:
    """The batch with its uniform groups removed (group ids kept), and the kept rows."""
    kept_rows = torch.tensor([i for i in range(case.rewards.shape[0]) if not case.uniform[i]])
    ids = torch.empty(case.rewards.shape[0], dtype=torch.int64)
    for group, rows in enumerate(case.rows):
        ids[rows] = group
    remaining = Case(
        case.rewards[kept_rows],
        case.entropy[kept_rows],
        None if case.mask is None else case.mask[kept_rows],
        ids[kept_rows],
        [],
        case.threshold,
        True,
    )
    return remaining, kept_rows


@settings(max_examples=15, deadline=None)
@given(
    case=cases(),
    backend=st.sampled_from(BACKENDS),
    normalize=st.sampled_from(["zero-filled", "separate", "joint", "none"]),
    scope=st.sampled_from(SCOPES),
)
def test_property_11_filter_groups(case, backend, normalize, scope):
    # A uniform group's rows get exactly 0, and removing the uniform groups from the batch
    # leaves every other row's advantage unchanged (to rounding: sums run in another order).
    options = dict(normalize=normalize, scope=scope, filter_groups=True)
    advantages = gtpo(case, backend, **options)
    sequence = grpo_s_advantages(
        case.rewards,
        case.entropy,
        case.mask,
        case.groups,
        success_threshold=case.threshold,
        backend=backend,
    )
    uniform = case.uniform
    assert torch.all(advantages[uniform] == 0) and torch.all(sequence[uniform] == 0)
    expected = gtpo_reference(case, **options)
    assert torch.all((advantages.double() - expected).abs() <= ATOL + RTOL * expected.abs())
    assume(not uniform.all() and uniform.any())
    remaining, kept_rows = without_uniform_groups(case)
    torch.testing.assert_close(
        gtpo(remaining, backend, **options), advantages[kept_rows], rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(
        grpo_s_advantages(
            remaining.rewards,
            remaining.entropy,
            remaining.mask,
            remaining.groups,
            success_threshold=case.threshold,
            backend=backend,
        ),
        sequence[kept_rows],
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["zero-filled", "separate", "joint", "none"])
def test_all_uniform_batch_gives_zeros(backend, normalize):
    gen = torch.Generator().manual_seed(5)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, 0.0])  # success, failure, failure groups
    entropy = torch.rand(6, 7, generator=gen)
    options = dict(normalize=normalize, backend=backend)
    for groups in (2, torch.tensor([4, 4, 9, 9, 1, 1])):
        advantages = gtpo_advantages(rewards, entropy, None, groups, **options)
        assert torch.equal(advantages, torch.zeros(6, 7))
        sequence = grpo_s_advantages(rewards, entropy, None, groups, backend=backend)
        assert torch.equal(sequence, torch.zeros(6))
        # Without the filter the all-failure groups become noise (the defect it removes).
        noisy = grpo_s_advantages(rewards, entropy, None, groups, filter_groups=False)
        assert noisy[2:].abs().max() > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reward_keeps_its_group(backend):
    # A NaN reward is neither success nor failure: its group is never filtered, so the NaN
    # reaches the outputs it feeds instead of becoming a silent 0.
    rewards = torch.tensor([float("nan"), 0.0, 1.0, 0.0])
    entropy = torch.rand(4, 5, generator=torch.Generator().manual_seed(6)) + 0.1
    advantages = gtpo_advantages(rewards, entropy, None, 2, normalize="none", backend=backend)
    assert torch.isnan(advantages[0]).all()
    assert torch.isnan(grpo_s_advantages(rewards, entropy, None, 2, backend=backend)[:2]).all()
    assert ref_advantages.uniform_group_rows(rewards, 2) == [False, False, False, False]
