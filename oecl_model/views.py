"""Deterministic test-time views: the one definition `oecl eval` and the exported graph share.

The paper's ensemble score is ‖mean of z over the plain view and K random SimCLR views‖. Random
views make a served score that changes from call to call, so the served form replaces them
with a fixed set of K views drawn once from the training augmentation's geometric family:
square crops whose area is a share of the image inside the run's crop-scale range, resized
back to the input size, mirrored when training mirrored. View 0 is always the plain image, so
K = 1 is the single-pass norm. Crops of other aspect ratios (`make_views(ratio=...)`, as
RandomResizedCrop draws them) were measured on the validation split and did not score better
than squares (benchmarks/RESULTS.md), so the served set stays square.

Every view is a separable linear map of the image: a crop-and-bilinear-resize along rows (an
H x H matrix) and along columns (a W x W matrix, which also carries the flip). Applying the
views is two batched matrix products, so the same code runs in eager PyTorch and exports to
plain ONNX MatMuls (no Resize op whose rounding differs between backends).

Crop positions and sizes come from a Halton sequence (bases 2, 3, 5), aspect ratios from the
Weyl sequence of sqrt(2): deterministic, spread evenly over the family for any K, and the
first K views of a larger set are the K-view set (a K sweep compares nested sets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

DEFAULT_VIEWS = 8  # chosen on the validation split (benchmarks/RESULTS.md)
RESAMPLE = ("bilinear, half-pixel centres: output pixel o of a box (start, size) on an axis "
            "of length L samples source coordinate start + (o + 0.5) * size / L - 0.5, clamped "
            "to [start, start + size - 1]; the column map is mirrored when hflip")


@dataclass(frozen=True)
class View:
    """One view: the crop box in pixels of the model input, and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    hflip: bool = False

    def to_json(self) -> dict[str, int | bool]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> View:
        return cls(int(d["top"]), int(d["left"]), int(d["height"]), int(d["width"]),
                   bool(d["hflip"]))


def _halton(i: int, base: int) -> float:
    f, r = 1.0, 0.0
    while i > 0:
        f /= base
        r += f * (i % base)
        i //= base
    return r


def make_views(
    k: int, height: int, width: int, crop_scale: Sequence[float] = (0.5, 1.0),
    hflip: bool = False, ratio: Sequence[float] = (1.0, 1.0),
) -> tuple[View, ...]:
    """The K-view set: the plain view, then K - 1 crops from the training family.

    Draw i (1, 2, ...) takes area share lo + (hi - lo) * halton(i, 5) of the image, with
    width/height (relative to the image's) log-uniform in `ratio` at frac(i * sqrt(2)) (the
    default 1 gives squares), and top-left offsets at halton(i, 2) and halton(i, 3) of the
    free range; when training flipped, every other view is mirrored. Boxes are whole pixels
    so a client in any language reproduces them; a draw that rounds to a view already in the
    set is skipped.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of views must be a positive integer, got {k!r}")
    lo, hi = (float(s) for s in crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
    r_lo, r_hi = (float(r) for r in ratio)
    if not 0.0 < r_lo <= r_hi:
        raise ValueError(f"aspect ratio range must satisfy 0 < lo <= hi, got {ratio}")
    views = [View(0, 0, height, width, False)]
    i = 0
    while len(views) < k:
        i += 1
        if i > 64 * k:
            raise ValueError(f"a {height}x{width} input at crop scale {lo}-{hi} has fewer than "
                             f"{k} distinct whole-pixel views")
        share = lo + (hi - lo) * _halton(i, 5)
        # Weyl, not a fourth Halton base: for small i, halton(i, 7) rises with halton(i, 5),
        # which would tie wide crops to large ones.
        aspect = math.exp(math.log(r_lo) + math.log(r_hi / r_lo) * (i * math.sqrt(2.0) % 1.0))
        h = min(height, max(1, round(math.sqrt(share / aspect) * height)))
        w = min(width, max(1, round(math.sqrt(share * aspect) * width)))
        top = round(_halton(i, 2) * (height - h))
        left = round(_halton(i, 3) * (width - w))
        view = View(top, left, h, w, hflip and len(views) % 2 == 1)
        if view not in views:  # on a small pixel grid two draws can round to one box
            views.append(view)
    return tuple(views)


def views_for(cfg, height: int, width: int, k: int) -> tuple[View, ...]:
    """The K-view set of a run: its own crop-scale range and flip setting."""
    return make_views(k, height, width, tuple(cfg.crop_scale), bool(cfg.hflip))


def views_to_json(views: Sequence[View]) -> list[dict[str, int | bool]]:
    return [v.to_json() for v in views]


def views_from_json(items: Sequence[dict]) -> tuple[View, ...]:
    return tuple(View.from_json(d) for d in items)


def _axis_matrix(start: int, size: int, length: int, flip: bool) -> torch.Tensor:
    """(length, length) matrix M with out = M @ in along one axis (see RESAMPLE)."""
    o = torch.arange(length, dtype=torch.float64)
    src = (start + (o + 0.5) * size / length - 0.5).clamp(start, start + size - 1)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=start + size - 1)
    frac = src - i0
    m = torch.zeros(length, length, dtype=torch.float64)
    rows = torch.arange(length)
    m[rows, i0] += 1.0 - frac
    m[rows, i1] += frac
    if flip:
        m = m.flip(0)  # output column o reads what the unflipped map wrote to column L-1-o
    return m.float()


def view_matrices(views: Sequence[View], height: int, width: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maps (K, H, H) and transposed column maps (K, W, W): view_k(x) = R_k @ x @ C_k."""
    rows = torch.stack([_axis_matrix(v.top, v.height, height, False) for v in views])
    cols = torch.stack([_axis_matrix(v.left, v.width, width, v.hflip) for v in views])
    return rows, cols.transpose(1, 2).contiguous()


class ViewStack(nn.Module):
    """float (N, C, H, W) images → (K·N, C, H, W) views, view-major (all of view 0 first)."""

    def __init__(self, views: Sequence[View], height: int, width: int) -> None:
        super().__init__()
        if not views:
            raise ValueError("at least one view is needed")
        self.views = tuple(views)
        rows, cols = view_matrices(self.views, height, width)
        # (K, 1, 1, ., .) broadcasts over batch and channels in one MatMul each.
        self.register_buffer("rows", rows[:, None, None], persistent=False)
        self.register_buffer("cols", cols[:, None, None], persistent=False)

    @property
    def k(self) -> int:
        return len(self.views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.rows.to(x.dtype), self.cols.to(x.dtype)
        v = torch.matmul(torch.matmul(rows, x.unsqueeze(0)), cols)  # (K, N, C, H, W)
        return v.reshape(-1, *x.shape[1:])


def is_plain(views: Sequence[View], height: int, width: int) -> bool:
    """True when the set is the plain view alone: the score is then the single-pass norm."""
    return len(views) == 1 and views[0] == View(0, 0, height, width, False)


def mean_over_views(z: torch.Tensor, k: int) -> torch.Tensor:
    """(K·N, d) projections of a view-major stack → (N, d) float32 mean over the K views."""
    return z.float().view(k, -1, z.shape[1]).mean(0)


class ViewScoreModel(nn.Module):
    """uint8 NCHW in, (norm of the mean projection over the K views, that mean) out: the K-view
    counterpart of `ScoreModel`, used by the exported graph and the runtime's torch backend.

    The views are resampled in float32; with `half` the network then runs in half precision
    (its weights must be half too) and its projection comes back as float32.
    """

    def __init__(self, net: nn.Module, views: Sequence[View], height: int, width: int,
                 half: bool = False) -> None:
        super().__init__()
        self.net = net
        self.stack = ViewStack(views, height, width)
        self.half_precision = half

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stack(images.float() / 255.0)
        z = mean_over_views(self.net(x.half() if self.half_precision else x), self.stack.k)
        return torch.linalg.vector_norm(z, dim=1), z
