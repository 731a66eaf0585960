"""`oecl score` on hostile paths and outputs: each problem is one error row or one line, the
run never hangs, and `--out` is written whole or not at all."""

from __future__ import annotations

import csv
import io
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import deny_listing, random_images
from PIL import Image

from oecl_runtime.commands.score import expand_paths, score
from oecl_runtime.scorer import Scorer

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _pngs(folder: Path, n: int, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{i}.png" for i in range(n)]
    for p, img in zip(paths, random_images(n, seed=7, size=32), strict=True):
        Image.fromarray(img).save(p)
    return paths


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _score(args: list[str], artifact_dir: Path):
    return CliRunner().invoke(score, [*args, "--model", str(artifact_dir), "--threads", "1"])


def _score_process(args: list[str], artifact_dir: Path, timeout: float = 60, **kw):
    """`oecl score` as its own process: a hang is a timeout, not a stuck test run."""
    cmd = [sys.executable, "-m", "oecl_runtime", "score", *args, "--model", str(artifact_dir),
           "--backend", "onnxruntime-cpu", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_a_path_that_does_not_exist_is_a_usage_error(artifact_dir: Path, tmp_path: Path) -> None:
    _pngs(tmp_path, 1)
    for missing in ("nosuchdir", str(tmp_path / "nosuch.png")):
        res = _score([str(tmp_path / "img0.png"), missing], artifact_dir)
        assert res.exit_code == 2, res.output
        (line,) = _error_lines(res.output)
        assert missing in line and "no such file or directory" in line
    # A glob that matches nothing is not a missing path: nothing to score.
    res = _score([str(tmp_path / "*.jpg")], artifact_dir)
    assert res.exit_code == 1 and "no images found" in res.output


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_a_threshold_that_is_not_finite_and_non_negative_is_refused(
        artifact_dir: Path, tmp_path: Path, value: str) -> None:
    _pngs(tmp_path, 1)
    res = _score([str(tmp_path), "--threshold", value], artifact_dir)
    assert res.exit_code == 2, res.output
    (line,) = _error_lines(res.output)
    assert "--threshold" in line and "finite number >= 0" in line


def test_a_non_finite_norm_is_an_error_row_never_normal(artifact_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _pngs(tmp_path, 3)
    real = Scorer.score_array

    def one_nan(self: Scorer, batch: np.ndarray) -> np.ndarray:
        norms = real(self, batch)
        norms[1] = np.nan
        return norms

    monkeypatch.setattr(Scorer, "score_array", one_nan)
    res = _score([str(tmp_path), "--threshold", "1e9", "--strict"], artifact_dir)
    assert res.exit_code == 1, res.output
    rows = _rows(res.stdout)
    assert [r["norm"] == "" for r in rows] == [False, True, False]
    assert "non-finite norm" in rows[1]["error"] and rows[1]["is_anomaly"] == ""
    # Every finite norm is below 1e9: two anomalies, and the NaN is neither.
    assert "3 images: 2 scored, 2 anomalies" in res.stderr and "1 errors" in res.stderr


def test_a_fifo_is_an_error_row_not_a_hang(artifact_dir: Path, tmp_path: Path) -> None:
    _pngs(tmp_path, 2)
    os.mkfifo(tmp_path / "x.png")
    for args in ([str(tmp_path)], [str(tmp_path / "x.png"), str(tmp_path / "img0.png")]):
        res = _score_process(args, artifact_dir, timeout=60)
        assert res.returncode == 0, res.stderr
        rows = {Path(r["path"]).name: r for r in _rows(res.stdout)}
        assert "FIFO" in rows["x.png"]["error"] and rows["x.png"]["norm"] == ""
        assert rows["img0.png"]["norm"] and not rows["img0.png"]["error"]


def _locked(tmp_path: Path) -> Path:
    _pngs(tmp_path, 1, "a")
    _pngs(tmp_path / "locked", 1)
    _pngs(tmp_path / "z", 1)
    return tmp_path / "locked"


def _check_locked_row(res, tmp_path: Path) -> None:
    assert res.exit_code == 0, res.output
    rows = _rows(res.stdout)
    assert [r["path"] for r in rows] == [str(tmp_path / "a0.png"), str(tmp_path / "locked"),
                                         str(tmp_path / "z" / "img0.png")]
    assert rows[1]["error"] == "cannot list this directory: Permission denied"
    assert "1 errors" in res.stderr


@pytest.mark.skipif(AS_ROOT, reason="root reads a chmod-000 directory; the patched test below "
                                    "covers it")
def test_a_directory_that_cannot_be_listed_is_an_error_row(artifact_dir: Path,
                                                           tmp_path: Path) -> None:
    locked = _locked(tmp_path)
    locked.chmod(0)
    try:
        res = _score([str(tmp_path)], artifact_dir)
    finally:
        locked.chmod(0o755)
    _check_locked_row(res, tmp_path)


def test_a_directory_that_cannot_be_listed_is_an_error_row_patched(
        artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deny_listing(monkeypatch, _locked(tmp_path))
    _check_locked_row(_score([str(tmp_path)], artifact_dir), tmp_path)


def test_symlink_loops_and_overlong_paths_are_one_line(artifact_dir: Path,
                                                       tmp_path: Path) -> None:
    _pngs(tmp_path, 1)
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "gone.png").symlink_to("nothing-here.png")
    res = _score([str(tmp_path)], artifact_dir)
    assert res.exit_code == 0, res.output
    errors = {Path(r["path"]).name: r["error"] for r in _rows(res.stdout) if r["error"]}
    assert errors == {"gone.png": "a broken symbolic link",
                      "loop.png": "Too many levels of symbolic links"}

    res = _score([str(tmp_path / "loop.png")], artifact_dir)
    assert res.exit_code == 2 and "Too many levels of symbolic links" in res.output
    long = str(tmp_path / ("d" * 5000) / "x.png")
    res = _score([long], artifact_dir)
    assert res.exit_code == 2
    (line,) = _error_lines(res.output)
    assert "File name too long" in line and "characters)" in line and len(line) < 400
    res = _score([str(tmp_path), "--out", long[:-4] + ".csv"], artifact_dir)
    assert res.exit_code == 1
    (line,) = _error_lines(res.output)
    assert line.startswith("Error: cannot write") and "File name too long" in line
    assert len(line) < 400


def test_a_file_name_that_is_not_utf8_is_escaped_in_the_rows(artifact_dir: Path,
                                                             tmp_path: Path) -> None:
    (src,) = _pngs(tmp_path, 1)
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    os.rename(src, odd)
    out = tmp_path / "x.csv"
    res = _score([str(tmp_path), "--out", str(out)], artifact_dir)
    assert res.exit_code == 0, res.output
    (row,) = _rows(out.read_bytes().decode("utf-8"))
    assert row["path"] == str(tmp_path / "caf\\xe9.png") and row["norm"] and not row["error"]


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))


def test_score_out_under_a_file_size_limit_leaves_no_file(artifact_dir: Path,
                                                          tmp_path: Path) -> None:
    _pngs(tmp_path / "images", 12, prefix="a-rather-long-file-name-" * 4)
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    res = _score_process([str(tmp_path / "images"), "--out", str(out)], artifact_dir,
                         preexec_fn=_limit_file_size)
    assert res.returncode == 1, res.stderr
    assert "Error: cannot write" in res.stderr and "File too large" in res.stderr
    assert "Traceback" not in res.stderr
    assert list(out.parent.iterdir()) == []


def test_score_out_into_a_directory_it_cannot_write(artifact_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _pngs(tmp_path / "images", 1)
    ro = tmp_path / "ro"
    ro.mkdir()
    if AS_ROOT:  # root writes into a 0555 directory: fail the temporary file's creation
        import tempfile

        def refuse(*args: object, **kw: object) -> tuple[int, str]:
            raise PermissionError(13, "Permission denied", str(ro))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    ro.chmod(0o555)
    try:
        res = _score([str(tmp_path / "images"), "--out", str(ro / "x.csv")], artifact_dir)
    finally:
        ro.chmod(0o755)
    assert res.exit_code == 1
    (line,) = _error_lines(res.output)
    assert line == f"Error: cannot write {ro / 'x.csv'}: Permission denied"
    assert list(ro.iterdir()) == []
    # A parent that is a file is refused the same way.
    res = _score([str(tmp_path / "images"), "--out", str(tmp_path / "images" / "img0.png" /
                                                          "x.csv")], artifact_dir)
    assert res.exit_code == 1 and "Error: cannot write" in res.output


def test_expand_paths_lists_problems_in_walk_order(tmp_path: Path) -> None:
    _pngs(tmp_path, 2)
    os.mkfifo(tmp_path / "f.png")
    problems: dict[str, str] = {}
    entries = expand_paths((str(tmp_path),), problems)
    assert [Path(p).name for p in entries] == ["f.png", "img0.png", "img1.png"]
    assert problems == {str(tmp_path / "f.png"): "a named pipe (FIFO), not a regular file"}
