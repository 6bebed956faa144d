"""The fused linear losses with every objective, and in half precision on both backends, against
the logits function on logits materialised from the float64 head (the spec: each linear result
equals the logits function applied to ``hidden @ weight.T + bias`` formed in float32). Gradients
reach the float64 hidden, weight and bias through those logits."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_linear import VALUE_TOL, assert_grads, leaves, make_head, small_tiles  # noqa: F401
from test_linear_loss import loss_inputs

import entropy_kernels as ek
from entropy_kernels.objectives import OBJECTIVES, Objective

BACKENDS = ["torch", "triton"]
OBJECTIVE_CASES = [Objective(name) for name in OBJECTIVES] + [
    Objective("clip", ratio_level="sequence"),
    Objective("cispo", ratio_level="sequence-token"),
    Objective("sapo", ratio_level="sequence-token"),
]


def logits_of(head):
    """Float32 logits of a float64 head (leaves with gradients), as the spec defines them."""
    hidden, weight, bias = head
    logits = hidden @ weight.T
    return (logits if bias is None else logits + bias).float()


def compare_with_logits_loss(linear_fn, logits_fn, head, *args, backend, **options):
    hidden, weight, bias, tokens = head
    ours = leaves((hidden, weight, bias))
    refs = leaves((hidden, weight, bias), torch.float64)
    # clip_cov draws its cut tokens from torch's global generator: the same draws for both.
    torch.manual_seed(0)
    got = linear_fn(*ours[:2], tokens, *args, bias=ours[2], backend=backend, **options)
    torch.manual_seed(0)
    want = logits_fn(logits_of(refs), tokens, *args, backend="torch", **options)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(got.loss.double(), want.loss.double(), **VALUE_TOL)
    torch.testing.assert_close(got.logprobs.double(), want.logprobs.double(), **VALUE_TOL)
    torch.testing.assert_close(got.entropy.double(), want.entropy.double(), **VALUE_TOL)
    assert_grads(ours, refs)


def compare_policy_loss(head, seed, backend, objective, **options):
    """``linear_policy_loss`` off policy with an entropy bonus, against ``policy_loss``."""
    advantages, mask, old, _ = loss_inputs(head, seed=seed)
    mask[:, 0] = True  # no empty sequence (sequence-level ratios average over tokens)
    # loss_inputs puts some old log-probs exactly on the current ones; kl_cov's |logp - old| has
    # no gradient there (each float32 path picks its own side), so move every old one off it.
    old = old - 0.05
    if objective.name == "kl_cov":
        # Its top-covariance pick is a tie between exactly two active tokens (their centred
        # products are equal), which each path breaks by its last bit: keep every token.
        mask[:] = True
    compare_with_logits_loss(
        ek.linear_policy_loss,
        ek.policy_loss,
        head,
        advantages,
        mask,
        old_logprobs=old,
        objective=objective,
        entropy_coef=0.01,
        backend=backend,
        **options,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVE_CASES, ids=lambda o: f"{o.name}-{o.ratio_level}")
def test_every_objective_matches_the_logits_loss(backend, objective):
    compare_policy_loss(make_head(3, 6, 21, 150, seed=4), 4, backend, objective, temperature=0.9)


@settings(max_examples=8, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 24), st.integers(2, 90)),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    bias=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    objective=st.sampled_from(OBJECTIVE_CASES),
    seed=st.integers(0, 2**16),
)
def test_half_precision_losses_on_both_backends(shape, dtype, bias, backend, objective, seed):
    """Half-precision heads, with or without bias, any objective, either backend."""
    batch, seq, size, vocab = shape
    assume(objective.name != "kl_cov" or batch * seq != 2)  # a tie by construction (see above)
    head = make_head(batch, seq, size, vocab, dtype=dtype, bias=bias, seed=seed)
    compare_policy_loss(head, seed, backend, objective)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss", ["gtpo", "grpo_s"])
def test_shaped_losses_in_half_precision_with_group_ids(backend, dtype, loss):
    """GTPO / GRPO-S one-call forms: half precision, no bias, groups as ids, an ignored token,
    old entropy given."""
    head = make_head(4, 5, 19, 97, dtype=dtype, bias=False, seed=7)
    hidden, weight, bias, tokens = head
    tokens[2, 1] = -100
    _, mask, old, _ = loss_inputs(head, seed=7)
    mask[:, 0] = True
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 1, 0, 1])
    old_entropy = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(7)) * 3
    linear_fn = ek.linear_gtpo_loss if loss == "gtpo" else ek.linear_grpo_s_loss
    logits_fn = ek.gtpo_loss if loss == "gtpo" else ek.grpo_s_loss
    compare_with_logits_loss(
        linear_fn,
        logits_fn,
        (hidden, weight, bias, tokens),
        rewards,
        mask,
        groups,
        old_logprobs=old,
        old_entropy=old_entropy,
        backend=backend,
    )
