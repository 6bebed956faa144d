"""Timing, peak memory, copy bandwidth and environment facts for the benchmark harness.

Every figure here is measured; a method that is not available on this machine returns None,
which the report shows as "n/a".
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# do_bench settings, in milliseconds of warm-up and of timed repetitions.
GPU_WARMUP_MS = 25
GPU_REP_MS = 100
# CPU timer: at least this many timed calls, more while the time budget lasts.
CPU_MIN_REPEATS = 3
CPU_MAX_REPEATS = 15
CPU_BUDGET_S = 1.0


def timer_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            f"triton.testing.do_bench, median, warm-up {GPU_WARMUP_MS} ms, "
            f"repetitions {GPU_REP_MS} ms, L2 flushed before each call"
        )
    return (
        f"time.perf_counter median of {CPU_MIN_REPEATS}-{CPU_MAX_REPEATS} calls "
        f"(about {CPU_BUDGET_S:g} s per implementation) after a warm-up call, with glibc's "
        "malloc at its steady state (mmap threshold 32 MiB, as its dynamic threshold ends up "
        "after large frees); the peak-memory call is a separate, untimed one"
    )


def median_time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall time of one call of `fn`, in milliseconds.

    On CPU the caller warms up (compilation, first-call allocations) beforehand; do_bench
    warms up on its own.
    """
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, return_mode="median")
        )
    _prepare_cpu_peak()  # sets malloc's timing thresholds
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < CPU_MAX_REPEATS and (
        len(times) < CPU_MIN_REPEATS or time.perf_counter() - started < CPU_BUDGET_S
    ):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def time_and_peak(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Median milliseconds and peak bytes above the inputs of an already warmed-up `fn`.

    The peak is read on a call of its own: on CPU it runs with every block an mmap (see
    :func:`peak_bytes_above_inputs`), which would slow down code that allocates often.
    """
    peak = peak_bytes_above_inputs(fn, device)
    return median_time_ms(fn, device), peak


# --- peak memory -----------------------------------------------------------------------------

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# (mmap threshold, trim threshold). Timing: glibc's steady state, which its dynamic threshold
# reaches after large frees (at most 32 MiB on 64-bit, trim at twice that); fixed here, so that
# allocation-heavy code is not timed while page-faulting fresh mmaps on every call.
_TIMING_MALLOC = (32 << 20, 64 << 20)
# Peak memory: every tensor-sized block an mmap that leaves the resident set when freed.
_PEAK_MALLOC = (1 << 16, 1 << 16)
_cpu_peak_ready: bool | None = None
_libc = None


def _set_malloc(thresholds: tuple[int, int]) -> bool:
    mmap_threshold, trim_threshold = thresholds
    return bool(
        _libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        and _libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def _proc_status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} missing from {_PROC_STATUS}")
    return int(match.group(1)) * 1024


def _prepare_cpu_peak() -> bool:
    """Set up peak resident-memory measurement on Linux; False where it cannot be done.

    The kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs.
    glibc normally raises its mmap threshold after large frees and keeps freed blocks
    resident, which would hide new allocations; during the measured call the threshold is
    pinned at 64 KiB, so every tensor-sized block is an mmap that leaves the resident set when
    freed. Outside it, malloc runs at its timing thresholds.
    """
    global _cpu_peak_ready, _libc
    if _cpu_peak_ready is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _PROC_CLEAR_REFS.write_text("5")
            _proc_status_bytes("VmHWM")
            _cpu_peak_ready = _set_malloc(_TIMING_MALLOC)
        except OSError:
            _cpu_peak_ready = False
    return _cpu_peak_ready


def memory_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
            "memory_allocated before the call (inputs and earlier allocations excluded; "
            "outputs such as the gradient included)"
        )
    if _prepare_cpu_peak():
        return (
            "peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs) minus "
            "the resident size before the call, on an untimed call with glibc's mmap threshold "
            "pinned at 64 KiB so freed tensors leave the resident set; includes non-tensor "
            "memory"
        )
    return "not measured on this machine (no /proc/self/clear_refs)"


def peak_bytes_above_inputs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory allocated while `fn` runs, above what was allocated before it."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    if not _prepare_cpu_peak():
        return None
    _set_malloc(_PEAK_MALLOC)
    try:
        # Blocks freed before the switch may still be resident: trim them before the baseline.
        _libc.malloc_trim(0)
        _PROC_CLEAR_REFS.write_text("5")
        before = _proc_status_bytes("VmRSS")
        result = fn()
        peak = _proc_status_bytes("VmHWM") - before
        del result
    finally:
        _set_malloc(_TIMING_MALLOC)
    return max(peak, 0)


# --- copy bandwidth --------------------------------------------------------------------------


def copy_bandwidth(device: torch.device) -> dict:
    """Bandwidth of a large device-to-device `Tensor.copy_`, timed like the workloads.

    Bytes moved are counted as read + write of the copied tensor.
    """
    nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    time_ms = median_time_ms(lambda: dst.copy_(src), device)
    return {
        "tensor_bytes": nbytes,
        "bytes_moved": 2 * nbytes,
        "time_ms": time_ms,
        "gbps": 2 * nbytes / (time_ms * 1e-3) / 1e9,
    }


# --- environment -----------------------------------------------------------------------------


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "entropy_kernels": package_version("entropy-kernels"),
        "trl": package_version("trl"),
        "transformers": package_version("transformers"),
        "liger_kernel": package_version("liger-kernel"),
    }


def cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or "cpu")


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "total_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
        }
    return {
        "type": "cpu",
        "name": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "os_cpus": os.cpu_count(),
    }


def device_slug(info: dict) -> str:
    if info["type"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def git_state() -> dict:
    """Commit and whether the tree differs from it; read-only (no index lock taken)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", *args],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def run_facts() -> dict:
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPO_ROOT):
        script = script.relative_to(REPO_ROOT)
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", str(script), *sys.argv[1:]]),
    }
