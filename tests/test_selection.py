"""`--select`: the checkpoint judged best on validation is the run's model (train's test AUROC,
eval and export); `last` keeps the last; `auto` selects only on real validation anomalies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import gray_pngs, tiny_config

from oecl_train.checkpoint import model_checkpoint
from oecl_train.selection import Selection
from oecl_train.trainer import load_trained
from oecl_train.training import run_training


def _scripted(monkeypatch: pytest.MonkeyPatch, figures: list[float]) -> list[int]:
    """Selection.judge answers `figures` in turn; returns the steps it was asked at."""
    asked: list[int] = []
    it = iter(figures)

    def judge(self, net, device):  # noqa: ANN001 - the method it replaces
        asked.append(len(asked))
        return next(it)

    monkeypatch.setattr(Selection, "judge", judge)
    return asked


def test_the_best_checkpoint_on_validation_is_the_model(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 checkpoints: the second is best.
    asked = _scripted(monkeypatch, [0.5, 0.9, 0.7, 0.8])
    cfg = tiny_config(tmp_path, epochs=4, checkpoint_every=1, keep_checkpoints=10,
                      select="auto")
    result = run_training(cfg, progress=False, quick_eval=False, warn_threshold=False)
    assert len(asked) == 4
    run = Path(result["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    judged = [(r["step"], r["val_auroc"]) for r in rows if "val_auroc" in r]
    assert [f for _, f in judged] == [0.5, 0.9, 0.7, 0.8]
    best_step = judged[1][0]
    sel = result["selected"]
    assert (sel["step"], sel["val_auroc"], sel["judged_on"]) == (best_step, 0.9, "other-classes")
    assert sel["last"] == {"step": judged[-1][0], "val_auroc": 0.8}
    assert model_checkpoint(run).name == "best.json"
    _, _, meta = load_trained(run)
    assert meta["step"] == best_step and meta["selected"]["val_auroc"] == 0.9


def test_ties_go_to_the_later_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, [0.6, 0.9, 0.9])
    cfg = tiny_config(tmp_path, epochs=3, checkpoint_every=1, select="auto")
    result = run_training(cfg, progress=False, quick_eval=False, warn_threshold=False)
    assert result["selected"]["step"] == result["selected"]["total_steps"]


def test_select_last_keeps_the_last_and_judges_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _scripted(monkeypatch, [])
    cfg = tiny_config(tmp_path, epochs=2, checkpoint_every=1, select="last")
    result = run_training(cfg, progress=False, quick_eval=False, warn_threshold=False)
    run = Path(result["run_dir"])
    assert asked == [] and "selected" not in result
    assert not (run / "checkpoints" / "best.json").exists()
    assert load_trained(run)[2]["complete"]


def test_a_fresh_run_forgets_an_earlier_runs_best(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, [0.9, 0.95, 0.1, 0.2])
    cfg = tiny_config(tmp_path, epochs=2, checkpoint_every=1, select="auto")
    run_training(cfg, progress=False, quick_eval=False, warn_threshold=False)
    again = run_training(cfg, progress=False, quick_eval=False, warn_threshold=False)
    assert again["selected"]["val_auroc"] == 0.2  # not the first run's 0.95


def test_auto_selects_only_on_real_anomalies(tmp_path: Path) -> None:
    from helpers import splits_for

    root = tmp_path / "mvtec"  # normal images alone to train on
    gray_pngs(root / "train" / "good", 24, 120, 0, size=16, spread=60)
    gray_pngs(root / "test" / "good", 3, 120, 1, size=16, spread=60)
    gray_pngs(root / "test" / "scratch", 3, 30, 2, size=16, spread=60)
    cfg = tiny_config(tmp_path, data="folder", data_root=str(root), id_class="good",
                      val_fraction=0.25, select="auto")
    splits = splits_for(cfg)
    assert Selection.for_run(cfg, splits, tmp_path / "run") is None  # held-out shifts only
    forced = tiny_config(tmp_path, data="folder", data_root=str(root), id_class="good",
                         val_fraction=0.25, select="val")
    assert Selection.for_run(forced, splits, tmp_path / "run").kind == "held-out-shifts"
    labelled = tiny_config(tmp_path, select="auto")
    assert Selection.for_run(labelled, splits_for(labelled), tmp_path / "run").kind == \
        "other-classes"


def test_export_and_eval_use_the_selected_checkpoint(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from oecl_train.evaluate import evaluate_run
    from oecl_train.export import export_run
    from oecl_train.report import format_run_table

    _scripted(monkeypatch, [0.4, 0.8, 0.6])
    cfg = tiny_config(tmp_path, epochs=3, checkpoint_every=1, select="auto")
    result = run_training(cfg, progress=False, quick_eval=False, warn_threshold=False)
    out = tmp_path / "artifact"
    export_run(result["run_dir"], out, ["onnx"], views=1)
    meta = json.loads((out / "oecl.json").read_text())
    selected = result["selected"]
    assert selected["val_auroc"] == 0.8 and selected["step"] < selected["total_steps"]
    assert meta["source"]["checkpoint_step"] == selected["step"]
    report = evaluate_run(result["run_dir"], ("norm",), device="cpu", plots=False)
    assert report["checkpoint"]["step"] == selected["step"]
    assert report["checkpoint"]["selected"]["val_auroc"] == 0.8
    assert "the best on validation: AUROC 0.800" in format_run_table(report)
