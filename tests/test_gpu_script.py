"""bench/gpu.py, the one command for a GPU machine, checked where CI can: its CPU dry run of
the tests phase (the CUDA tests skip, and the report says why), its refusal to pretend a GPU
run without CUDA, and the peak its MFU is measured against."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def run_main(gpu, monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["bench/gpu.py", *args])
    try:
        return gpu.main()
    except SystemExit as e:
        return e.code


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's refusal")
def test_a_gpu_run_without_cuda_is_refused_with_the_dry_run_named(
    gpu, monkeypatch, capsys, tmp_path
):
    assert run_main(gpu, monkeypatch, "--only", "tests", "--out", str(tmp_path)) == 2
    assert "no CUDA GPU here: run with --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_an_unknown_phase_is_refused_naming_the_phases(gpu, monkeypatch, capsys, tmp_path):
    assert (
        run_main(gpu, monkeypatch, "--dry-run", "--only", "tests,warp", "--out", str(tmp_path)) == 2
    )
    err = capsys.readouterr().err
    assert "unknown phases ['warp']" in err and "tests,throughput,recipe,inference" in err


@pytest.mark.slow  # runs pytest over tests/test_gpu.py
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run rather than skip")
def test_dry_run_of_the_tests_phase_reports_each_cuda_test_skipped_with_the_reason(
    gpu, monkeypatch, tmp_path
):
    # A report from an earlier call (another phase) is kept: calls add up to one report.
    (tmp_path / "report.json").write_text(
        json.dumps({"phases": {"recipe": {"error": "from an earlier call", "phase_seconds": 1}}})
    )
    assert run_main(gpu, monkeypatch, "--dry-run", "--only", "tests", "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["device"] == "cpu"
    tests = report["phases"]["tests"]
    names = {c["test"] for c in tests["cases"]}
    gpu_tests = (ROOT / "tests" / "test_gpu.py").read_text()
    assert len(names) >= 8 and all(f"def {n}(" in gpu_tests for n in names), names
    assert {c["outcome"] for c in tests["cases"]} == {"skipped"}
    assert all("no CUDA" in c["detail"] for c in tests["cases"])
    assert report["phases"]["recipe"]["error"] == "from an earlier call"
    md = (tmp_path / "report.md").read_text()
    assert "## 1. CUDA tests" in md and "from an earlier call" in md
    assert (tmp_path / "gpu-tests.xml").is_file() and (tmp_path / "gpu-tests.log").is_file()


def test_mfu_uses_the_datasheet_dense_bf16_peak_of_the_gpu(gpu):
    assert gpu.datasheet_peak("NVIDIA H200") == 989.4e12
    assert gpu.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu.datasheet_peak("NVIDIA H100 PCIe") == 756.0e12
    assert gpu.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert gpu.datasheet_peak("Some Future GPU") is None
