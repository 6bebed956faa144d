"""Launch configuration of the kernels: one fixed choice per kernel, no autotuning.

Every row kernel (scoring forward, scoring backward, fused policy loss) sweeps a row in
``block_v``-wide blocks with ``num_warps`` warps (:class:`KernelConfig`; chosen for H100/H200
before one was available, timed by ``benchmarks/sweep.py``). The fused linear kernels take
two-dimensional tiles (:class:`TileConfig`), chosen by ``benchmarks/linear_sweep.py`` on an H200
and shrunk at the first launch on a device that cannot hold them. :func:`override` is how the
sweeps time alternatives, and how a user with another GPU can pin a configuration without
editing the package.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch

KERNELS = ("scoring_fwd", "scoring_bwd", "policy_loss_fused")
# The fused linear kernels take two-dimensional tiles (TileConfig).
LINEAR_KERNELS = ("linear_fwd", "linear_bwd_hidden", "linear_bwd_weight")


@dataclass(frozen=True)
class KernelConfig:
    """``block_v`` logits per block (a power of two); ``num_stages`` None is Triton's default."""

    block_v: int
    num_warps: int
    num_stages: Optional[int] = None

    def __post_init__(self):
        if self.block_v < 1 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v must be a power of two, got {self.block_v}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages must be at least 1, got {self.num_stages}")

    def launch_options(self) -> dict:
        """Triton launch keywords besides ``BLOCK_V``."""
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        return options


# 4096 columns over 8 warps: 16 logits per thread per block (two 16-byte loads in bf16).
GPU_DEFAULT = KernelConfig(block_v=4096, num_warps=8)
# The interpreter (CPU tensors) uses 256-wide blocks, so that small test vocabularies still take
# several blocks and exercise the online rescaling and the tail mask.
INTERPRETER_DEFAULT = KernelConfig(block_v=256, num_warps=8)


@dataclass(frozen=True)
class TileConfig:
    """A fused linear kernel's tile: ``block_n`` rows x ``block_v`` vocabulary entries, the
    hidden dimension in ``block_h`` slices (powers of two, at least 16 for ``tl.dot``)."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: Optional[int] = None

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_h", "num_warps"):
            value = getattr(self, name)
            low = 1 if name == "num_warps" else 16
            if value < low or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {low}, got {value}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages must be at least 1, got {self.num_stages}")

    def smaller(self) -> Optional[TileConfig]:
        """The next tile to try where this one does not fit the device: one pipeline stage
        fewer (down to 2), then half the larger of ``block_n`` / ``block_v`` (down to 32; the
        float32 dlogits tile of the backward lives in shared memory too), then half ``block_h``
        (down to 16); None when nothing can shrink."""
        n, v, h = self.block_n, self.block_v, self.block_h
        if self.num_stages is not None and self.num_stages > 2:
            return TileConfig(n, v, h, self.num_warps, self.num_stages - 1)
        if max(n, v) > 32:
            n, v = (n // 2, v) if n >= v else (n, v // 2)
        elif h > 16:
            h //= 2
        else:
            return None
        return TileConfig(n, v, h, self.num_warps, self.num_stages)

    def launch_options(self) -> dict:
        """Triton launch keywords."""
        options = {
            "BLOCK_N": self.block_n,
            "BLOCK_V": self.block_v,
            "BLOCK_H": self.block_h,
            "num_warps": self.num_warps,
        }
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        return options


# The fastest of benchmarks/linear_sweep.py's tiles on an H200 (bfloat16, N = 4096, H = 2048,
# V = 151936; benchmarks/results/nvidia-h200-2026-11-26-linear-tiles*.json). A device with less
# shared memory (or float32 operands) gets them shrunk by TileConfig.smaller at the first launch.
LINEAR_GPU_DEFAULTS = {
    "linear_fwd": TileConfig(128, 256, 64, 8, 3),
    "linear_bwd_hidden": TileConfig(128, 128, 64, 8, 4),
    # Swept as (256, 128, 64, 16, 2) with two dlogits parts; the third part's tl.dot needs
    # 256 KiB of shared memory there (compiled for sm_90, more than the 227 KiB an H100/H200
    # has), so the tile is its first fitting shrink (TileConfig.smaller) until swept again.
    "linear_bwd_weight": TileConfig(128, 128, 64, 16, 2),
}
# How the "triton" backend computes the fused linear gradients on a GPU: "blas" (cuBLAS tiles
# with float32 output and the torch fold, entropy_kernels.backends.torch_linear), "tiles" (the
# tl.dot kernels of entropy_kernels.ops.linear) or "blas-triton-fold" (the default): the cuBLAS
# tiles with the scoring backward kernel as the fold, one pass over each tile where the torch
# fold makes about six, writing bfloat16 dlogits as parts that the gradient matmuls take as they
# are (three since the sixth session, backends/split_matmuls.DLOGITS_PARTS). Forward + backward
# on an H200 with two parts (bfloat16, N = 4096, H = 2048, V = 151936, tl.dot forward;
# benchmarks/results/nvidia-h200-2026-11-26-s5-94b166a-routes.json): 27.2 ms by
# "blas-triton-fold", 53.9 ms by "blas", 91.9 ms by "tiles"; three parts not yet timed.
# "blas-bf16-dlogits" is opt-in and outside the spec's gradient tolerance: the same tiles with
# dlogits rounded to bfloat16 (the first part alone), one matmul per gradient instead of three, as
# TRL, Liger, verl and Cut Cross-Entropy do (each dlogit off by up to 2^-8 of itself): 18.5 ms
# after the cuBLAS forward, 19.5 ms after the tl.dot one (...-s5-ec3a078-routes.json).
# The environment variable ENTROPY_KERNELS_LINEAR_GPU_BACKWARD overrides it.
LINEAR_GPU_BACKWARD = os.environ.get("ENTROPY_KERNELS_LINEAR_GPU_BACKWARD", "blas-triton-fold")
# How the "triton" backend computes the fused linear forward on a GPU: "tiles" (the tl.dot
# kernel, entropy_kernels.kernels.linear_fwd), "blas-triton-fold" (cuBLAS tiles with float32
# output, each reduced by the scoring forward kernel) or "auto" (the default): the cuBLAS fold
# for a forward without gradients (scoring old / reference log-probs), the tl.dot kernel for a
# training forward. Measured on an H200 (bfloat16, N = 4096, H = 2048, V = 151936;
# benchmarks/results/nvidia-h200-2026-11-26-s5-*-routes.json, four calls): forward alone 4.98 to
# 5.80 ms by the cuBLAS fold, 6.17 to 6.25 ms by tl.dot; forward + backward (with the default
# gradients) 27.6 / 26.8 / 27.2 / 26.8 ms after the tl.dot forward, 30.0 / 26.3 / 29.9 / 28.0 ms
# after the cuBLAS fold, whose tiles are issued one by one while the host barely keeps ahead.
# ENTROPY_KERNELS_LINEAR_GPU_FORWARD overrides it.
LINEAR_GPU_FORWARD = os.environ.get("ENTROPY_KERNELS_LINEAR_GPU_FORWARD", "auto")
# The cuBLAS tiles of those routes, rows x vocabulary entries (128 MiB per float32 tile): the
# fastest of five shapes on an H200, with the least memory (tied with 1024 x 32768): forward +
# backward 27.1 ms, 1799 MiB; 2048 x 16384: 27.3 ms, 1831 MiB; 4096 x 16384: 30.7 ms, 2052 MiB
# (bfloat16, N = 4096, H = 2048, V = 151936; the fourth session's second call, tree 80b143c,
# benchmarks/results/nvidia-h200-2026-11-26-linear-blas-tiles.json, before the backward lost
# its float32 [V, H] accumulator: 994 MiB now at this tile).
# ENTROPY_KERNELS_LINEAR_GPU_BLAS_TILE ("RxV") overrides it.
_BLAS_TILE = os.environ.get("ENTROPY_KERNELS_LINEAR_GPU_BLAS_TILE", "4096x8192")
LINEAR_GPU_BLAS_TILE = tuple(int(n) for n in _BLAS_TILE.split("x") if n.isdigit())
if len(LINEAR_GPU_BLAS_TILE) != 2 or min(LINEAR_GPU_BLAS_TILE) < 1 or _BLAS_TILE.count("x") != 1:
    raise ValueError(
        f"ENTROPY_KERNELS_LINEAR_GPU_BLAS_TILE must be ROWSxVOCAB (positive), got {_BLAS_TILE!r}"
    )
LINEAR_GPU_ROUTES = {
    "LINEAR_GPU_BACKWARD": ("blas", "blas-triton-fold", "tiles", "blas-bf16-dlogits"),
    "LINEAR_GPU_FORWARD": ("auto", "tiles", "blas-triton-fold"),
}
for _name, _routes in LINEAR_GPU_ROUTES.items():
    if globals()[_name] not in _routes:
        raise ValueError(f"ENTROPY_KERNELS_{_name} must be one of {_routes}")
# Small tiles under the interpreter, so that test shapes span several tiles and splits.
LINEAR_INTERPRETER_DEFAULT = TileConfig(16, 32, 16, 4)

_overrides: dict[str, KernelConfig | TileConfig] = {}


def launch_config(kernel: str, vocab_size: int, device: torch.device) -> KernelConfig:
    """The configuration `kernel` launches with for rows of `vocab_size` logits on `device`.

    The block never exceeds the vocabulary rounded up to a power of two.
    """
    import triton

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    config = _overrides.get(kernel)
    if config is None:
        config = GPU_DEFAULT if device.type == "cuda" else INTERPRETER_DEFAULT
    block_v = min(config.block_v, triton.next_power_of_2(max(vocab_size, 1)))
    return KernelConfig(block_v, config.num_warps, config.num_stages)


def tile_config(kernel: str, device: torch.device) -> TileConfig:
    """The tile that fused linear `kernel` launches with on `device`."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"kernel must be one of {LINEAR_KERNELS}, got {kernel!r}")
    config = _overrides.get(kernel)
    if config is None:
        config = (
            LINEAR_GPU_DEFAULTS[kernel] if device.type == "cuda" else LINEAR_INTERPRETER_DEFAULT
        )
    return config


def is_overridden(kernel: str) -> bool:
    """Whether `kernel` runs under :func:`override` (its tile is then used as given)."""
    return kernel in _overrides


def round_bf16_by_hand(grad: torch.Tensor) -> bool:
    """Whether a row kernel writing `grad` must round to bfloat16 itself: under the interpreter
    (CPU tensors), whose float32 -> bfloat16 cast truncates."""
    return grad.dtype == torch.bfloat16 and grad.device.type != "cuda"


@contextlib.contextmanager
def override(**configs: KernelConfig) -> Iterator[None]:
    """Launch the named kernels with these configurations inside the block.

    ``with override(policy_loss_fused=KernelConfig(8192, 16)): ...``; the fused linear kernels
    take a :class:`TileConfig` (``override(linear_fwd=TileConfig(128, 128, 64, 8))``).
    Not thread-safe: it is meant for benchmarks and for pinning a configuration around a
    training step.
    """
    unknown = set(configs) - set(KERNELS) - set(LINEAR_KERNELS)
    if unknown:
        raise ValueError(
            f"kernel names must be among {KERNELS + LINEAR_KERNELS}, got {sorted(unknown)}"
        )
    for name, config in configs.items():
        kind = TileConfig if name in LINEAR_KERNELS else KernelConfig
        if not isinstance(config, kind):
            raise ValueError(f"{name} must be a {kind.__name__}, got {type(config).__name__}")
    saved = dict(_overrides)
    _overrides.update(configs)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
