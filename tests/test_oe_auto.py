"""`oecl train --oe auto`: probes of candidate OE mixes judged on validation, the chosen one
continued as the run; what the candidates are judged on, and the record eval reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import gray_pngs, tiny_config
from PIL import Image

from oecl_train import checkpoint, oe_auto, validation
from oecl_train.cli import main
from oecl_train.config import TrainConfig
from oecl_train.data import Splits
from oecl_train.data.readers import conform, make_reader

TINY = ["--depth", "resnet10", "--width", "4", "--batch-size", "4", "--no-hflip",
        "--precision", "fp32", "--no-progress"]


def _images(folder: Path, n: int, value: int, seed: int) -> None:
    gray_pngs(folder, n, value, seed, size=8, spread=60)


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """An MVTec-layout tree, normal images only to train on, through `--oe auto`."""
    root = tmp_path_factory.mktemp("mvtec") / "screw"
    _images(root / "train" / "good", 12, 120, 0)
    _images(root / "test" / "good", 3, 120, 1)
    _images(root / "test" / "scratch", 3, 30, 2)
    out = tmp_path_factory.mktemp("runs")
    args = ["train", "--data", "folder", "--data-root", str(root), "--id-class", "good",
            "--out-dir", str(out), "--name", "screw", "--oe", "auto", "--steps", "5",
            "--oe-probe-steps", "1", "--val-fraction", "0.25", *TINY]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return out / "screw", json.loads(r.output.strip().splitlines()[-1]), r.output


def test_normal_images_alone_choose_by_held_out_shifts(auto_run):
    run_dir, result, output = auto_run
    rec = result["oe_auto"]
    assert rec["judged_on"] == "held-out-shifts"
    assert "judged on held-out synthetic shifts" in output  # said which of the three
    assert list(rec["candidates"]) == list(oe_auto.CANDIDATES)
    for name, c in rec["candidates"].items():
        trained = set(oe_auto.CANDIDATES[name][1])
        # Each candidate is scored on exactly the shift families it did not train with.
        assert set(c["judged_on_sets"]) == set(validation.FAMILIES) - trained
        assert set(c["per_set"]) == set(c["judged_on_sets"])
        assert c["val_auroc"] == pytest.approx(np.mean(list(c["per_set"].values())))
    # Two rungs: all five to step 1, the best two continued to step 4, the better of those
    # chosen.
    assert rec["rung_steps"] == [1, 4]
    first = {n: c["rungs"]["1"] for n, c in rec["candidates"].items()}
    kept = sorted(first, key=lambda n: -first[n])[:2]
    assert {n for n, c in rec["candidates"].items() if "4" in c["rungs"]} == set(kept)
    assert rec["chosen"] == max(kept, key=lambda n: rec["candidates"][n]["rungs"]["4"])
    assert rec["cost"]["probe_steps_total"] == 5 + 2 * 3 and rec["cost"]["extra_steps"] == 7
    for name in kept:  # continued from step 1 on the run's schedule, paused at step 4
        ckpt = checkpoint.latest(run_dir / "probes" / name / "checkpoints")
        meta = json.loads(ckpt.read_text())
        assert (meta["step"], meta["total_steps"]) == (4, 5)
    # The table is printed, with the chosen row marked.
    assert f"{rec['chosen']} *" in output and "chosen: " in output
    # The run is the chosen probe continued: a concrete config that records the choice.
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["oe_auto"]["chosen"] == rec["chosen"]
    mix = oe_auto.CANDIDATES[rec["chosen"]][0]
    assert cfg["oe"] == mix.get("oe", "photos")
    assert all(cfg[k] == v for k, v in mix.items())
    # Continued from the chosen probe's step, not from scratch.
    assert f"resuming {run_dir} at epoch 1 of 2 (step 4 of 5)" in output
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5
    assert (run_dir / "probes" / rec["chosen"] / "config.json").exists()


def test_eval_reports_the_choice(auto_run):
    run_dir, result, _ = auto_run
    r = CliRunner().invoke(main, ["eval", str(run_dir), "--k", "1"])
    assert r.exit_code == 0, r.output
    assert "OE chosen on held-out synthetic shifts" in r.output
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["oe_auto"]["chosen"] == result["oe_auto"]["chosen"]
    assert "OE chosen on" in (run_dir / "eval" / "report.md").read_text()


def test_resume_keeps_finished_probes_and_their_figures(auto_run, tmp_path):
    """A run stopped after three probes continues with the other two, the first three
    neither retrained nor judged again."""
    import shutil

    run_dir = tmp_path / "screw"
    shutil.copytree(auto_run[0], run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg.update(oe="auto", oe_auto=None, out_dir=str(tmp_path), oe_overlay=0.0, oe_jigsaw=0.0,
               oe_cutpaste=0.0)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    rec = json.loads((run_dir / "oe_auto.json").read_text())
    kept = dict(list(rec["candidates"].items())[:3])
    for c in kept.values():  # first rung only, with marks: not re-judged
        c["val_auroc"] = c["per_set"][c["judged_on_sets"][0]] = 0.25
        c["rungs"], c["probe_steps"] = {"1": 0.25}, 1
    # The choice follows the figures on record: far leads the first rung.
    kept["far"]["val_auroc"] = kept["far"]["rungs"]["1"] = 0.99
    rec["candidates"] = kept
    (run_dir / "oe_auto.json").write_text(json.dumps(rec))
    shutil.rmtree(run_dir / "checkpoints")
    r = CliRunner().invoke(main, ["train", "--resume", str(run_dir), "--no-progress"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])["oe_auto"]
    assert {n: out["candidates"][n]["rungs"]["1"] for n in kept} == {
        n: c["rungs"]["1"] for n, c in kept.items()}
    assert "4" in out["candidates"]["far"]["rungs"]  # continued to the second rung
    assert out["chosen"] in ("far", *[n for n in out["candidates"] if n not in kept])
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["oe"] == oe_auto.mix_settings(TrainConfig(), out["chosen"])["oe"]


def test_labelled_source_is_judged_on_the_other_classes_training_images(tmp_path):
    cfg = tiny_config(tmp_path, oe="auto")
    splits = Splits.from_config(cfg, oe="photos")
    kind, sets, _ = validation.validation_sets(cfg, splits)
    assert kind == "other-classes"
    (images,) = sets.values()
    reader = make_reader("digits", seed=cfg.seed)
    train, test = reader.load("train"), reader.load("test")
    id_label = train.class_index(cfg.id_class)
    def keys(a: np.ndarray) -> set[bytes]:  # each image as the model sees it
        return {x.tobytes() for x in conform(a, splits.spec)}

    other_train = keys(train.images[train.labels != id_label])
    assert keys(images) == other_train and len(images) == len(other_train)
    test_only = keys(test.images) - keys(train.images)
    assert not test_only & {x.tobytes() for x in images}  # never a test image
    # A far source that is the ID source's other classes cannot judge itself: shifts instead.
    cfg_same = tiny_config(tmp_path, oe="auto", oe_far="digits")
    assert validation.validation_sets(cfg_same, splits)[0] == "held-out-shifts"


def test_known_anomalies_come_first(tmp_path):
    _images(tmp_path / "anomalies" / "crack", 3, 10, 5)
    _images(tmp_path / "anomalies" / "stain", 2, 250, 6)
    cfg = tiny_config(tmp_path, oe="auto", val_ood=str(tmp_path / "anomalies"))
    splits = Splits.from_config(cfg, oe="photos")
    kind, sets, why = validation.validation_sets(cfg, splits)
    assert kind == "val-ood" and why == "--val-ood given"
    assert sets["val-ood"].shape == (5, *splits.id_val.shape[1:])  # conformed to the model


def test_shifts_are_repeatable_and_change_every_image():
    x = np.random.default_rng(0).integers(0, 256, (6, 1, 8, 8), dtype=np.uint8)
    for family in validation.FAMILIES:
        a = validation.shifted(family, x, seed=3)
        assert a.shape == x.shape and np.array_equal(a, validation.shifted(family, x, seed=3))
        assert all((a[i] != x[i]).any() for i in range(len(x))), family


def test_probe_longer_than_the_run_is_refused(tmp_path):
    r = CliRunner().invoke(main, ["train", "--data", "digits", "--oe", "auto", "--steps", "4",
                                  "--oe-probe-steps", "4", "--out-dir", str(tmp_path), *TINY])
    assert r.exit_code != 0
    assert "--oe-probe-steps (4) must be below the run's length (4 steps)" in r.output


def test_labelled_run_picks_by_the_other_classes(tmp_path, monkeypatch):
    """End to end on a labelled source (two candidates, to stay quick): judged on the other
    classes' training images, every candidate on the same set."""
    from oecl_train.training import run_training

    monkeypatch.setattr(oe_auto, "CANDIDATES", {k: oe_auto.CANDIDATES[k]
                                                for k in ("far", "far+cutpaste")})
    cfg = tiny_config(tmp_path, oe="auto", steps=3, oe_probe_steps=1, batch_size=8, width=4,
                      image_size=8)
    lines: list[str] = []
    result = run_training(cfg, progress=False, quick_eval=False, echo=lines.append)
    rec = result["oe_auto"]
    n_other = len(Splits.from_config(cfg, oe="digits").oe)
    assert rec["judged_on"] == "other-classes"
    assert rec["n_val_ood"] == {"other-classes": min(n_other, validation.MAX_VAL_OOD)}
    assert all(c["judged_on_sets"] == ["other-classes"] for c in rec["candidates"].values())
    figures = {n: c["val_auroc"] for n, c in rec["candidates"].items()}
    assert rec["chosen"] == max(figures, key=figures.get)
    assert any("judged on the other classes' training images" in ln for ln in lines)


def test_a_finished_auto_run_is_reused_by_sweeps_and_benchmarks(auto_run):
    from oecl_train.sweep import train_or_reuse

    run_dir = auto_run[0]
    saved = json.loads((run_dir / "config.json").read_text())
    asked = TrainConfig.from_dict({**saved, "oe": "auto", "oe_auto": None, "oe_overlay": 0.0,
                                   "oe_jigsaw": 0.0, "oe_cutpaste": 0.0})
    assert train_or_reuse(asked, progress=False) == ("reused", None)


def test_unreadable_known_anomalies_fail_in_one_line_before_any_write(tmp_path):
    r = CliRunner().invoke(main, ["train", "--data", "digits", "--oe", "auto", "--steps", "4",
                                  "--val-ood", str(tmp_path / "missing"), "--out-dir",
                                  str(tmp_path / "runs"), *TINY])
    assert r.exit_code != 0 and "missing: no such directory" in r.output
    assert not (tmp_path / "runs").exists()


def test_non_square_images_leave_rotations_out(tmp_path, monkeypatch):
    """Self-OECL's quarter turns cannot keep a non-square image's shape: no such probe."""
    root = tmp_path / "wide"
    rng = np.random.default_rng(0)
    for split, n in (("train/good", 8), ("test/good", 2), ("test/dent", 2), ("far/any", 6)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (6, 10), dtype=np.uint8)
            Image.fromarray(arr, "L").save(root / split / f"{i}.png")
    probed, _ = _fake_probes(monkeypatch, lambda name, steps, n: 0.5 + 0.01 * n)
    cfg = tiny_config(tmp_path, data="folder", data_root=str(root), id_class="good",
                      image_size=None, oe="auto", oe_far="folder", oe_root=str(root / "far"),
                      steps=6)
    result = oe_auto.run_auto(cfg, resume=False, progress=False, quick_eval=False,
                              echo=lambda m: None, train=lambda c, **kw: {"cfg": c})
    no_self = [n for n in oe_auto.CANDIDATES if n != "self"]
    assert probed[:len(no_self)] == no_self
    # The later the probe, the higher its figure: the first rung keeps CutPaste and jigsaws,
    # and jigsaws, judged last, win the second.
    assert result["oe_auto"]["chosen"] == probed[-1] == "far+jigsaw"
    assert result["cfg"].oe_jigsaw == 0.5 and result["cfg"].oe == "folder"


def _fake_probes(monkeypatch, figure) -> tuple[list[str], list[bool]]:
    """`_probe` replaced by scripted figures: figure(name, probe steps, probes so far).
    Returns the names probed and the resume flag of each call, in call order."""
    probed: list[str] = []
    resumed: list[bool] = []

    def fake_probe(cfg, name, steps, *args):
        probed.append(name)
        resumed.append(args[4])
        val = figure(name, steps, len(probed))
        before = args[-1] or {}
        return {"settings": {"oe": "photos"}, "judged_on_sets": [], "per_set": {},
                "val_auroc": val, "rungs": {**before.get("rungs", {}), str(steps): val},
                "probe_steps": steps, "probe_train_s": 0.0, "judge_s": 0.0}

    monkeypatch.setattr(oe_auto, "_probe", fake_probe)
    return probed, resumed


def test_the_second_rung_decides_among_the_first_rungs_best_two(tmp_path, monkeypatch):
    # Rotations lead early and are overtaken by jigsaws; photos alone never recover.
    early = {"far": 0.60, "far+overlay": 0.70, "far+jigsaw": 0.80, "far+cutpaste": 0.75,
             "self": 0.85}
    late = {"far+jigsaw": 0.95, "self": 0.90}
    probed, _ = _fake_probes(monkeypatch, lambda name, steps, n: (early if steps == 50 else
                                                              late)[name])
    cfg = tiny_config(tmp_path, oe="auto", steps=600)
    result = oe_auto.run_auto(cfg, resume=False, progress=False, quick_eval=False,
                              echo=lambda m: None, train=lambda c, **kw: {"cfg": c})
    rec = result["oe_auto"]
    assert rec["rung_steps"] == [50, 200]  # a twelfth of the run, then four times that
    assert probed == [*oe_auto.CANDIDATES, "self", "far+jigsaw"]  # the best two, best first
    assert rec["chosen"] == "far+jigsaw" and result["cfg"].oe_jigsaw == 0.5
    assert rec["cost"] == {"probe_train_s": 0.0, "judge_s": 0.0,
                           "probe_steps_total": 5 * 50 + 2 * 150, "extra_steps": 350,
                           "extra_share": round(350 / 600, 4)}


def test_a_second_rung_as_long_as_the_run_is_left_out():
    assert oe_auto.rung_steps(300, 3600) == [300, 1200]
    assert oe_auto.rung_steps(300, 1200) == [300]


def test_a_record_of_another_layout_is_not_resumed(tmp_path, monkeypatch):
    """A run stopped under an older --oe auto (one rung, probes that were short runs of their
    own): its figures and probe checkpoints are not taken for this layout's."""
    probed, resumed = _fake_probes(monkeypatch, lambda name, steps, n: 0.5 + 0.01 * n)
    cfg = tiny_config(tmp_path, oe="auto", steps=600)
    run_dir = tmp_path / cfg.run_name()
    run_dir.mkdir(parents=True)
    old = {"judged_on": "other-classes", "probe_steps": 100,
           "candidates": {"far": {"val_auroc": 0.99, "settings": {"oe": "photos"}}}}
    (run_dir / oe_auto.RECORD).write_text(json.dumps(old))
    result = oe_auto.run_auto(cfg, resume=True, progress=False, quick_eval=False,
                              echo=lambda m: None, train=lambda c, **kw: {"cfg": c})
    first = len(oe_auto.CANDIDATES)
    assert probed[:first] == list(oe_auto.CANDIDATES)  # every candidate probed again
    assert resumed[:first] == [False] * first  # from scratch
    assert result["oe_auto"]["candidates"]["far"]["val_auroc"] != 0.99
