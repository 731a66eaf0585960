"""Evaluation: metrics by hand, the scores on a fixed model, report files, sweeps, errors."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import TINY_TRAIN

from oecl_model.model import build_model
from oecl_model.views import make_views
from oecl_train import checkpoint
from oecl_train.augment import SimCLRAugment
from oecl_train.config import TrainConfig
from oecl_train.evaluate import REPORT_SCHEMA, evaluate_run
from oecl_train.evaluate_cli import eval_cmd
from oecl_train.metrics import METRICS, ood_metrics, rates_at_threshold, threshold_at_tpr
from oecl_train.scores import SCORES, compute_scores
from oecl_train.sweep import evaluate_sweep, run_sweep
from oecl_train.train_cli import train
from oecl_train.training import run_training

# The tests' tiny model and data (helpers.TINY_TRAIN), trained briefly as SimCLR on class 0.
TINY = {**TINY_TRAIN, "id_class": "0", "steps": 15, "oe": "none", "device": "cpu"}


def tiny_eval_config(out_dir: Path, **kw) -> TrainConfig:
    cfg = TrainConfig.from_dict({**TINY, "out_dir": str(out_dir), **kw})
    cfg.validate()
    return cfg


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_with_ties_by_hand():
    # ID scores {2, 3}, OOD scores {1, 2}. AUROC = P(ID > OOD) + ½ P(tie) over the 4 pairs:
    # (2,1) 1, (2,2) ½, (3,1) 1, (3,2) 1 → 3.5 / 4.
    # AUPR-IN, thresholds 3 | 2 (tied ID and OOD) | 1: precision 1 at recall ½, then 2/3 at
    # recall 1 → ½·1 + ½·⅔ = 5/6. AUPR-OUT (OOD positive, -score) is the mirror image: 5/6.
    # FPR@95TPR: all ID accepted only at threshold 2, which accepts one of two OOD → ½.
    m = ood_metrics(np.array([1, 2, 2, 3.0]), np.array([0, 1, 0, 1]))
    assert m["AUROC"] == pytest.approx(0.875)
    assert m["AUPR-IN"] == pytest.approx(5 / 6)
    assert m["AUPR-OUT"] == pytest.approx(5 / 6)
    assert m["FPR@95TPR"] == pytest.approx(0.5)


def test_metrics_without_ties_by_hand():
    # ID {0.35, 0.8}, OOD {0.1, 0.4}: ID wins 3 of 4 pairs. Ranked: 0.8 ID, 0.4 OOD, 0.35 ID,
    # 0.1 OOD → AUPR-IN = ½·1 + ½·⅔; -score ranks 0.1 OOD, 0.35 ID, 0.4 OOD → AUPR-OUT = ½·1 + ½·⅔.
    m = ood_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert m == pytest.approx(
        {"AUROC": 0.75, "AUPR-IN": 5 / 6, "AUPR-OUT": 5 / 6, "FPR@95TPR": 0.5}
    )


def test_fpr_at_95_tpr_and_threshold_by_hand():
    # ID = 1..20. 95% TPR keeps 19 of 20 → threshold 2; of OOD {0.5, 1.5, 19.5} only 19.5
    # passes → FPR 1/3. AUROC: 20 + 19 + 1 wins of 60 pairs.
    ids = np.arange(1, 21, dtype=float)
    ood = np.array([0.5, 1.5, 19.5])
    s = np.concatenate([ids, ood])
    is_id = np.r_[np.ones(20, bool), np.zeros(3, bool)]
    m = ood_metrics(s, is_id)
    assert m["FPR@95TPR"] == pytest.approx(1 / 3)
    assert m["AUROC"] == pytest.approx(40 / 60)
    assert threshold_at_tpr(ids, 0.95) == 2.0
    assert rates_at_threshold(s, is_id, 2.0) == pytest.approx({"TPR": 0.95, "FPR": 1 / 3})


def test_metrics_refuse_one_class_and_nan():
    with pytest.raises(ValueError, match="both ID and OOD"):
        ood_metrics(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics(np.array([1.0, np.nan]), np.array([1, 0]))


# -- scores on a fixed model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_model():
    torch.manual_seed(0)
    net = build_model(depth="resnet10", width=8, in_channels=1, mean=[0.5], std=[0.5]).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 1, 16, 16), dtype=np.uint8)
    return net, images, SimCLRAugment((16, 16), 1)


def test_norm_is_the_norm_of_the_plain_view(fixed_model):
    net, images, _ = fixed_model
    got = compute_scores(net, images, scores=("norm",), precision="fp32", batch=4)["norm"]
    with torch.no_grad():
        want = torch.linalg.vector_norm(net(torch.from_numpy(images).float() / 255), dim=1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    # bf16 autocast (the default) stays close to fp32.
    bf16 = compute_scores(net, images, scores=("norm",), precision="bf16")["norm"]
    np.testing.assert_allclose(bf16, got, rtol=0.05)


def test_augmented_scores_by_hand(fixed_model):
    net, images, augment = fixed_model
    k, seed = 5, 123
    kw = dict(augment=augment, k=k, precision="fp32", batch=(k + 1) * len(images), seed=seed,
              views=make_views(3, 16, 16))
    before = torch.random.get_rng_state()
    got = compute_scores(net, images, **kw)
    # Scoring leaves the caller's random state alone and repeats exactly.
    assert torch.equal(torch.random.get_rng_state(), before)
    again = compute_scores(net, images, **kw)
    for s in SCORES:
        np.testing.assert_array_equal(got[s], again[s])

    raw = torch.from_numpy(images)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        views = augment(raw.repeat(k, 1, 1, 1))  # view-major: K copies of the whole batch
        z = net(torch.cat([raw.float() / 255, views])).view(k + 1, len(images), -1)
    mean_aug = torch.linalg.vector_norm(z.mean(0), dim=1).numpy()
    mean_sq = z.square().sum(2).mean(0).numpy()
    np.testing.assert_allclose(got["mean-aug-norm"], mean_aug, rtol=1e-5)
    np.testing.assert_allclose(got["mean-sq-norm"], mean_sq, rtol=1e-5)
    np.testing.assert_allclose(got["norm"], torch.linalg.vector_norm(z[0], dim=1), rtol=1e-5)
    # Jensen: the mean of squared norms is at least the squared norm of the mean.
    assert np.all(got["mean-sq-norm"] >= got["mean-aug-norm"] ** 2 * (1 - 1e-6))


def test_unknown_score_and_missing_augmentation(fixed_model):
    net, images, _ = fixed_model
    with pytest.raises(ValueError, match="unknown score 'max-norm'"):
        compute_scores(net, images, scores=("norm", "max-norm"))
    with pytest.raises(ValueError, match="need an augmentation"):
        compute_scores(net, images, scores=("mean-sq-norm",))


# -- a trained run: report files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    cfg = tiny_eval_config(tmp_path_factory.mktemp("runs"), name="tiny")
    result = run_training(cfg, progress=False, quick_eval=False)
    return Path(result["run_dir"])


def test_report_files_and_schema(tiny_run):
    report = evaluate_run(tiny_run, SCORES, k=2, save_scores=True, device="cpu")
    eval_dir = tiny_run / "eval"
    on_disk = json.loads((eval_dir / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["schema"] == REPORT_SCHEMA and on_disk["direction"] == "higher_is_normal"
    assert set(on_disk) >= {
        "run_dir", "created", "checkpoint", "data", "evaluation", "scores", "threshold", "budget",
        "files",
    }
    assert list(on_disk["scores"]) == list(SCORES)
    for s in on_disk["scores"].values():
        assert s["direction"] == "higher_is_normal"
        assert set(s["metrics"]) == set(METRICS)
        for v in s["metrics"].values():
            assert isinstance(v, float) and 0.0 <= v <= 1.0
        assert s["id"]["n"] + s["ood"]["n"] == on_disk["data"]["n_test"]
    thr = on_disk["threshold"]
    assert thr["score"] == "mean-view-norm" and isinstance(thr["value"], float) and thr["n_val"] > 0
    assert 0.0 <= thr["test"]["TPR"] <= 1.0
    b = on_disk["budget"]
    assert (b["steps"], b["epochs"], b["complete"]) == (15, b["planned_epochs"], True)
    assert isinstance(b["wall_time_s"], float) and b["device"] == "cpu"
    assert on_disk["evaluation"]["k"] == 2
    for name in ("report.md", "roc.png", "hist.png", "scores.csv"):
        assert (eval_dir / name).stat().st_size > 0
    assert "higher = normal" in (eval_dir / "report.md").read_text()
    assert not list(eval_dir.glob(".*.tmp"))  # atomic writes leave no temporaries

    # Anyone can recompute the metrics from scores.csv.
    rows = list(csv.DictReader((eval_dir / "scores.csv").open()))
    assert len(rows) == on_disk["data"]["n_test"]
    assert set(rows[0]) == {"index", "path", "label", "is_id", *SCORES}
    is_id = np.array([r["is_id"] == "1" for r in rows])
    for name in SCORES:
        m = ood_metrics(np.array([float(r[name]) for r in rows]), is_id)
        assert m == pytest.approx(on_disk["scores"][name]["metrics"])


def test_eval_command_prints_table(tiny_run):
    res = CliRunner().invoke(eval_cmd, [str(tiny_run), "--scores", "norm", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "higher = normal" in res.output and "FPR@95TPR" in res.output
    assert "threshold (mean-view-norm" in res.output  # the served score at the default K
    assert list(json.loads((tiny_run / "eval" / "report.json").read_text())["scores"]) == ["norm"]
    assert not (tiny_run / "eval" / "scores.csv").exists()  # no stale per-image scores


# -- sweeps ------------------------------------------------------------------------------------


def test_one_vs_rest_sweep_end_to_end(tmp_path):
    cfg = tiny_eval_config(tmp_path, name="sweep")
    sweep = run_sweep(cfg, "0,1", k=2, progress=False, echo=lambda m: None)
    path = tmp_path / "sweep" / "sweep.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["classes"] == ["0", "1"] and on_disk["protocol"] == "one-vs-rest"
    assert [e["run_dir"] for e in on_disk["per_class"]] == ["class-0", "class-1"]
    for score in SCORES:
        per = [e["metrics"][score]["AUROC"] for e in on_disk["per_class"]]
        assert on_disk["mean"][score]["AUROC"] == pytest.approx(np.mean(per))
    assert all(e["budget"]["wall_time_source"] == "measured" for e in on_disk["per_class"])
    assert "| mean |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert sweep["mean"] == on_disk["mean"]
    for c in ("0", "1"):
        report_path = tmp_path / "sweep" / f"class-{c}" / "eval" / "report.json"
        report = json.loads(report_path.read_text())
        assert report["data"]["id_class"] == c

    # Running it again reuses the finished runs; `oecl eval` on the sweep aggregates them.
    ckpt = sorted((tmp_path / "sweep" / "class-0" / "checkpoints").glob("*.safetensors"))[-1]
    mtime = ckpt.stat().st_mtime_ns
    again = run_sweep(cfg, "0,1", k=2, progress=False, echo=lambda m: None)
    assert ckpt.stat().st_mtime_ns == mtime and again["mean"] == sweep["mean"]
    res = CliRunner().invoke(eval_cmd, [str(tmp_path / "sweep"), "--k", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "mean" in res.output and "higher = normal" in res.output
    assert evaluate_sweep(tmp_path / "sweep", k=2, echo=lambda m: None)["mean"] == sweep["mean"]


# -- bad input -----------------------------------------------------------------------------------


def _one_line_error(res) -> str:
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_eval_bad_input_is_one_line(tmp_path, tiny_run):
    runner = CliRunner()
    no_ckpt = tmp_path / "no-ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.json").write_text((tiny_run / "config.json").read_text())
    assert "no checkpoint" in _one_line_error(runner.invoke(eval_cmd, [str(no_ckpt)]))
    assert "not a run directory" in _one_line_error(runner.invoke(eval_cmd, [str(tmp_path)]))
    missing = tmp_path / "missing"
    assert "no such directory" in _one_line_error(runner.invoke(eval_cmd, [str(missing)]))
    msg = _one_line_error(runner.invoke(eval_cmd, [str(tiny_run), "--scores", "norm,maxnorm"]))
    assert "unknown score 'maxnorm'" in msg


def test_sweep_unknown_class_is_one_line(tmp_path):
    args = ["--classes", "0,42", "--data", "digits", "--out-dir", str(tmp_path), "--no-progress"]
    msg = _one_line_error(CliRunner().invoke(train, args))
    assert "no class 42" in msg
    assert not any(tmp_path.iterdir())  # refused before anything was trained


def test_sweep_reuses_only_runs_with_the_same_settings(tmp_path: Path) -> None:
    from oecl_train.sweep import EvalError, train_or_reuse

    cfg = TrainConfig(data="digits", out_dir=str(tmp_path), name="run", steps=5)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "epoch-0001.json").write_text(json.dumps({"complete": True}))
    (run_dir / "checkpoints" / "epoch-0001.safetensors").write_bytes(b"")
    saved = cfg.to_json()
    del saved["oe_overlay"]  # written before the option existed: reads as its default
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert train_or_reuse(cfg, progress=False) == ("reused", None)
    # The same directory spelled another way (saved relative, asked absolute): the same run.
    (run_dir / "config.json").write_text(json.dumps({**saved, "out_dir": "elsewhere/.."}))
    assert train_or_reuse(cfg, progress=False) == ("reused", None)
    (run_dir / "config.json").write_text(json.dumps({**saved, "oe_overlay": 0.5}))
    with pytest.raises(EvalError, match=r"different settings \(oe_overlay\)"):
        train_or_reuse(cfg, progress=False)


def test_sweep_extends_a_shorter_finished_run_only_when_asked(tmp_path: Path) -> None:
    """A probe-then-continue benchmark extends the probe's run in place: the same steps are
    not trained twice, the extension ends at the new length, and a stop before its first
    checkpoint (config.json already says the new length) is picked up on the next call."""
    from oecl_train.sweep import EvalError, train_or_reuse

    short = TrainConfig(data="digits", out_dir=str(tmp_path), name="run", steps=2,
                        image_size=16, depth="resnet10", width=8, batch_size=8, oe="none",
                        precision="fp32", device="cpu")
    assert train_or_reuse(short, progress=False)[0] == "trained"
    longer = dataclasses.replace(short, steps=4)
    with pytest.raises(EvalError, match=r"different settings \(steps\)"):
        train_or_reuse(longer, progress=False)
    with pytest.raises(EvalError, match=r"settings \(lr\)"):  # only --steps may differ
        train_or_reuse(dataclasses.replace(longer, lr=0.5), progress=False, extend=True)
    run = tmp_path / "run"
    # config.json saying 4 steps beside the 2-step run's last checkpoint: an extension that
    # stopped before it wrote anything.
    (run / "config.json").write_text(json.dumps(longer.to_json()))
    what, seconds = train_or_reuse(longer, progress=False, extend=True)
    assert what == "extended" and seconds is not None
    meta = json.loads(checkpoint.latest(run / "checkpoints").read_text())
    assert meta["complete"] and meta["step"] == 4 and meta["total_steps"] == 4
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4
    assert train_or_reuse(longer, progress=False, extend=True) == ("reused", None)
    # Shorter than what ran is never "extended".
    with pytest.raises(EvalError, match="different settings"):
        train_or_reuse(short, progress=False, extend=True)


def test_view_score_in_eval_is_the_exported_score(tiny_run):
    """eval's mean-view-norm and the exporter's reference come from one view set, so a served
    K-view artifact and `oecl eval --views K` cannot drift."""
    from oecl_model.views import views_for, views_to_json
    from oecl_train import export
    from oecl_train.data import Splits
    from oecl_train.trainer import load_trained

    res = CliRunner().invoke(eval_cmd, [str(tiny_run), "--scores", "norm,mean-view-norm",
                                        "--views", "3", "--save-scores", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    cfg, net, _ = load_trained(tiny_run, "cpu")
    splits = Splits.from_config(cfg, oe="none")
    views = views_for(cfg, 16, 16, 3)
    assert report["evaluation"]["views"] == views_to_json(views)
    rows = list(csv.DictReader((tiny_run / "eval" / "scores.csv").open()))
    got = np.array([float(r["mean-view-norm"]) for r in rows])
    ref = export.torch_norms(net, splits.test_images, torch.device("cpu"), views=views)
    tol = 1e-4 if cfg.precision == "fp32" else 0.05  # eval runs the run's own precision
    np.testing.assert_allclose(got, ref, rtol=tol)
    plain = np.array([float(r["norm"]) for r in rows])
    assert np.abs(got - plain).max() > 1e-3
