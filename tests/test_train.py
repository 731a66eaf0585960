"""Training engine: augmentation, self-OECL and near-OE batches, LARS and the schedule; runs,
checkpoints and the CLI are in test_train_runs.py."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import splits_for, tiny_config

from oecl_train.augment import AugmentConfig, SimCLRAugment, jigsaw, overlay, rotate
from oecl_train.optim import LARS, build_optimizer, cosine_lr
from oecl_train.trainer import Trainer


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
