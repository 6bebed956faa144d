"""Tables, plots and merging of benchmark result files.

    python benchmarks/report.py a.json [b.json ...] [--out merged.json]

prints the table of one or more result files (runs of the same device split by
``--workloads`` / ``--dtypes`` / ``--tokens``, say) and, with ``--out``, writes their merge
with its markdown table and plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MIB = 1 << 20
WORKLOAD_TITLES = {
    "scoring": "scoring (log-probs + entropy, no grad)",
    "policy_loss": "policy_loss forward + backward",
    "gtpo_loss": "gtpo_loss on-policy forward + backward",
    "advantages": "gtpo_advantages alone",
}
# Plot sections: vocabulary sweeps at this N, token sweeps at this V (nearest present).
PLOT_TOKENS = 16384
PLOT_VOCAB = 151936

TABLE_COLUMNS = (
    ("workload", 18),
    ("dtype", 8),
    ("N", 5),
    ("H", 4),
    ("V", 6),
    ("impl", 19),
    ("time ms", 8),
    ("min..max", 13),
    ("x ours", 6),
    ("x range", 11),
    ("peak MiB", 8),
    ("mem x", 6),
    ("GB/s", 6),
    ("of copy", 7),
    ("check", 5),
    ("noise", 5),
)
# Columns naming the cell (left-aligned, as is the implementation's name after them).
KEY_COLUMNS = 5
TABLE_HEADER = "  ".join(
    f"{name:<{width}}" if index <= KEY_COLUMNS else f"{name:>{width}}"
    for index, (name, width) in enumerate(TABLE_COLUMNS)
)


def header(data: dict) -> str:
    device = data["device"]
    copy = data["copy_bandwidth"]
    versions = ", ".join(
        f"{key} {value or 'not installed'}" for key, value in data["versions"].items()
    )
    lines = [
        f"device: {device['name']} ({device['type']})",
        f"versions: {versions}",
        f"commit: {data['git']['commit']}{' (modified tree)' if data['git']['dirty'] else ''}",
        f"matrix: {data['matrix']['name']}",
        f"timer: {data['timer']}",
        f"peak memory: {data['memory']}",
        f"{data.get('noise_rule', 'noise not measured (an older result file)')}",
        _load_line(data),
        f"copy bandwidth: {copy['gbps']:.1f} GB/s (copy_ of {copy['tensor_bytes'] // MIB} MiB, "
        "read + write counted)",
        "bytes floor per workload (GB/s = floor bytes / time):",
        *(f"  {workload}: {text}" for workload, text in data["bytes_model"].items()),
        *(f"note: {note}" for note in data["notes"]),
    ]
    return "\n".join(lines) + "\n"


def _load_line(data: dict) -> str:
    loads = [data.get(key, {}) for key in ("load_before", "load_after")]
    text = " then ".join(str(load.get("load_average")) for load in loads if load)
    cpus = data["device"].get("os_cpus")
    if any(load.get("busy") for load in loads):
        return (
            f"machine load {text} on {cpus} CPUs: BUSY, other processes competed for the CPUs; "
            "timings are biased even where no figure is flagged noisy"
        )
    return f"machine load {text or 'not recorded'} on {cpus} CPUs"


def add_copy_fraction(cell: dict, copy_gbps: float) -> None:
    for entry in cell["impls"].values():
        if "gbps" in entry:
            entry["copy_fraction"] = entry["gbps"] / copy_gbps


def _number(value: float | None) -> str:
    """Three significant digits, no exponent below a million."""
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _span(low: float | None, high: float | None, unit: str = "") -> str:
    if low is None or high is None:
        return ""
    return f"{_number(low)}{unit}..{_number(high)}{unit}"


def _key(cell: dict) -> tuple[str, ...]:
    return (
        cell["workload"],
        cell["dtype"],
        str(cell["tokens"]),
        str(cell.get("hidden") or "-"),
        str(cell["vocab"] or "-"),
    )


def _figures(cell: dict, impl: str, entry: dict) -> tuple[str, ...]:
    if entry["status"] != "ok":
        return (entry["status"],) + ("",) * (len(TABLE_COLUMNS) - KEY_COLUMNS - 2)
    peak = entry["peak_bytes"]
    ours = impl == cell["ours"]
    return (
        _number(entry["time_ms"]),
        _span(entry.get("time_min_ms"), entry.get("time_max_ms")),
        "ours" if ours else _number(entry.get("time_over_ours")),
        "" if ours else _span(entry.get("ratio_min"), entry.get("ratio_max")),
        "n/a" if peak is None else _number(peak / MIB),
        "ours" if ours else _number(entry.get("peak_over_ours")),
        _number(entry["gbps"]),
        f"{entry['copy_fraction']:.1%}",
        "ok" if entry["check"] == "ok" else "DIFF",
        "noisy" if entry.get("noise") else "",
    )


def format_cell(cell: dict) -> str:
    """Rows of one cell; why an implementation did not run or is noisy: :func:`reasons`."""
    rows = []
    for index, (impl, entry) in enumerate(cell["impls"].items()):
        key = _key(cell) if index == 0 else ("",) * KEY_COLUMNS
        values = (*key, impl, *_figures(cell, impl, entry))
        row = "  ".join(
            f"{value:<{width}}" if column <= KEY_COLUMNS else f"{value:>{width}}"
            for column, (value, (_, width)) in enumerate(zip(values, TABLE_COLUMNS, strict=True))
        )
        rows.append(row.rstrip())
    return "\n".join(rows)


def reasons(data: dict) -> str:
    """Why implementations did not run, disagreed or are noisy, each distinct reason once."""
    seen = {}
    for cell in data["results"]:
        where = " ".join(_key(cell))
        for impl, entry in cell["impls"].items():
            if entry["status"] == "ok" and entry["check"] != "ok":
                seen.setdefault((impl, "DIFF", f"{where}: {entry['check']}"), None)
            elif entry["status"] != "ok":
                text = entry.get("reason", "does not fit in memory")
                seen.setdefault((impl, entry["status"], text), None)
            for text in entry.get("noise", ()):
                seen.setdefault((impl, "noisy", f"{where}: {text}"), None)
    return "\n".join(f"{impl} {status}: {text}" for impl, status, text in seen)


def format_table(data: dict) -> str:
    cells = [format_cell(cell) for cell in data["results"]]
    return "\n".join([TABLE_HEADER, *cells, "", reasons(data)])


def _markdown_entry(cell: dict, impl: str, metric: str) -> str:
    entry = cell["impls"].get(impl, {"status": "n/a"})
    if entry["status"] != "ok":
        return entry["status"]
    noisy = " **noisy**" if entry.get("noise") else ""
    if metric == "memory":
        peak = entry["peak_bytes"]
        ratio = entry.get("peak_over_ours")
        text = "n/a" if peak is None else _number(peak / MIB)
        return text + ("" if ratio is None else f" ({ratio:.2f}x)")
    text = f"{_number(entry['time_ms'])} [{_span(entry['time_min_ms'], entry['time_max_ms'])}]"
    if impl != cell["ours"] and "time_over_ours" in entry:
        spread = _span(entry["ratio_min"], entry["ratio_max"])
        text += f" {entry['time_over_ours']:.2f}x ({spread})"
    return text + noisy


def markdown_table(data: dict) -> str:
    """Time and peak-memory tables: one row per cell, a column per implementation; the logits
    and the linear workloads (other peers) get a table each."""
    lines = [
        f"Device: {data['device']['name']}; copy bandwidth {data['copy_bandwidth']['gbps']:.0f} "
        f"GB/s; commit {str(data['git']['commit'])[:10]}; command `{data['command']}`.",
        "",
        "Time: median ms [min..max over interleaved rounds], time over ours (ratio of medians) "
        f"and (min..max of per-round ratios); >1x means ours is faster. "
        f"{data.get('noise_rule', '')}. Peak memory: MiB above the inputs (over ours' peak).",
    ]
    families = {}
    for cell in data["results"]:
        families.setdefault(tuple(cell["impls"]), []).append(cell)
    for impls, cells in families.items():
        head = ["workload", "dtype", "N", "H", "V", *impls]
        for metric in ("time", "memory"):
            lines += ["", f"{metric}:", "", "| " + " | ".join(head) + " |"]
            lines.append("|" + "|".join("---" for _ in head) + "|")
            for cell in cells:
                row = [*_key(cell), *(_markdown_entry(cell, impl, metric) for impl in impls)]
                lines.append("| " + " | ".join(row) + " |")
    floors = [cell for cell in data["results"] if "matmul_ms" in cell]
    if floors:
        lines += [
            "",
            "Against the matmul floor (cuBLAS `hidden @ weight.T` timed in the same run; one such "
            "matmul for scoring, three for the loss's forward + backward):",
            "",
            "| workload | dtype | N | H | V | matmul ms | "
            + " | ".join(f"{impl} / floor" for impl in floors[0]["impls"])
            + " |",
            "|" + "|".join("---" for _ in range(6 + len(floors[0]["impls"]))) + "|",
        ]
        for cell in floors:
            ratios = [
                _number(entry["over_matmul_floor"]) if "over_matmul_floor" in entry else "-"
                for entry in cell["impls"].values()
            ]
            lines.append(
                "| " + " | ".join([*_key(cell), _number(cell["matmul_ms"]), *ratios]) + " |"
            )
    why = reasons(data)
    if why:
        lines += ["", "Why a figure is missing, differs or is noisy:", ""]
        lines += [f"- {line}" for line in why.splitlines()]
    return "\n".join(lines) + "\n"


def problems(data: dict) -> tuple[list[str], list[str]]:
    """(failures of this library's implementations, problems of peers)."""
    failures, warnings = [], []
    for cell in data["results"]:
        where = f"{cell['workload']} {cell['dtype']} N={cell['tokens']} V={cell['vocab']}"
        for impl, entry in cell["impls"].items():
            if entry["status"] == "error":
                text = f"{impl} failed on {where}: {entry['reason']}"
            elif entry["status"] == "ok" and entry["check"] != "ok":
                text = f"{impl} on {where}: {entry['check']}"
            else:
                continue
            (failures if impl.startswith("ours") else warnings).append(text)
    return failures, warnings


# --- plots -----------------------------------------------------------------------------------


def _nearest(values, target):
    return min(values, key=lambda value: (abs(value - target), -value)) if values else None


def _series(cells, impl, axis, metric):
    """(x, y) points of one implementation; values a log axis cannot show are left out."""
    points = []
    for cell in cells:
        entry = cell["impls"].get(impl, {})
        if entry.get("status") != "ok":
            continue
        value = entry["time_ms"] if metric == "time" else entry["peak_bytes"]
        if value is None or value <= 0:
            continue
        points.append((cell[axis], value if metric == "time" else value / MIB))
    return sorted(points)


def _plain_log_axes(ax, xs) -> None:
    """Log axes labelled with plain numbers (mathtext tick labels are slow to lay out)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def write_plots(data: dict, out_dir: Path, stem: str) -> list[Path]:
    """Time and peak memory against vocabulary size (at fixed N) and token count (fixed V).

    One PNG per (metric, axis), a panel per workload and dtype, a line per implementation;
    cells that did not run leave gaps, and zero memory (below what the method resolves) is
    not drawn on the log axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The linear workloads have a third axis (H): they are in the tables only.
    results = [cell for cell in data["results"] if cell["workload"] in WORKLOAD_TITLES]
    dtypes = list(dict.fromkeys(cell["dtype"] for cell in results if cell["vocab"]))
    impls = data["matrix"]["impls"]
    tokens_fixed = _nearest(sorted({c["tokens"] for c in results if c["vocab"]}), PLOT_TOKENS)
    vocab_fixed = _nearest(sorted({c["vocab"] for c in results if c["vocab"]}), PLOT_VOCAB)
    paths = []
    for metric, ylabel in (("time", "median time (ms)"), ("memory", "peak MiB above inputs")):
        for axis, xlabel in (("vocab", "vocabulary size V"), ("tokens", "tokens N")):
            workloads = [
                w
                for w in data["matrix"]["workloads"]
                if w in WORKLOAD_TITLES and (axis == "tokens" or w != "advantages")
            ]
            if not workloads or not dtypes:
                continue
            fig, axes = plt.subplots(
                len(workloads),
                len(dtypes),
                figsize=(5.5 * len(dtypes), 3.4 * len(workloads) + 0.6),
                squeeze=False,
            )
            for row, workload in enumerate(workloads):
                for col, dtype in enumerate(dtypes):
                    ax = axes[row][col]
                    cell_dtype = "float32" if workload == "advantages" else dtype
                    cells = [
                        c
                        for c in results
                        if c["workload"] == workload
                        and c["dtype"] == cell_dtype
                        and (axis == "tokens" or c["tokens"] == tokens_fixed)
                        and (axis == "vocab" or not c["vocab"] or c["vocab"] == vocab_fixed)
                    ]
                    for index, impl in enumerate(impls):
                        points = _series(cells, impl, axis, metric)
                        if points:
                            xs, ys = zip(*points, strict=True)
                            # One colour per implementation in every panel and file.
                            ax.plot(xs, ys, marker="o", label=impl, color=f"C{index}")
                    fixed = f"N = {tokens_fixed}" if axis == "vocab" else f"V = {vocab_fixed}"
                    if workload == "advantages":
                        fixed = "no vocabulary"
                    ax.set_title(f"{WORKLOAD_TITLES[workload]}, {cell_dtype}, {fixed}", fontsize=8)
                    _plain_log_axes(ax, sorted({c[axis] for c in cells}))
                    ax.set_xlabel(xlabel, fontsize=8)
                    ax.set_ylabel(ylabel, fontsize=8)
                    ax.tick_params(labelsize=7)
                    ax.grid(True, which="major", alpha=0.3)
                    if ax.lines:
                        ax.legend(fontsize=6)
            fig.suptitle(f"{data['device']['name']}: {ylabel} vs {xlabel}", fontsize=10)
            fig.subplots_adjust(
                left=0.1,
                right=0.97,
                top=1 - 0.75 / fig.get_figheight(),
                bottom=0.4 / fig.get_figheight(),
                hspace=0.55,
                wspace=0.25,
            )
            path = out_dir / f"{stem}-{metric}-vs-{axis}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            paths.append(path)
    return paths


def write_outputs(data: dict, out_dir: Path, stem: str, plots: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    markdown_path = out_dir / f"{stem}.md"
    markdown_path.write_text(markdown_table(data))
    written = [json_path, markdown_path]
    if plots:
        written += write_plots(data, out_dir, stem)
    return written


def merge(datas: list[dict]) -> dict:
    """One result set from runs on the same device (later files win on repeated cells)."""
    names = {data["device"]["name"] for data in datas}
    if len(names) != 1:
        raise ValueError(f"results from different devices cannot be merged: {sorted(names)}")
    merged = json.loads(json.dumps(datas[0]))
    merged["merged_from"] = [
        {key: data[key] for key in ("created", "command", "git", "versions", "copy_bandwidth")}
        for data in datas
    ]
    cells = {}
    for data in datas:
        for cell in data["results"]:
            cells[_key(cell)] = cell
    merged["results"] = list(cells.values())
    matrix = merged["matrix"]
    for key in ("workloads", "tokens", "vocab", "dtypes", "impls"):
        matrix[key] = list(dict.fromkeys(v for data in datas for v in data["matrix"][key]))
    matrix["name"] = "+".join(dict.fromkeys(data["matrix"]["name"] for data in datas))
    merged["notes"] = list(dict.fromkeys(n for data in datas for n in data["notes"]))
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write the merged JSON, markdown and plots")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    data = merge([json.loads(path.read_text()) for path in args.files])
    print(header(data))
    print(format_table(data))
    if args.out:
        for path in write_outputs(data, args.out.parent, args.out.stem, plots=not args.no_plots):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
