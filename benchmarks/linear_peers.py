"""Fused-linear workloads (hidden states and the LM head in, no logits) and their peers.

``linear_scoring``: log-probs + entropy of ``hidden @ weight.T``, no gradient.
``linear_policy_loss``: the clipped surrogate of those log-probs, forward + backward to the
hidden states and the weight. Every implementation gets the same tensors; each closure returns
``(checked, *gradients)`` like those of ``peers``, and its values and gradients are compared
with eager PyTorch's before anything is timed.

verl is not installed beside this library (it pins another transformers): its one file
``verl/utils/experimental/torch_functional.py`` (torch and, optionally, liger_kernel only) is
taken from the verl wheel, which ``pip download --no-deps`` puts in :data:`VERL_CACHE` once.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peers
import torch

import entropy_kernels as ek

LINEAR_WORKLOADS = ("linear_scoring", "linear_policy_loss")
LINEAR_IMPLS = (
    "eager",
    "trl",
    "liger-ce",
    "liger-grpo",
    "verl",
    "cce",
    "ours-torch",
    "ours-triton",
)
VERL_VERSION = "0.9.1"
VERL_FILE = "verl/utils/experimental/torch_functional.py"
VERL_CACHE = Path(
    os.environ.get("ENTROPY_KERNELS_BENCH_CACHE", Path.home() / ".cache" / "entropy-kernels-bench")
)
# TRL's vocabulary tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE) and verl's token chunk.
TRL_CHUNK = 32768
VERL_CHUNK = 512

LINEAR_DESCRIPTIONS = {
    "eager": (
        "logits = hidden @ weight.T materialised in float32 ([N, V]), then the same eager "
        "log_softmax / gather / entropy / clipped surrogate as the logits workloads"
    ),
    "trl": (
        f"trl.kernels.ChunkedLogProbFunction (TRL 1.16), outputs=('entropy',), vocabulary "
        f"tiles of {TRL_CHUNK} as GRPOTrainer uses it (torch tile folds off CUDA), then the "
        "eager surrogate"
    ),
    "liger-ce": (
        "liger_kernel.ops.LigerFusedLinearScaledCrossEntropyFunction, return_entropy=True "
        "(Liger's fused-linear cross-entropy with entropy; a chunked torch fallback off sm_90), "
        "log-probs = -nll, then the eager surrogate"
    ),
    "liger-grpo": (
        "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss, loss_type='bnpo' (token mean), "
        "beta=0, per-sequence advantages, Liger's defaults otherwise (compiled=True, one row "
        "per chunk); returns the loss only, so policy loss only"
    ),
    "verl": (
        f"verl {VERL_VERSION} verl.utils.experimental.torch_functional.FusedLinearForPPO "
        f"(chunk_size={VERL_CHUNK}, impl_backend='torch'), loaded from the verl wheel's file, "
        "then the eager surrogate"
    ),
    "cce": (
        "cut_cross_entropy.linear_cross_entropy(reduction='none'), impl='cce' (its Triton "
        "kernels, gradient filtering on) on CUDA and 'torch_compile' on CPU, "
        "log-probs = -loss; computes no entropy (only log-probs are checked), then the eager "
        "surrogate"
    ),
    "ours-torch": "entropy_kernels.linear_logprobs_and_entropy / linear_policy_loss, "
    "backend='torch'",
    "ours-triton": "entropy_kernels.linear_*, backend='triton' (CUDA only)",
}
LINEAR_BYTES_MODEL = {
    "linear_scoring": "(N + V) * H * bytes: hidden and weight read once (compute-bound: "
    "2 N H V FLOPs)",
    "linear_policy_loss": "2 * (N + V) * H * bytes: hidden and weight read, their gradients "
    "written (compute-bound: at least 6 N H V FLOPs)",
}
# Relative error (Frobenius norm) of a gradient against eager's, per input dtype.
GRAD_RTOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass
class LinearInputs:
    hidden: torch.Tensor  # [B, T, H], requires grad for the loss
    weight: torch.Tensor  # [V, H], requires grad for the loss
    tokens: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] bool, last position masked out
    advantages: torch.Tensor  # [B, T] float32, constant along T
    sequence_advantages: torch.Tensor  # [B] float32
    old_logprobs: torch.Tensor  # [B, T] float32


def bytes_floor(workload: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> int:
    passes = 1 if workload == "linear_scoring" else 2
    return passes * (tokens + vocab) * hidden * (torch.finfo(dtype).bits // 8)


def make_inputs(workload, tokens, hidden, vocab, dtype, device, seed) -> LinearInputs:
    """Logits of about the logits workloads' scale: ``weight`` ~ 2 / sqrt(H) * randn."""
    if tokens % peers.BATCH or tokens // peers.BATCH < 2:
        raise ValueError(f"token count must be a multiple of {peers.BATCH}, at least 2 per row")
    shape = (peers.BATCH, tokens // peers.BATCH)
    gen = torch.Generator(device=device).manual_seed(seed)
    token_ids = torch.randint(0, vocab, shape, generator=gen, device=device)
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    mask[:, -1] = False
    sequence_advantages = torch.randn(peers.BATCH, generator=gen, device=device)
    states = torch.randn((*shape, hidden), generator=gen, device=device).to(dtype)
    weight = torch.randn((vocab, hidden), generator=gen, device=device)
    weight = (weight * (peers.LOGIT_SCALE / math.sqrt(hidden))).to(dtype)
    old_logprobs = torch.empty(shape, device=device)
    rows = states.reshape(-1, hidden)
    chunk = max(1, (1 << 24) // vocab)
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk):
            logits = rows[start : start + chunk].float() @ weight.float().T
            old_logprobs.view(-1)[start : start + chunk] = peers._exact_logprobs(
                logits, token_ids.view(-1)[start : start + chunk]
            )
    old_logprobs += torch.randn(shape, generator=gen, device=device) * peers.OLD_LOGPROB_NOISE
    grad = workload == "linear_policy_loss"
    return LinearInputs(
        hidden=states.requires_grad_(grad),
        weight=weight.requires_grad_(grad),
        tokens=token_ids,
        mask=mask,
        advantages=sequence_advantages[:, None].expand(shape).contiguous(),
        sequence_advantages=sequence_advantages,
        old_logprobs=old_logprobs,
    )


# --- log-probs (+ entropy) of each peer, [B, T] in, [B, T] out -------------------------------


def eager_linear(hidden, weight, tokens):
    logits = hidden.float() @ weight.float().T
    return peers.eager_logprobs_entropy(logits, tokens)


def _trl(hidden, weight, tokens):
    _without_datasets_shim()
    from trl.kernels import ChunkedLogProbFunction

    flat = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy, *_ = ChunkedLogProbFunction.apply(
        flat, weight, None, tokens.reshape(-1), 1.0, TRL_CHUNK, None, 1.0, ("entropy",)
    )
    return logprobs.view(tokens.shape), entropy.detach().view(tokens.shape)


def _without_datasets_shim() -> None:
    """TRL's chunked backward imports ``trl.trainer.utils`` for one ZeRO-3 gather context,
    and that module imports ``datasets``. Where ``datasets`` is missing (the GPU image), the
    context is what TRL returns without ZeRO-3: a null context."""
    if importlib.util.find_spec("datasets") is not None or "trl.trainer.utils" in sys.modules:
        return
    import contextlib
    import types

    import trl.trainer

    shim = types.ModuleType("trl.trainer.utils")
    shim.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
    sys.modules["trl.trainer.utils"] = trl.trainer.utils = shim


def _liger_ce(hidden, weight, tokens):
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as fused

    flat = hidden.reshape(-1, hidden.shape[-1])
    nll, entropy = fused.apply(flat, weight, tokens.reshape(-1), 1.0, -100, 1, True)
    return -nll.view(tokens.shape), entropy.detach().view(tokens.shape)


def _cce(hidden, weight, tokens):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"  # CCE's Triton kernels need CUDA
    loss = linear_cross_entropy(hidden, weight, tokens, reduction="none", impl=impl)
    return (-loss.float(),)


def load_verl(download: bool = True):
    """verl's FusedLinearForPPO from the cached wheel file, fetched first if `download`."""
    path = VERL_CACHE / f"verl-{VERL_VERSION}" / VERL_FILE
    if not path.exists():
        if not download:
            raise peers.NotApplicable(f"verl {VERL_VERSION} file not cached at {path}")
        _fetch_verl_file(path)
    spec = importlib.util.spec_from_file_location("verl_torch_functional", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FusedLinearForPPO


def _fetch_verl_file(path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        command += [f"verl=={VERL_VERSION}", "-d", tmp]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=300)
            (wheel,) = Path(tmp).glob("verl-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                text = archive.read(VERL_FILE)
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as err:
            raise peers.NotApplicable(f"verl {VERL_VERSION} wheel not fetched ({err})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)


def _verl(download: bool):
    fused = load_verl(download)(chunk_size=VERL_CHUNK, impl_backend="torch")

    def logprobs_entropy(hidden, weight, tokens):
        logprobs, entropy = fused(hidden, weight, tokens)
        return logprobs, entropy.detach()

    return logprobs_entropy


def _ours(backend: str, triton_runs: bool):
    if not hasattr(ek, "linear_logprobs_and_entropy") or not hasattr(ek, "linear_policy_loss"):
        raise peers.NotApplicable("this entropy_kernels has no linear_logprobs_and_entropy yet")
    if backend == "triton" and not triton_runs:
        raise peers.NotApplicable("Triton backend is timed on CUDA only")

    def logprobs_entropy(hidden, weight, tokens):
        return ek.linear_logprobs_and_entropy(hidden, weight, tokens, backend=backend)

    return logprobs_entropy


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise peers.NotApplicable(f"{module} is not installed")


def _logprobs_fn(impl: str, triton_runs: bool, download: bool) -> Callable:
    if impl == "eager":
        return eager_linear
    if impl == "verl":
        return _verl(download)
    if impl.startswith("ours-"):
        return _ours(impl.removeprefix("ours-"), triton_runs)
    module, fn = {"trl": ("trl", _trl), "liger-ce": ("liger_kernel", _liger_ce)}.get(
        impl, ("cut_cross_entropy", _cce)
    )
    _need(module)
    return fn


# --- timed closures --------------------------------------------------------------------------


def _liger_grpo(x: LinearInputs):
    _need("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.0,
        use_ref_model=False,
        epsilon_low=peers.CLIP_LOW,
        epsilon_high=peers.CLIP_HIGH,
        loss_type="bnpo",
    )
    mask = x.mask.long()

    def run():
        loss, _ = loss_fn(
            x.hidden, x.weight, x.tokens, mask, x.sequence_advantages,
            old_per_token_logps=x.old_logprobs,
        )  # fmt: skip
        return (loss.detach(),), *torch.autograd.grad(loss, (x.hidden, x.weight))

    return run


def build(impl: str, workload: str, x: LinearInputs, triton_runs: bool, download: bool = True):
    """The timed function of `impl` on a linear workload, or :class:`peers.NotApplicable`."""
    if impl == "liger-grpo":
        if workload != "linear_policy_loss":
            raise peers.NotApplicable("Liger's fused-linear GRPO loss returns no log-probs")
        return _liger_grpo(x)
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; known: {LINEAR_IMPLS}")
    logprobs_entropy = _logprobs_fn(impl, triton_runs, download)
    if workload == "linear_scoring":

        def run():
            with torch.no_grad():
                return (logprobs_entropy(x.hidden, x.weight, x.tokens),)

        return run
    if impl.startswith("ours-"):
        backend = impl.removeprefix("ours-")

        def run():
            out = ek.linear_policy_loss(
                x.hidden, x.weight, x.tokens, x.advantages, x.mask,
                old_logprobs=x.old_logprobs, clip_low=peers.CLIP_LOW,
                clip_high=peers.CLIP_HIGH, backend=backend,
            )  # fmt: skip
            return (out.loss.detach(),), *torch.autograd.grad(out.loss, (x.hidden, x.weight))

        return run

    def run():
        logprobs = logprobs_entropy(x.hidden, x.weight, x.tokens)[0]
        loss = peers.clipped_surrogate(logprobs, x.old_logprobs, x.advantages, x.mask)
        return (loss.detach(),), *torch.autograd.grad(loss, (x.hidden, x.weight))

    return run


def check_values(result: tuple) -> dict:
    """Log-probs (+ entropy) or the loss, and the gradients (kept: O((N + V) H) floats)."""
    grads = result[1:]
    return {
        "values": peers.check_values(result),
        "grads": [grad.detach().float().cpu() for grad in grads],
        "grad_rtol": GRAD_RTOL[grads[0].dtype] if grads else None,
    }


def disagreement(reference: dict, values: dict) -> str | None:
    """None when `values` match; a peer without entropy is compared on its log-probs only."""
    mismatch = peers.disagreement(reference["values"][: len(values["values"])], values["values"])
    if mismatch is not None:
        return mismatch
    pairs = zip(("hidden", "weight"), reference["grads"], values["grads"], strict=False)
    for name, ref, grad in pairs:
        error = float(torch.linalg.vector_norm(grad - ref) / torch.linalg.vector_norm(ref))
        if not error <= values["grad_rtol"]:
            return f"gradient of {name}: relative error {error:.3g}"
    return None
