"""A threshold on too few ID-validation images is called out once: by `oecl train`, before
training, with what to do; `eval` and `export` record it in their files without repeating it,
and the quickstart (which sets no threshold) runs clean."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from click.testing import CliRunner

from oecl_train.cli import main
from oecl_train.config import TrainConfig
from oecl_train.training import few_validation_images

TINY = ["--data", "digits", "--id-class", "1", "--oe", "photos", "--image-size", "16",
        "--depth", "resnet10", "--width", "8", "--batch-size", "16", "--precision", "fp32",
        "--no-hflip", "--device", "cpu", "--no-progress"]


def _splits(n_val: int, n_train: int) -> SimpleNamespace:
    return SimpleNamespace(id_val=np.zeros(n_val), id_train=np.zeros(n_train))


def test_the_warning_names_the_val_fraction_that_fixes_it():
    w = few_validation_images(_splits(50, 450), TrainConfig(val_fraction=0.1))
    assert w.startswith("the 95%-TPR threshold rests on only 50 ID-validation images")
    assert w.endswith("(--val-fraction 0.2 holds out 100)")
    # A class too small to spare 100 images: no fraction to suggest.
    w = few_validation_images(_splits(18, 162), TrainConfig(val_fraction=0.1))
    assert "rests on only 18" in w and "--val-fraction 0." not in w
    assert few_validation_images(_splits(100, 900), TrainConfig()) is None


def test_train_warns_once_eval_and_export_record_it_silently(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["train", *TINY, "--steps", "2", "--out-dir", str(tmp_path),
                             "--name", "r"])
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if "rests on only" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: the 95%-TPR threshold")
    assert "--val-fraction" in warned[0]

    run = tmp_path / "r"
    r = runner.invoke(main, ["eval", str(run), "--scores", "norm,mean-view-norm",
                             "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "rests on only" not in r.output
    report = json.loads((run / "eval" / "report.json").read_text())
    assert "rests on only" in report["threshold"]["warning"]
    assert "rests on only" in (run / "eval" / "report.md").read_text()

    r = runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "art"), "--no-verify",
                             "--views", "2"])
    assert r.exit_code == 0, r.output
    *human, last = r.output.strip().splitlines()
    assert not any("rests on only" in ln for ln in human), human
    assert "rests on only" in json.loads(last)["threshold_warning"]  # the machine line keeps it
    meta = json.loads((tmp_path / "art" / "oecl.json").read_text())
    assert "rests on only" in meta["score"]["threshold_warning"]
