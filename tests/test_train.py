"""Training engine: augmentation, self-OECL batches, LARS, checkpoints, resume, divergence, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import splits_for, tiny_config

from oecl_train import checkpoint
from oecl_train.augment import AugmentConfig, SimCLRAugment, jigsaw, overlay, rotate
from oecl_train.cli import main
from oecl_train.data import build_splits
from oecl_train.optim import LARS, build_optimizer, cosine_lr
from oecl_train.trainer import Trainer, TrainingDiverged, load_trained


# -- augmentation -------------------------------------------------------------------------------
def test_augmentation_draws_the_paper_parameters_per_sample():
    torch.manual_seed(0)
    crop, flip, jitter, gray = SimCLRAugment((32, 32), 3).ops
    shape = torch.Size([4000, 3, 32, 32])
    src = crop.forward_parameters(shape)["src"]  # (N, 4, 2) corners of each crop
    wh = src[:, 2] - src[:, 0] + 1
    area = wh[:, 0] * wh[:, 1] / (32 * 32)
    assert 0.07 <= float(area.min()) and float(area.max()) <= 1.0 and float(area.std()) > 0.1
    assert float(flip.forward_parameters(shape)["batch_prob"].float().mean()) == pytest.approx(
        0.5, abs=0.04
    )
    pj = jitter.forward_parameters(shape)
    assert float(pj["batch_prob"].float().mean()) == pytest.approx(0.8, abs=0.03)
    for key, (lo, hi) in {
        "brightness_factor": (0.6, 1.4),
        "contrast_factor": (0.6, 1.4),
        "saturation_factor": (0.6, 1.4),
        "hue_factor": (-0.1, 0.1),
    }.items():
        v = pj[key]
        assert lo - 1e-6 <= float(v.min()) < lo + 0.01 and hi - 0.01 < float(v.max()) <= hi + 1e-6
    assert float(gray.forward_parameters(shape)["batch_prob"].float().mean()) == pytest.approx(
        0.2, abs=0.03
    )
    wide = SimCLRAugment((32, 32), 3, AugmentConfig(crop_scale=(0.5, 1.0))).ops[0]
    wh = wide.forward_parameters(shape)["src"]
    wh = wh[:, 2] - wh[:, 0] + 1
    assert float((wh[:, 0] * wh[:, 1]).min()) / 1024 >= 0.45


def test_augmentation_is_per_sample_and_handles_grayscale():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).repeat(8, 1, 1, 1)
    v = SimCLRAugment((16, 16), 3)(x)
    assert v.shape == (8, 3, 16, 16) and v.dtype == torch.float32
    assert 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    # identical inputs, independent draws: no two views alike
    flat = v.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(8) * 1e3).min() > 1e-3
    g = SimCLRAugment((16, 16), 1)(x[:, :1])
    assert g.shape == (8, 1, 16, 16)


def test_self_oecl_batches_are_rotations_of_id_images(tmp_path):
    cfg = tiny_config(tmp_path, oe="self", batch_size=4)
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    id_order, oe_order = tr._orders(0)
    x_id, x_oe = tr._batch(0, id_order, oe_order)
    x = tr.id_data[id_order[:4]]
    xo = tr.id_data[oe_order[:4]]
    assert torch.equal(x_id, torch.cat([x, torch.rot90(x, 1, (2, 3))]))
    assert torch.equal(x_oe, torch.cat([torch.rot90(xo, 2, (2, 3)), torch.rot90(xo, 3, (2, 3))]))
    assert not torch.equal(id_order[:4], oe_order[:4])  # a separately shuffled draw
    assert torch.equal(rotate(rotate(x, 1), 3), x)


def test_overlay_is_the_maximum_with_a_shifted_image():
    torch.manual_seed(0)
    n, size = 500, 16
    a = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    a[:, :, 8, 8] = 100
    b = torch.zeros_like(a)
    b[:, :, 0, 0] = 255
    out = overlay(a, b)
    assert out.shape == a.shape and out.dtype == torch.uint8
    assert (out[:, 0, 8, 8] == 100).all()  # a is kept
    assert (out == 255).sum((1, 2, 3)).eq(1).all()  # b's pixel moved, not lost
    y, x = (out[:, 0] == 255).nonzero()[:, 1:].T
    dy, dx = ((y + 8) % size) - 8, ((x + 8) % size) - 8  # signed circular shift
    for d in (dy, dx):
        assert d.abs().min() >= 2 and d.abs().max() <= 4  # 1/8 to 1/4 of 16 pixels
        assert (d > 0).any() and (d < 0).any()
    # Every image gets its own shift.
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 20


def test_jigsaw_puts_every_images_quadrants_in_another_order():
    torch.manual_seed(0)
    n, h, w = 2000, 5, 7  # odd sizes: 2x3 quadrants, the last row and column stay put
    # Each quadrant of each image holds one distinct value: the output names its sources.
    x = torch.zeros(n, 2, h, w, dtype=torch.uint8)
    boxes = [(slice(0, 2), slice(0, 3)), (slice(0, 2), slice(3, 6)),
             (slice(2, 4), slice(0, 3)), (slice(2, 4), slice(3, 6))]
    for q, (r, c) in enumerate(boxes):
        x[:, 0, r, c] = 10 + q
        x[:, 1, r, c] = 20 + q  # both channels move together
    x[:, :, 4, :] = 99
    x[:, :, :, 6] = 99
    out = jigsaw(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out[:, :, 4, :] == 99).all() and (out[:, :, :, 6] == 99).all()
    orders = []
    for r, c in boxes:
        block = out[:, :, r, c]
        src = block[:, 0, 0, 0] - 10
        assert (block[:, 0] == (10 + src)[:, None, None]).all()  # a whole quadrant moved
        assert (block[:, 1] == (20 + src)[:, None, None]).all()
        orders.append(src)
    orders = torch.stack(orders, 1)
    assert (orders.sort(1).values == torch.arange(4)).all()  # a permutation, nothing lost
    assert not (orders == torch.arange(4)).all(1).any()  # never the image itself
    assert len({tuple(o) for o in orders.tolist()}) == 23  # every other order is drawn
    torch.manual_seed(0)
    assert torch.equal(jigsaw(x), out)  # drawn from the default generator
    with pytest.raises(ValueError, match="at least 2x2"):
        jigsaw(torch.zeros(1, 1, 1, 8))


def test_overlay_share_replaces_the_tail_of_the_external_oe_draw(tmp_path):
    cfg = tiny_config(tmp_path, batch_size=4, oe_batch_size=8, oe_overlay=0.25)
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    id_order, oe_order = tr._orders(0)
    torch.manual_seed(3)
    x_id, x_oe = tr._batch(0, id_order, oe_order)
    assert torch.equal(x_id, tr.id_data[id_order[:4]])
    assert x_oe.shape[0] == 8
    assert torch.equal(x_oe[:6], tr.oe_data[oe_order[:6]])
    torch.manual_seed(3)
    pick = torch.randint(len(tr.id_data), (2, 2))
    assert torch.equal(x_oe[6:], overlay(tr.id_data[pick[0]], tr.id_data[pick[1]]))
    # The same seed draws the same overlays (what resume relies on).
    torch.manual_seed(3)
    assert torch.equal(tr._batch(0, id_order, oe_order)[1], x_oe)



@pytest.mark.parametrize(
    "kw, message",
    [({"oe_overlay": 1.0}, "--oe-overlay must be in"), ({"oe": "self", "oe_overlay": 0.5},
                                                       "external OE source"),
     ({"oe_jigsaw": -0.1}, "--oe-jigsaw must be in"),
     ({"oe": "none", "oe_jigsaw": 0.5}, "--oe-jigsaw mixes into an external OE source"),
     ({"oe_overlay": 0.5, "oe_jigsaw": 0.5}, "must leave a share for --oe")],
)
def test_overlay_share_is_checked(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **kw)


# -- optimisation -------------------------------------------------------------------------------
def test_lars_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [
            {"params": [w], "weight_decay": 0.1, "lars": True},
            {"params": [b], "weight_decay": 0.0, "lars": False},
        ],
        lr=0.5,
        momentum=0.9,
        eta=0.01,
    )
    w.grad, b.grad = torch.tensor([0.0, 1.0]), torch.tensor([2.0])
    opt.step()
    g = torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([3.0, 4.0])  # [0.3, 1.4]
    trust = 0.01 * 5.0 / math.sqrt(0.3**2 + 1.4**2)
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * trust * g)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))
    # second step: momentum buffer v = 0.9 v + g'
    w_before = w.detach().clone()
    w.grad, b.grad = torch.tensor([0.0, 1.0]), torch.tensor([2.0])
    opt.step()
    g2 = torch.tensor([0.0, 1.0]) + 0.1 * w_before
    trust2 = 0.01 * float(w_before.norm()) / float(g2.norm())
    v = 0.9 * trust * g + trust2 * g2
    torch.testing.assert_close(w.detach(), w_before - 0.5 * v)


def test_optimizer_excludes_batchnorm_and_bias_from_decay():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    for name in ("sgd", "lars"):
        opt = build_optimizer(name, net, 0.1, 0.9, 5e-4)
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert decayed == {id(net[0].weight)}


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0) == pytest.approx(1.0)
    assert cosine_lr(50, 100, 1.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 1.0) == pytest.approx(0.0)
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)


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
