"""benchmarks/gpu_check.sh --smoke: every step of the GPU acceptance run, on the CPU at tiny
sizes with the kernels interpreted, so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(ln) for ln in (tmp_path / "gpu-check-steps.jsonl").read_text()
             .splitlines()]
    assert [s["step"] for s in steps] == ["pytest", "loss", "train", "score"]
    assert all(s["rc"] == 0 for s in steps)
    score = json.loads((tmp_path / "score-smoke.json").read_text())
    assert score["smoke"] and all(r["images_per_s"] > 0 for rows in score["results"].values()
                                  for r in rows)
    train = json.loads((tmp_path / "train-cpu.json").read_text())
    assert set(train["results"]) == {"reference", "ours-fp32"}
    summary = (tmp_path / "gpu-check.md").read_text()
    for part in ("## Loss", "## Training", "## Scoring"):
        assert part in summary


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--fast"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
