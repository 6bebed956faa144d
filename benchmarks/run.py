"""Speed and memory of entropy_kernels against the ways trainers compute the same thing today.

    python benchmarks/run.py            # CUDA: the full matrix; CPU: a reduced one (minutes)
    python benchmarks/run.py --quick    # a tiny matrix, seconds (what the test runs)

Workloads: ``scoring`` (log-probs + entropy, no gradient), ``policy_loss`` (forward +
backward, token-level advantages and old log-probs), ``gtpo_loss`` (on-policy forward +
backward), ``advantages`` (``gtpo_advantages`` alone). Every implementation of a cell gets
the same input tensors. Prints a table and writes ``<device>-<date>.json``, a markdown table
and PNG plots to ``benchmarks/results/`` (``--out-dir``). See ``--help`` for subsets, which
split a long GPU run into several commands; ``benchmarks/report.py`` merges their files.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
from pathlib import Path

import measure
import peers
import report
import torch

MATRICES = {
    "quick": {
        "tokens": (128, 256),
        "vocab": (512, 2048),
        "dtypes": ("float32",),
    },
    "reduced": {
        "tokens": (128, 512),
        "vocab": (2048, 8192, 32000),
        "dtypes": ("float32",),
    },
    "full": {
        "tokens": (4096, 16384, 65536),
        "vocab": (32000, 128256, 151936, 262144),
        "dtypes": ("bfloat16", "float32"),
    },
}
# Seconds of timed calls per implementation on CPU in the quick matrix (default 1 s).
QUICK_CPU_BUDGET_S = 0.1
# torch.compile takes tens of seconds per workload on CPU: too slow for the quick matrix.
QUICK_SKIPS = {"compile": "skipped by --quick (compilation alone takes tens of seconds on CPU)"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OURS_PREFERENCE = ("ours-triton", "ours-torch")


def csv_of(kind, allowed=None):
    def parse(text: str):
        items = tuple(kind(item) for item in text.split(",") if item)
        if allowed is not None:
            unknown = [item for item in items if item not in allowed]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {allowed}")
        return items

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    for name in MATRICES:
        size.add_argument(
            f"--{name}",
            dest="matrix",
            action="store_const",
            const=name,
            help=f"the {name} matrix: {MATRICES[name]}",
        )
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    parser.add_argument(
        "--workloads",
        type=csv_of(str, peers.WORKLOADS),
        default=peers.WORKLOADS,
        help=f"comma-separated subset of {','.join(peers.WORKLOADS)}",
    )
    parser.add_argument(
        "--impls",
        type=csv_of(str, peers.IMPLS),
        default=peers.IMPLS,
        help=f"comma-separated subset of {','.join(peers.IMPLS)}",
    )
    parser.add_argument("--tokens", type=csv_of(int), help="token counts N, comma-separated")
    parser.add_argument("--vocab", type=csv_of(int), help="vocabulary sizes V, comma-separated")
    parser.add_argument("--dtypes", type=csv_of(str, tuple(DTYPES)), help="logit dtypes")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="appended to the output file names")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.matrix is None:
        args.matrix = "full" if args.device == "cuda" else "reduced"
    for key in ("tokens", "vocab", "dtypes"):
        if getattr(args, key) is None:
            setattr(args, key, MATRICES[args.matrix][key])
    return args


def is_out_of_memory(err: BaseException | None) -> bool:
    """CUDA or CPU allocation failure, also when wrapped (torch.compile re-raises it)."""
    while err is not None:
        if isinstance(err, torch.OutOfMemoryError):
            return True
        if isinstance(err, RuntimeError) and "can't allocate memory" in str(err):
            return True
        err = err.__cause__
    return False


def free_memory(device: torch.device) -> None:
    """Return a cell's memory to the device (tensors themselves are freed by refcount)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def error_text(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def measure_impl(impl, workload, inputs, device, compiled, skips):
    """Time and peak memory of one implementation on one cell; values kept for the check."""
    if impl in skips:
        return {"status": "skipped", "reason": skips[impl]}, None
    try:
        fn = peers.build(impl, workload, inputs, compiled, triton_runs=device.type == "cuda")
    except peers.NotApplicable as err:
        return {"status": "n/a", "reason": str(err)}, None
    out_of_memory = False
    try:
        # The first call compiles, warms up and gives the values the check compares.
        values = peers.check_values(fn())
        time_ms, peak = measure.time_and_peak(fn, device)
    except Exception as err:  # a failing peer must not stop the run; its cell says why
        if not is_out_of_memory(err):
            return {"status": "error", "reason": error_text(err)}, None
        out_of_memory = True
    if out_of_memory:
        free_memory(device)
        return {"status": "oom"}, None
    return {"status": "ok", "time_ms": time_ms, "peak_bytes": peak}, values


def run_cell(workload, dtype_name, tokens, vocab, device, impls, compiled, skips, seed) -> dict:
    dtype = DTYPES[dtype_name]
    cell = {
        "workload": workload,
        "dtype": dtype_name,
        "tokens": tokens,
        "vocab": vocab,
        "batch": peers.BATCH,
        "seq_len": tokens // peers.BATCH,
        "groups": peers.GROUP,
        "bytes_floor": peers.bytes_floor(workload, tokens, vocab or 0, dtype),
        "ours": None,
        "impls": {},
    }
    inputs = None
    try:
        inputs = peers.make_inputs(workload, tokens, vocab or 0, dtype, device, seed)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
    if inputs is None:
        free_memory(device)
        cell["impls"] = {impl: {"status": "oom", "reason": "inputs do not fit"} for impl in impls}
        return cell
    values = {}
    oracle = peers.oracle_values(workload, inputs)
    if oracle is not None:
        values[peers.ORACLE] = oracle
    for impl in impls:
        cell["impls"][impl], values[impl] = measure_impl(
            impl, workload, inputs, device, compiled, skips
        )
    del inputs
    free_memory(device)
    add_derived_figures(cell, values)
    return cell


def add_derived_figures(cell: dict, values: dict) -> None:
    """Bandwidth, time over ours, and the cross-implementation check of one cell.

    Values are checked against the reference implementation where the workload has one
    (advantages), else against eager PyTorch, else against the first implementation that ran.
    """
    entries = cell["impls"]
    ok = [impl for impl, entry in entries.items() if entry["status"] == "ok"]
    cell["ours"] = next((impl for impl in OURS_PREFERENCE if impl in ok), None)
    check_reference = next((name for name in (peers.ORACLE, "eager") if name in values), None)
    if check_reference is None or values[check_reference] is None:
        check_reference = ok[0] if ok else None
    cell["check_reference"] = check_reference
    for impl in ok:
        entry = entries[impl]
        entry["gbps"] = cell["bytes_floor"] / (entry["time_ms"] * 1e-3) / 1e9
        if cell["ours"] is not None:
            entry["time_over_ours"] = entry["time_ms"] / entries[cell["ours"]]["time_ms"]
        mismatch = peers.disagreement(values[check_reference], values[impl])
        entry["check"] = "ok" if mismatch is None else f"mismatch vs {check_reference}: {mismatch}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 would time the Triton interpreter; unset it.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.matrix == "quick":
        measure.CPU_BUDGET_S = QUICK_CPU_BUDGET_S
    notes = []
    if device.type == "cpu":
        notes.append(
            "CPU run: only eager PyTorch, torch.compile and this library's torch backend are "
            "timed. Triton kernels (ours, TRL, Liger) run on CPU only under TRITON_INTERPRET, "
            "an emulator far too slow to time; their figures need a CUDA device."
        )
    notes.append(
        "Inputs: B = 16 rows of T = N / 16 tokens, prompt groups of 8, logits ~ 2 * randn, "
        "uniform random tokens, every row's last position masked out (Liger drops it), "
        "old log-probs = current + 0.1 * randn, clip 0.2 / 0.28, token-mean."
    )
    skips = QUICK_SKIPS if args.matrix == "quick" else {}
    impls = [impl for impl in peers.IMPLS if impl in args.impls]

    info = measure.device_info(device)
    data = {
        "schema": 1,
        **measure.run_facts(),
        "matrix": {
            "name": args.matrix,
            "workloads": list(args.workloads),
            "tokens": list(args.tokens),
            "vocab": list(args.vocab),
            "dtypes": list(args.dtypes),
            "impls": impls,
        },
        "device": info,
        "versions": measure.versions(),
        "git": measure.git_state(),
        "timer": measure.timer_description(device),
        "memory": measure.memory_description(device),
        "bytes_model": peers.BYTES_MODEL,
        "impl_descriptions": {impl: peers.IMPL_DESCRIPTIONS[impl] for impl in impls},
        "notes": notes,
    }
    torch.manual_seed(args.seed)
    data["copy_bandwidth"] = measure.copy_bandwidth(device)
    print(report.header(data), flush=True)

    compiled = peers.CompiledPeers()
    results = data["results"] = []
    print(report.TABLE_HEADER, flush=True)
    for workload in args.workloads:
        # Shaping reads float32 entropy whatever the logits' dtype, and no vocabulary.
        dtypes = ("float32",) if workload == "advantages" else args.dtypes
        vocabs = (None,) if workload == "advantages" else args.vocab
        for dtype_name in dtypes:
            for tokens in args.tokens:
                for vocab in vocabs:
                    cell = run_cell(
                        workload,
                        dtype_name,
                        tokens,
                        vocab,
                        device,
                        impls,
                        compiled,
                        skips,
                        args.seed,
                    )
                    report.add_copy_fraction(cell, data["copy_bandwidth"]["gbps"])
                    results.append(cell)
                    print(report.format_cell(cell), flush=True)

    day = datetime.date.today().isoformat()
    stem = f"{measure.device_slug(info)}-{day}"
    if args.matrix == "quick":
        stem += "-quick"
    if args.tag:
        stem += f"-{args.tag}"
    written = report.write_outputs(data, args.out_dir, stem, plots=not args.no_plots)
    failures, warnings = report.problems(data)
    print()
    print(report.reasons(data))
    print()
    for line in warnings:
        print(f"peer problem: {line}")
    for line in failures:
        print(f"FAILED: {line}")
    for path in written:
        print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
