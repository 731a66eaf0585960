"""CutPaste near-OE: a patch of each ID image moved within it, the rest of the image untouched,
drawn on the device from the seeded default generator; and its share of the trainer's OE tail."""

from __future__ import annotations

import pytest
import torch
from helpers import splits_for, tiny_config

from oecl_train.augment import cutpaste, cutpaste_with_mask, jigsaw, overlay
from oecl_train.trainer import Trainer


def _noise(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_an_unturned_patch_is_a_block_of_the_same_image_moved_elsewhere():
    x = _noise(48, 3, 16, 20)  # noise: every block of it is distinct
    torch.manual_seed(0)
    out, mask = cutpaste_with_mask(x, scar=0.0, jitter=0.0)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for img, src, m in zip(out, x, mask, strict=True):
        assert m.any()
        # Outside the pasted box the image is the ID image, pixel for pixel.
        assert torch.equal(img[:, ~m], src[:, ~m])
        r0, r1, c0, c1 = _box(m)
        assert int(m.sum()) == (r1 - r0) * (c1 - c0)  # a whole rectangle
        block = img[:, r0:r1, c0:c1]
        found = [(i, j) for i in range(16 - (r1 - r0) + 1) for j in range(20 - (c1 - c0) + 1)
                 if torch.equal(src[:, i : i + r1 - r0, j : j + c1 - c0], block)]
        assert found and (r0, c0) not in found  # cut from this image, pasted elsewhere
        (i, j), = found
        assert abs(i - r0) >= 1 and abs(j - c0) >= 1  # moved along both axes
        assert 0.02 * 320 - 6 <= int(m.sum()) <= 0.15 * 320 + 8  # 2-15% of the area (rounded)


def test_scars_are_thin_turned_and_change_only_their_own_pixels():
    x = _noise(32, 1, 64, 64, seed=1)
    torch.manual_seed(1)
    out, mask = cutpaste_with_mask(x, scar=1.0)
    counts = mask.sum((1, 2))
    # At most 1/8 of 64 wide and 40% of it long, turned (nearest sampling adds a rim).
    assert (counts >= 1).all() and (counts <= 8 * 26 * 1.5).all()
    boxes = [_box(m) for m in mask]
    turned = sum(int(m.sum()) < (r1 - r0) * (c1 - c0) for m, (r0, r1, c0, c1)
                 in zip(mask, boxes, strict=True))
    assert turned > len(mask) // 2  # most scars are not axis-aligned rectangles
    assert all(torch.equal(o[:, ~m], s[:, ~m]) for o, s, m in zip(out, x, mask, strict=True))
    assert (out != x).any()


def test_the_pasted_brightness_moves_by_at_most_the_jitter():
    x = torch.full((16, 1, 32, 32), 100, dtype=torch.uint8)
    torch.manual_seed(2)
    out, mask = cutpaste_with_mask(x, scar=0.0, jitter=0.1)
    pasted = out[mask[:, None]].float()
    assert pasted.min() >= 90 and pasted.max() <= 110 and (pasted != 100).any()


def test_cutpaste_is_deterministic_under_the_seed():
    x = _noise(8, 3, 24, 24)
    torch.manual_seed(7)
    a = cutpaste(x)
    torch.manual_seed(7)
    assert torch.equal(cutpaste(x), a)
    torch.manual_seed(8)
    assert not torch.equal(cutpaste(x), a)


def test_cutpaste_share_follows_overlays_and_jigsaws_in_the_oe_tail(tmp_path):
    cfg = tiny_config(tmp_path, batch_size=4, oe_batch_size=8, oe_overlay=0.25, oe_jigsaw=0.25,
                      oe_cutpaste=0.25)
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    id_order, oe_order = tr._orders(0)
    torch.manual_seed(5)
    _, x_oe = tr._batch(0, id_order, oe_order)
    assert x_oe.shape[0] == 8
    assert torch.equal(x_oe[:2], tr.oe_data[oe_order[:2]])
    torch.manual_seed(5)
    pick = torch.randint(len(tr.id_data), (2, 2))
    assert torch.equal(x_oe[2:4], overlay(tr.id_data[pick[0]], tr.id_data[pick[1]]))
    pick = torch.randint(len(tr.id_data), (2,))
    assert torch.equal(x_oe[4:6], jigsaw(tr.id_data[pick]))
    pick = torch.randint(len(tr.id_data), (2,))
    assert torch.equal(x_oe[6:], cutpaste(tr.id_data[pick]))


@pytest.mark.parametrize(
    "kw, message",
    [({"oe_cutpaste": 1.0}, "--oe-cutpaste must be in"),
     ({"oe": "self", "oe_cutpaste": 0.5}, "--oe-cutpaste mixes into an external OE source"),
     ({"oe": "auto", "oe_cutpaste": 0.5}, "not --oe none/self/auto"),
     ({"oe_jigsaw": 0.5, "oe_cutpaste": 0.5}, "must leave a share for --oe"),
     ({"oe_far": "self"}, "--oe-far names an external OE source"),
     ({"oe_probe_steps": 0}, "--oe-probe-steps must be positive")],
)
def test_near_oe_shares_are_checked(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **kw)
