"""A user's own image folders end to end: an MVTec AD-shaped tree through train, eval, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import gray_pngs

from oecl_train import report as report_module
from oecl_train.cli import main

TINY = ["--depth", "resnet10", "--width", "8", "--batch-size", "4", "--steps", "2",
        "--oe", "none", "--no-hflip"]


def _images(folder: Path, n: int, value: int, seed: int) -> None:
    gray_pngs(folder, n, value, seed, size=12, spread=20)


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec") / "bottle"
    _images(root / "train" / "good", 14, 150, 0)
    _images(root / "test" / "good", 4, 150, 1)
    _images(root / "test" / "broken_large", 3, 40, 2)
    _images(root / "test" / "contamination", 5, 240, 3)
    for d in ("broken_large", "contamination"):
        _images(root / "ground_truth" / d, 3, 255, 4)  # masks, never read
    return root


@pytest.fixture(scope="module")
def run(mvtec, tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("runs")
    args = ["train", "--data", "folder", "--data-root", str(mvtec), "--id-class", "good",
            "--out-dir", str(out), "--name", "bottle", "--no-progress",
            *TINY]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return out / "bottle", json.loads(r.output.strip().splitlines()[-1]), r.output


def test_train_reports_the_real_split_and_each_defect(run):
    _, result, output = run
    test = result["test"]
    assert set(test["per_ood_class"]) == {"broken_large", "contamination"}
    assert "AUROC per OOD class: broken_large" in output
    # The few validation images are called out before training.
    assert "warning: the 95%-TPR threshold rests on only 1 ID-validation images" in output


def test_eval_reports_per_ood_class_and_one_threshold(run, monkeypatch):
    run_dir, _, _ = run
    legends: list[list[str]] = []
    real_savefig = report_module._savefig

    def keep_legend(fig, path):
        if path.name == "hist.png":
            legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        real_savefig(fig, path)

    monkeypatch.setattr(report_module, "_savefig", keep_legend)
    r = CliRunner().invoke(main, ["eval", str(run_dir), "--scores", "norm", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads((run_dir / "eval" / "report.json").read_text())
    d = rep["data"]
    assert (d["n_test_id"], d["n_test_ood"]) == (4, 8)
    assert d["ood_classes"] == {"broken_large": 3, "contamination": 5}
    per = rep["scores"]["norm"]["per_ood_class"]
    assert {c: p["n"] for c, p in per.items()} == d["ood_classes"]
    for p in per.values():
        assert 0.0 <= p["AUROC"] <= 1.0 and np.isfinite(p["mean"])
    assert "OOD class" in r.output and "contamination" in r.output
    md = (run_dir / "eval" / "report.md").read_text()
    assert "| broken_large | 3 |" in md and "| contamination | 5 |" in md
    assert legends and legends[0][:3] == ["ID (4)", "OOD broken_large (3)",
                                          "OOD contamination (5)"]
    thr = rep["threshold"]
    assert thr["precision"] == "fp32" and "rests on only 1" in thr["warning"]
    assert "warning: the 95%-TPR threshold" not in r.output  # said once, by `oecl train`


def test_export_threshold_and_direction_match_eval(run, tmp_path):
    run_dir, _, _ = run
    from oecl_train.evaluate import evaluate_run
    from oecl_train.export import export_run

    rep = evaluate_run(run_dir, ("norm",), device="cpu", plots=False)
    summary = export_run(run_dir, tmp_path / "art", verify=False, log=lambda m: None)
    meta = json.loads((tmp_path / "art" / "oecl.json").read_text())
    # One threshold per run: the fp32 norm at 95% TPR of the same ID-validation images,
    # although the run scores its test split in bf16.
    assert meta["score"]["threshold"] == pytest.approx(rep["threshold"]["value"], rel=1e-6)
    # ... taken on the score the artifact serves (the K-view score at the default K).
    assert rep["threshold"]["score"] == meta["score"]["name"] == "mean-view-norm"
    assert meta["score"]["threshold_rule"]["n_images"] == rep["threshold"]["n_val"]
    assert "rests on only 1" in meta["score"]["threshold_warning"]
    assert rep["direction"] == meta["score"]["direction"] == "higher_is_normal"
    assert summary["threshold_warning"] == meta["score"]["threshold_warning"]
