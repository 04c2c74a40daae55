"""bench/gpu_check.sh works where there is no GPU: its CUDA tests skip, and the bench runs the tiny
shapes (`--small`), printing its tables and writing its JSON under $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_small_shapes(tmp_path):
    pytest.importorskip("snac")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--small",
                           "--prompts", "1", "--max-new-tokens", "14", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tests = (tmp_path / "cuda_tests.txt").read_text()
    assert "SKIPPED" in tests and "needs a CUDA GPU" in tests and "FAILED" not in tests
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["small"] and report["device"] == "cpu"
    assert set(report["target_forward_ms_by_rows"]) == {"1", "2", "4", "8", "16"}
    modes = report["results"]
    assert [m.split()[0] for m in modes] == ["plain", "draft", "heads"]
    # the draft is the small target's 2 layers, i.e. the target: every draft is accepted
    assert modes["draft (2 layers, γ 4)"]["target_forwards_per_token"] < 0.5
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "| plain |" in table and "| target ms |" in table
