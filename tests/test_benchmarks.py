"""The benchmark harness runs its quick matrix on CPU and writes complete result files."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"
WORKLOADS = {"scoring", "policy_loss", "gtpo_loss", "advantages"}
IMPLS = {"eager", "compile", "trl", "liger", "ours-torch", "ours-triton", "ours-triton-inplace"}
STATUSES = {"ok", "n/a", "oom", "skipped", "error"}
PLOTS = ("time-vs-vocab", "time-vs-tokens", "memory-vs-vocab", "memory-vs-tokens")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the plots need the 'bench' extra")
    out_dir = tmp_path_factory.mktemp("bench")
    # One thread: the shapes are tiny and CI runners are shared.
    command = [sys.executable, str(RUN), "--quick", "--device", "cpu", "--threads", "1"]
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
    assert set(data["bytes_model"]) == WORKLOADS
    assert any("TRITON_INTERPRET" in note for note in data["notes"])


def test_every_cell_reports_every_implementation(quick_run):
    _, _, data, _ = quick_run
    results = data["results"]
    assert {cell["workload"] for cell in results} == WORKLOADS
    for cell in results:
        assert set(cell["impls"]) == IMPLS
        assert cell["bytes_floor"] > 0
        assert cell["ours"] == "ours-torch"
        for impl, entry in cell["impls"].items():
            assert entry["status"] in STATUSES, (impl, entry)
            if entry["status"] == "ok":
                assert entry["time_ms"] > 0
                assert entry["gbps"] > 0 and entry["copy_fraction"] > 0
                assert entry["time_over_ours"] > 0
                assert entry["check"] == "ok", (cell["workload"], impl, entry["check"])
                assert "peak_bytes" in entry
            else:
                assert entry["status"] == "oom" or entry["reason"]
        # On CPU the Triton kernels are never timed, and nothing is estimated for them.
        for impl in ("ours-triton", "ours-triton-inplace", "trl", "liger"):
            assert cell["impls"][impl]["status"] == "n/a"
        assert cell["impls"]["ours-torch"]["status"] == "ok"
        if cell["workload"] == "advantages":
            assert cell["impls"]["eager"]["status"] == "n/a"
            assert cell["check_reference"] == "entropy_kernels.reference"
        else:
            assert cell["impls"]["eager"]["status"] == "ok"
            assert cell["check_reference"] == "eager"


def test_bytes_floor_model(quick_run):
    _, _, data, _ = quick_run
    for cell in data["results"]:
        logits = cell["tokens"] * (cell["vocab"] or 0) * 4  # float32
        expected = {"scoring": logits, "policy_loss": 2 * logits, "gtpo_loss": 3 * logits}
        if cell["workload"] in expected:
            assert cell["bytes_floor"] == expected[cell["workload"]]


def test_plots_markdown_and_printed_table(quick_run):
    out_dir, json_path, _, stdout = quick_run
    for name in PLOTS:
        png = out_dir / f"{json_path.stem}-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    markdown = (out_dir / f"{json_path.stem}.md").read_text()
    assert "| workload | dtype | N | V |" in markdown
    assert "time ms" in stdout and "ours-torch" in stdout


@pytest.fixture(scope="module")
def bench():
    """The harness's modules (benchmarks/ is a directory of scripts, not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import peers
        import report
    finally:
        sys.path.pop(0)
    return peers, report


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
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
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


def test_sweep_checks_every_configuration(tmp_path):
    """benchmarks/sweep.py on CPU: each configuration of each kernel is checked (not timed)
    against the default's outputs, and the result file names device, versions and commit."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--quick", "--device", "cpu"]
        + ["--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("cpu-*-sweep-quick.json")
    data = json.loads(path.read_text())
    for key in ("command", "shape", "device", "versions", "git", "copy_bandwidth"):
        assert key in data, key
    assert set(data["kernels"]) == {"scoring_fwd", "scoring_bwd", "policy_loss_fused"}
    for rows in data["kernels"].values():
        assert [row["status"] for row in rows] == ["checked", "checked"]
        assert sum(row["default"] for row in rows) == 1
