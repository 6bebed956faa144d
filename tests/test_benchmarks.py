"""The benchmark harness runs its quick matrix on CPU and writes complete result files."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import entropy_kernels as ek

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"
LOGITS_WORKLOADS = {"scoring", "policy_loss", "gtpo_loss", "advantages"}
LINEAR_WORKLOADS = {"linear_scoring", "linear_policy_loss"}
WORKLOADS = LOGITS_WORKLOADS | LINEAR_WORKLOADS
IMPLS = {"eager", "compile", "trl", "liger", "ours-torch", "ours-triton", "ours-triton-inplace"}
LINEAR_IMPLS = {"eager", "trl", "ours-torch", "ours-triton"} | {
    "liger-ce",
    "liger-grpo",
    "verl",
    "cce",
}
HAS_LINEAR = hasattr(ek, "linear_logprobs_and_entropy") and hasattr(ek, "linear_policy_loss")
STATUSES = {"ok", "n/a", "oom", "skipped", "error"}
PLOTS = ("time-vs-vocab", "time-vs-tokens", "memory-vs-vocab", "memory-vs-tokens")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the plots need the 'bench' extra")
    out_dir = tmp_path_factory.mktemp("bench")
    # One thread: the shapes are tiny and CI runners are shared.
    command = [sys.executable, str(RUN), "--quick", "--device", "cpu", "--threads", "1"]
    # verl's file is fetched by a full run; the test uses it only where it is cached.
    command.append("--no-download")
    done = subprocess.run(
        [*command, "--out-dir", str(out_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (json_path,) = out_dir.glob("*.json")
    return out_dir, json_path, json.loads(json_path.read_text()), done.stdout


def test_json_has_environment_and_method(quick_run):
    _, json_path, data, _ = quick_run
    assert json_path.name.startswith("cpu-") and json_path.stem.endswith("-quick")
    for key in ("created", "command", "matrix", "device", "versions", "git", "timer", "memory"):
        assert key in data, key
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    for package in ("torch", "triton", "trl", "liger_kernel", "entropy_kernels"):
        assert package in data["versions"], package
    assert "commit" in data["git"]
    assert data["copy_bandwidth"]["gbps"] > 0
    for key in ("load_before", "load_after"):
        assert set(data[key]) == {"load_average", "busy"}, key
    assert set(data["bytes_model"]) == WORKLOADS
    assert any("TRITON_INTERPRET" in note for note in data["notes"])


def test_every_cell_reports_every_implementation(quick_run):
    _, _, data, _ = quick_run
    results = data["results"]
    assert {cell["workload"] for cell in results} == WORKLOADS
    for cell in results:
        linear = cell["workload"] in LINEAR_WORKLOADS
        assert set(cell["impls"]) == (LINEAR_IMPLS if linear else IMPLS)
        assert cell["bytes_floor"] > 0
        assert cell["ours"] == ("ours-torch" if HAS_LINEAR or not linear else None)
        for impl, entry in cell["impls"].items():
            assert entry["status"] in STATUSES, (impl, entry)
            if entry["status"] == "ok":
                assert 0 < entry["time_min_ms"] <= entry["time_ms"] <= entry["time_max_ms"]
                assert entry["rounds"] >= 3
                assert entry["gbps"] > 0 and entry["copy_fraction"] > 0
                if cell["ours"] is not None and impl != cell["ours"]:
                    # The ratio of medians lies within the per-round ratios.
                    ratio = entry["time_over_ours"]
                    assert entry["ratio_min"] <= ratio * (1 + 1e-9)
                    assert ratio <= entry["ratio_max"] * (1 + 1e-9)
                assert entry["check"] == "ok", (cell["workload"], impl, entry["check"])
                assert "peak_bytes" in entry and isinstance(entry["noise"], list)
            else:
                assert entry["status"] == "oom" or entry["reason"]
        assert cell["noisy"] == any(e.get("noise") for e in cell["impls"].values())
        # On CPU the Triton kernels are never timed, and nothing is estimated for them.
        for impl in ("ours-triton", "ours-triton-inplace", "trl", "liger"):
            if impl in cell["impls"] and not (linear and impl == "trl"):
                assert cell["impls"][impl]["status"] == "n/a"
        if cell["workload"] == "advantages":
            assert cell["impls"]["eager"]["status"] == "n/a"
            assert cell["check_reference"] == "entropy_kernels.reference"
        else:
            assert cell["impls"]["eager"]["status"] == "ok"
            assert cell["check_reference"] == "eager"
        if linear:
            # Peers with a torch path run on CPU (verl only where its file is cached).
            for impl in ("trl", "liger-ce"):
                assert cell["impls"][impl]["status"] == "ok", cell["impls"][impl]
            assert cell["impls"]["verl"]["status"] in ("ok", "n/a")
            assert cell["impls"]["ours-torch"]["status"] == ("ok" if HAS_LINEAR else "n/a")
        else:
            assert cell["impls"]["ours-torch"]["status"] == "ok"


def test_bytes_floor_model(quick_run):
    _, _, data, _ = quick_run
    for cell in data["results"]:
        logits = cell["tokens"] * (cell["vocab"] or 0) * 4  # float32
        expected = {"scoring": logits, "policy_loss": 2 * logits, "gtpo_loss": 3 * logits}
        if cell["hidden"]:
            read = (cell["tokens"] + cell["vocab"]) * cell["hidden"] * 4
            expected = {"linear_scoring": read, "linear_policy_loss": 2 * read}
        if cell["workload"] in expected:
            assert cell["bytes_floor"] == expected[cell["workload"]]


def test_plots_markdown_and_printed_table(quick_run):
    out_dir, json_path, _, stdout = quick_run
    for name in PLOTS:
        png = out_dir / f"{json_path.stem}-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    markdown = (out_dir / f"{json_path.stem}.md").read_text()
    assert "| workload | dtype | N | H | V |" in markdown
    assert "| linear_policy_loss | float32 | 64 | 24 | 500 |" in markdown
    assert "time ms" in stdout and "min..max" in stdout and "ours-torch" in stdout


def _import_harness(*names):
    """Modules of the harness (benchmarks/ is a directory of scripts, not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def bench():
    return _import_harness("peers", "report")


@pytest.fixture(scope="module")
def harness():
    return _import_harness("measure", "stats", "linear_peers", "run")


def test_summary_spreads_and_ratios(harness):
    _, stats, _, _ = harness
    samples = {"ours": [10.0, 11.0, 10.5], "eager": [30.0, 31.0, 33.0]}
    summary = stats.summarize(samples, "ours")
    ours, eager = summary["ours"], summary["eager"]
    assert (ours["time_min_ms"], ours["time_ms"], ours["time_max_ms"]) == (10.0, 10.5, 11.0)
    assert eager["time_over_ours"] == pytest.approx(31.0 / 10.5)
    assert eager["ratio_min"] == pytest.approx(31.0 / 11.0)
    assert eager["ratio_max"] == pytest.approx(33.0 / 10.5)
    assert ours["noise"] == [] and eager["noise"] == []  # quiet: every figure can be ranked
    assert "time_over_ours" not in ours
    with pytest.raises(ValueError, match="samples"):
        stats.summarize({"ours": [1.0, 2.0], "eager": [1.0]}, "ours")


def test_slow_outlier_is_flagged(harness):
    """One round of ours slowed by a competing process: ours is 3x faster in the other rounds,
    but its spread and the ratio's (both sides of 1) are flagged, and the ratio of medians
    still tells the quiet rounds' answer."""
    _, stats, _, _ = harness
    samples = {"ours": [10.0, 10.2, 90.0, 10.1, 10.3], "eager": [30.0, 30.5, 31.0, 29.8, 30.2]}
    summary = stats.summarize(samples, "ours")
    assert any("times vary" in text for text in summary["ours"]["noise"])
    assert not any("times vary" in text for text in summary["eager"]["noise"])
    assert any("cannot rank" in text for text in summary["eager"]["noise"])
    assert summary["eager"]["ratio_min"] < 1 < summary["eager"]["ratio_max"]
    assert summary["eager"]["time_over_ours"] == pytest.approx(30.2 / 10.2)
    # A slow round that keeps the rank flags the spread only.
    samples["ours"][2] = 20.0
    summary = stats.summarize(samples, "ours")
    assert summary["ours"]["noise"] and not summary["eager"]["noise"]


def test_interleaved_rounds_and_injected_outlier(harness, monkeypatch):
    """Rounds call every implementation once, starting one later each round, and a call made
    slow on purpose shows up in the spread and the flag of its cell."""
    measure, stats, _, _ = harness
    monkeypatch.setattr(measure, "CPU_MIN_REPEATS", 4)
    monkeypatch.setattr(measure, "CPU_MAX_REPEATS", 4)
    calls = []

    def timed(name, seconds, slow_call=None):
        def fn():
            calls.append(name)
            time.sleep(seconds * (20 if len(calls) == slow_call else 1))

        return fn

    fns = {"ours": timed("ours", 0.002, slow_call=5), "eager": timed("eager", 0.006)}
    fns["broken"] = lambda: 1 / 0
    samples, errors = measure.interleaved_samples(fns, torch.device("cpu"))
    assert set(errors) == {"broken"} and isinstance(errors["broken"], ZeroDivisionError)
    # The failing one leaves after round 0; then each round starts one later.
    assert calls == ["ours", "eager", "eager", "ours", "ours", "eager", "eager", "ours"]
    assert [len(times) for times in samples.values()] == [4, 4]
    summary = stats.summarize(samples, "ours")
    assert summary["ours"]["time_max_ms"] >= 40 > 20 > summary["ours"]["time_ms"]
    assert any("cannot rank" in text for text in summary["eager"]["noise"])
    assert any("times vary" in text for text in summary["ours"]["noise"])


def test_rounds_option_sets_a_minimum_of_interleaved_rounds(harness, monkeypatch, tmp_path):
    """``--rounds`` (``measure.set_cpu_rounds``): that many rounds even with no time budget left,
    beyond the default maximum too."""
    measure, _, _, run = harness
    monkeypatch.setattr(measure, "CPU_MIN_REPEATS", measure.CPU_MIN_REPEATS)
    monkeypatch.setattr(measure, "CPU_MAX_REPEATS", measure.CPU_MAX_REPEATS)
    monkeypatch.setattr(measure, "CPU_BUDGET_S", 0.0)
    assert run.parse_args(["--rounds", "21", "--out-dir", str(tmp_path)]).rounds == 21
    rounds = measure.CPU_MAX_REPEATS + 2
    measure.set_cpu_rounds(rounds)
    samples, _ = measure.interleaved_samples({"ours": lambda: None}, torch.device("cpu"))
    assert len(samples["ours"]) == rounds


def test_results_go_to_a_temp_dir_unless_saved(harness):
    _, _, _, run = harness
    default = run.parse_args(["--quick", "--device", "cpu"]).out_dir
    assert default.is_dir() and REPO not in default.resolve().parents
    default.rmdir()
    assert run.parse_args(["--quick", "--device", "cpu", "--save"]).out_dir == run.RESULTS_DIR
    assert run.parse_args(["--linear", "64x32x512,128x8x100"]).linear == (
        (64, 32, 512),
        (128, 8, 100),
    )


def test_linear_check_catches_a_wrong_gradient(harness):
    """The linear peers' check compares gradients too: a peer whose weight gradient is off by
    1% (or whose loss differs) is reported, one off by float32 rounding is not."""
    _, _, linear_peers, _ = harness
    x = linear_peers.make_inputs(
        "linear_policy_loss", 32, 8, 40, torch.float32, torch.device("cpu"), seed=0
    )
    reference = linear_peers.check_values(
        linear_peers.build("eager", "linear_policy_loss", x, triton_runs=False)()
    )
    loss, grad_hidden, grad_weight = reference["values"][0], *reference["grads"]
    same = linear_peers.check_values(((loss,), grad_hidden, grad_weight * (1 + 1e-6)))
    assert linear_peers.disagreement(reference, same) is None
    wrong = linear_peers.check_values(((loss,), grad_hidden, grad_weight * 1.01))
    assert "gradient of weight" in linear_peers.disagreement(reference, wrong)
    assert "output 0" in linear_peers.disagreement(
        reference, linear_peers.check_values(((loss + 0.1,), grad_hidden, grad_weight))
    )


def test_busy_machine_is_said(bench):
    """A run that shared its CPUs says so in its header, flagged noisy or not (issue 14)."""
    _, report = bench
    data = {"device": {"os_cpus": 2}, "load_after": {"load_average": [1.1, 1, 1], "busy": False}}
    assert "BUSY" not in report._load_line(data)
    data["load_before"] = {"load_average": [3.2, 2.0, 1.0], "busy": True}
    assert "BUSY" in report._load_line(data) and "[3.2, 2.0, 1.0]" in report._load_line(data)


def test_report_merges_result_files(quick_run, bench):
    _, report = bench
    _, _, data, _ = quick_run
    merged = report.merge([data, data])
    assert len(merged["results"]) == len(data["results"])
    assert len(merged["merged_from"]) == 2
    assert report.format_table(merged).startswith(report.TABLE_HEADER)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU"
)
@pytest.mark.parametrize("workload", sorted(LOGITS_WORKLOADS))
def test_triton_peers_do_the_same_work(bench, workload):
    """TRL, Liger and the Triton backend are timed on CUDA only; run by the interpreter on a
    tiny cell, they must return what eager PyTorch (or the reference) returns, gradients too."""
    peers, _ = bench
    inputs = peers.make_inputs(workload, 32, 64, torch.bfloat16, torch.device("cpu"), seed=0)
    compiled = peers.CompiledPeers()
    results = {}
    # In IMPLS order: the in-place variant, which overwrites the logits, runs last.
    for impl in peers.IMPLS:
        if impl == "compile":
            continue
        try:
            fn = peers.build(impl, workload, inputs, compiled, triton_runs=True)
        except peers.NotApplicable:
            continue
        results[impl] = fn()
    # Peers are optional installs: those present must run.
    expected = {"ours-torch", "ours-triton"}
    if workload != "advantages":
        expected |= {"eager"} | ({"trl"} if importlib.util.find_spec("trl") else set())
    if workload == "policy_loss":
        expected |= {"ours-triton-inplace"}
        expected |= {"liger"} if importlib.util.find_spec("liger_kernel") else set()
    assert expected <= set(results), sorted(results)

    oracle = peers.oracle_values(workload, inputs)
    reference = oracle if oracle is not None else peers.check_values(results["eager"])
    for impl, result in results.items():
        assert peers.disagreement(reference, peers.check_values(result)) is None, impl
        if workload in ("policy_loss", "gtpo_loss"):
            # bfloat16 gradients: equal up to the rounding of the last bit.
            torch.testing.assert_close(result[1], results["eager"][1], msg=impl)


def run_quick_cpu(script: str, *args: str) -> None:
    """Run ``benchmarks/<script> --quick --device cpu *args`` under the interpreter; it must
    succeed."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--device", "cpu", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_sweep_checks_every_configuration(tmp_path):
    """benchmarks/sweep.py on CPU: each configuration of each kernel is checked (not timed)
    against the default's outputs, and the result file names device, versions and commit."""
    run_quick_cpu("sweep.py", "--out-dir", str(tmp_path))
    (path,) = tmp_path.glob("cpu-*-sweep-quick.json")
    data = json.loads(path.read_text())
    for key in ("command", "shape", "device", "versions", "git", "copy_bandwidth"):
        assert key in data, key
    assert set(data["kernels"]) == {"scoring_fwd", "scoring_bwd", "policy_loss_fused"}
    for rows in data["kernels"].values():
        assert [row["status"] for row in rows] == ["checked", "checked"]
        assert sum(row["default"] for row in rows) == 1


def test_linear_sweep_checks_and_times_every_tile(tmp_path):
    """benchmarks/linear_sweep.py on CPU: every tile of every fused linear kernel is checked
    against the default tile's outputs, timed, and the best one recorded."""
    out = tmp_path / "tiles.json"
    run_quick_cpu("linear_sweep.py", "--out", str(out))
    data = json.loads(out.read_text())
    for key in ("command", "device", "versions", "git", "matmul_ms"):
        assert key in data, key
    kernels = {"linear_fwd", "linear_bwd_hidden", "linear_bwd_weight"}
    assert set(data["kernels"]) == set(data["best"]) == kernels
    for rows in data["kernels"].values():
        assert len(rows) == 2 and all("time_ms" in row for row in rows), rows


@pytest.mark.parametrize("mode", [["--routes-only"], ["--blas-tiles", "2048x16384,4096x8192"]])
def test_linear_routes_and_tile_shapes_are_timed(tmp_path, mode):
    """benchmarks/linear_sweep.py's route and cuBLAS tile timings run end to end (on CPU the
    GPU routes fall back to the same computation) and name the fastest."""
    out = tmp_path / "routes.json"
    run_quick_cpu("linear_sweep.py", "--dtype", "float32", "--out", str(out), *mode)
    routes = json.loads(out.read_text())["routes_ms"]
    if mode[0] == "--routes-only":
        assert routes["best"] in routes and "forward auto" in routes and "torch" in routes
    else:
        assert routes["best tile"] in ("2048x16384", "4096x8192")
        assert routes["tile 4096x8192"] > 0
