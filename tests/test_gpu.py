"""The same comparisons at real sizes on a CUDA device (skipped without one).

V = 151,936 is Qwen2's vocabulary (not a multiple of the 4096-wide block); more than 65,535
rows checks that the 1-D grid has no y/z-dimension limit; more than 2^31 logits checks the
int64 offsets. The float64 truth is computed in row chunks to fit memory.
"""

import pytest
import torch

import entropy_kernels as ek
from entropy_kernels import reference

pytestmark = pytest.mark.gpu

VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_GRAD_TOL = dict(rtol=2**-7, atol=1e-5)


def chunked_truth(logits, tokens, grad_logp, grad_entropy, rows_per_chunk=1024, **kwargs):
    """Float64 log-probs, entropy and gradient (rounded to the logits' dtype), chunk by chunk."""
    logp, entropy, grad = [], [], []
    flat = logits.view(-1, logits.shape[-1])
    for start in range(0, flat.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        x = flat[rows].double().requires_grad_()
        lp, h = reference.logprobs_and_entropy(x, tokens.view(-1)[rows], **kwargs)
        (
            lp * grad_logp.view(-1)[rows].double() + h * grad_entropy.view(-1)[rows].double()
        ).sum().backward()
        logp.append(lp.detach())
        entropy.append(h.detach())
        grad.append(x.grad.to(logits.dtype))
    return torch.cat(logp), torch.cat(entropy), torch.cat(grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qwen_vocabulary_against_float64(dtype):
    torch.manual_seed(0)
    vocab, rows = 151_936, 2_048
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    logits[:, -7:] = float("-inf")  # masked vocabulary tail, as padded vocabularies have
    tokens = torch.randint(0, vocab - 7, (rows,), device="cuda")
    tokens[::17] = -100
    x = logits.clone().requires_grad_()
    logp, entropy = ek.logprobs_and_entropy(x, tokens, temperature=0.8, backend="triton")
    grad_logp, grad_entropy = torch.randn_like(logp), torch.randn_like(entropy)
    (logp * grad_logp + entropy * grad_entropy).sum().backward()
    want_logp, want_entropy, want_grad = chunked_truth(
        logits, tokens, grad_logp, grad_entropy, temperature=0.8
    )
    torch.testing.assert_close(logp.double(), want_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), want_entropy, **VALUE_TOL)
    tol = BF16_GRAD_TOL if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.float(), want_grad.float(), **tol)
    assert torch.all(x.grad[:, -7:] == 0)
    if dtype == torch.bfloat16:
        # Rounded to nearest once: equal to the rounded float64 gradient but where float32
        # error straddles a rounding boundary (truncation would miss about half).
        nonzero = want_grad != 0
        mismatched = (x.grad != want_grad) & nonzero
        assert int(mismatched.sum()) <= 0.01 * int(nonzero.sum())


def test_more_than_65535_rows_and_int64_offsets():
    """70,000 x 32,768 bf16 logits: 2.3e9 elements, past int32 offsets and the grid-y limit."""
    torch.manual_seed(1)
    rows, vocab = 70_000, 32_768
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, vocab, (rows,), device="cuda")
    logp, entropy = ek.logprobs_and_entropy(logits, tokens, backend="triton")
    tail = slice(rows - 512, rows)  # the rows whose offsets exceed 2^31
    want_logp, want_entropy = reference.logprobs_and_entropy(logits[tail].double(), tokens[tail])
    torch.testing.assert_close(logp[tail].double(), want_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy[tail].double(), want_entropy, **VALUE_TOL)


def test_strided_view_against_torch_backend():
    torch.manual_seed(2)
    full = torch.randn(8, 513, 151_936, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 151_936, (8, 513), device="cuda")
    kernel = ek.logprobs_and_entropy(full[:, :-1], ids[:, 1:], backend="triton")
    chunked = ek.logprobs_and_entropy(full[:, :-1], ids[:, 1:], backend="torch")
    for got, want in zip(kernel, chunked, strict=True):
        torch.testing.assert_close(got, want, **VALUE_TOL)


@pytest.mark.parametrize(
    "aggregation",
    ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"],
)
def test_policy_loss_against_reference(aggregation):
    torch.manual_seed(3)
    batch, seq, vocab = 4, 256, 151_936
    logits = torch.randn(batch, seq, vocab, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
    adv = torch.randn(batch, seq, device="cuda")
    mask = torch.rand(batch, seq, device="cuda") > 0.2
    old = torch.randn(batch, seq, device="cuda") * 0.1 - 12.5
    options = dict(
        old_logprobs=old,
        clip_high=0.28,
        dual_clip=3.0,
        aggregation=aggregation,
        entropy_coef=0.01,
    )
    x = logits.clone().requires_grad_()
    out = ek.policy_loss(x, tokens, adv, mask, backend="triton", **options)
    out.loss.backward()
    ref_x = logits.double().requires_grad_()
    ref = reference.policy_loss(ref_x, tokens, adv, mask, **options)
    ref.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss, **VALUE_TOL)
    torch.testing.assert_close(
        x.grad.float(), ref_x.grad.to(torch.bfloat16).float(), **BF16_GRAD_TOL
    )


def test_inplace_backward_allocates_no_logits_sized_buffer():
    """Peak memory with inplace_backward stays within O(N) of the inputs."""
    torch.manual_seed(4)
    rows, vocab = 8_192, 151_936
    weight = torch.randn(vocab, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    hidden = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, vocab, (1, rows), device="cuda")
    adv = torch.randn(1, rows, device="cuda")
    logits_bytes = rows * vocab * 2
    for inplace in (False, True):
        weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        logits = (hidden @ weight.T).view(1, rows, vocab)
        out = ek.policy_loss(logits, tokens, adv, inplace_backward=inplace, backend="triton")
        out.loss.backward()
        del logits, out
        peak = torch.cuda.max_memory_allocated() - start
        extra = peak - logits_bytes
        if inplace:
            assert extra < 0.1 * logits_bytes, f"inplace peak {peak} has a logits-sized buffer"
        else:
            assert extra >= 0.9 * logits_bytes, "the non-inplace gradient must be a new buffer"


def test_new_batch_shapes_do_not_recompile():
    """B and T are runtime values: after the first call, other shapes reuse the same binary."""
    from entropy_kernels.kernels.scoring_fwd import scoring_fwd_kernel

    caches = getattr(scoring_fwd_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version does not expose its kernel cache")

    def compiled_variants():
        return sum(len(entry[0]) for entry in caches.values())

    vocab = 151_936
    # Warm up the way trainers call it: a logits view against a shifted token view.
    warm = torch.randn(2, 101, vocab, device="cuda", dtype=torch.bfloat16)
    warm_ids = torch.randint(0, vocab, (2, 101), device="cuda")
    ek.logprobs_and_entropy(warm[:, :-1], warm_ids[:, 1:])
    before = compiled_variants()
    for batch, seq in [(3, 37), (1, 513), (8, 1), (5, 64)]:
        logits = torch.randn(batch, seq + 1, vocab, device="cuda", dtype=torch.bfloat16)
        tokens = torch.randint(0, vocab, (batch, seq + 1), device="cuda")
        ek.logprobs_and_entropy(logits[:, :-1], tokens[:, 1:])
    assert compiled_variants() == before


def test_advantage_shaping_kernels_at_scale_without_host_sync():
    """512 rows x 2048 positions, groups of 8 as a count and as unsorted ids: Triton equals
    the torch backend, and no kernel path synchronises with the host."""
    torch.manual_seed(5)
    batch, seq, group = 512, 2048, 8
    rewards = (torch.rand(batch, device="cuda") > 0.5).float()
    entropy = torch.rand(batch, seq, device="cuda") * 3
    mask = torch.rand(batch, seq, device="cuda") > 0.1
    ids = torch.randperm(batch, device="cuda") % (batch // group)

    def run(fn, backend, **options):
        torch.cuda.set_sync_debug_mode("error" if backend == "triton" else "default")
        try:
            return fn(backend=backend, **options)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    for groups in (group, ids):
        for normalize in ("separate", "joint", "none"):
            for scope in ("batch", "group"):

                def gtpo(backend, groups=groups, normalize=normalize, scope=scope):
                    return ek.gtpo_advantages(
                        rewards,
                        entropy,
                        mask,
                        groups,
                        normalize=normalize,
                        scope=scope,
                        backend=backend,
                    )

                torch.testing.assert_close(
                    run(gtpo, "triton"), run(gtpo, "torch"), rtol=1e-5, atol=1e-5
                )

        def grpo_s(backend, groups=groups):
            return ek.grpo_s_advantages(rewards, entropy, mask, groups, backend=backend)

        def grpo(backend, groups=groups):
            return ek.grpo_advantages(rewards, groups, backend=backend)

        for fn in (grpo_s, grpo):
            torch.testing.assert_close(run(fn, "triton"), run(fn, "torch"), rtol=1e-5, atol=1e-5)
