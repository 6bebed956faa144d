"""The fused linear GPU routes' folds, run on CPU: cuBLAS-style tiles (BLAS here) reduced by the
Triton scoring kernels under the interpreter (``fold="triton"`` of the torch backend's tiles),
the bfloat16 split of ``dlogits``, and the choice of the forward route."""

from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_linear import VALUE_TOL, assert_grads, leaves, make_head, small_tiles  # noqa: F401

import entropy_kernels as ek
from entropy_kernels import linear_scoring, reference
from entropy_kernels.backends import split_matmuls, torch_linear


@pytest.mark.parametrize(
    "dtype, half_rows",
    [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
     (torch.bfloat16, True), (torch.float16, True)],
    ids=str,
)  # fmt: skip
def test_tiled_gradients_with_the_triton_fold(monkeypatch, dtype, half_rows):
    """The cuBLAS-tiled gradients with the scoring backward kernel as the fold (the GPU route
    "blas-triton-fold"), run here under the interpreter through the torch backend's tiles: each
    tile's tokens are tile-local, outside the tile for most rows, -1 for ignored ones.

    ``half_rows``: the rows stay in their half dtype, as on CUDA (here the products are formed
    from exact float32 copies): bfloat16 tiles then take the split fold (three bfloat16 parts
    of ``dlogits``) and the matmuls over the parts."""
    from entropy_kernels.backends.torch_linear import torch_linear_backward, torch_linear_forward

    folds, splits = [], []

    def with_triton_fold(*args):
        folds.append(1)
        return torch_linear_backward(*args, fold="triton")

    def forward_with_triton_fold(*args):
        folds.append(0)
        return torch_linear_forward(*args, fold="triton")

    count_split_launches(monkeypatch, splits)
    if half_rows:
        monkeypatch.setattr(torch_linear, "matmul_rows", lambda block: block)
    monkeypatch.setattr(linear_scoring, "torch_linear_backward", with_triton_fold)
    monkeypatch.setattr(linear_scoring, "torch_linear_forward", forward_with_triton_fold)
    hidden, weight, head_bias, tokens = make_head(2, 5, 37, 203, dtype=dtype)
    tokens[1, 2] = -100
    poisoned = hidden.clone()
    poisoned[1, 2] = float("nan")  # an ignored row leaves no trace, even a non-finite one
    head_bias[7] = float("-inf")  # a masked vocabulary entry
    head_bias[64:128] = float("-inf")  # a whole tile of them, holding a token
    tokens[0, 3] = 100
    tokens = tokens.int()
    ours = leaves((poisoned, weight, head_bias))
    refs = leaves((hidden, weight, head_bias), torch.float64)
    logp, entropy = ek.linear_logprobs_and_entropy(
        *ours[:2], tokens, bias=ours[2], temperature=0.7, backend="torch"
    )
    ref_logp, ref_entropy = reference.linear_logprobs_and_entropy(
        *refs[:2], tokens, bias=refs[2], temperature=0.7
    )
    generator = torch.Generator().manual_seed(2)
    grad_logp, grad_entropy = torch.randn(2, 2, 5, generator=generator)
    ((logp * grad_logp).sum() + (entropy * grad_entropy).sum()).backward()
    ((ref_logp * grad_logp).sum() + (ref_entropy * grad_entropy).sum()).backward()
    assert logp[0, 3] == float("-inf") and ref_logp[0, 3] == float("-inf")
    assert folds == [0, 1]
    # Rows of 8, a 203-wide vocabulary in tiles of 64: 2 row blocks x 4 tiles.
    assert len(splits) == (8 if half_rows and dtype != torch.float32 else 0)
    assert all(shape[0] == split_matmuls.DLOGITS_PARTS for shape in splits)
    assert_grads(ours, refs)
    # Unvalidated tokens outside the vocabulary give NaN, not a neighbour's log-prob, and a
    # non-finite row of a scored token gives NaN.
    bad = tokens.clone()
    bad[1, 0], bad[1, 1] = 203, -5
    nan_row = hidden.clone()
    nan_row[0, 1] = float("nan")
    with torch.no_grad():
        logp, entropy = ek.linear_logprobs_and_entropy(
            nan_row, weight, bad, bias=head_bias, validate=False, backend="torch"
        )
    assert torch.isnan(logp[1, :2]).all() and torch.isfinite(logp[1, 3])
    assert torch.isnan(logp[0, 1]) and torch.isnan(entropy[0, 1]) and torch.isfinite(logp[0, 0])
    assert folds == [0, 1, 0]


def count_split_launches(monkeypatch, shapes):
    """Record the parts' shape of each launch of the split fold in ``shapes``."""
    make_launcher = torch_linear.split_backward_launcher

    def counted_launcher(*args):
        launch = make_launcher(*args)
        return lambda *a: shapes.append(a[-1].shape) or launch(*a)

    monkeypatch.setattr(torch_linear, "split_backward_launcher", counted_launcher)


@pytest.mark.parametrize("n_parts", [2, 3])
def test_split_fold_parts(n_parts):
    """The split fold's parts: the first is the bfloat16 rounding (to nearest even) of the
    float32 ``dlogits``, each next one that of what the previous ones leave, so k parts sum to
    within 2^-8k of it, as the torch split (``bfloat16_parts``) gives them."""
    from entropy_kernels.ops.scoring import scoring_backward_out, scoring_backward_split

    generator = torch.Generator().manual_seed(3)
    rows, width = 6, 131
    logits = torch.randn(rows, width, generator=generator) * 3
    tokens = torch.randint(0, width + 1, (rows,), generator=generator)  # width: outside
    tokens[2] = -1  # ignored
    logprobs, entropy, normaliser = ek.ops.scoring.scoring_forward(
        logits, tokens.clamp_max(width - 1), 0.7, -1, "torch", False
    )
    grads = tuple(torch.randn(rows, generator=generator) for _ in range(2))
    saved = (normaliser, entropy.reshape(-1))
    dlogits = torch.empty_like(logits)
    scoring_backward_out(logits, tokens, *saved, *grads, 0.7, -1, "triton", dlogits)
    parts = torch.empty((n_parts, rows, width), dtype=torch.bfloat16)
    scoring_backward_split(logits, tokens, saved, grads, 0.7, -1, parts)
    assert torch.equal(parts[0], dlogits.bfloat16())
    assert torch.equal(parts[1], (dlogits - parts[0].float()).bfloat16())
    for index, part in enumerate(split_matmuls.bfloat16_parts(dlogits, n_parts)):
        assert torch.equal(parts[index], part), index
    assert torch.equal(parts[:, 2], torch.zeros(n_parts, width, dtype=torch.bfloat16))
    error = (parts.double().sum(0) - dlogits.double()).abs()
    assert (error <= dlogits.abs().double() * 2.0 ** (-8 * n_parts)).all()
    assert parts[-1].abs().max() > 0  # the last part carries something


def test_gpu_forward_route_follows_the_need_for_gradients(monkeypatch):
    """``LINEAR_GPU_FORWARD = "auto"``: the cuBLAS fold (measured faster alone) for a forward
    without gradients, the tl.dot kernel (faster before the backward) for a training forward."""
    from entropy_kernels import kernel_config

    monkeypatch.setattr(kernel_config, "LINEAR_GPU_FORWARD", "auto")
    assert linear_scoring.gpu_forward_route(needs_grad=False) == "blas-triton-fold"
    assert linear_scoring.gpu_forward_route(needs_grad=True) == "tiles"
    monkeypatch.setattr(kernel_config, "LINEAR_GPU_FORWARD", "tiles")
    assert linear_scoring.gpu_forward_route(needs_grad=False) == "tiles"
    seen = []
    forward = linear_scoring.linear_forward

    def recorded(*args):
        seen.append(args[-1])
        return forward(*args)

    monkeypatch.setattr(linear_scoring, "linear_forward", recorded)
    hidden, weight, bias, tokens = make_head(1, 3, 8, 20)
    with torch.no_grad():
        ek.linear_logprobs_and_entropy(hidden, weight, tokens, backend="torch")
    ek.linear_logprobs_and_entropy(hidden, weight, tokens, backend="torch")
    ek.linear_logprobs_and_entropy(hidden, weight.requires_grad_(), tokens, backend="torch")
    with torch.no_grad():  # old log-probs from the model's own (trainable) head
        ek.linear_logprobs_and_entropy(hidden, weight, tokens, backend="torch")
    assert seen == [False, False, True, False]


def triton_folds(mp, half_rows):
    """Patch the torch backend's tiles to take the GPU routes' Triton folds (``mp``: a
    ``MonkeyPatch``); ``half_rows``: keep half-precision rows as on CUDA."""
    forward, backward = torch_linear.torch_linear_forward, torch_linear.torch_linear_backward
    mp.setattr(linear_scoring, "torch_linear_forward", lambda *a: forward(*a, fold="triton"))
    mp.setattr(linear_scoring, "torch_linear_backward", lambda *a: backward(*a, fold="triton"))
    if half_rows:
        mp.setattr(torch_linear, "matmul_rows", lambda block: block)


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 11), st.integers(1, 40), st.integers(1, 200)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    half_rows=st.booleans(),
    bias=st.sampled_from(["none", "plain", "masked"]),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    ignored=st.booleans(),
    wanted=st.sampled_from(["all", "hidden", "weight", "bias"]),
    seed=st.integers(0, 2**16),
)
def test_triton_folds_agree_with_the_torch_fold(
    shape, dtype, half_rows, bias, temperature, ignored, wanted, seed
):
    """Values of both Triton folds (forward and backward) equal the torch fold's, and the
    gradients of both folds hold the spec's tolerance against the float64 reference (two
    half-precision gradients, each rounded once, may sit one unit apart, so they are not
    compared with each other), over shapes that cut the 8 x 64 test tiles anywhere (a
    vocabulary of one entry, one row), masked vocabulary entries (tokens on them too: log-prob
    -inf), ignored rows, and gradients wanted for every input or for one of them only."""
    batch, seq, size, vocab = shape
    hidden, weight, head_bias, tokens = make_head(
        batch, seq, size, vocab, dtype=dtype, bias=bias != "none", seed=seed
    )
    if bias == "masked" and vocab > 1:
        head_bias[1::3] = float("-inf")
    if ignored:
        tokens[0, 0] = -100
    grads = torch.randn(2, batch, seq, generator=torch.Generator().manual_seed(seed))
    results = []
    for fold in ("torch", "triton", "float64"):
        with pytest.MonkeyPatch.context() as mp:
            if fold == "triton":
                triton_folds(mp, half_rows)
            mp.setattr(torch_linear, "TILE_ROWS", 8)
            mp.setattr(torch_linear, "TILE_VOCAB", 64)
            inputs = leaves(
                (hidden, weight, head_bias), torch.float64 if fold == "float64" else None
            )
            for name, tensor in zip(("hidden", "weight", "bias"), inputs, strict=True):
                if tensor is not None and wanted not in ("all", name):
                    tensor.requires_grad_(False)
            score = (
                reference.linear_logprobs_and_entropy
                if fold == "float64"
                else partial(ek.linear_logprobs_and_entropy, backend="torch")
            )
            logp, entropy = score(*inputs[:2], tokens, bias=inputs[2], temperature=temperature)
            results.append((logp, entropy, inputs))
            if not logp.requires_grad:  # the one wanted input is a missing bias
                continue
            finite = torch.isfinite(logp)  # -inf where the token is masked out
            loss = (torch.where(finite, logp, 0.0) * grads[0]).sum() + (entropy * grads[1]).sum()
            loss.backward()
    (want_logp, want_entropy, want), (logp, entropy, got), (*_, truth) = results
    torch.testing.assert_close(logp, want_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy, want_entropy, **VALUE_TOL)
    assert_grads(want, truth)
    assert_grads(got, truth)


def test_float16_splits_exactly_into_bfloat16_parts():
    """A float16 operand is the exact sum of its two bfloat16 parts, over float16's whole range
    (subnormals, the largest values, signs), so the split matmuls lose nothing on the operand."""
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16)
    values = values[torch.isfinite(values)]
    high, low = split_matmuls.operand_parts(values)
    assert high.dtype == low.dtype == torch.bfloat16
    assert torch.equal(high.double() + low.double(), values.double())
    same, none = split_matmuls.operand_parts(values.bfloat16())
    assert none is None and torch.equal(same, values.bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounded_dlogits_route_stays_within_its_rounding_bound(monkeypatch, dtype):
    """The opt-in route "blas-bf16-dlogits" (outside the spec's tolerance) rounds ``dlogits``
    to bfloat16, the high part alone, and multiplies that exactly: each gradient element is
    within ``2^-8`` (bfloat16's unit roundoff) of ``|dlogits| @ |operand|`` of the float64
    truth, plus the rounding of the gradient itself to the input dtype. A dropped tile, a wrong
    sign or a wrong scale breaks the bound by orders of magnitude."""
    backward = torch_linear.torch_linear_backward
    monkeypatch.setattr(linear_scoring, "torch_linear_backward",
                        lambda *a: backward(*a, fold="triton-rounded"))  # fmt: skip
    monkeypatch.setattr(torch_linear, "matmul_rows", lambda block: block)
    shapes = []
    count_split_launches(monkeypatch, shapes)
    hidden, weight, head_bias, tokens = make_head(2, 5, 37, 203, dtype=dtype)
    tokens[1, 2] = -100
    assert_rounded_gradients(hidden, weight, head_bias, tokens, "torch")
    assert len(shapes) == 8 and {shape[0] for shape in shapes} == {1}  # 2 row blocks x 4 tiles


def assert_rounded_gradients(hidden, weight, head_bias, tokens, backend):
    """Gradients of ``linear_logprobs_and_entropy`` within the rounded route's bound (see
    :func:`test_rounded_dlogits_route_stays_within_its_rounding_bound`)."""
    ours = leaves((hidden, weight, head_bias))
    logp, entropy = ek.linear_logprobs_and_entropy(
        *ours[:2], tokens, bias=ours[2], temperature=0.7, backend=backend
    )
    generator = torch.Generator(device=hidden.device).manual_seed(4)
    grad_logp, grad_entropy = torch.randn(
        2, *tokens.shape, generator=generator, device=hidden.device
    )
    ((logp * grad_logp).sum() + (entropy * grad_entropy).sum()).backward()
    rows, head, bias64 = (t.detach().double() for t in (hidden, weight, head_bias))
    logits = (rows @ head.T + bias64).requires_grad_()
    ref_logp, ref_entropy = reference.logprobs_and_entropy(logits, tokens, temperature=0.7)
    loss = (ref_logp * grad_logp).sum() + (ref_entropy * grad_entropy).sum()
    (dlogits,) = torch.autograd.grad(loss, logits)
    size, vocab = weight.shape[1], weight.shape[0]
    dlogits, rows = dlogits.reshape(-1, vocab), rows.reshape(-1, size)
    unit = 2.0**-8 if hidden.dtype == torch.bfloat16 else 2.0**-11  # the gradient's own rounding
    for mine, truth, spread in (
        (ours[0].grad.reshape(-1, size), dlogits @ head, dlogits.abs() @ head.abs()),
        (ours[1].grad, dlogits.T @ rows, dlogits.T.abs() @ rows.abs()),
        (ours[2].grad, dlogits.sum(0), dlogits.abs().sum(0)),
    ):
        bound = unit * truth.abs() + (1 + unit) * (2.0**-8 + 1e-5) * spread
        assert ((mine.double() - truth).abs() <= bound).all()


@given(
    n_ranges=st.integers(1, 5),
    n_rows=st.integers(1, 40),
    per_range_logits=st.booleans(),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    seed=st.integers(0, 2**16),
)
def test_merge_kernel_matches_its_torch_twin(n_ranges, n_rows, per_range_logits, temperature, seed):
    """The Triton merge of the fused linear forward's range states (one launch) gives what the
    torch epilogue gives (``merge_states`` + ``finish_rows``), bit for bit up to float32
    rounding: empty ranges (``m = -inf``, ``s = w = 0``), rows empty everywhere, ignored rows,
    tokens outside the vocabulary (NaN), the token's logit read from its own range."""
    from entropy_kernels.ops.linear_lse import finish_rows, merge_rows, merge_states

    generator = torch.Generator().manual_seed(seed)
    width, ignore = 7, -100
    vocab = n_ranges * width - 3  # the last range is narrower
    part_max = torch.randn(n_ranges, n_rows, generator=generator) * 3
    part_sum = torch.rand(n_ranges, n_rows, generator=generator) * 5 + 0.5
    part_sum_z = -torch.rand(n_ranges, n_rows, generator=generator) * part_sum
    empty = torch.rand(n_ranges, n_rows, generator=generator) < 0.3
    part_max[empty], part_sum[empty], part_sum_z[empty] = float("-inf"), 0.0, 0.0
    state = torch.stack([part_max, part_sum, part_sum_z], 1).contiguous()
    tokens = torch.randint(-3, vocab + 3, (n_rows,), generator=generator)
    tokens[torch.rand(n_rows, generator=generator) < 0.2] = ignore
    logits_shape = (n_ranges, n_rows) if per_range_logits else (n_rows,)
    token_logit = torch.randn(logits_shape, generator=generator)
    inv_temperature = 1.0 / temperature
    got = merge_rows(state, token_logit, tokens, vocab, width, inv_temperature, ignore)
    own = token_logit
    if per_range_logits:
        own = token_logit.gather(0, (tokens // width).clamp(0, n_ranges - 1).unsqueeze(0))[0]
    own = own.masked_fill((tokens < 0) | (tokens >= vocab), float("nan"))
    want = finish_rows(*merge_states(state, inv_temperature), own, tokens == ignore,
                       inv_temperature)  # fmt: skip
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=2e-6, atol=2e-6, equal_nan=True)


def test_backward_holds_one_row_blocks_operands_at_a_time(monkeypatch):
    """The backward's per-block operands (rows in the matmul dtype, masked, and their bfloat16
    parts: up to four times the block's hidden states) exist for one row block at a time, so
    that they do not grow with N: each is built when its block is reached, and the previous
    block's are gone by then (4 row blocks of at most 8 here, 4 vocabulary tiles)."""
    import gc
    import weakref

    built, alive_at_build = [], []
    make_operands = torch_linear._block_operands

    def tracked(*args):
        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in built))
        operands = make_operands(*args)
        built.append(weakref.ref(operands[1][0]))  # the stacked bfloat16 high parts
        return operands

    monkeypatch.setattr(torch_linear, "_block_operands", tracked)
    triton_folds(monkeypatch, half_rows=True)
    hidden, weight, head_bias, tokens = make_head(2, 11, 37, 203, dtype=torch.bfloat16)
    inputs = leaves((hidden, weight, head_bias))
    logp, entropy = ek.linear_logprobs_and_entropy(*inputs[:2], tokens, bias=inputs[2])
    (logp.sum() + entropy.sum()).backward()
    assert len(built) == 4 * 4 and max(alive_at_build) <= 1
