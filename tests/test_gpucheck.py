"""benchmarks/gpu-check.sh on a machine without CUDA: its message, its CPU dry path, its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfkt.bench import gpucheck
from dfkt.core.device import resolve_device
from dfkt.errors import DfktError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu-check.sh")], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    return r, out


def test_without_cuda_says_so_and_runs_the_dry_path(dry_run):
    r, out = dry_run
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "no CUDA" in r.stdout and "CPU dry path ok" in r.stdout
    assert "pip install" not in r.stdout and not (out / "tests.rc").exists()     # no install, no test suite
    doc = json.loads((out / "gpu-check.json").read_text())
    assert doc["dry"] is True and doc["environment"]["device"] == "cpu"
    assert [t["name"] for t in doc["throughput"]] == ["shot-resnet50", "dafl-resnet34-resnet18"]
    for t in doc["throughput"]:
        assert t["steps"] == 2 and t["finite_loss"] and t["samples_per_s"] > 0
    md = (out / "gpu-check.md").read_text()
    assert md.startswith("## GPU check (CPU dry run") and "| shot resnet50 | 3x64x64 | 2 |" in md


def test_report_shows_the_stages_and_publishes_cuda_runs_only(dry_run, tmp_path):
    _, out = dry_run
    doc = json.loads((out / "gpu-check.json").read_text())
    with pytest.raises(DfktError, match="dry run is not a measurement"):
        gpucheck.publish(doc, tmp_path / "RESULTS.md")
    (tmp_path / "tests.rc").write_text("1\n")
    (tmp_path / "tests.log").write_text("....F\n1 failed, 4 passed in 3.0s\n")
    doc.update(dry=False, tests=gpucheck._stage(tmp_path, "tests"))
    md = gpucheck.markdown(doc)
    assert "exit 1 (FAILED); `1 failed, 4 passed in 3.0s`" in md and "demo --device cuda` (AMP): not run" in md
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- suite:other -->\nkept\n<!-- /suite:other -->\n")
    gpucheck.publish(doc, results)
    gpucheck.publish(doc, results)            # replaced, not appended twice
    text = results.read_text()
    assert text.count("<!-- suite:gpu-check -->") == 1 and "kept" in text and "## GPU check\n" in text


def test_auto_device_follows_dfkt_device(monkeypatch):
    """DFKT_TEST_DEVICE reaches the runs through DFKT_DEVICE (tests/conftest.py): 'auto' resolves to it."""
    monkeypatch.setenv("DFKT_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("DFKT_DEVICE", "meta")
    assert resolve_device("auto") == torch.device("meta") and resolve_device("cpu") == torch.device("cpu")


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun with more processes per node than GPUs: an error naming the fix, not two ranks on one card."""
    from dfkt.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("DFKT_DEVICE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda", 0) and resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    for spec in ("auto", "cuda"):
        with pytest.raises(ConfigError, match="--nproc_per_node=1"):
            resolve_device(spec)
