"""`oecl score` and `oecl bench` through click's CliRunner; `Scorer.score_files` beneath
`oecl score`; the runtime verbs as both entry points list them."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import copy_artifact, random_images
from PIL import Image

from oecl_runtime import Scorer
from oecl_runtime.commands.bench import bench
from oecl_runtime.commands.score import expand_paths, score
from oecl_runtime.flops import graph_macs
from oecl_runtime.scorer import FileResult
from oecl_runtime.verbs import RUNTIME_VERBS


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i, img in enumerate(random_images(5, seed=31, size=36)):
        Image.fromarray(img).save(root / ("sub" if i % 2 else ".") / f"img{i}.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image, skipped by the directory walk")
    return root


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_score_files_in_order_with_an_unreadable_file(artifact_dir: Path,
                                                     image_dir: Path) -> None:
    files = expand_paths((str(image_dir),))
    files.insert(1, str(image_dir / "missing.png"))
    # batch_size 2: several batches, one of them holding both unreadable files.
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu", batch_size=2) as s:
        results = list(s.score_files(files, workers=2))
        good = [p for p in files if p.endswith(".png") and "missing" not in p]
        want = s.score(good)
        high = list(s.score_files(good[:1], threshold=1e9))
    assert [r.path for r in results] == files
    corrupt = str(image_dir / "corrupt.jpg")
    bad = {r.path: r.error for r in results if r.error is not None}
    assert set(bad) == {files[1], corrupt}
    assert "no such file" in bad[files[1]] and "cannot decode" in bad[corrupt]
    assert all(r.norm is None and r.is_anomaly is None for r in results if r.error)
    scored = [r for r in results if r.error is None]
    assert [r.path for r in scored] == good
    for r, w in zip(scored, want, strict=True):
        assert r.norm == pytest.approx(w.norm, rel=1e-6) and r.is_anomaly == w.is_anomaly
    assert high == [FileResult(good[0], scored[0].norm, True)]


def test_score_files_stops_decoding_when_the_caller_stops(artifact_dir: Path,
                                                         image_dir: Path) -> None:
    files = expand_paths((str(image_dir),)) * 20
    before = threading.active_count()
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu", batch_size=2) as s:
        results = s.score_files(files, workers=3)
        assert next(results).path == files[0]
        results.close()
    assert threading.active_count() == before


def _verb_lines(help_text: str) -> list[str]:
    return [line for line in help_text.splitlines()
            if line.startswith("  ") and line.split()[0] in RUNTIME_VERBS]


def test_both_entry_points_list_the_runtime_verbs_alike_without_heavy_imports() -> None:
    code = ("import sys\nfrom click.testing import CliRunner\nfrom oecl_train.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'], terminal_width=100)\n"
            "print(sorted({'numpy', 'onnxruntime', 'torch'} & set(sys.modules)))\n"
            "print(r.output)")
    oecl = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout
    heavy, oecl_help = oecl.split("\n", 1)
    assert heavy == "[]"
    runtime = subprocess.run([sys.executable, "-m", "oecl_runtime", "--help"],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "COLUMNS": "100"}).stdout
    lines = _verb_lines(oecl_help)
    assert [line.split()[0] for line in lines] == list(RUNTIME_VERBS)
    assert lines == _verb_lines(runtime)
    for line, (_, _, short_help) in zip(lines, RUNTIME_VERBS.values(), strict=True):
        assert line.endswith(short_help)


def test_score_directory_with_a_corrupt_file(artifact_dir: Path, image_dir: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(score, [str(image_dir), "--model", str(artifact_dir),
                                     "--out", str(out), "--backend", "onnxruntime-cpu"])
    assert res.exit_code == 0, res.output
    rows = _rows(out.read_text())
    assert len(rows) == 6 and [r["path"] for r in rows] == expand_paths((str(image_dir),))
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("corrupt.jpg")
    assert "cannot decode" in bad[0]["error"] and bad[0]["norm"] == ""
    good = [r for r in rows if not r["error"]]
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu") as s:
        want = s.score([r["path"] for r in good])
    for r, w in zip(good, want, strict=True):
        assert float(r["norm"]) == pytest.approx(w.norm, rel=1e-5)
        assert r["is_anomaly"] == str(w.is_anomaly).lower()
    assert "6 images: 5 scored" in res.stderr and "1 errors" in res.stderr
    assert "norm: higher = normal" in res.stderr and "images/s" in res.stderr


def test_score_strict_jsonl_glob_and_threshold(artifact_dir: Path, image_dir: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "scores.jsonl"
    args = [str(image_dir / "**" / "*.png"), str(image_dir / "corrupt.jpg"),
            "--model", str(artifact_dir), "--out", str(out), "--threshold", "1e9", "--strict",
            "--threads", "1"]
    res = CliRunner().invoke(score, args)
    assert res.exit_code == 1, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert all(r["is_anomaly"] is True for r in rows if r["error"] is None)
    assert rows[-1]["norm"] is None and "cannot decode" in rows[-1]["error"]


def test_score_to_stdout_and_usage_errors(artifact_dir: Path, image_dir: Path,
                                          tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(score, [str(image_dir / "img0.png"), "--model", str(artifact_dir)])
    assert res.exit_code == 0 and len(_rows(res.stdout)) == 1
    res = runner.invoke(score, [str(image_dir), "--model", str(artifact_dir), "--out", "x.txt"])
    assert res.exit_code == 2 and ".csv or .jsonl" in res.output
    res = runner.invoke(score, [str(tmp_path / "*.png"), "--model", str(artifact_dir)])
    assert res.exit_code == 1 and "no images found" in res.output
    broken = copy_artifact(artifact_dir, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"x")
    res = runner.invoke(score, [str(image_dir), "--model", str(broken)])
    assert res.exit_code == 1
    (message,) = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert "model.onnx" in message and "truncated" in message


@pytest.fixture
def live_server(artifact_dir: Path) -> Iterator[str]:
    import socket

    import uvicorn

    from oecl_runtime.serving.app import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scorer = Scorer.open(artifact_dir, backend="onnxruntime-cpu")
    server = uvicorn.Server(uvicorn.Config(create_app(scorer), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        scorer.close()


def test_bench_quick_run_writes_json_csv_png(artifact_dir: Path, live_server: str,
                                             tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = CliRunner().invoke(bench, [
        "--model", str(artifact_dir), "--batch-sizes", "1,4,512", "--iterations", "5",
        "--warmup", "1", "--url", live_server, "--concurrency", "1,4", "--requests", "20",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "bench.json").read_text())
    rows = report["results"]
    assert [(r["mode"], r["batch_size"], r["concurrency"]) for r in rows] == [
        ("backend", 1, None), ("backend", 4, None), ("http", 1, 1), ("http", 1, 4)]
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["count"] == 5 and rows[2]["count"] == 20
    lat = rows[1]["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["backend"]["name"] == "onnxruntime-cpu" and report["device"]["cpu"]
    assert "onnxruntime" in report["device"]["versions"]
    assert report["server"]["name"] == "onnxruntime-cpu"
    # The arithmetic rate is the throughput times the graph's multiply-adds (x2 FLOPs).
    macs = graph_macs(artifact_dir / "model.onnx")
    assert report["macs_per_image"] == macs
    for r in rows[:2]:
        assert r["gflop_per_s"] == pytest.approx(2e-9 * macs * r["images_per_s"])
    assert all("gflop_per_s" not in r for r in rows[2:])
    csv_rows = _rows((out / "bench.csv").read_text())
    assert len(csv_rows) == 4
    assert float(csv_rows[0]["gflop_per_s"]) > 0 and csv_rows[2]["gflop_per_s"] == ""
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipping batch sizes [512]" in res.stderr and "p99" in res.stdout
    assert np.isfinite(rows[3]["latency_ms"]["p99"])


def test_bench_refuses_remote_urls(artifact_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(bench, ["--model", str(artifact_dir), "--url", "http://10.1.2.3:80",
                                     "--out", str(tmp_path)])
    assert res.exit_code == 2 and "only target this machine" in res.output
