"""SimCLR view augmentation, drawn per sample and applied to whole batches on the training device.

kornia draws independent parameters for every sample of a batch, so one call turns a uint8
batch into a batch of distinct views without leaving the device (no per-image CPU work).
"""

from __future__ import annotations

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
