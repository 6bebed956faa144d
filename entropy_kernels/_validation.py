"""Argument checks shared by the public functions; each failure is a ValueError naming it."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import numbers
import os

import torch

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The label of tokens that are not scored (PyTorch's and the trainers' default): the default
# `ignore_index`, and the tokens the losses leave out whatever the mask says.
IGNORE_INDEX = -100
BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` means the Triton kernels on CUDA and the chunked PyTorch path elsewhere.

    ``"triton"`` needs the triton package, and on CPU tensors its interpreter
    (``TRITON_INTERPRET=1``): otherwise a ValueError here rather than an error from deep
    inside Triton.
    """
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _has_triton() else "torch"
    if backend == "triton":
        if not _has_triton():
            raise ValueError(
                "backend='triton' needs the triton package, which is not installed; use "
                "backend='torch' or 'auto'"
            )
        if device.type == "cpu" and not _triton_interpreter_on():
            raise ValueError(
                "backend='triton' on CPU tensors runs only under Triton's interpreter "
                "(TRITON_INTERPRET=1 set before triton is imported); use backend='torch' or "
                "'auto' on CPU, or move the tensors to a GPU"
            )
        if device.type == "cpu" and _old_interpreter_with_new_numpy():
            raise ValueError(
                "backend='triton' on CPU tensors: the interpreter of Triton < 3.7 fails with "
                "NumPy >= 2.4; install numpy<2.4 (or Triton >= 3.7), or use backend='torch'"
            )
    return backend


@functools.cache
def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # blocked by an import hook, or a broken entry
        return False


@functools.cache
def _old_interpreter_with_new_numpy() -> bool:
    """Triton 3.6's interpreter calls int() on one-element arrays, which NumPy 2.4 rejects
    (checked: Triton 3.6.0 fails with NumPy 2.4.6, passes with 2.3.5 and 2.2.6)."""

    def major_minor(package: str) -> tuple[int, ...]:
        return tuple(int(part) for part in importlib.metadata.version(package).split(".")[:2])

    try:
        return major_minor("triton") < (3, 7) and major_minor("numpy") >= (2, 4)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


def _triton_interpreter_on() -> bool:
    """Triton's own reading of ``TRITON_INTERPRET`` ("1", "true", "on", any case)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def check_real(name: str, value) -> None:
    """A real number option (``clip_low``, ``kl_coef``, ...): an int or float, not a bool or a
    string (whose comparisons would raise TypeError, or pass as 0 / 1), or a one-element real
    tensor (a scheduled coefficient)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy floats too
        return
    raise ValueError(f"{name} must be a real number, got {value!r}")


def check_positive_float(name: str, value: float) -> None:
    # Plain comparisons (False for NaN): torch.compile with dynamic shapes may trace a float
    # as a symbolic one, which math.isfinite cannot take.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_logits_and_tokens(
    logits: torch.Tensor, tokens: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Shapes, dtypes and devices of ``logits [..., V]`` and ``tokens``; returns the tokens as
    int32 / int64 (other integer dtypes, e.g. uint8 or int16, are widened to int64: a copy of
    a few bytes per token, so that every backend indexes and compares them alike; so are int32
    tokens when ``ignore_index`` lies outside int32, which PyTorch would wrap around)."""
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
    return check_tokens(tokens, "logits", logits, ignore_index)


def check_tokens(
    tokens: torch.Tensor, name: str, scored: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Integer ``tokens`` with the leading shape of ``scored [..., V or H]``, on its device;
    returned as int32 / int64 (narrower or unsigned dtypes widened to int64, int32 too when
    ``ignore_index`` lies outside int32)."""
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if tuple(tokens.shape) != tuple(scored.shape[:-1]):
        raise ValueError(
            f"tokens must have the leading shape of {name} {tuple(scored.shape[:-1])}, "
            f"got {tuple(tokens.shape)}"
        )
    if tokens.device != scored.device:
        raise ValueError(f"tokens must be on {scored.device} like {name}, got {tokens.device}")
    if tokens.dtype == torch.int64 or (
        tokens.dtype == torch.int32 and -(2**31) <= ignore_index < 2**31
    ):
        return tokens
    return tokens.to(torch.int64)


def check_values(
    tokens: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    mask: torch.Tensor | None = None,
    log_probs: dict[str, torch.Tensor | None] | None = None,
    non_negative: dict[str, torch.Tensor | None] | None = None,
) -> None:
    """The checks that read tensor values, with one host sync for all of them (``validate``).

    Tokens must lie in [0, V) or equal ignore_index; a float ``mask`` holds weights >= 0;
    ``log_probs`` (e.g. old / reference log-probs) are <= 0 and ``non_negative`` tensors (an
    entropy) >= 0 at active positions (token not ignored, mask nonzero). NaN passes (it is
    padding at inactive positions and propagates elsewhere). Skipped while torch.compile
    traces (a host sync would break the graph); the kernels never read out of bounds, and an
    out-of-range token yields NaN.
    """
    if torch.compiler.is_compiling():
        return
    valid = ((tokens >= 0) & (tokens < vocab_size)) | (tokens == ignore_index)
    failures = [((~valid).any(), None)]
    active = tokens != ignore_index
    if mask is not None and mask.dtype != torch.bool:
        failures.append(((mask < 0).any(), "mask weights must be >= 0 (bool or non-negative)"))
        active = active & (mask != 0)
    elif mask is not None:
        active = active & mask
    for name, values in (log_probs or {}).items():
        if values is not None:
            bad = ((values > 0) & active).any()
            failures.append(
                (
                    bad,
                    f"{name} must be log-probabilities (<= 0) at active positions, "
                    "found a positive value (probabilities instead of log-probs?)",
                )
            )
    for name, values in (non_negative or {}).items():
        if values is not None:
            bad = ((values < 0) & active).any()
            failures.append(
                (bad, f"{name} must be >= 0 at active positions, found a negative value")
            )
    flags = torch.stack([flag for flag, _ in failures]).tolist()
    if flags[0]:
        raise ValueError(
            f"tokens must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {tokens[~valid][0].item()}"
        )
    for flag, (_, message) in zip(flags[1:], failures[1:], strict=True):
        if flag:
            raise ValueError(message)


def check_ignore_index(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index must be an int in the int64 range, got {value!r}")


def check_mask_dtype(mask: torch.Tensor | None) -> None:
    if isinstance(mask, torch.Tensor) and mask.is_complex():
        raise ValueError(f"mask must be a bool or real tensor, got dtype {mask.dtype}")


def check_shaping_constant(name: str, value: float) -> None:
    """``alpha2`` / ``beta2``: a finite number >= 0 (a negative one inverts the shaping)."""
    if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_threshold(value: float) -> None:
    """``success_threshold``: a real number, not NaN (every row would then be a failure)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"success_threshold must be a real number (not NaN), got {value!r}")


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
