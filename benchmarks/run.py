"""Speed and memory of entropy_kernels against the ways trainers compute the same thing today.

    python benchmarks/run.py            # CUDA: the full matrix; CPU: a reduced one (minutes)
    python benchmarks/run.py --quick    # a tiny matrix, seconds (what the test runs)
    python benchmarks/run.py --save     # write into benchmarks/results/ (default: a temp dir)

Workloads: ``scoring`` (log-probs + entropy, no gradient), ``policy_loss`` (forward +
backward, token-level advantages and old log-probs), ``gtpo_loss`` (on-policy forward +
backward), ``advantages`` (``gtpo_advantages`` alone), and from hidden states through the LM
head (``linear_peers``): ``linear_scoring`` and ``linear_policy_loss``. Every implementation
of a cell gets the same input tensors, is checked against eager PyTorch, warmed up, and then
timed interleaved with the others (``measure.interleaved_samples``); the table gives each
time's min / median / max and each ratio's per-round range, and marks figures too noisy to
rank (``stats``). Prints a table and writes ``<device>-<date>.json``, a markdown table and PNG
plots to a new temporary directory, or to ``benchmarks/results/`` with ``--save``
(``--out-dir`` for another). See ``--help`` for subsets, which split a long GPU run into
several commands; ``benchmarks/report.py`` merges their files.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import linear_peers
import measure
import peers
import report
import stats
import torch

from entropy_kernels.kernel_config import TileConfig, override

MATRICES = {
    "quick": {
        "tokens": (128, 256),
        "vocab": (512, 2048),
        "dtypes": ("float32",),
        "linear": ((64, 24, 500),),
    },
    "reduced": {
        "tokens": (128, 512),
        "vocab": (2048, 8192, 32000),
        "dtypes": ("float32",),
        # (N, H, V): seconds per call on 2 CPU cores, minutes per cell with torch.compile's
        # peers; larger shapes with --linear (4096x256x32000 takes 4 times as long).
        "linear": ((1024, 256, 32000), (1024, 896, 32000)),
    },
    "full": {
        "tokens": (4096, 16384, 65536),
        "vocab": (32000, 128256, 151936, 262144),
        "dtypes": ("bfloat16", "float32"),
        "linear": ((4096, 896, 151936), (16384, 896, 151936), (16384, 4096, 151936)),
    },
}
# Seconds of timed calls per implementation on CPU in the quick matrix (default 1 s).
QUICK_CPU_BUDGET_S = 0.1
# torch.compile takes tens of seconds per workload on CPU: too slow for the quick matrix.
QUICK_SKIPS = {
    impl: "skipped by --quick (torch.compile takes tens of seconds per shape on CPU)"
    for impl in ("compile", "liger-grpo", "cce")
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OURS_PREFERENCE = ("ours-triton", "ours-torch")
RESULTS_DIR = Path(__file__).parent / "results"
WORKLOADS = peers.WORKLOADS + linear_peers.LINEAR_WORKLOADS
IMPLS = tuple(dict.fromkeys(peers.IMPLS + linear_peers.LINEAR_IMPLS))


def shapes(text: str):
    """``NxHxV,NxHxV`` -> ((N, H, V), ...)."""
    try:
        return tuple(tuple(int(n) for n in item.split("x", 2)) for item in text.split(",") if item)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected NxHxV[,NxHxV...]: {err}") from None


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
        type=csv_of(str, WORKLOADS),
        default=WORKLOADS,
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--impls",
        type=csv_of(str, IMPLS),
        help=f"comma-separated subset of {','.join(IMPLS)} (default: all)",
    )
    parser.add_argument("--tokens", type=csv_of(int), help="token counts N, comma-separated")
    parser.add_argument("--vocab", type=csv_of(int), help="vocabulary sizes V, comma-separated")
    parser.add_argument("--dtypes", type=csv_of(str, tuple(DTYPES)), help="logit dtypes")
    parser.add_argument("--linear", type=shapes, help="linear workloads' NxHxV, comma-separated")
    add_output_options(parser)
    parser.add_argument(
        "--no-download", action="store_true", help="verl n/a unless its file is already cached"
    )
    parser.add_argument("--tag", default="", help="appended to the output file names")
    parser.add_argument(
        "--linear-tiles",
        type=Path,
        help="a linear_sweep.py JSON: launch the fused linear kernels with its best tiles",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="CPU: at least this many interleaved rounds per cell "
        f"(default {measure.CPU_MIN_REPEATS}; more rank a noisy machine's cells)",
    )
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.matrix is None:
        args.matrix = "full" if args.device == "cuda" else "reduced"
    for key in ("tokens", "vocab", "dtypes", "linear"):
        if getattr(args, key) is None:
            setattr(args, key, MATRICES[args.matrix][key])
    set_output_dir(parser, args)
    return args


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save", action="store_true", help=f"write into {RESULTS_DIR}")
    parser.add_argument("--out-dir", type=Path, help="where to write (default: a new temp dir)")


def set_output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Results land in the tree only when asked (--save): a rerun leaves nothing behind."""
    if args.out_dir is None:
        args.out_dir = RESULTS_DIR if args.save else Path(tempfile.mkdtemp(prefix="ek-bench-"))
    elif args.save:
        parser.error("--save and --out-dir: choose one")


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


def prepare_impl(impl, cell, inputs, device, compiled, skips, download):
    """(entry, timed function, checked values) of one implementation on one cell.

    The first call compiles, warms up (the first call into this library imports the compiler
    stack, seconds) and gives the values the check compares; the second measures the peak
    memory. Neither is timed.
    """
    if impl in skips:
        return {"status": "skipped", "reason": skips[impl]}, None, None
    workload = cell["workload"]
    triton_runs = device.type == "cuda"
    try:
        if workload in linear_peers.LINEAR_WORKLOADS:
            fn = linear_peers.build(impl, workload, inputs, triton_runs, download)
        else:
            fn = peers.build(impl, workload, inputs, compiled, triton_runs)
    except peers.NotApplicable as err:
        return {"status": "n/a", "reason": str(err)}, None, None
    check = linear_peers.check_values if cell["hidden"] else peers.check_values
    try:
        values = check(fn())
        peak = measure.peak_bytes_above_inputs(fn, device)
    except Exception as err:  # a failing peer must not stop the run; its cell says why
        return failure_entry(err, device), None, None
    return {"status": "ok", "peak_bytes": peak}, fn, values


def failure_entry(err: Exception, device: torch.device) -> dict:
    if is_out_of_memory(err):
        free_memory(device)
        return {"status": "oom"}
    return {"status": "error", "reason": error_text(err)}


def run_cell(key, device, impls, compiled, skips, args) -> dict:
    workload, dtype_name, tokens, hidden, vocab = key
    dtype = DTYPES[dtype_name]
    linear = workload in linear_peers.LINEAR_WORKLOADS
    cell = {
        "workload": workload,
        "dtype": dtype_name,
        "tokens": tokens,
        "hidden": hidden,
        "vocab": vocab,
        "batch": peers.BATCH,
        "seq_len": tokens // peers.BATCH,
        "groups": peers.GROUP,
        "bytes_floor": (
            linear_peers.bytes_floor(workload, tokens, hidden, vocab, dtype)
            if linear
            else peers.bytes_floor(workload, tokens, vocab or 0, dtype)
        ),
        "ours": None,
        "impls": {},
    }
    inputs, seed = None, args.seed
    try:
        if linear:
            inputs = linear_peers.make_inputs(workload, tokens, hidden, vocab, dtype, device, seed)
        else:
            inputs = peers.make_inputs(workload, tokens, vocab or 0, dtype, device, seed)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
    if inputs is None:
        free_memory(device)
        cell["impls"] = {impl: {"status": "oom", "reason": "inputs do not fit"} for impl in impls}
        return cell
    # Values are checked against the reference implementation where the workload has one
    # (advantages), else against the first implementation that ran (eager, first in order),
    # as soon as each has run: only the reference's values are kept.
    oracle = None if linear else peers.oracle_values(workload, inputs)
    reference = (peers.ORACLE, oracle) if oracle is not None else None
    disagreement = linear_peers.disagreement if linear else peers.disagreement
    fns = {}
    for impl in impls:
        entry, fn, values = prepare_impl(
            impl, cell, inputs, device, compiled, skips, not args.no_download
        )
        cell["impls"][impl] = entry
        if fn is None:
            continue
        fns[impl] = fn
        reference = reference or (impl, values)
        mismatch = disagreement(reference[1], values)
        entry["check"] = "ok" if mismatch is None else f"mismatch vs {reference[0]}: {mismatch}"
    cell["check_reference"] = reference[0] if reference else None
    if linear and device.type == "cuda":
        # The floor the fused linear kernels are held to: cuBLAS's rate on one N H V matmul.
        rows, weight = inputs.hidden.detach().reshape(-1, hidden), inputs.weight.detach()
        cell["matmul_ms"] = measure.median_time_ms(lambda: rows @ weight.T, device)
    reference = values = None  # the values of the check, on the CPU
    samples, errors = measure.interleaved_samples(fns, device)
    for impl, err in errors.items():
        cell["impls"][impl] = failure_entry(err, device)
    del inputs, fns
    free_memory(device)
    add_derived_figures(cell, samples)
    return cell


def add_derived_figures(cell: dict, samples: dict) -> None:
    """Timing spreads, ratios of time and peak memory over ours, and bandwidth."""
    entries = cell["impls"]
    ok = [impl for impl in samples if entries[impl]["status"] == "ok"]
    cell["ours"] = next((impl for impl in OURS_PREFERENCE if impl in ok), None)
    summary = stats.summarize({impl: samples[impl] for impl in ok}, cell["ours"])
    ours_peak = entries[cell["ours"]]["peak_bytes"] if cell["ours"] else None
    for impl in ok:
        entry = entries[impl]
        entry.update(summary[impl])
        entry["gbps"] = cell["bytes_floor"] / (entry["time_ms"] * 1e-3) / 1e9
        if "matmul_ms" in cell:
            passes = 1 if cell["workload"] == "linear_scoring" else 3
            entry["over_matmul_floor"] = entry["time_ms"] / (passes * cell["matmul_ms"])
        if cell["ours"] is not None and impl != cell["ours"]:
            entry["peak_over_ours"] = stats.peak_ratio(entry["peak_bytes"], ours_peak)
    cell["noisy"] = any(entries[impl]["noise"] for impl in ok)


def cell_keys(args) -> list[tuple]:
    """(workload, dtype, N, H, V) of every cell; H is None for the logits workloads."""
    keys = []
    for workload in args.workloads:
        if workload in linear_peers.LINEAR_WORKLOADS:
            keys += [(workload, d, n, h, v) for d in args.dtypes for n, h, v in args.linear]
        elif workload == "advantages":
            # Shaping reads float32 entropy whatever the logits' dtype, and no vocabulary.
            keys += [(workload, "float32", n, None, None) for n in args.tokens]
        else:
            keys += [
                (workload, d, n, None, v)
                for d in args.dtypes
                for n in args.tokens
                for v in args.vocab
            ]
    return keys


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
    if args.rounds:
        measure.set_cpu_rounds(args.rounds)
    notes = []
    if device.type == "cpu":
        notes.append(
            "CPU run: Triton kernels (ours-triton, TRL's and Liger's logits kernels) run on CPU "
            "only under TRITON_INTERPRET, an emulator far too slow to time; their figures need a "
            "CUDA device. The linear workloads' peers run their PyTorch paths here (TRL's and "
            "Liger's torch fallbacks, verl's torch FusedLinearForPPO, CCE's torch_compile)."
        )
    notes.append(
        "Inputs: B = 16 rows of T = N / 16 tokens, prompt groups of 8, logits ~ 2 * randn "
        "(linear: hidden ~ randn, weight ~ 2 / sqrt(H) * randn), uniform random tokens, every "
        "row's last position masked out (Liger drops it), old log-probs = current + 0.1 * randn, "
        "clip 0.2 / 0.28, token-mean."
    )
    skips = QUICK_SKIPS if args.matrix == "quick" else {}
    impls = [impl for impl in IMPLS if impl in (args.impls or IMPLS)]
    descriptions = {**peers.IMPL_DESCRIPTIONS, **linear_peers.LINEAR_DESCRIPTIONS}

    info = measure.device_info(device)
    data = {
        "schema": 2,
        **measure.run_facts(),
        "matrix": {
            "name": args.matrix,
            "workloads": list(args.workloads),
            "tokens": list(args.tokens),
            "vocab": list(args.vocab),
            "dtypes": list(args.dtypes),
            "linear": [list(shape) for shape in args.linear],
            "impls": impls,
        },
        "device": info,
        "versions": {**measure.versions(), "verl": f"{linear_peers.VERL_VERSION} (wheel file)"},
        "git": measure.git_state(),
        "timer": measure.timer_description(device),
        "memory": measure.memory_description(device),
        "noise_rule": stats.RULE,
        "bytes_model": {**peers.BYTES_MODEL, **linear_peers.LINEAR_BYTES_MODEL},
        "impl_descriptions": {impl: descriptions[impl] for impl in impls},
        "notes": notes,
    }
    torch.manual_seed(args.seed)
    # Before any timed work: the last minute's load is other processes'.
    data["load_before"] = measure.machine_load(own_threads=0)
    data["copy_bandwidth"] = measure.copy_bandwidth(device)
    print(report.header(data), flush=True)

    tiles = contextlib.ExitStack()
    if args.linear_tiles:
        best = json.loads(args.linear_tiles.read_text())["best"]
        data["linear_tiles"] = best
        tiles.enter_context(override(**{k: TileConfig(*v) for k, v in best.items()}))
    compiled = peers.CompiledPeers()
    results = data["results"] = []
    print(report.TABLE_HEADER, flush=True)
    for key in cell_keys(args):
        family = linear_peers.LINEAR_IMPLS if key[3] else peers.IMPLS
        cell_impls = [impl for impl in impls if impl in family]
        cell = run_cell(key, device, cell_impls, compiled, skips, args)
        report.add_copy_fraction(cell, data["copy_bandwidth"]["gbps"])
        results.append(cell)
        print(report.format_cell(cell), flush=True)

    tiles.close()
    day = datetime.date.today().isoformat()
    stem = f"{measure.device_slug(info)}-{day}"
    if args.matrix == "quick":
        stem += "-quick"
    if args.tag:
        stem += f"-{args.tag}"
    data["load_after"] = measure.machine_load(own_threads=torch.get_num_threads())
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
