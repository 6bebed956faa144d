"""GRPO / GTPO / GRPO-S advantages: the properties of algorithms.md, the Triton kernels and the
torch backend against the float64 loop reference, and argument validation.

Sizes are small because the Triton backend runs under the interpreter (each program costs
milliseconds): batches of up to 4 groups of up to 5 rows, up to 24 positions, which already
cover single-row groups, all-success / all-failure groups and ragged masks. One test uses
T = 600 > 512, the kernel's largest position block, so the per-block statistics are merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entropy_kernels.advantages import (
    grpo_advantages,
    grpo_s_advantages,
    grpo_s_rewards,
    gtpo_advantages,
)
from entropy_kernels.reference import advantages as ref

BACKENDS = ["triton", "torch"]
NORMALIZE = ["zero-filled", "separate", "joint", "none"]
SCOPES = ["batch", "group"]
# float32 unit roundoff.
U32 = 2.0**-24
# Absolute / relative tolerance of float32 results against the float64 reference.
ATOL = RTOL = 1e-5


@dataclass
class Case:
    rewards: torch.Tensor  # [B] float32
    entropy: torch.Tensor  # [B, T] float32
    mask: torch.Tensor | None  # [B, T] bool / float, or None
    groups: int | torch.Tensor
    rows: list[list[int]]  # the rows of each group
    threshold: float
    filter_groups: bool = False

    @property
    def active(self) -> torch.Tensor:
        if self.mask is None:
            return torch.ones(self.entropy.shape, dtype=torch.bool)
        return self.mask != 0

    @property
    def uniform(self) -> torch.Tensor:
        """[B] bool: rows of groups whose rows are all successes or all failures."""
        uniform = torch.zeros(self.rewards.shape[0], dtype=torch.bool)
        for rows in self.rows:
            kinds = self.success[rows]
            uniform[rows] = bool(kinds.all() or not kinds.any())
        return uniform

    @property
    def kept(self) -> torch.Tensor:
        """The active tokens that take part in the shaping (not filtered out)."""
        if not self.filter_groups:
            return self.active
        return self.active & ~self.uniform[:, None]

    @property
    def success(self) -> torch.Tensor:
        return self.rewards > self.threshold

    @property
    def max_group(self) -> int:
        return max(len(rows) for rows in self.rows)


@st.composite
def cases(
    draw,
    max_groups=4,
    max_group_size=5,
    min_len=1,
    max_len=24,
    id_form=None,
    zero_entropy=True,
    min_entropy=0.0,
    filtering=False,
):
    """Random batches: both group forms, every reward pattern, ragged masks, zero entropies;
    with `filtering`, `filter_groups` on or off (off otherwise: the Eq. 3 / 5 properties)."""
    filter_groups = draw(st.booleans()) if filtering else False
    id_form = draw(st.booleans()) if id_form is None else id_form
    n_groups = draw(st.integers(1, max_groups))
    if id_form:
        sizes = draw(st.lists(st.integers(1, max_group_size), min_size=n_groups, max_size=n_groups))
    else:
        sizes = [draw(st.integers(1, max_group_size))] * n_groups
    batch, seq_len = sum(sizes), draw(st.integers(min_len, max_len))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    threshold = draw(st.sampled_from([0.0, 0.5]))

    # Rewards: per group all success, all failure or mixed; a reward equal to the threshold
    # is a failure.
    patterns = draw(
        st.lists(
            st.sampled_from(["success", "failure", "mixed"]), min_size=n_groups, max_size=n_groups
        )
    )
    rewards = []
    for size, pattern in zip(sizes, patterns, strict=True):
        for _ in range(size):
            is_success = pattern == "success" or (
                pattern == "mixed" and torch.rand((), generator=gen).item() < 0.5
            )
            if is_success:
                rewards.append(threshold + 0.01 + torch.rand((), generator=gen).item())
            elif torch.rand((), generator=gen).item() < 0.3:
                rewards.append(threshold)
            else:
                rewards.append(threshold - torch.rand((), generator=gen).item())
    rewards = torch.tensor(rewards, dtype=torch.float32)

    entropy = min_entropy + torch.rand(batch, seq_len, generator=gen) * 4.0
    if zero_entropy and draw(st.booleans()):
        entropy[torch.rand(batch, seq_len, generator=gen) < 0.2] = 0.0

    mask_kind = draw(st.sampled_from(["none", "bool", "float", "ragged"]))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "ragged":
        lengths = torch.randint(0, seq_len + 1, (batch,), generator=gen)
        mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    else:
        mask = torch.rand(batch, seq_len, generator=gen) < 0.75
        if mask_kind == "float":
            mask = mask.float() * 0.5  # loss weights: nonzero means active

    if id_form:
        ids = draw(
            st.lists(st.integers(-1000, 1000), min_size=n_groups, max_size=n_groups, unique=True)
        )
        order = draw(st.permutations(range(batch)))
        row_ids = [ids[g] for g, size in enumerate(sizes) for _ in range(size)]
        groups = torch.empty(batch, dtype=torch.int64)
        groups[torch.tensor(order)] = torch.tensor(row_ids)
        rows = [[i for i in range(batch) if groups[i].item() == gid] for gid in ids]
        # Rewards were drawn per group in construction order: move them with the rows.
        permuted = torch.empty_like(rewards)
        permuted[torch.tensor(order)] = rewards
        rewards = permuted
    else:
        groups = sizes[0]
        rows = [list(range(g * groups, (g + 1) * groups)) for g in range(n_groups)]
    return Case(rewards, entropy, mask, groups, rows, threshold, filter_groups)


def gtpo(case: Case, backend: str, **options) -> torch.Tensor:
    options = {"filter_groups": case.filter_groups, **options}
    return gtpo_advantages(
        case.rewards,
        case.entropy,
        case.mask,
        case.groups,
        success_threshold=case.threshold,
        backend=backend,
        **options,
    )


def gtpo_reference(case: Case, **options) -> torch.Tensor:
    options = {"filter_groups": case.filter_groups, **options}
    return ref.gtpo_advantages(
        case.rewards,
        case.entropy,
        case.mask,
        case.groups,
        success_threshold=case.threshold,
        **options,
    )


def whitening_sets(case: Case, normalize: str, scope: str) -> list[torch.Tensor]:
    """The [B, T] boolean masks of the active tokens of each Eq. 6 whitening set."""
    scopes = case.rows if scope == "group" else [list(range(case.rewards.shape[0]))]
    sets = []
    for rows in scopes:
        in_scope = torch.zeros(case.rewards.shape[0], dtype=torch.bool)
        in_scope[rows] = True
        kinds = [case.success, ~case.success] if normalize == "separate" else [in_scope]
        for kind in kinds:
            sets.append(case.kept & (in_scope & kind)[:, None])
    return sets


def assert_whitened_close(actual, case, normalize, scope, alpha1=1.0, alpha2=0.1, **options):
    """GTPO advantages against the float64 reference at the spec's tolerance.

    Also where whitening amplifies eps-sized spreads by up to 1e4: with one row per set at a
    position (d_t = 1), Eq. 3 gives `a1 + a2 - a2 eps / (H + eps)`, and a set made only of such
    tokens has a variance far below the 1e-8 under the square root. The library keeps that
    deviation exactly (see the kernel module), so no float32 slack is needed; near-ties have
    their own test.
    """
    expected = gtpo_reference(
        case, alpha1=alpha1, alpha2=alpha2, normalize=normalize, scope=scope, **options
    )
    assert torch.all(actual[~case.active] == 0)
    if normalize != "none":
        for tokens in whitening_sets(case, normalize, scope):
            if int(tokens.sum()) < 2:
                assert torch.all(actual[tokens] == 0), "a set of < 2 tokens must get 0"
    error = (actual.double() - expected).abs()
    bound = ATOL + RTOL * expected.abs()
    assert torch.all(error <= bound), f"max error {error.max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# Backends against the float64 loop reference


@settings(max_examples=15)
@given(
    case=cases(filtering=True),
    normalize=st.sampled_from(NORMALIZE),
    scope=st.sampled_from(SCOPES),
    backend=st.sampled_from(BACKENDS),
)
def test_gtpo_matches_reference(case, normalize, scope, backend):
    actual = gtpo(case, backend, normalize=normalize, scope=scope)
    assert actual.dtype == torch.float32 and actual.shape == case.entropy.shape
    assert_whitened_close(actual, case, normalize, scope)


@settings(max_examples=10)
@given(
    case=cases(filtering=True),
    alpha1=st.floats(0.0, 3.0),
    alpha2=st.floats(0.01, 2.0),
    normalize=st.sampled_from(NORMALIZE),
    scope=st.sampled_from(SCOPES),
)
def test_gtpo_backends_agree_for_other_alphas(case, alpha1, alpha2, normalize, scope):
    # The alphas enter the kernel as runtime arguments; both backends must use them alike.
    for backend in BACKENDS:
        actual = gtpo(case, backend, alpha1=alpha1, alpha2=alpha2, normalize=normalize, scope=scope)
        assert_whitened_close(actual, case, normalize, scope, alpha1=alpha1, alpha2=alpha2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["separate", "joint"])
def test_gtpo_near_ties(backend, normalize):
    # One group, two successes and two failures whose entropies agree to 2 .. 11 float32 ulps
    # at every position: `d_t H - sum H` is a few ulps of H, so each whitening set ("separate")
    # has a spread far below the 1e-8 under the square root, and a float32 `sum H` (or sum of
    # 1 / (H + eps)) rounds most of it away: errors up to 9e-5 before the sums ran in float64
    # ("separate"; "joint" whitening sees the success/failure gap and is checked for contrast).
    # T = 37 is not a multiple of any block.
    gen = torch.Generator().manual_seed(3)
    seq_len = 37

    def near(h):
        ulps = torch.randint(2, 12, (seq_len,), generator=gen) * 2.0**-23
        return h * (1 + ulps * torch.where(torch.rand(seq_len, generator=gen) < 0.5, -1, 1))

    success_h = torch.rand(seq_len, generator=gen) * 3 + 0.5
    failure_h = torch.rand(seq_len, generator=gen) * 3 + 0.5
    entropy = torch.stack([success_h, near(success_h), failure_h, near(failure_h)])
    assert torch.all(entropy[0] != entropy[1]) and torch.all(entropy[2] != entropy[3])
    case = Case(torch.tensor([1.0, 0.5, -1.0, -0.5]), entropy, None, 4, [[0, 1, 2, 3]], 0.0)
    for scope in SCOPES:
        actual = gtpo(case, backend, normalize=normalize, scope=scope)
        assert_whitened_close(actual, case, normalize, scope)


# T = 600 > 512 (the kernel's largest position block): two blocks whose statistics merge.
@settings(max_examples=3)
@given(
    case=cases(max_groups=2, max_group_size=3, min_len=600, max_len=600),
    normalize=st.sampled_from(["separate", "joint"]),
    scope=st.sampled_from(SCOPES),
)
def test_gtpo_long_sequences_merge_blocks(case, normalize, scope):
    assert_whitened_close(
        gtpo(case, "triton", normalize=normalize, scope=scope), case, normalize, scope
    )


def assert_sequence_close(actual, expected, case):
    """Per-group z-scores against the float64 reference at the spec's tolerance."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    for rows in case.rows:
        if len(rows) < 2:
            assert torch.all(actual[rows] == 0), "a group of one row must get 0"
            continue
        bound = ATOL + RTOL * expected[rows].abs()
        error = (actual[rows].double() - expected[rows]).abs()
        assert torch.all(error <= bound), f"group {rows}: max error {error.max().item():.3g}"


@settings(max_examples=15)
@given(
    case=cases(filtering=True),
    backend=st.sampled_from(BACKENDS),
    beta1=st.sampled_from([1.0, 0.3]),
    beta2=st.sampled_from([0.1, 1.5]),
)
def test_grpo_s_matches_reference(case, backend, beta1, beta2):
    options = dict(beta1=beta1, beta2=beta2, success_threshold=case.threshold)
    filtering = dict(filter_groups=case.filter_groups)
    actual = grpo_s_advantages(
        case.rewards, case.entropy, case.mask, case.groups, backend=backend, **options, **filtering
    )
    expected = ref.grpo_s_advantages(
        case.rewards, case.entropy, case.mask, case.groups, **options, **filtering
    )
    values = ref.grpo_s_rewards(case.rewards, case.entropy, case.mask, case.groups, **options)
    assert_sequence_close(actual, expected, case)
    rewards = grpo_s_rewards(
        case.rewards, case.entropy, case.mask, case.groups, backend=backend, **options
    )
    torch.testing.assert_close(rewards.double(), values, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gap", [2e-3, 1e-3, 5e-4])
def test_grpo_s_near_tie_of_mean_entropies(backend, gap):
    # Two successes whose mean entropies differ by gap / 20 (~5e-5 relative): their Eq. 9
    # rewards are ~beta2 * 5e-5 apart, a spread of the order of eps, which the z-score turns
    # into advantages of about +-0.56 that move with every bit of the spread. Means rounded to
    # float32 shifted them by up to 3e-4 (found by hypothesis in CI), so the sequence-level
    # statistics run in float64. The second pair is an ordinary failure pair, for contrast.
    gen = torch.Generator().manual_seed(7)
    tied = torch.rand(20, generator=gen) * 4
    near = tied[torch.randperm(20, generator=gen)].clone()
    near[0] += gap
    entropy = torch.stack([tied, near, torch.rand(20, generator=gen) * 4, tied])
    rewards = torch.tensor([0.9, 0.6, -0.3, -0.2])
    # Groups of one outcome each: filter_groups would zero them.
    actual = grpo_s_advantages(rewards, entropy, None, 2, filter_groups=False, backend=backend)
    expected = ref.grpo_s_advantages(rewards, entropy, None, 2, filter_groups=False)
    assert 0.1 < expected[0].abs() < 0.7, "the spread must sit where the z-score is sensitive"
    case = Case(rewards, entropy, None, 2, [[0, 1], [2, 3]], 0.0)
    assert_sequence_close(actual, expected, case)


@settings(max_examples=20)
@given(
    case=cases(max_len=1), backend=st.sampled_from(BACKENDS), scale=st.sampled_from(["std", "none"])
)
def test_grpo_matches_reference(case, backend, scale):
    actual = grpo_advantages(case.rewards, case.groups, scale=scale, backend=backend)
    expected = ref.grpo_advantages(case.rewards, case.groups, scale=scale)
    if scale == "none":
        torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL)
    else:
        assert_sequence_close(actual, expected, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_equal_rewards_give_exactly_zero(backend):
    # 0.3 * 7 / 7 rounds away from 0.3 in float32; a naive (r - mean) / (std + 1e-6) turns
    # that ulp into advantages of ~0.03. Groups of equal rewards carry no signal: exactly 0.
    rewards = torch.tensor([0.3] * 7 + [0.1] * 7 + [0.7, 0.7, 0.7, -1.3])
    groups = torch.tensor([5] * 7 + [2] * 7 + [9] * 4)
    for scale in ("std", "none"):
        actual = grpo_advantages(rewards, groups, scale=scale, backend=backend)
        assert torch.all(actual[:14] == 0)
        expected = ref.grpo_advantages(rewards, groups, scale=scale)
        torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Properties of algorithms.md (normalize="none" gives the shaped rewards r of Eq. 3 / 5)


def shaped(case: Case, backend: str, alpha1=1.0, alpha2=0.1, eps=1e-6) -> torch.Tensor:
    return gtpo(case, backend, alpha1=alpha1, alpha2=alpha2, eps=eps, normalize="none")


def position_sets(case: Case):
    """(P_t, N_t) as [rows] index tensors, for every group and position."""
    for rows in case.rows:
        rows = torch.tensor(rows)
        for t in range(case.entropy.shape[1]):
            active = case.active[rows, t]
            yield (t, rows[active & case.success[rows]], rows[active & ~case.success[rows]])


@settings(max_examples=12)
@given(
    case=cases(),
    backend=st.sampled_from(BACKENDS),
    alpha1=st.floats(0.0, 2.0),
    alpha2=st.floats(0.01, 1.0),
)
def test_property_1_conservation(case, backend, alpha1, alpha2):
    # sum_{P_t} r = (a1 + a2) d_t and sum_{N_t} r = -(a1 + a2) h_t, up to eps: the exact
    # shortfall is a2 d_t eps / (sum H + eps) (resp. a2 h_t eps / (sum 1/(H+eps) + eps)).
    eps = 1e-6
    r = shaped(case, backend, alpha1, alpha2, eps).double()
    h = case.entropy.double()
    for t, successes, failures in position_sets(case):
        d_t, h_t = len(successes), len(failures)
        if d_t:
            shortfall = alpha2 * d_t * eps / (h[successes, t].sum().item() + eps)
            assert r[successes, t].sum().item() == pytest.approx(
                (alpha1 + alpha2) * d_t - shortfall, rel=1e-5, abs=1e-5
            )
        if h_t:
            inverse_sum = (1.0 / (h[failures, t] + eps)).sum().item()
            shortfall = alpha2 * h_t * eps / (inverse_sum + eps)
            assert r[failures, t].sum().item() == pytest.approx(
                -(alpha1 + alpha2) * h_t + shortfall, rel=1e-5, abs=1e-5
            )


@settings(max_examples=12)
@given(
    case=cases(zero_entropy=False), backend=st.sampled_from(BACKENDS), level=st.floats(0.05, 8.0)
)
def test_property_2_uniform_entropy(case, backend, level):
    # Equal entropies across each position's rows (varying across positions) give a1 + a2
    # on success tokens and -(a1 + a2) on failure tokens; the deviation is at most
    # a2 * eps / H (successes) and a2 * eps * (H + eps) (failures), H <= 4.3 * level here.
    levels = level * (1.0 + torch.arange(case.entropy.shape[1], dtype=torch.float32) / 7)
    case.entropy = levels.expand_as(case.entropy).clone()
    r = shaped(case, backend)
    bound = 0.1 * 1e-6 * (1.0 / level + 5 * level) + 1e-6
    success_tokens = case.active & case.success[:, None]
    failure_tokens = case.active & ~case.success[:, None]
    assert torch.all((r[success_tokens] - 1.1).abs() <= bound)
    assert torch.all((r[failure_tokens] + 1.1).abs() <= bound)
    assert torch.all(r[~case.active] == 0)


@settings(max_examples=8)
@given(
    case=cases(zero_entropy=False, min_entropy=0.05),
    backend=st.sampled_from(BACKENDS),
    exponent=st.integers(-3, 3),
    factor=st.floats(0.3, 3.0),
)
def test_property_3_scale_invariance(case, backend, exponent, factor):
    # With eps = 0 and a power-of-two factor every float operation scales exactly, so r is
    # bit-identical; with eps = 1e-6 and any factor r moves by O(a2 G eps / min H) only.
    base = shaped(case, backend, eps=0.0)
    scaled_case = Case(
        case.rewards,
        case.entropy * 2.0**exponent,
        case.mask,
        case.groups,
        case.rows,
        case.threshold,
    )
    assert torch.equal(shaped(scaled_case, backend, eps=0.0), base)

    scaled_case.entropy = case.entropy * factor
    min_h = 0.05 * min(factor, 1.0)
    bound = 4 * 0.1 * case.max_group * 1e-6 / min_h + 1e-6
    error = (shaped(scaled_case, backend) - shaped(case, backend)).abs()
    assert torch.all(error <= bound)


@settings(max_examples=12)
@given(
    case=cases(), backend=st.sampled_from(BACKENDS), normalize=st.sampled_from(["none", "separate"])
)
def test_property_4_monotone_in_entropy(case, backend, normalize):
    # Within P_t, r grows with H; within N_t, r falls as H falls. Rounding is monotone, so
    # this holds exactly in float32; "separate" whitening is increasing affine per set.
    r = gtpo(case, backend, normalize=normalize)
    for t, successes, failures in position_sets(case):
        for rows in (successes, failures):
            h, values = case.entropy[rows, t], r[rows, t]
            lower = h[:, None] < h[None, :]
            assert torch.all((values[:, None] <= values[None, :])[lower])


@settings(max_examples=12)
@given(
    case=cases(),
    backend=st.sampled_from(BACKENDS),
    alpha1=st.floats(0.0, 2.0),
    alpha2=st.floats(0.01, 1.0),
)
def test_property_5_bounds(case, backend, alpha1, alpha2):
    # a1 <= r <= a1 + a2 d_t on successes, -(a1 + a2 h_t) <= r <= -a1 on failures (to an ulp).
    r = shaped(case, backend, alpha1, alpha2).double()
    slack = 4 * U32 * (alpha1 + alpha2 * case.max_group)
    for t, successes, failures in position_sets(case):
        assert torch.all(r[successes, t] >= alpha1 - slack)
        assert torch.all(r[successes, t] <= alpha1 + alpha2 * len(successes) + slack)
        assert torch.all(r[failures, t] <= -alpha1 + slack)
        assert torch.all(r[failures, t] >= -(alpha1 + alpha2 * len(failures)) - slack)


@settings(max_examples=12)
@given(
    case=cases(),
    backend=st.sampled_from(BACKENDS),
    scope=st.sampled_from(SCOPES),
    alpha1=st.floats(0.0, 2.0),
    alpha2=st.floats(0.01, 1.0),
)
def test_property_6_separate_whitening(case, backend, scope, alpha1, alpha2):
    # Each set ends with mean 0 and unbiased variance var / (var + 1e-8) (~1 unless the set
    # has no spread); a set of fewer than two tokens is all 0.
    advantages = gtpo(
        case, backend, alpha1=alpha1, alpha2=alpha2, normalize="separate", scope=scope
    )
    assert_whitened_close(advantages, case, "separate", scope, alpha1=alpha1, alpha2=alpha2)
    r = gtpo_reference(case, alpha1=alpha1, alpha2=alpha2, normalize="none")
    for tokens in whitening_sets(case, "separate", scope):
        n = int(tokens.sum())
        if n < 2:
            assert torch.all(advantages[tokens] == 0)
            continue
        var_r = r[tokens].var().item()
        values = advantages[tokens].double()
        assert abs(values.mean().item()) <= ATOL
        assert values.var().item() == pytest.approx(var_r / (var_r + 1e-8), rel=1e-4, abs=ATOL)


@settings(max_examples=8)
@given(
    case=cases(),
    backend=st.sampled_from(BACKENDS),
    scope=st.sampled_from(SCOPES),
    alpha1=st.floats(0.0, 2.0),
    alpha2=st.floats(0.01, 1.0),
)
def test_separate_whitening_cancels_the_alphas(case, backend, scope, alpha1, alpha2):
    # Under "separate" alpha1 is constant within each set and cancels exactly (the kernels
    # never add it, so the result is bit-identical); alpha2 scales r - mean and cancels up to
    # the 1e-8 in sqrt(var + 1e-8), i.e. wherever a set's variance is well above 1e-8.
    separate = dict(normalize="separate", scope=scope)
    advantages = gtpo(case, backend, alpha1=alpha1, alpha2=alpha2, **separate)
    assert torch.equal(advantages, gtpo(case, backend, alpha1=1.0, alpha2=alpha2, **separate))
    default = gtpo(case, backend, **separate)
    unit_r = shaped(case, "torch", 0.0, 1.0).double()
    for tokens in whitening_sets(case, "separate", scope):
        if int(tokens.sum()) < 2:
            continue
        smaller_var = min(alpha2, 0.1) ** 2 * unit_r[tokens].var().item()
        if smaller_var < 1e-3:
            continue  # the 1e-8 shifts the result by more than 1e-5 relative
        torch.testing.assert_close(advantages[tokens], default[tokens], rtol=RTOL, atol=ATOL)


@settings(max_examples=8)
@given(
    case=cases(filtering=True),
    backend=st.sampled_from(BACKENDS),
    normalize=st.sampled_from(NORMALIZE),
    scope=st.sampled_from(SCOPES),
    data=st.data(),
)
def test_property_7_permutation_equivariance(case, backend, normalize, scope, data):
    # Permuting rows inside their groups permutes the outputs (an id tensor may even be
    # permuted across the whole batch, ids moving with their rows). Summation order changes,
    # so equality is to rounding (the bound of assert_whitened_close).
    batch = case.rewards.shape[0]
    if isinstance(case.groups, int):
        perm = torch.arange(batch)
        for rows in case.rows:
            shuffle = torch.tensor(data.draw(st.permutations(range(len(rows)))))
            perm[rows] = torch.tensor(rows)[shuffle]
        groups = case.groups
    else:
        perm = torch.tensor(data.draw(st.permutations(range(batch))))
        groups = case.groups[perm]
    inverse = torch.argsort(perm)
    permuted = Case(
        case.rewards[perm],
        case.entropy[perm],
        None if case.mask is None else case.mask[perm],
        groups,
        [sorted(inverse[rows].tolist()) for rows in case.rows],
        case.threshold,
        case.filter_groups,
    )
    expected = gtpo(case, backend, normalize=normalize, scope=scope)
    actual = gtpo(permuted, backend, normalize=normalize, scope=scope)
    assert_whitened_close(actual, permuted, normalize, scope)
    assert_whitened_close(expected[perm], permuted, normalize, scope)
    options = dict(success_threshold=case.threshold)
    expected = ref.grpo_s_advantages(
        permuted.rewards, permuted.entropy, permuted.mask, groups, **options
    )
    for actual in (
        grpo_s_advantages(
            permuted.rewards, permuted.entropy, permuted.mask, groups, backend=backend, **options
        ),
        grpo_s_advantages(
            case.rewards, case.entropy, case.mask, case.groups, backend=backend, **options
        )[perm],
    ):
        assert_sequence_close(actual, expected, permuted)


@settings(max_examples=8)
@given(
    case=cases(max_groups=3, filtering=True),
    backend=st.sampled_from(BACKENDS),
    normalize=st.sampled_from(NORMALIZE),
    data=st.data(),
)
def test_property_7_group_scope_is_local(case, backend, normalize, data):
    # With scope="group" a group's output does not depend on any other group: redraw every
    # other group's rewards, entropies and mask, and the kept group is bit-identical.
    kept = torch.tensor(case.rows[data.draw(st.integers(0, len(case.rows) - 1))])
    others = torch.ones(case.rewards.shape[0], dtype=torch.bool)
    others[kept] = False
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    changed = Case(
        case.rewards.clone(),
        case.entropy.clone(),
        None if case.mask is None else case.mask.clone(),
        case.groups,
        case.rows,
        case.threshold,
        case.filter_groups,
    )
    changed.rewards[others] = torch.randn(int(others.sum()), generator=gen)
    changed.entropy[others] = (
        torch.rand(int(others.sum()), case.entropy.shape[1], generator=gen) * 9
    )
    if changed.mask is not None:
        redrawn = torch.rand(int(others.sum()), case.entropy.shape[1], generator=gen) < 0.5
        changed.mask[others] = redrawn.to(changed.mask.dtype)
    before = gtpo(case, backend, normalize=normalize, scope="group")
    after = gtpo(changed, backend, normalize=normalize, scope="group")
    assert torch.equal(before[kept], after[kept])
    for function in (grpo_s_advantages, grpo_s_rewards):
        before = function(
            case.rewards,
            case.entropy,
            case.mask,
            case.groups,
            success_threshold=case.threshold,
            backend=backend,
        )
        after = function(
            changed.rewards,
            changed.entropy,
            changed.mask,
            case.groups,
            success_threshold=case.threshold,
            backend=backend,
        )
        assert torch.equal(before[kept], after[kept])


@settings(max_examples=12)
@given(
    case=cases(),
    backend=st.sampled_from(BACKENDS),
    beta1=st.floats(0.0, 2.0),
    beta2=st.floats(0.01, 1.0),
)
def test_property_8_grpo_s_conservation(case, backend, beta1, beta2):
    # sum_success r = (b1 + b2) n and sum_failure r = -(b1 + b2) m per group, up to the exact
    # eps shortfall (as in property 1, on the sequence-mean entropies of Eq. 8).
    eps = 1e-6
    r = grpo_s_rewards(
        case.rewards,
        case.entropy,
        case.mask,
        case.groups,
        beta1=beta1,
        beta2=beta2,
        success_threshold=case.threshold,
        eps=eps,
        backend=backend,
    ).double()
    h = case.entropy.double()
    mean_h = torch.where(case.active, h, 0.0).sum(1) / case.active.sum(1).clamp_min(1).double()
    # A row without active tokens has no Eq. 8 mean entropy and stands alone.
    nonempty = case.active.any(1)
    groups = [[i for i in rows if nonempty[i]] for rows in case.rows]
    groups += [[i] for rows in case.rows for i in rows if not nonempty[i]]
    for rows in filter(None, groups):
        rows = torch.tensor(rows)
        successes, failures = rows[case.success[rows]], rows[~case.success[rows]]
        n, m = len(successes), len(failures)
        if n:
            shortfall = beta2 * n * eps / (mean_h[successes].sum().item() + eps)
            assert r[successes].sum().item() == pytest.approx(
                (beta1 + beta2) * n - shortfall, rel=1e-5, abs=1e-5
            )
        if m:
            shortfall = beta2 * m * eps / ((1.0 / (mean_h[failures] + eps)).sum().item() + eps)
            assert r[failures].sum().item() == pytest.approx(
                -(beta1 + beta2) * m + shortfall, rel=1e-5, abs=1e-5
            )


@settings(max_examples=12)
@given(
    case=cases(filtering=True),
    backend=st.sampled_from(BACKENDS),
    normalize=st.sampled_from(NORMALIZE),
    scope=st.sampled_from(SCOPES),
)
def test_property_9_inactive_zero_and_no_gradient(case, backend, normalize, scope):
    # Inactive positions are exactly 0 whatever they hold (NaN / inf included: the kernels
    # must mask before use), and no gradient reaches the entropy.
    entropy = case.entropy.clone()
    entropy[~case.active] = float("nan")
    entropy[~case.active & (torch.arange(entropy.shape[1]) % 2 == 0)] = float("inf")
    entropy.requires_grad_(True)
    advantages = gtpo_advantages(
        case.rewards,
        entropy,
        case.mask,
        case.groups,
        success_threshold=case.threshold,
        normalize=normalize,
        scope=scope,
        filter_groups=case.filter_groups,
        backend=backend,
    )
    assert not advantages.requires_grad
    assert torch.all(advantages[~case.active] == 0)
    assert torch.all(advantages[case.active].isfinite())
    sequence = grpo_s_advantages(
        case.rewards,
        entropy,
        case.mask,
        case.groups,
        success_threshold=case.threshold,
        filter_groups=case.filter_groups,
        backend=backend,
    )
    assert not sequence.requires_grad and torch.all(sequence.isfinite())


# ---------------------------------------------------------------------------------------------
# Group forms, layouts, NaN, edge shapes


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_groups_equal_consecutive_ids(backend):
    # groups=G and the id tensor arange(B) // G describe the same grouping.
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(12, generator=gen) > 0.5).float()
    entropy = torch.rand(12, 9, generator=gen) * 3
    mask = torch.rand(12, 9, generator=gen) > 0.3
    ids = torch.arange(12) // 4
    for normalize, scope in (("separate", "batch"), ("joint", "group"), ("none", "batch")):
        a = gtpo_advantages(
            rewards, entropy, mask, 4, normalize=normalize, scope=scope, backend=backend
        )
        b = gtpo_advantages(
            rewards, entropy, mask, ids, normalize=normalize, scope=scope, backend=backend
        )
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        grpo_s_advantages(rewards, entropy, mask, 4, backend=backend),
        grpo_s_advantages(rewards, entropy, mask, ids, backend=backend),
    )
    torch.testing.assert_close(
        grpo_advantages(rewards, 4, backend=backend),
        grpo_advantages(rewards, ids.int(), backend=backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_entropy_and_mask_dtypes(backend):
    # A strided view of the entropy and bool / float / int masks give the same result as
    # contiguous inputs with a bool mask.
    gen = torch.Generator().manual_seed(1)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    storage = torch.rand(6, 40, generator=gen) * 3
    entropy = storage[:, 3:36:3]  # strides (40, 3)
    mask = torch.rand(entropy.shape, generator=gen) > 0.25
    expected = gtpo_advantages(rewards, entropy.contiguous(), mask, 3, backend=backend)
    for mask_variant in (mask, mask.float(), mask.int(), mask.t().contiguous().t()):
        actual = gtpo_advantages(rewards, entropy, mask_variant, 3, backend=backend)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        grpo_s_advantages(rewards, entropy, mask, 3, backend=backend),
        grpo_s_advantages(rewards, entropy.contiguous(), mask, 3, backend=backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    # A NaN entropy at an active position, or a NaN reward, shows in the outputs it feeds.
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    entropy = torch.rand(4, 5, generator=torch.Generator().manual_seed(2))
    entropy[0, 2] = float("nan")
    r = gtpo_advantages(rewards, entropy, None, 2, normalize="none", backend=backend)
    assert torch.isnan(r[0, 2]) and torch.isfinite(r[2:]).all()
    assert torch.isnan(gtpo_advantages(rewards, entropy, None, 2, backend=backend)[0]).any()
    assert torch.isnan(grpo_s_advantages(rewards, entropy, None, 2, backend=backend)[:2]).all()
    entropy[0, 2] = 0.5
    rewards[3] = float("nan")
    r = gtpo_advantages(rewards, entropy, None, 2, normalize="none", backend=backend)
    assert torch.isnan(r[3]).all() and torch.isfinite(r[:3]).all()
    assert torch.isnan(grpo_advantages(rewards, 2, backend=backend)[2:]).all()
    assert torch.isnan(grpo_s_advantages(rewards, entropy, None, 2, backend=backend)[2:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend):
    # B = 0 and T = 0 return empty results without launching anything.
    empty = torch.zeros(0)
    assert gtpo_advantages(empty, torch.zeros(0, 5), None, 1, backend=backend).shape == (0, 5)
    assert grpo_advantages(empty, torch.zeros(0, dtype=torch.long), backend=backend).shape == (0,)
    out = gtpo_advantages(torch.ones(2), torch.zeros(2, 0), None, 2, backend=backend)
    assert out.shape == (2, 0)
    torch.testing.assert_close(
        grpo_s_advantages(torch.tensor([1.0, 0.0]), torch.zeros(2, 0), None, 2, backend=backend),
        ref.grpo_s_advantages(torch.tensor([1.0, 0.0]), torch.zeros(2, 0), None, 2).float(),
    )


# ---------------------------------------------------------------------------------------------
# Bad input


def _bad_calls():
    rewards, entropy, mask = torch.ones(4), torch.rand(4, 3), torch.ones(4, 3, dtype=torch.bool)
    yield "groups", lambda: gtpo_advantages(rewards, entropy, mask, 3)  # B % G != 0
    yield "groups", lambda: gtpo_advantages(rewards, entropy, mask, 0)
    yield "groups", lambda: gtpo_advantages(rewards, entropy, mask, True)
    yield "groups", lambda: gtpo_advantages(rewards, entropy, mask, 2.0)
    yield "groups", lambda: gtpo_advantages(rewards, entropy, mask, torch.zeros(4))
    yield "groups", lambda: gtpo_advantages(rewards, entropy, mask, torch.zeros(3, dtype=int))
    yield "groups", lambda: grpo_advantages(rewards, torch.zeros(2, 2, dtype=torch.long))
    yield "groups", lambda: grpo_s_advantages(rewards, entropy, mask, 3)
    yield "entropy", lambda: gtpo_advantages(rewards, torch.rand(5, 3), mask, 2)
    yield "entropy", lambda: gtpo_advantages(rewards, torch.rand(4), None, 2)
    yield "entropy", lambda: gtpo_advantages(rewards, torch.ones(4, 3, dtype=int), None, 2)
    yield "mask", lambda: gtpo_advantages(rewards, entropy, mask[:, :2], 2)
    yield "mask", lambda: grpo_s_advantages(rewards, entropy, mask.t(), 2)
    yield "rewards", lambda: gtpo_advantages(rewards[None], entropy, mask, 2)
    yield "rewards", lambda: grpo_advantages([1.0, 0.0], 2)
    yield "normalize", lambda: gtpo_advantages(rewards, entropy, mask, 2, normalize="whiten")
    yield "scope", lambda: gtpo_advantages(rewards, entropy, mask, 2, scope="prompt")
    yield "scale", lambda: grpo_advantages(rewards, 2, scale="mad")
    yield "eps", lambda: gtpo_advantages(rewards, entropy, mask, 2, eps=-1.0)
    yield "eps", lambda: grpo_s_advantages(rewards, entropy, mask, 2, eps=float("nan"))
    yield "backend", lambda: gtpo_advantages(rewards, entropy, mask, 2, backend="cuda")
    yield "backend", lambda: grpo_advantages(rewards, 2, backend="")


@pytest.mark.parametrize("argument, call", list(_bad_calls()))
def test_bad_input_raises_value_error(argument, call):
    with pytest.raises(ValueError, match=argument):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_s_row_without_active_tokens_stands_alone(backend):
    """A masked-out response (e.g. truncated) has no Eq. 8 mean entropy: it must not swamp its
    group's failure sum with 1/eps, and it gets advantage 0. The others see a group without it."""
    generator = torch.Generator().manual_seed(31)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    entropy = torch.rand(8, 6, generator=generator) + 0.2
    mask = torch.rand(8, 6, generator=generator) > 0.2
    mask[:, 0] = True
    mask[2] = False  # a failure row of group 0 with no active token
    got = grpo_s_advantages(rewards, entropy, mask, 4, backend=backend)
    assert got[2] == 0
    kept = torch.tensor([0, 1, 3, 4, 5, 6, 7])
    want = grpo_s_advantages(
        rewards[kept],
        entropy[kept],
        mask[kept],
        torch.tensor([0, 0, 0, 1, 1, 1, 1]),
        backend=backend,
    )
    torch.testing.assert_close(got[kept], want)
    reference = ref.grpo_s_advantages(rewards, entropy, mask, 4)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_one_row_per_set_keeps_the_eps_sized_spread(backend, scope):
    # Groups of two, one success and one failure: every set at every position holds one row,
    # so Eq. 3 / 5 give a1 + a2 - a2 eps / (H + eps) and its mirror, a spread of ~1e-7 that
    # "separate" whitening (sqrt(var + 1e-8) ~ 1e-4) magnifies a thousandfold. Computed as
    # r = a1 + a2 * d_t H / (sum H + eps) in float32, the spread would be rounding noise.
    gen = torch.Generator().manual_seed(3)
    rewards = torch.tensor([1.0, 0.0] * 4)
    entropy = torch.rand(8, 16, generator=gen) * 2 + 0.1
    options = dict(normalize="separate", scope=scope)
    actual = gtpo_advantages(rewards, entropy, None, 2, backend=backend, **options)
    expected = ref.gtpo_advantages(rewards, entropy, None, 2, **options)
    # The reference's advantages are small but not noise: the test is not vacuous.
    assert expected.abs().max() > 100 * ATOL
    torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_success_is_decided_in_the_rewards_dtype(backend):
    # reward > threshold as PyTorch compares it: a float32 reward equal to a threshold that
    # float32 cannot hold (0.3) is a failure; a float64 reward just above 0 is a success
    # (rounding it to float32 first would lose neither here, but 1e-50 -> 0.0 would).
    entropy = torch.rand(4, 3, generator=torch.Generator().manual_seed(4)) + 0.1
    F64 = torch.float64
    for rewards, threshold, success in (
        (torch.tensor([0.3, 0.0, 1.0, 0.0]), 0.3, [False, False, True, False]),
        (torch.tensor([1e-50, 0.0, 1.0, 0.0], dtype=F64), 0.0, [True, False, True, False]),
    ):
        options = dict(success_threshold=threshold, normalize="none", filter_groups=False)
        r = gtpo_advantages(rewards, entropy, None, 2, backend=backend, **options)
        assert (r[:, 0] > 0).tolist() == success
        torch.testing.assert_close(
            r.double(), ref.gtpo_advantages(rewards, entropy, None, 2, **options)
        )
        s = grpo_s_rewards(rewards, entropy, None, 2, success_threshold=threshold, backend=backend)
        assert (s > 0).tolist() == success
        torch.testing.assert_close(
            s.double(), ref.grpo_s_rewards(rewards, entropy, None, 2, success_threshold=threshold)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_inputs_propagate(backend):
    # api.md: NaN or inf in the inputs is never silently turned into a number. An infinite
    # reward would simply count as a success (or failure), and an infinite entropy on a
    # failure row would give 1 / inf = 0: both are read as NaN instead.
    entropy = torch.rand(4, 5, generator=torch.Generator().manual_seed(5)) + 0.1
    rewards = torch.tensor([float("inf"), 0.0, 1.0, 0.0])
    r = gtpo_advantages(rewards, entropy, None, 2, normalize="none", backend=backend)
    assert torch.isnan(r[0]).all() and torch.isfinite(r[1:]).all()
    assert torch.isnan(grpo_s_advantages(rewards, entropy, None, 2, backend=backend)[:2]).all()
    assert torch.isnan(grpo_advantages(rewards, 2, backend=backend)[:2]).all()

    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    entropy[1, 2] = float("inf")  # a failure row
    r = gtpo_advantages(rewards, entropy, None, 2, normalize="none", backend=backend)
    assert torch.isnan(r[1, 2]) and torch.isfinite(r[2:]).all()
    assert torch.isnan(grpo_s_advantages(rewards, entropy, None, 2, backend=backend)[:2]).all()
    torch.testing.assert_close(
        r.double(),
        ref.gtpo_advantages(rewards, entropy, None, 2, normalize="none"),
        equal_nan=True,
    )
