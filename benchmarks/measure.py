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
# Seconds of timed calls per implementation (a cell of k implementations gets k times this).
CPU_BUDGET_S = 1.0
# Interleaved rounds on CUDA: each round is a short do_bench of every implementation.
GPU_ROUNDS = 5


def set_cpu_rounds(rounds: int) -> None:
    """At least ``rounds`` interleaved rounds per CPU cell, whatever the time budget."""
    global CPU_MIN_REPEATS, CPU_MAX_REPEATS
    CPU_MIN_REPEATS = rounds
    CPU_MAX_REPEATS = max(CPU_MAX_REPEATS, rounds)


def timer_description(device: torch.device) -> str:
    order = (
        "implementations of a cell interleaved: each round times every implementation once, "
        "starting one implementation later each round; median, min and max over the rounds, "
        "and per-round ratios against ours (the in-place variant's gradient overwrites the "
        "logits, so after its first round the others compute on those values: the same work)"
    )
    if device.type == "cuda":
        return (
            f"{GPU_ROUNDS} rounds of triton.testing.do_bench (median of "
            f"{GPU_REP_MS // GPU_ROUNDS} ms of repetitions, L2 flushed before each call) after "
            f"an untimed warm-up call and an untimed peak-memory call; {order}"
        )
    return (
        f"time.perf_counter of one call per round, {CPU_MIN_REPEATS}-{CPU_MAX_REPEATS} rounds "
        f"(about {CPU_BUDGET_S:g} s per implementation), after an untimed warm-up call and an "
        "untimed peak-memory call; glibc's malloc at its steady state (mmap threshold 32 MiB, "
        f"as its dynamic threshold ends up after large frees); {order}"
    )


def _one_call_ms(fn: Callable[[], object], device: torch.device, rep_ms: int) -> float:
    if device.type == "cuda":
        import triton.testing

        warmup = min(GPU_WARMUP_MS, rep_ms)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms, return_mode="median"))
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def median_time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall time of one call of `fn`, in milliseconds (the copy bandwidth's timer).

    On CPU the caller warms up (compilation, first-call allocations) beforehand; do_bench
    warms up on its own.
    """
    if device.type == "cuda":
        return _one_call_ms(fn, device, GPU_REP_MS)
    _prepare_cpu_peak()  # sets malloc's timing thresholds
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < CPU_MAX_REPEATS and (
        len(times) < CPU_MIN_REPEATS or time.perf_counter() - started < CPU_BUDGET_S
    ):
        times.append(_one_call_ms(fn, device, GPU_REP_MS))
    return statistics.median(times)


def interleaved_samples(
    fns: dict[str, Callable[[], object]], device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Exception]]:
    """Per-round milliseconds of each already warmed-up function, timed round-robin.

    Round ``r`` calls every function once, starting at the ``r``-th (so that none always runs
    right after the same one): a competing process or a clock change then slows every
    implementation of the round alike instead of one implementation's whole series. A function
    that raises leaves the rounds: ``(samples, errors)``, each implementation in one of them.
    """
    _prepare_cpu_peak()  # sets malloc's timing thresholds
    order = list(fns)
    samples: dict[str, list[float]] = {impl: [] for impl in order}
    errors: dict[str, Exception] = {}
    budget_s = CPU_BUDGET_S * len(order)
    started = time.perf_counter()
    rounds = 0
    while order and _another_round(rounds, time.perf_counter() - started, budget_s, device):
        shift = rounds % len(order)
        for impl in order[shift:] + order[:shift]:
            try:
                samples[impl].append(_one_call_ms(fns[impl], device, GPU_REP_MS // GPU_ROUNDS))
            except Exception as err:  # reported in the cell, like a failing warm-up
                errors[impl] = err
        for impl in errors:
            if impl in order:
                order.remove(impl)
                del samples[impl]
        rounds += 1
    return samples, errors


def _another_round(rounds: int, elapsed_s: float, budget_s: float, device: torch.device) -> bool:
    if device.type == "cuda":
        return rounds < GPU_ROUNDS
    if rounds < CPU_MIN_REPEATS:
        return True
    return rounds < CPU_MAX_REPEATS and elapsed_s < budget_s


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
        "cut_cross_entropy": package_version("cut-cross-entropy"),
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


def machine_load(own_threads: int) -> dict:
    """Load averages (1, 5, 15 min); ``busy`` when the last minute's exceeds this process's
    threads by a whole CPU. A busy machine biases timings in ways interleaving cannot undo (a
    thread pool waiting for a descheduled worker, say)."""
    try:
        load = os.getloadavg()
    except OSError:
        return {"load_average": None, "busy": None}
    return {"load_average": [round(x, 2) for x in load], "busy": load[0] >= own_threads + 1}


def run_facts() -> dict:
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPO_ROOT):
        script = script.relative_to(REPO_ROOT)
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", str(script), *sys.argv[1:]]),
    }
