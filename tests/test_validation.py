"""Bad input gets a ValueError naming the argument, on both backends; odd but valid input
(narrow or unsigned token dtypes, NaN padding at inactive positions) works."""

import math

import pytest
import torch

import entropy_kernels as ek

BACKENDS = ["torch", "triton"]
INTEGER_DTYPES = [
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]
B, T, V, G = 4, 3, 40, 2


def make_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=generator)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.rand(B, T, generator=generator) > 0.3
    mask[:, 0] = True
    logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend="torch")
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    return dict(
        logits=logits,
        tokens=tokens,
        mask=mask,
        advantages=torch.randn(B, generator=generator),
        rewards=rewards,
        old_logprobs=logp - 0.1,
        ref_logprobs=logp - 0.2,
        entropy=entropy,
    )


def call_public(name, inputs, backend, **options):
    """Call public function `name` on `inputs` (see make_inputs) with `options`."""
    x = inputs
    if name == "logprobs_and_entropy":
        return ek.logprobs_and_entropy(x["logits"], x["tokens"], backend=backend, **options)
    if name == "policy_loss":
        return ek.policy_loss(
            x["logits"], x["tokens"], x["advantages"], x["mask"], backend=backend, **options
        )
    if name in ("gtpo_loss", "grpo_s_loss"):
        loss = getattr(ek, name)
        return loss(
            x["logits"], x["tokens"], x["rewards"], x["mask"], G, backend=backend, **options
        )
    if name == "grpo_advantages":
        return ek.grpo_advantages(x["rewards"], G, backend=backend, **options)
    shaping = getattr(ek, name)
    return shaping(x["rewards"], x["entropy"], x["mask"], G, backend=backend, **options)


LOSSES = ["policy_loss", "gtpo_loss", "grpo_s_loss"]
PUBLIC = [
    "logprobs_and_entropy",
    *LOSSES,
    "grpo_advantages",
    "gtpo_advantages",
    "grpo_s_advantages",
]


@pytest.fixture(scope="module")
def triton_imported():
    """Triton imported under the interpreter: it reads TRITON_INTERPRET when triton.language
    is imported, which torch does at the first custom-op call (later tests need it on)."""
    inputs = make_inputs()
    call_public("logprobs_and_entropy", inputs, "triton")


@pytest.fixture
def interpreter_off(triton_imported, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    return monkeypatch


@pytest.mark.parametrize("name", PUBLIC)
@pytest.mark.parametrize("value", [None, "0", "false"])
def test_triton_backend_on_cpu_needs_the_interpreter(name, value, interpreter_off):
    if value is not None:
        interpreter_off.setenv("TRITON_INTERPRET", value)
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET=1"):
        call_public(name, make_inputs(), "triton")
    # The choice of backend is still the user's: the torch backend runs.
    call_public(name, make_inputs(), "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_every_integer_token_dtype_scores_like_int64(dtype, backend):
    inputs = make_inputs(1)
    tokens = inputs["tokens"]
    if dtype.is_signed:  # -100 fits every signed dtype: an ignored token
        tokens = tokens.clone()
        tokens[0, 1] = -100
    want = call_public("logprobs_and_entropy", {**inputs, "tokens": tokens}, backend)
    narrow = {**inputs, "tokens": tokens.to(dtype)}
    got = call_public("logprobs_and_entropy", narrow, backend)
    for ours, expected in zip(got, want, strict=True):
        assert torch.equal(ours, expected)
    if dtype.is_signed:
        assert got[0][0, 1] == 0.0 and got[1][0, 1] == 0.0
    # The losses share the conversion; the interpreter is slow, so one dtype of each kind.
    if backend == "torch" or dtype in (torch.uint8, torch.int16):
        for name in LOSSES:
            loss = call_public(name, narrow, backend).loss
            assert torch.equal(loss, call_public(name, {**inputs, "tokens": tokens}, backend).loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsigned_tokens_out_of_range_are_named(backend):
    inputs = make_inputs()
    tokens = inputs["tokens"].to(torch.uint8)
    tokens[1, 1] = 200  # >= V
    with pytest.raises(ValueError, match="tokens must lie in .* found 200"):
        call_public("logprobs_and_entropy", {**inputs, "tokens": tokens}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_negative_mask_weights_raise(name, backend):
    inputs = make_inputs()
    mask = inputs["mask"].float()
    mask[2, 0] = -0.5
    with pytest.raises(ValueError, match="mask"):
        call_public(name, {**inputs, "mask": mask}, backend)
    # validate=False skips the host sync: no error, the caller vouches for the mask.
    call_public(name, {**inputs, "mask": mask}, backend, validate=False)


@pytest.mark.parametrize("name", LOSSES)
def test_complex_mask_raises(name):
    inputs = make_inputs()
    with pytest.raises(ValueError, match="mask"):
        call_public(name, {**inputs, "mask": inputs["mask"].to(torch.complex64)}, "torch")


SHAPING = ["gtpo_advantages", "grpo_s_advantages", "gtpo_loss", "grpo_s_loss"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SHAPING)
def test_nan_success_threshold_raises(name, backend):
    with pytest.raises(ValueError, match="success_threshold"):
        call_public(name, make_inputs(), backend, success_threshold=math.nan)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SHAPING)
@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan])
def test_bad_entropy_weight_raises(name, value, backend):
    option = "alpha2" if name.startswith("gtpo") else "beta2"
    with pytest.raises(ValueError, match=option):
        call_public(name, make_inputs(), backend, **{option: value})


@pytest.mark.parametrize(
    "module, options",
    [
        (ek.GTPOLoss, dict(alpha2=-1.0)),
        (ek.GTPOLoss, dict(success_threshold=math.nan)),
        (ek.GRPOSLoss, dict(beta2=-1.0)),
        (ek.GRPOSLoss, dict(success_threshold=math.nan)),
    ],
)
def test_modules_reject_bad_shaping_options_at_construction(module, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        module(**options)


def test_modules_accept_backend_triton_at_construction_anywhere(interpreter_off):
    """Where the tensors live is known only at the call: construction checks the name only."""
    ek.GTPOLoss(backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ek.GRPOSLoss(backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gtpo_loss", "grpo_s_loss"])
def test_negative_old_entropy_raises_at_active_positions_only(name, backend):
    inputs = make_inputs()
    old_entropy = inputs["entropy"].clone()
    inactive = (~inputs["mask"]).nonzero()[0].tolist()
    old_entropy[tuple(inactive)] = -1.0  # padding: fine
    call_public(name, inputs, backend, old_entropy=old_entropy)
    old_entropy[0, 0] = -1e-3
    with pytest.raises(ValueError, match="old_entropy"):
        call_public(name, inputs, backend, old_entropy=old_entropy)
    call_public(name, inputs, backend, old_entropy=old_entropy, validate=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("argument", ["old_logprobs", "ref_logprobs"])
def test_positive_log_probs_raise_at_active_positions(argument, name, backend):
    inputs = make_inputs()
    options = {"kl_coef": 0.1} if argument == "ref_logprobs" else {}
    probabilities = inputs[argument].exp()  # the common mistake
    with pytest.raises(ValueError, match=f"{argument} must be log-probabilities"):
        call_public(name, inputs, backend, **options, **{argument: probabilities})
    padded = inputs[argument].clone()
    padded[~inputs["mask"]] = 0.5  # inactive: takes no part
    call_public(name, inputs, backend, **options, **{argument: padded})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_nan_log_probs_propagate_and_pad(name, backend):
    inputs = make_inputs()
    old = inputs["old_logprobs"].clone()
    old[~inputs["mask"]] = math.nan  # padding at inactive positions: legal
    out = call_public(name, inputs, backend, old_logprobs=old)
    assert torch.isfinite(out.loss)
    old[0, 0] = math.nan  # active: the loss is NaN, not an error and not a number
    out = call_public(name, inputs, backend, old_logprobs=old)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_in_the_int64_range(backend):
    inputs = make_inputs()
    tokens = inputs["tokens"].to(torch.int32)
    tokens[0, 0] = 0  # 2**40 wraps to 0 in int32: no token may be taken for ignored
    far = ek.logprobs_and_entropy(inputs["logits"], tokens, ignore_index=2**40, backend=backend)
    near = ek.logprobs_and_entropy(inputs["logits"], tokens, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(far, near, strict=True))
    for value in (2**70, True, 1.0):
        with pytest.raises(ValueError, match="ignore_index"):
            ek.logprobs_and_entropy(inputs["logits"], tokens, ignore_index=value, backend=backend)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(
    "option, value",
    [("clip_low", "0.2"), ("clip_high", None), ("kl_coef", True), ("entropy_coef", [0.1]),
     ("dual_clip", "3"), ("temperature", True)],
)  # fmt: skip
def test_non_numeric_options_raise_value_errors_naming_them(name, option, value):
    """A string, bool or list where a number belongs is bad input like an out-of-range number:
    a ValueError naming the option, not a TypeError from a comparison (or True read as 1)."""
    options = {option: value}
    if option == "kl_coef":
        options["ref_logprobs"] = make_inputs()["ref_logprobs"]
    with pytest.raises(ValueError, match=option):
        call_public(name, make_inputs(), "torch", **options)


def test_one_element_tensor_coefficients_are_accepted():
    """A scheduled coefficient may arrive as a 0-dim tensor."""
    inputs = make_inputs()
    plain = call_public("policy_loss", inputs, "torch", entropy_coef=0.01)
    tensor = call_public("policy_loss", inputs, "torch", entropy_coef=torch.tensor(0.01))
    torch.testing.assert_close(tensor.loss, plain.loss)
