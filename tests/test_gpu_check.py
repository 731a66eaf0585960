"""benchmarks/gpu_check.sh: every step of the GPU acceptance run, on the CPU at tiny sizes with
the kernels interpreted (--smoke), so the script cannot rot between GPU runs; and the contract
that makes the one GPU run count: at most 8 files come back, measurements are on disk as they
are made, and a missing GPU or wheel folder stops the run in seconds with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["pytest", "targets", "loss", "train", "score"]
OUT_FILES = {"gpu-check.jsonl", "gpu-check.log", "gpu-check.md", "gpu-check.json",
             "gpu-check.tar.gz"}
# The device machine returns at most this many files from its output folder.
DEVICE_FILE_LIMIT = 8


def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    return proc, out


def test_gpu_check_smoke(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Everything comes back: a handful of files, nothing in folders.
    files = {p.name for p in out.iterdir()}
    assert files == OUT_FILES and len(files) <= DEVICE_FILE_LIMIT
    recs = _records(out / "gpu-check.jsonl")
    assert recs[0]["kind"] == "preflight" and recs[0]["ok"] and recs[0]["torch"]
    steps = [r for r in recs if r.get("kind") == "step"]
    assert [s["step"] for s in steps] == STEPS
    assert all(s["rc"] == 0 and not s["timed_out"] for s in steps)
    # Each measurement is appended while its step runs, before the step's own record.
    for bench in ("loss", "train", "score"):
        rows = [i for i, r in enumerate(recs) if r.get("bench") == bench]
        done = next(i for i, r in enumerate(recs) if r.get("step") == bench)
        assert rows and max(rows) < done, bench
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        archived = {Path(n).name for n in tar.getnames()}
        score = json.load(tar.extractfile("gpu-check/score-smoke.json"))
        train = json.load(tar.extractfile("gpu-check/train-cpu.json"))
        targets = json.load(tar.extractfile("gpu-check/targets.json"))
    assert {"pytest.xml", "loss-cpu.json", "loss-cpu.csv", "targets.json",
            *(f"{s}.log" for s in STEPS)} <= archived
    assert score["smoke"] and score["complete"]
    assert all(r["images_per_s"] > 0 for rows in score["results"].values() for r in rows)
    assert set(train["results"]) == {"reference", "ours-fp32"} and train["complete"]
    # Every variant reports the settings it ran under; all alike.
    settings = [r["settings"] for r in train["results"].values()]
    assert all(s == {**settings[0], "compile": s["compile"]} for s in settings)
    assert {(k["kernel"], k["spill_stores"]) for k in targets["kernels"]} == {
        (k, 0) for k in ("row_norm", "fwd", "bwd", "oe_grad")}
    summary = (out / "gpu-check.md").read_text()
    for part in ("## Loss kernels", "## Loss (", "## Training", "## Scoring", "settings"):
        assert part in summary
    assert json.loads((out / "gpu-check.json").read_text())["ok"] is True


# Runs bench_train with its live report patched to SIGKILL the process right after the first
# line is on disk: a time limit at the worst moment, reproducibly (polling for the line and then
# killing raced a fast machine, which finished every variant in between).
_KILLED_AFTER_FIRST_REPORT = """
import os, runpy, signal, sys
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import _gpu_env
report = _gpu_env.append_jsonl
def report_then_die(*args):
    report(*args)
    os.kill(os.getpid(), signal.SIGKILL)
_gpu_env.append_jsonl = report_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_bench_cut_short_keeps_what_it_measured(tmp_path):
    # bench_train killed (as a time limit would) once its first variant is reported: that
    # variant is in its JSON, marked incomplete.
    jsonl = tmp_path / "live.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_FIRST_REPORT,
         str(REPO / "benchmarks" / "bench_train.py"), "--data", "digits",
         "--depth", "resnet10", "--width", "4", "--batch-size", "8", "--steps", "1",
         "--warmup", "1", "--workers", "0", "--variants", "ours-fp32,reference,ours-fp32",
         "--device", "cpu", "--out", str(tmp_path), "--jsonl", str(jsonl)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    record = json.loads((tmp_path / "train-cpu.json").read_text())
    assert record["complete"] is False and list(record["results"]) == ["ours-fp32"]
    assert [r["variant"] for r in _records(jsonl)] == ["ours-fp32"]


def test_preflight_without_a_gpu_stops_in_seconds_with_one_line(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on GPU machines too.
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert time.monotonic() - t0 < 60  # no step ran
    (line,) = [ln for ln in proc.stderr.splitlines() if "preflight" in ln]
    assert line.startswith("gpu_check.sh: preflight failed: no CUDA device visible to torch")
    # The refusal comes back too.
    (rec,) = _records(tmp_path / "gpu-check.jsonl")
    assert rec["kind"] == "preflight" and not rec["ok"] and rec["missing"]


def test_preflight_names_a_missing_wheel_folder(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _gpu_env
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.setattr(_gpu_env, "CARRIED", ("kornia", "oecl_not_a_package"))
    missing, env = _gpu_env.preflight(cpu=True, wheels=tmp_path / ".whl")
    assert env["torch"] and env["python"]
    assert missing == ["oecl_not_a_package not importable (no wheel folder "
                       f"{tmp_path / '.whl'}/: run bash benchmarks/fetch_wheels.sh where there "
                       f"is network and carry {tmp_path / '.whl'})"]
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "kornia-0.9.0-py3-none-any.whl").write_bytes(b"")
    missing, _ = _gpu_env.preflight(cpu=True, wheels=tmp_path / ".whl")
    assert missing == [f"oecl_not_a_package not importable ({tmp_path / '.whl'}/ lacks their "
                       "wheels)"]


@pytest.mark.parametrize("args, message", [
    (["--fast"], "unknown argument --fast"),
    (["--steps", "loss,warp"], "unknown step warp"),
])
def test_gpu_check_rejects_unknown_arguments(args, message):
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_failing_variant_is_recorded_and_the_others_still_run(tmp_path):
    # The reference's DataLoader refuses -1 workers; ours needs none and is still timed.
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--data", "digits",
         "--depth", "resnet10", "--width", "4", "--batch-size", "8", "--steps", "1",
         "--warmup", "1", "--workers", "-1", "--variants", "reference,ours-fp32",
         "--device", "cpu", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    record = json.loads((tmp_path / "train-cpu.json").read_text())
    assert record["complete"] and "ValueError" in record["results"]["reference"]["error"]
    assert record["results"]["ours-fp32"]["images_per_s"] > 0
