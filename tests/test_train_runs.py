"""Training runs: run files, checkpoints, resume, divergence, the CLI, stopping on a signal or a
time interval without losing work, extending a finished run, and the config a run is given
(read, never written: what ran is recorded beside it)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import splits_for, tiny_config

from oecl_train import checkpoint
from oecl_train.cli import main
from oecl_train.data import build_splits
from oecl_train.trainer import Trainer, TrainingDiverged, load_trained
from oecl_train.training import run_training


# -- runs, checkpoints, resume -------------------------------------------------------------------
def test_alpha_warmup_and_run_files(tmp_path):
    cfg = tiny_config(tmp_path, oe="photos", epochs=4, alpha_warmup=0.5, checkpoint_every=1)
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    tr.fit()
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["alpha"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    for key in ("loss", "contrastive", "id_norm", "oe_norm", "lr", "images_per_s"):
        assert all(math.isfinite(r[key]) for r in rows)
    for name in ("config.json", "loss.png", "norms.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    kept = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["epoch-00003.json", "epoch-00004.json"]
    cfg2, net, meta = load_trained(tmp_path / "run")
    assert meta["complete"] and meta["architecture"]["width"] == 8 and cfg2.alpha_warmup == 0.5
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config(tmp_path, oe="none", steps=2)
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    tr.fit()
    path = checkpoint.latest(tmp_path / "run" / "checkpoints")
    fresh = Trainer(cfg, splits_for(cfg), tmp_path / "other", progress=False)
    checkpoint.load(path, fresh.net, fresh.optimizer)
    for (k, a), b in zip(tr.net.state_dict().items(), fresh.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    sa, sb = tr.optimizer.state_dict(), fresh.optimizer.state_dict()
    for i in sa["state"]:
        assert torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"])
    assert "pickle" not in path.with_suffix(".safetensors").read_bytes()[:200].decode("latin1")


@pytest.mark.parametrize("oe", ["self", "photos"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, oe):
    kw = dict(oe=oe, epochs=4, checkpoint_every=1, alpha_warmup=0.25, keep_checkpoints=10)
    full_cfg = tiny_config(tmp_path / "a", **kw)
    full = Trainer(full_cfg, splits_for(full_cfg), tmp_path / "a" / "run", progress=False)
    full.fit()

    cut_cfg = tiny_config(tmp_path / "b", **kw)
    cut = Trainer(cut_cfg, splits_for(cut_cfg), tmp_path / "b" / "run", progress=False)
    original_save = Trainer._save

    def save_then_die(self, epoch, last):
        path = original_save(self, epoch, last)
        if epoch == 2:
            raise KeyboardInterrupt  # the process dies right after the epoch-2 checkpoint
        return path

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    monkeypatch.setattr(Trainer, "_save", original_save)
    resumed = Trainer(cut_cfg, splits_for(cut_cfg), tmp_path / "b" / "run", progress=False)
    assert resumed.resume() == 2
    resumed.fit()

    def rows(d):
        return [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "contrastive", "id_norm", "oe_norm", "alpha", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["epoch"], key)
    for (k, x), y in zip(
        full.net.state_dict().items(), resumed.net.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("where", ["inside an epoch", "at an epoch's end"])
def test_a_fit_paused_at_stop_at_continues_as_if_never_paused(tmp_path, where):
    # How --oe auto's probes are the first steps of the run they may become.
    kw = dict(oe="photos", epochs=4, checkpoint_every=1, alpha_warmup=0.25)
    full_cfg = tiny_config(tmp_path / "a", **kw)
    full = Trainer(full_cfg, splits_for(full_cfg), tmp_path / "a" / "run", progress=False)
    full.fit()

    cfg = tiny_config(tmp_path / "b", **kw)
    paused = Trainer(cfg, splits_for(cfg), tmp_path / "b" / "run", progress=False)
    stop = paused.steps_per_epoch + (1 if where == "inside an epoch" else 0)
    paused.stop_at = stop
    paused.fit()
    latest = json.loads(checkpoint.latest(tmp_path / "b" / "run" / "checkpoints").read_text())
    assert latest["step"] == stop and latest["total_steps"] == full.total_steps
    resumed = Trainer(cfg, splits_for(cfg), tmp_path / "b" / "run", progress=False)
    resumed.resume()
    assert resumed.start_step == stop
    resumed.fit()
    for (k, x), y in zip(
        full.net.state_dict().items(), resumed.net.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, oe="photos", epochs=3, checkpoint_every=1)
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    original = Trainer._step

    def poisoned(self, step, x_id, x_oe):
        m = original(self, step, x_id, x_oe)
        if step == bad_step:
            m["loss"] = torch.tensor(float("nan"))
        return m

    bad_step = tr.steps_per_epoch + 1  # in the second epoch, after one checkpoint
    monkeypatch.setattr(Trainer, "_step", poisoned)
    with pytest.raises(
        TrainingDiverged, match=rf"loss became nan at step {bad_step}; the last good"
    ):
        tr.fit()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "epoch-00001.json"
    ]


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    runner = CliRunner()
    cases = [
        ["train", "--data", "mnist", "--data-root", str(tmp_path / "nope")],
        ["train", "--data", "digits", "--id-class", "12", "--out-dir", str(tmp_path)],
        ["train", "--optimizer", "adam"],
        ["train", "--crop-scale", "0.1"],
        ["train", "--config", str(tmp_path / "missing.toml")],
        ["train", "--resume", str(tmp_path)],
    ]
    for args in cases:
        r = runner.invoke(main, args)
        assert r.exit_code != 0, args
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), (args, r.output)


def test_cli_train_with_config_file_and_resume(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(
        'data = "digits"\nid-class = 3\ndepth = "resnet10"\nwidth = 8\n'
        'image_size = 16\nbatch_size = 16\nprecision = "fp32"\nsteps = 4\noe = "self"\n'
    )
    runner = CliRunner()
    r = runner.invoke(
        main,
        [
            "train",
            "--config",
            str(conf),
            "--out-dir",
            str(tmp_path),
            "--name",
            "r",
            "--steps",
            "3",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["final"]["step"] == 3 and 0.0 <= result["test"]["AUROC"] <= 1.0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["id_class"] == "3" and saved["steps"] == 3 and saved["oe"] == "self"
    r = runner.invoke(main, ["train", "--resume", str(tmp_path / "r"), "--no-progress"])
    assert r.exit_code == 0, r.output


def test_quickstart_end_to_end(tmp_path):
    r = CliRunner().invoke(
        main, ["quickstart", "--steps", "40", "--out-dir", str(tmp_path), "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "AUROC" in r.output and "higher = normal" in r.output
    # Clean: no warning at all (it sets no threshold), and the first number is the served
    # score on the whole test split.
    assert "warning" not in r.output.lower(), r.output
    first = next(ln for ln in r.stdout.splitlines() if "AUROC" in ln)
    assert first.startswith("test AUROC ") and "mean-view-norm over 8 views" in first
    assert "whole test split" in first
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["final"]["step"] == 40 and result["test"]["AUROC"] > 0.5
    assert result["test"]["score"] == "mean-view-norm (higher = normal)"
    assert (tmp_path / "quickstart-digit0" / "checkpoints").is_dir()


def test_runs_are_repeatable(tmp_path):
    out = []
    for d in ("a", "b"):
        cfg = tiny_config(tmp_path / d, oe="photos", steps=3)
        out.append(Trainer(cfg, splits_for(cfg), tmp_path / d / "run", progress=False).fit())
    assert out[0]["loss"] == out[1]["loss"] and out[0]["id_norm"] == out[1]["id_norm"]


def test_imagenet_stem_rgb_and_lars_run(tmp_path):
    cfg = tiny_config(
        tmp_path, oe="none", steps=1, stem="imagenet", channels=3, optimizer="lars", image_size=32
    )
    splits = build_splits(
        data="digits",
        data_root=None,
        id_class="1",
        protocol="one-vs-rest",
        oe="none",
        image_size=32,
        channels=3,
    )
    assert splits.id_train.shape[1:] == (3, 32, 32)
    assert np.isfinite(Trainer(cfg, splits, tmp_path / "run", progress=False).fit()["loss"])


# -- no work lost: signals, time-interval checkpoints, extending a finished run ----------------
def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.net.state_dict().items()}


def test_sigint_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    import os
    import signal

    from oecl_train.trainer import TrainingInterrupted

    kw = dict(oe="photos", steps=6, alpha_warmup=0.3)
    full_cfg = tiny_config(tmp_path / "a", **kw)
    full = Trainer(full_cfg, splits_for(full_cfg), tmp_path / "a" / "run", progress=False)
    full.fit()

    cfg = tiny_config(tmp_path / "b", **kw)
    cut = Trainer(cfg, splits_for(cfg), tmp_path / "b" / "run", progress=False)
    original = Trainer._step

    def ctrl_c_during_step_2(self, step, x_id, x_oe):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; the step still completes
        return original(self, step, x_id, x_oe)

    monkeypatch.setattr(Trainer, "_step", ctrl_c_during_step_2)
    # A process started in the background inherits SIGINT ignored, so compare with what was
    # installed before rather than with Python's default handler.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        cut.fit()
    monkeypatch.setattr(Trainer, "_step", original)
    assert stopped.value.exit_code == 130
    msg = str(stopped.value)
    assert "stopped after step 3 of 6" in msg
    assert f"oecl train --resume {tmp_path / 'b' / 'run'}" in msg
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    kept = checkpoint.list_checkpoints(tmp_path / "b" / "run" / "checkpoints")
    assert [p.name for p in kept] == ["epoch-00000_step-00000003.json"]
    assert not list((tmp_path / "b").rglob("*.tmp"))

    resumed = Trainer(cfg, splits_for(cfg), tmp_path / "b" / "run", progress=False)
    resumed.resume()
    assert resumed.start_step == 3
    last = resumed.fit()
    a, b = _weights(full), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    log = (tmp_path / "a" / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in log.splitlines()]
    assert last["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-5)
    assert last["step"] == 6


def test_checkpoints_on_a_time_interval_inside_an_epoch(tmp_path):
    cfg = tiny_config(tmp_path, oe="none", steps=3, checkpoint_minutes=1e-9, keep_checkpoints=10)
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    assert tr.steps_per_epoch > 3  # all three steps lie inside the first epoch
    tr.fit()
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == [
        "epoch-00000_step-00000001.json",
        "epoch-00000_step-00000002.json",
        "epoch-00000_step-00000003.json",
        "epoch-00001.json",
    ]
    meta = json.loads((tmp_path / "run" / "checkpoints" / names[1]).read_text())
    assert (meta["step"], meta["step_in_epoch"], meta["complete"]) == (2, 2, False)
    assert meta["partial"]["n_steps"] == 2


def test_sigterm_on_the_command_line_then_extend_the_finished_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "r"
    args = ["train", "--data", "digits", "--id-class", "1", "--image-size", "16", "--depth",
            "resnet10", "--width", "8", "--batch-size", "16", "--precision", "fp32",
            "--oe", "none", "--steps", "100000", "--out-dir", str(tmp_path), "--name", "r"]
    proc = subprocess.Popen([sys.executable, "-m", "oecl_train.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    while not (run / "config.json").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, (out, err)
    assert "SIGTERM: stopped after step" in err and f"oecl train --resume {run}" in err
    assert "\r" not in err  # no progress bar when stderr is not a terminal
    meta = json.loads(checkpoint.latest(run / "checkpoints").read_text())
    done = meta["step"]
    assert done >= 1 and not meta["complete"]

    runner = CliRunner()
    # Extend (here: shorten to just past where it stopped): the schedule follows the new length.
    r = runner.invoke(main, ["train", "--resume", str(run), "--steps", str(done + 2),
                             "--no-progress"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["final"]["step"] == done + 2
    meta = json.loads(checkpoint.latest(run / "checkpoints").read_text())
    assert meta["complete"] and meta["total_steps"] == done + 2
    assert json.loads((run / "config.json").read_text())["steps"] == done + 2
    # A complete run is not trained or evaluated again: the command says so.
    r = runner.invoke(main, ["train", "--resume", str(run), "--no-progress"])
    assert r.exit_code == 0 and f"is complete ({done + 2} steps)" in r.output
    assert f"--resume {run} --steps N" in r.output and '"final"' not in r.output
    r = runner.invoke(main, ["train", "--resume", str(run), "--steps", str(done + 1)])
    assert r.exit_code == 0 and f"--steps {done + 1} asks for no more" in r.output
    r = runner.invoke(main, ["train", "--resume", str(run), "--lr", "0.5"])
    assert r.exit_code != 0 and "--lr cannot change them" in r.output


def test_extending_a_run_cut_inside_an_epoch_resumes_from_the_newest_checkpoint(
    tmp_path, monkeypatch
):
    import os
    import signal

    from oecl_train.trainer import TrainingInterrupted

    cfg = tiny_config(tmp_path, oe="none", steps=3)
    Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False).fit()  # ends inside epoch 0
    longer = tiny_config(tmp_path, oe="none", steps=6)
    tr = Trainer(longer, splits_for(longer), tmp_path / "run", progress=False)
    tr.resume(extend=True)
    assert (tr.start_step, tr.total_steps) == (3, 6)
    original = Trainer._step

    def stop_at_4(self, step, x_id, x_oe):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, x_id, x_oe)

    monkeypatch.setattr(Trainer, "_step", stop_at_4)
    with pytest.raises(TrainingInterrupted, match="after step 5 of 6"):
        tr.fit()
    monkeypatch.setattr(Trainer, "_step", original)
    # epoch-00000_step-00000005 (step 5) is newer than the short run's epoch-00001 (step 3).
    latest = checkpoint.latest(tmp_path / "run" / "checkpoints")
    assert latest.name == "epoch-00000_step-00000005.json"
    again = Trainer(longer, splits_for(longer), tmp_path / "run", progress=False)
    again.resume()
    assert (again.start_step, again.total_steps) == (5, 6)
    assert again.fit()["step"] == 6


def test_the_given_config_is_never_written_and_config_json_records_what_ran(tmp_path):
    cfg = tiny_config(tmp_path, steps=1, precision="auto", compile="auto", oe="none",
                      device="cpu")
    given = cfg.to_json()
    result = run_training(cfg, progress=False, warn_threshold=False, echo=lambda m: None)
    assert (cfg.precision, cfg.compile, cfg.tf32) == ("auto", "auto", True)
    assert cfg.to_json() == given
    assert 0.0 <= result["test"]["AUROC"] <= 1.0  # scored at the precision that ran
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["execution"] == {"device": "cpu", "precision": "fp32", "compile": False,
                                  "tf32": False}
    assert (saved["precision"], saved["compile"], saved["tf32"]) == ("fp32", "off", False)
    assert saved["device"] == "cpu"
