"""SimCLR view augmentation, drawn per sample and applied to whole batches on the training device.

kornia draws independent parameters for every sample of a batch, so one call turns a uint8
batch into a batch of distinct views without leaving the device (no per-image CPU work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import permutations

import torch
from torch import nn

# RandomResizedCrop's width/height range (torchvision's and kornia's default, as in SimCLR).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2


class SimCLRAugment(nn.Module):
    """uint8 (N, C, H, W) → float views in [0, 1] of the same size. Works for C = 1 or 3."""

    def __init__(self, size: tuple[int, int], channels: int, cfg: AugmentConfig | None = None):
        super().__init__()
        import kornia.augmentation as K  # optional (the train extra) and slow to import

        cfg = cfg or AugmentConfig()
        b, c, s, h = cfg.jitter
        crop = K.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=CROP_RATIO)
        ops: list[nn.Module] = [crop]
        if cfg.hflip:
            ops.append(K.RandomHorizontalFlip())
        if channels == 3:
            ops.append(K.ColorJiggle(b, c, s, h, p=cfg.jitter_p))
            ops.append(K.RandomGrayscale(p=cfg.grayscale_p))
        else:
            # Saturation, hue and grayscale are undefined or identities on one channel.
            ops.append(K.ColorJiggle(b, c, 0.0, 0.0, p=cfg.jitter_p))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        return self.ops(x).clamp_(0.0, 1.0)


def rotate(x: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    """Rotate a batch by k·90° (self-OECL's distribution-shifting transformation)."""
    return torch.rot90(x, quarter_turns, dims=(2, 3))


def overlay(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Self-made near-OE: the pixel-wise maximum of `a` and `b`, with each image of `b` first
    shifted (circularly) by 1/8 to 1/4 of the image size along each axis, in a random direction
    drawn per image from torch's default generator.

    On light-on-dark images (digits, strokes, sparse objects) it draws two objects in one
    frame: made from ID images alone, yet never one ID image, and much nearer to the ID data
    than external far-OE.
    """
    n, _, h, w = b.shape
    dev = b.device

    def offsets(size: int) -> torch.Tensor:
        lo, hi = max(1, size // 8), max(1, size // 4)
        sign = torch.randint(0, 2, (n,), device=dev) * 2 - 1
        return torch.randint(lo, hi + 1, (n,), device=dev) * sign

    rows = (torch.arange(h, device=dev) - offsets(h)[:, None]) % h
    cols = (torch.arange(w, device=dev) - offsets(w)[:, None]) % w
    i = torch.arange(n, device=dev)[:, None, None]
    shifted = b[i, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return torch.maximum(a, shifted.permute(0, 3, 1, 2))


# The 23 orders of four quadrants other than the identity, as (top-left, top-right,
# bottom-left, bottom-right) sources: a jigsaw image is never its own ID image.
_QUADRANT_ORDERS = torch.tensor(
    [p for p in permutations(range(4)) if p != (0, 1, 2, 3)]
)


def jigsaw(x: torch.Tensor) -> torch.Tensor:
    """Self-made near-OE: each image's four quadrants in another order (one of the 23
    non-identity orders, drawn per image from torch's default generator).

    CSI's "permute" shifting transformation: every stroke of the ID image is kept, the
    layout no ID image has is what the norm must learn to reject. Odd sizes leave the
    last row / column in place.
    """
    n, _, h, w = x.shape
    hh, hw = h // 2, w // 2
    if hh == 0 or hw == 0:
        raise ValueError(f"jigsaw needs images of at least 2x2 pixels, got {h}x{w}")
    pick = torch.randint(len(_QUADRANT_ORDERS), (n,), device=x.device)
    order = _QUADRANT_ORDERS.to(x.device)[pick]
    quads = torch.stack(
        [x[:, :, :hh, :hw], x[:, :, :hh, hw : 2 * hw], x[:, :, hh : 2 * hh, :hw],
         x[:, :, hh : 2 * hh, hw : 2 * hw]], dim=1
    )  # (n, 4, c, hh, hw)
    picked = quads[torch.arange(n, device=x.device)[:, None], order]
    out = x.clone()
    out[:, :, :hh, :hw] = picked[:, 0]
    out[:, :, :hh, hw : 2 * hw] = picked[:, 1]
    out[:, :, hh : 2 * hh, :hw] = picked[:, 2]
    out[:, :, hh : 2 * hh, hw : 2 * hw] = picked[:, 3]
    return out


# CutPaste (Li et al., CVPR 2021), in shares of the image so one setting serves every size: a
# patch of 2-15% of the area with a height/width ratio of 0.3-3.3 (the paper's), or a "scar",
# 1/32-1/8 of the shorter side wide (at least a pixel) and 15-40% of it long, turned by up to
# 45° either way; the pasted pixels' brightness is scaled by 1 ± CUTPASTE_JITTER.
CUTPASTE_AREA = (0.02, 0.15)
CUTPASTE_ASPECT = (0.3, 3.3)
SCAR_WIDTH = (1 / 32, 1 / 8)
SCAR_LENGTH = (0.15, 0.4)
SCAR_ANGLE = 45.0
CUTPASTE_JITTER = 0.1


def cutpaste(x: torch.Tensor, scar: float = 0.5, jitter: float = CUTPASTE_JITTER) -> torch.Tensor:
    """Self-made near-OE: a patch of each image pasted elsewhere in the same image (a share
    `scar` of the images get a thin rotated scar instead of a patch). See `cutpaste_with_mask`."""
    return cutpaste_with_mask(x, scar, jitter)[0]


def cutpaste_with_mask(
    x: torch.Tensor, scar: float = 0.5, jitter: float = CUTPASTE_JITTER
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste on a batch, on its device, with every draw from torch's default generator;
    returns the images and the (n, h, w) mask of the pixels pasted over.

    The patch is cut axis-aligned and pasted with its centre moved by a quarter to three
    quarters of the room the image leaves along each axis (circularly within that room), so
    it never lands where it was cut unless the image has no room for it. An unturned patch is
    an exact pixel copy (before the brightness jitter); a turned scar is sampled nearest.
    """
    n, _, h, w = x.shape
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, device=dev)

    side = min(h, w)
    is_scar = torch.rand(n, device=dev) < scar
    area = uniform(*CUTPASTE_AREA) * h * w
    aspect = torch.exp(uniform(math.log(CUTPASTE_ASPECT[0]), math.log(CUTPASTE_ASPECT[1])))
    ph = torch.where(is_scar, (uniform(*SCAR_LENGTH) * side).round().clamp(min=2),
                     (area * aspect).sqrt().round()).clamp(1, max(1, h - 1))
    pw = torch.where(is_scar, (uniform(*SCAR_WIDTH) * side).round().clamp(min=1),
                     (area / aspect).sqrt().round()).clamp(1, max(1, w - 1))
    angle = torch.where(is_scar, uniform(-SCAR_ANGLE, SCAR_ANGLE), torch.zeros(n, device=dev))
    cos, sin = torch.cos(angle * math.pi / 180), torch.sin(angle * math.pi / 180)
    # Where the patch is cut: whole pixels, inside the image.
    src_y = (torch.rand(n, device=dev) * (h - ph + 1)).floor() + ph / 2
    src_x = (torch.rand(n, device=dev) * (w - pw + 1)).floor() + pw / 2

    def moved(src: torch.Tensor, size: int, half_extent: torch.Tensor) -> torch.Tensor:
        room = (size - 2 * half_extent).clamp(min=0)
        shift = (room * uniform(0.25, 0.75)).round()
        pos = (src - half_extent).clamp(min=0)
        pos = torch.where(room >= 1, torch.remainder(pos + shift, room.clamp(min=1)), pos)
        return half_extent + pos

    ey = (ph / 2 * cos.abs() + pw / 2 * sin.abs())
    ex = (ph / 2 * sin.abs() + pw / 2 * cos.abs())
    dst_y, dst_x = moved(src_y, h, ey), moved(src_x, w, ex)
    # Each output pixel centre in the pasted patch's own frame (turned back by its angle).
    dy = (torch.arange(h, device=dev) + 0.5)[None, :, None] - dst_y[:, None, None]
    dx = (torch.arange(w, device=dev) + 0.5)[None, None, :] - dst_x[:, None, None]
    c, s = cos[:, None, None], sin[:, None, None]
    local_y, local_x = c * dy + s * dx, c * dx - s * dy
    mask = (local_y.abs() < ph[:, None, None] / 2) & (local_x.abs() < pw[:, None, None] / 2)
    rows = (src_y[:, None, None] + local_y).floor().long().clamp(0, h - 1)
    cols = (src_x[:, None, None] + local_x).floor().long().clamp(0, w - 1)
    i = torch.arange(n, device=dev)[:, None, None]
    patch = x[i, :, rows, cols].permute(0, 3, 1, 2).float()  # (n, c, h, w)
    top = 255.0 if x.dtype == torch.uint8 else 1.0
    patch = (patch * uniform(1 - jitter, 1 + jitter)[:, None, None, None]).clamp(0, top)
    if x.dtype == torch.uint8:
        patch = patch.round()
    out = torch.where(mask[:, None], patch.to(x.dtype), x)
    return out, mask
