"""Workload inputs and the implementations the harness times on them.

Each implementation is built for one workload and one set of inputs and returns a function of
no arguments that does the whole timed piece of work (forward, or forward + backward with
the gradient returned) and returns ``(checked, *other_outputs)``: ``checked`` is a tuple of
small tensors (log-probs and entropy, the loss, or the advantages) compared across
implementations to catch a peer doing different work. An implementation that cannot run the
workload raises :class:`NotApplicable`; its cell then shows "n/a" with the reason, never an
estimate.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

import entropy_kernels as ek

WORKLOADS = ("scoring", "policy_loss", "gtpo_loss", "advantages")
IMPLS = ("eager", "compile", "trl", "liger", "ours-torch", "ours-triton", "ours-triton-inplace")
# Name of the untimed reference values some workloads are checked against.
ORACLE = "entropy_kernels.reference"

# Rows per batch and rows per prompt group of every workload (B = 16 completions, G = 8 per
# prompt); T = N / B tokens per completion.
BATCH = 16
GROUP = 8
CLIP_LOW = 0.2
CLIP_HIGH = 0.28
# Old log-probs are the current ones plus this much noise, so some ratios get clipped.
OLD_LOGPROB_NOISE = 0.1
LOGIT_SCALE = 2.0

IMPL_DESCRIPTIONS = {
    "eager": (
        "what trainers run today: float32 log_softmax of the whole [N, V] logits, gather, "
        "entropy as -(softmax * log_softmax).sum(-1) (no gradient), clipped surrogate in "
        "eager PyTorch; gtpo_loss adds entropy_kernels.gtpo_advantages(backend='torch') on "
        "that entropy; not applicable to the advantages alone (no trainer shapes GTPO "
        "advantages today)"
    ),
    "compile": (
        "torch.compile(dynamic=True) of the eager code (advantages: of "
        "entropy_kernels.gtpo_advantages(backend='torch')); compiled once per workload and "
        "dtype, compilation outside the timing"
    ),
    "trl": (
        "trl.kernels.selective_log_softmax_and_entropy (Triton) for log-probs and entropy, "
        "then the same eager surrogate, as TRL's GRPOTrainer composes it"
    ),
    "liger": (
        "liger_kernel.transformers.grpo_loss.triton_grpo_loss, loss_type='bnpo' (token mean), "
        "inplace=False, per-sequence advantages (its API has no token-level advantages; the "
        "harness's token advantages are constant along each row, so the work is the same)"
    ),
    "ours-torch": "entropy_kernels, backend='torch' (chunked PyTorch, custom autograd)",
    "ours-triton": "entropy_kernels, backend='triton'",
    "ours-triton-inplace": (
        "entropy_kernels.policy_loss, backend='triton', inplace_backward=True (the gradient "
        "overwrites the logits; run last in its cell)"
    ),
}

BYTES_MODEL = {
    "scoring": "N * V * bytes_per_logit: logits read once (O(N) token and output bytes ignored)",
    "policy_loss": (
        "2 * N * V * bytes_per_logit: logits read once, gradient written once (advantages and "
        "old log-probs are inputs, so the gradient can be produced in the forward pass)"
    ),
    "gtpo_loss": (
        "3 * N * V * bytes_per_logit (6 bytes per bfloat16 logit): logits read for the "
        "entropy that shapes the advantages, read again for the gradient, gradient written"
    ),
    "advantages": "N * 9 + B * 4: float32 entropy and bool mask read, float32 advantages written",
}


class NotApplicable(Exception):
    """The implementation is not installed or cannot do this workload here."""


@dataclass
class Inputs:
    """One cell's tensors, shared by every implementation.

    The last position of every row is masked out: Liger's loss takes ``[B, T + 1, V]``
    logits and ignores the last row of each sequence, so masking that row for everyone makes
    all implementations compute the same loss on the same tensors.
    """

    logits: torch.Tensor  # [B, T, V], requires grad for the loss workloads
    tokens: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] bool
    advantages: torch.Tensor  # [B, T] float32, constant along T
    sequence_advantages: torch.Tensor  # [B] float32
    old_logprobs: torch.Tensor  # [B, T] float32
    rewards: torch.Tensor  # [B] float32, one success and one failure at least per group
    entropy: torch.Tensor  # [B, T] float32, positive


def bytes_floor(workload: str, tokens: int, vocab: int, dtype: torch.dtype) -> int:
    bytes_per_logit = torch.finfo(dtype).bits // 8
    if workload == "scoring":
        return tokens * vocab * bytes_per_logit
    if workload == "policy_loss":
        return 2 * tokens * vocab * bytes_per_logit
    if workload == "gtpo_loss":
        return 3 * tokens * vocab * bytes_per_logit
    return tokens * 9 + BATCH * 4


def _exact_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float32 log-probs of the tokens, a few rows at a time to bound the temporary."""
    rows = logits.detach().reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1)
    chunk = max(1, (1 << 26) // logits.shape[-1])
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, rows.shape[0], chunk):
        logp = torch.log_softmax(rows[start : start + chunk].float(), dim=-1)
        out[start : start + chunk] = logp.gather(-1, flat_tokens[start : start + chunk, None])[:, 0]
    return out.reshape(tokens.shape)


def make_inputs(
    workload: str, tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int
) -> Inputs:
    if tokens % BATCH or tokens // BATCH < 2:
        raise ValueError(f"token count must be a multiple of {BATCH} with at least 2 per row")
    seq_len = tokens // BATCH
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (BATCH, seq_len)
    token_ids = torch.randint(0, max(vocab, 1), shape, generator=gen, device=device)
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    mask[:, -1] = False
    sequence_advantages = torch.randn(BATCH, generator=gen, device=device)
    rewards = (torch.arange(BATCH, device=device) % 2 == 0).float()
    entropy = torch.rand(shape, generator=gen, device=device) * 3.0 + 0.01
    if workload == "advantages":
        logits = torch.empty((BATCH, seq_len, 0), dtype=dtype, device=device)
        old_logprobs = torch.zeros(shape, device=device)
    else:
        logits = torch.randn((BATCH, seq_len, vocab), generator=gen, dtype=dtype, device=device)
        logits.mul_(LOGIT_SCALE)
        noise = torch.randn(shape, generator=gen, device=device) * OLD_LOGPROB_NOISE
        old_logprobs = _exact_logprobs(logits, token_ids) + noise
        logits.requires_grad_(workload != "scoring")
    return Inputs(
        logits=logits,
        tokens=token_ids,
        mask=mask,
        advantages=sequence_advantages[:, None].expand(shape).contiguous(),
        sequence_advantages=sequence_advantages,
        old_logprobs=old_logprobs,
        rewards=rewards,
        entropy=entropy,
    )


# --- the eager way ---------------------------------------------------------------------------


def eager_logprobs_entropy(logits: torch.Tensor, tokens: torch.Tensor):
    """float32 log_softmax + gather; entropy from softmax, without gradient."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(torch.softmax(logits.float(), dim=-1) * logp_all).sum(-1)
    return logprobs, entropy


def clipped_surrogate(logprobs, old_logprobs, advantages, mask):
    """Token-mean of the clipped surrogate, with the log-ratio clamp of verl and OpenRLHF."""
    ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -20.0, 20.0))
    clipped = torch.clamp(ratio, 1.0 - CLIP_LOW, 1.0 + CLIP_HIGH)
    per_token = torch.maximum(-advantages * ratio, -advantages * clipped)
    weights = mask.float()
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def _policy_from(logprobs_entropy: Callable):
    def policy(logits, tokens, advantages, mask, old_logprobs):
        logprobs, _ = logprobs_entropy(logits, tokens)
        return clipped_surrogate(logprobs, old_logprobs, advantages, mask)

    return policy


def _gtpo_from(logprobs_entropy: Callable):
    def gtpo(logits, tokens, rewards, mask):
        logprobs, entropy = logprobs_entropy(logits, tokens)
        advantages = ek.gtpo_advantages(rewards, entropy.detach(), mask, GROUP, backend="torch")
        return clipped_surrogate(logprobs, logprobs.detach(), advantages, mask)

    return gtpo


def _bind(workload: str, loss_fn: Callable, inputs: Inputs) -> Callable[[], tuple]:
    """The timed closure of a composed (eager, compiled or TRL) implementation."""
    x = inputs
    if workload == "scoring":

        def run():
            with torch.no_grad():
                return (loss_fn(x.logits, x.tokens),)

        return run
    if workload == "policy_loss":

        def run():
            loss = loss_fn(x.logits, x.tokens, x.advantages, x.mask, x.old_logprobs)
            (grad,) = torch.autograd.grad(loss, x.logits)
            return (loss.detach(),), grad

        return run

    def run():
        loss = loss_fn(x.logits, x.tokens, x.rewards, x.mask)
        (grad,) = torch.autograd.grad(loss, x.logits)
        return (loss.detach(),), grad

    return run


_COMPOSERS = {
    "scoring": lambda logprobs_entropy: logprobs_entropy,
    "policy_loss": _policy_from,
    "gtpo_loss": _gtpo_from,
}


# --- peers -----------------------------------------------------------------------------------


def _eager(workload: str, inputs: Inputs):
    if workload == "advantages":
        raise NotApplicable(
            "no trainer shapes GTPO advantages today: ours-torch is the plain-PyTorch baseline "
            "(values checked against entropy_kernels.reference)"
        )
    return _bind(workload, _COMPOSERS[workload](eager_logprobs_entropy), inputs)


def _gtpo_advantages(rewards, entropy, mask):
    return ek.gtpo_advantages(rewards, entropy, mask, GROUP, backend="torch")


class CompiledPeers:
    """One ``torch.compile`` per workload, reused across cells (guards recompile per dtype)."""

    def __init__(self):
        self._compiled: dict[str, Callable] = {}

    def get(self, workload: str) -> Callable:
        if not self._compiled:
            torch._dynamo.config.recompile_limit = 64
            # A compiled peer that silently fell back to eager would be mislabelled.
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        if workload not in self._compiled:
            if workload == "advantages":
                fn = _gtpo_advantages
            else:
                fn = _COMPOSERS[workload](eager_logprobs_entropy)
            self._compiled[workload] = torch.compile(fn, dynamic=True)
        return self._compiled[workload]


def _compile(workload: str, inputs: Inputs, compiled: CompiledPeers):
    fn = compiled.get(workload)
    if workload == "advantages":
        x = inputs
        return lambda: ((fn(x.rewards, x.entropy, x.mask),),)
    return _bind(workload, fn, inputs)


def _trl(workload: str, inputs: Inputs, triton_runs: bool):
    if workload == "advantages":
        raise NotApplicable("TRL has no advantage-shaping kernel")
    if not triton_runs:
        raise NotApplicable("TRL's kernel is Triton, timed on CUDA only")
    try:
        kernels = importlib.import_module("trl.kernels")
    except ImportError as err:
        raise NotApplicable(f"trl.kernels not importable ({err})") from None
    fused = getattr(kernels, "selective_log_softmax_and_entropy", None)
    if fused is None:
        raise NotApplicable("this TRL has no trl.kernels.selective_log_softmax_and_entropy")

    def logprobs_entropy(logits, tokens):
        logprobs, entropy = fused(logits, tokens)
        return logprobs, entropy.detach()

    return _bind(workload, _COMPOSERS[workload](logprobs_entropy), inputs)


def _liger(workload: str, inputs: Inputs, triton_runs: bool):
    if workload != "policy_loss":
        raise NotApplicable("Liger's GRPO loss returns no entropy; it covers policy_loss only")
    if not triton_runs:
        raise NotApplicable("Liger's kernel is Triton, timed on CUDA only")
    try:
        module = importlib.import_module("liger_kernel.transformers.grpo_loss")
    except ImportError as err:
        raise NotApplicable(f"liger_kernel not importable ({err})") from None
    triton_grpo_loss = module.triton_grpo_loss
    x = inputs
    # Liger pairs logits[:, t] with completion_ids[:, t] for t < T - 1 and drops row T - 1,
    # which every implementation masks out.
    completion_ids = x.tokens[:, :-1].contiguous()
    old_logprobs = x.old_logprobs[:, :-1].contiguous()
    completion_mask = x.mask[:, :-1].long()  # an integer mask, as TRL passes it

    def run():
        loss, _ = triton_grpo_loss(
            x.logits,
            old_logprobs,
            None,
            completion_ids,
            x.sequence_advantages,
            completion_mask,
            temperature=1.0,
            beta=0.0,
            eps_low=CLIP_LOW,
            eps_high=CLIP_HIGH,
            inplace=False,
            loss_type="bnpo",
            reduce=True,
        )
        (grad,) = torch.autograd.grad(loss, x.logits)
        return (loss.detach(),), grad

    return run


def _ours(workload: str, inputs: Inputs, triton_runs: bool, backend: str, inplace: bool):
    if backend == "triton" and not triton_runs:
        raise NotApplicable("Triton backend is timed on CUDA only (TRITON_INTERPRET emulates)")
    if inplace and workload != "policy_loss":
        raise NotApplicable("inplace_backward is a policy_loss option")
    x = inputs
    if workload == "advantages":
        return lambda: (
            (ek.gtpo_advantages(x.rewards, x.entropy, x.mask, GROUP, backend=backend),),
        )
    if workload == "scoring":

        def run():
            with torch.no_grad():
                return (ek.logprobs_and_entropy(x.logits, x.tokens, backend=backend),)

        return run
    if workload == "policy_loss":

        def run():
            # The in-place gradient must overwrite an op's output (as the lm_head's logits
            # are), not a leaf; a view is one and costs nothing.
            logits = x.logits.view_as(x.logits) if inplace else x.logits
            out = ek.policy_loss(
                logits,
                x.tokens,
                x.advantages,
                x.mask,
                old_logprobs=x.old_logprobs,
                clip_low=CLIP_LOW,
                clip_high=CLIP_HIGH,
                inplace_backward=inplace,
                backend=backend,
            )
            (grad,) = torch.autograd.grad(out.loss, x.logits)
            return (out.loss.detach(),), grad

        return run

    def run():
        out = ek.gtpo_loss(
            x.logits,
            x.tokens,
            x.rewards,
            x.mask,
            GROUP,
            clip_low=CLIP_LOW,
            clip_high=CLIP_HIGH,
            backend=backend,
        )
        (grad,) = torch.autograd.grad(out.loss, x.logits)
        return (out.loss.detach(),), grad

    return run


def build(
    impl: str, workload: str, inputs: Inputs, compiled: CompiledPeers, triton_runs: bool
) -> Callable[[], tuple]:
    """The timed function of `impl` on `workload`, or :class:`NotApplicable`.

    `triton_runs`: whether Triton kernels run here: on CUDA, or under TRITON_INTERPRET on CPU,
    which only tests use, to check that the GPU peers are called on the same work.
    """
    if impl == "eager":
        return _eager(workload, inputs)
    if impl == "compile":
        return _compile(workload, inputs, compiled)
    if impl == "trl":
        return _trl(workload, inputs, triton_runs)
    if impl == "liger":
        return _liger(workload, inputs, triton_runs)
    if impl == "ours-torch":
        return _ours(workload, inputs, triton_runs, "torch", inplace=False)
    if impl == "ours-triton":
        return _ours(workload, inputs, triton_runs, "triton", inplace=False)
    if impl == "ours-triton-inplace":
        return _ours(workload, inputs, triton_runs, "triton", inplace=True)
    raise ValueError(f"unknown implementation {impl!r}; known: {IMPLS}")


def oracle_values(workload: str, inputs: Inputs) -> list[torch.Tensor] | None:
    """Values to check a workload against when eager PyTorch does not compute it.

    The advantages are checked against the loop-style float64 reference, far too slow to be
    a timed peer. None where there is no such reference (the cell then records which
    implementation it was checked against instead).
    """
    if workload != "advantages":
        return None
    from entropy_kernels import reference

    gtpo_reference = getattr(reference, "gtpo_advantages", None)
    if gtpo_reference is None:
        return None
    # On the CPU: the loops read one Python float at a time.
    x = inputs
    return [gtpo_reference(x.rewards.cpu(), x.entropy.cpu(), x.mask.cpu(), GROUP).float()]


def check_values(result: tuple) -> list[torch.Tensor]:
    """The small tensors of a result that every implementation must agree on, on the CPU."""
    return [value.detach().float().cpu() for value in result[0]]


# Every implementation does float32 arithmetic on the same inputs; only summation order differs.
CHECK_RTOL = 1e-3
CHECK_ATOL = 1e-4


def disagreement(reference: list[torch.Tensor], values: list[torch.Tensor]) -> str | None:
    """None when `values` match `reference` to the tolerance, else what differs."""
    for index, (ref, val) in enumerate(zip(reference, values, strict=True)):
        if ref.shape != val.shape:
            return f"output {index}: shape {tuple(val.shape)}, expected {tuple(ref.shape)}"
        if not torch.allclose(val, ref, rtol=CHECK_RTOL, atol=CHECK_ATOL, equal_nan=False):
            worst = float((val - ref).abs().nan_to_num(float("inf")).max())
            return f"output {index}: max |difference| {worst:.3g}"
    return None
