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
    ("workload", 12),
    ("dtype", 9),
    ("N", 6),
    ("V", 7),
    ("impl", 20),
    ("time ms", 10),
    ("x ours", 7),
    ("peak MiB", 9),
    ("GB/s", 8),
    ("of copy", 8),
    ("check", 6),
)
TABLE_HEADER = "  ".join(
    f"{name:<{width}}" if index < 5 else f"{name:>{width}}"
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
        f"copy bandwidth: {copy['gbps']:.1f} GB/s (copy_ of {copy['tensor_bytes'] // MIB} MiB, "
        "read + write counted)",
        "bytes floor per workload (GB/s = floor bytes / time):",
        *(f"  {workload}: {text}" for workload, text in data["bytes_model"].items()),
        *(f"note: {note}" for note in data["notes"]),
    ]
    return "\n".join(lines) + "\n"


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


def format_cell(cell: dict) -> str:
    """Rows of one cell; why an implementation did not run is listed by :func:`reasons`."""
    rows = []
    for index, (impl, entry) in enumerate(cell["impls"].items()):
        key = (
            (cell["workload"], cell["dtype"], str(cell["tokens"]), str(cell["vocab"] or "-"))
            if index == 0
            else ("", "", "", "")
        )
        if entry["status"] == "ok":
            ours = "ours" if impl == cell["ours"] else _number(entry.get("time_over_ours"))
            peak = entry["peak_bytes"]
            figures = (
                _number(entry["time_ms"]),
                ours,
                "n/a" if peak is None else _number(peak / MIB),
                _number(entry["gbps"]),
                f"{entry['copy_fraction']:.1%}",
                "ok" if entry["check"] == "ok" else "DIFF",
            )
        else:
            figures = (entry["status"], "", "", "", "", "")
        values = (*key, impl, *figures)
        row = "  ".join(
            f"{value:<{width}}" if column < 5 else f"{value:>{width}}"
            for column, (value, (_, width)) in enumerate(zip(values, TABLE_COLUMNS, strict=True))
        )
        rows.append(row.rstrip())
    return "\n".join(rows)


def reasons(data: dict) -> str:
    """Why implementations did not run or disagreed, each distinct reason once."""
    seen = {}
    for cell in data["results"]:
        for impl, entry in cell["impls"].items():
            if entry["status"] == "ok" and entry["check"] != "ok":
                text = f"{cell['workload']} N={cell['tokens']} V={cell['vocab']}: {entry['check']}"
                seen.setdefault((impl, "DIFF", text), None)
            elif entry["status"] != "ok":
                text = entry.get("reason", "does not fit in memory")
                seen.setdefault((impl, entry["status"], text), None)
    return "\n".join(f"{impl} {status}: {text}" for impl, status, text in seen)


def format_table(data: dict) -> str:
    cells = [format_cell(cell) for cell in data["results"]]
    return "\n".join([TABLE_HEADER, *cells, "", reasons(data)])


def markdown_table(data: dict) -> str:
    """One row per cell: each implementation's median time in ms and its time over ours."""
    impls = data["matrix"]["impls"]
    head = ["workload", "dtype", "N", "V", *impls, "ours GB/s", "ours of copy", "ours peak MiB"]
    lines = [
        f"Device: {data['device']['name']}; copy bandwidth {data['copy_bandwidth']['gbps']:.0f} "
        f"GB/s; commit {str(data['git']['commit'])[:10]}; command `{data['command']}`.",
        "Cells: median ms (time over ours). Floor bytes per workload are in the JSON.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for cell in data["results"]:
        row = [cell["workload"], cell["dtype"], str(cell["tokens"]), str(cell["vocab"] or "-")]
        for impl in impls:
            entry = cell["impls"].get(impl, {"status": "n/a"})
            if entry["status"] != "ok":
                row.append(entry["status"])
            elif impl == cell["ours"] or "time_over_ours" not in entry:
                row.append(_number(entry["time_ms"]))
            else:
                row.append(f"{_number(entry['time_ms'])} ({entry['time_over_ours']:.2f}x)")
        ours = cell["impls"].get(cell["ours"]) if cell["ours"] else None
        if ours is None:
            row += ["n/a", "n/a", "n/a"]
        else:
            peak = ours["peak_bytes"]
            row += [
                _number(ours["gbps"]),
                f"{ours['copy_fraction']:.1%}",
                "n/a" if peak is None else _number(peak / MIB),
            ]
        lines.append("| " + " | ".join(row) + " |")
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

    results = data["results"]
    dtypes = list(dict.fromkeys(cell["dtype"] for cell in results if cell["vocab"]))
    impls = data["matrix"]["impls"]
    tokens_fixed = _nearest(sorted({c["tokens"] for c in results if c["vocab"]}), PLOT_TOKENS)
    vocab_fixed = _nearest(sorted({c["vocab"] for c in results if c["vocab"]}), PLOT_VOCAB)
    paths = []
    for metric, ylabel in (("time", "median time (ms)"), ("memory", "peak MiB above inputs")):
        for axis, xlabel in (("vocab", "vocabulary size V"), ("tokens", "tokens N")):
            workloads = [
                w for w in data["matrix"]["workloads"] if axis == "tokens" or w != "advantages"
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
            cells[(cell["workload"], cell["dtype"], cell["tokens"], cell["vocab"])] = cell
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
