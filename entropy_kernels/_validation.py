"""Argument checks shared by the public functions; each failure is a ValueError naming it."""

from __future__ import annotations

import math

import torch

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` means the Triton kernels on CUDA and the chunked PyTorch path elsewhere."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def check_positive_float(name: str, value: float) -> None:
    # Plain comparisons (False for NaN): torch.compile with dynamic shapes may trace a float
    # as a symbolic one, which math.isfinite cannot take.
    if not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_logits_and_tokens(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(
            f"logits must be float16, bfloat16 or float32 [..., V], got dtype {logits.dtype}"
        )
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(
            "logits must have unit stride in the vocabulary (last) dimension, got strides "
            f"{tuple(logits.stride())}; leading dimensions may have any strides"
        )
    check_tokens(tokens, "logits", logits)


def check_tokens(tokens: torch.Tensor, name: str, scored: torch.Tensor) -> None:
    """Integer ``tokens`` with the leading shape of ``scored [..., V or H]``, on its device."""
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if tuple(tokens.shape) != tuple(scored.shape[:-1]):
        raise ValueError(
            f"tokens must have the leading shape of {name} {tuple(scored.shape[:-1])}, "
            f"got {tuple(tokens.shape)}"
        )
    if tokens.device != scored.device:
        raise ValueError(f"tokens must be on {scored.device} like {name}, got {tokens.device}")


def check_token_range(tokens: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Tokens must lie in [0, V) or equal ignore_index (one reduction and one host sync).

    Skipped while torch.compile traces (a host sync would break the graph); the kernels never
    read out of bounds, and an out-of-range token yields NaN.
    """
    if tokens.numel() == 0 or torch.compiler.is_compiling():
        return
    valid = ((tokens >= 0) & (tokens < vocab_size)) | (tokens == ignore_index)
    if not bool(valid.all()):
        bad = tokens[~valid][0].item()
        raise ValueError(
            f"tokens must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {bad}"
        )


def check_companion(name: str, value: torch.Tensor | None, shape: tuple, device) -> None:
    """A per-token or per-sequence tensor that must match ``shape`` exactly."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(value)}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on {device}, got {value.device}")
