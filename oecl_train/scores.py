"""The paper's three scores, batched on the device, higher = normal.

- norm:          ‖z‖ of the plain test view (what the exported runtime serves)
- mean-aug-norm: ‖mean of z over the plain view and K SimCLR views‖
- mean-sq-norm:  mean of ‖z‖² over those views
- mean-view-norm: ‖mean of z over a fixed set of K deterministic views‖ (`oecl_model.views`;
  what an artifact exported with `--views K` serves)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from oecl_model.views import View, ViewStack, mean_over_views
from oecl_train.augment import SimCLRAugment
from oecl_train.execution import autocast
from oecl_train.score_names import DESCRIPTIONS, DIRECTION, RANDOM_VIEW_SCORES, SCORES, VIEW_SCORE

__all__ = ["DESCRIPTIONS", "DIRECTION", "RANDOM_VIEW_SCORES", "SCORES", "VIEW_SCORE",
           "compute_scores", "embed", "parse_scores", "view_scores"]


def parse_scores(text: str | Sequence[str]) -> tuple[str, ...]:
    """'norm,mean-sq-norm' → ('norm', 'mean-sq-norm'); an unknown name is a ValueError."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    names = [s for s in names if s]
    if not names:
        raise ValueError(f"no score given; choose from {', '.join(SCORES)}")
    unknown = [s for s in names if s not in SCORES]
    if unknown:
        raise ValueError(f"unknown score {unknown[0]!r}; choose from {', '.join(SCORES)}")
    return tuple(dict.fromkeys(names))


def _batches(images: np.ndarray | torch.Tensor, batch: int, device: torch.device):
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        chunk = torch.as_tensor(chunk).to(device, non_blocking=True)
        yield chunk.float().div_(255.0).contiguous(memory_format=torch.channels_last), chunk


@torch.inference_mode()
def embed(
    net: torch.nn.Module,
    images,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
    batch: int = 512,
) -> torch.Tensor:
    """Projection features z (float32, on the CPU) of the plain view of uint8 NCHW images."""
    device = torch.device(device)
    net.eval()
    out = []
    for x, _ in _batches(images, batch, device):
        with autocast(device, precision):
            out.append(net(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def compute_scores(
    net: torch.nn.Module,
    images,
    *,
    scores: Sequence[str] = SCORES,
    augment: SimCLRAugment | None = None,
    k: int = 32,
    views: Sequence[View] | None = None,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
    batch: int = 512,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Each requested score for every image of a uint8 NCHW array.

    The K augmented views are made on the device from the batch already there (no re-reading),
    drawn from `seed` inside a forked RNG so scores are repeatable and the caller's random
    state is left alone. The draws depend on the seed and on `batch` (images per forward).
    mean-view-norm uses the fixed `views` instead (no randomness). `progress(n)` is called
    after every n images scored.
    """
    device = torch.device(device)
    net.eval()
    scores = parse_scores(scores)
    want_views = VIEW_SCORE in scores
    if want_views and not views:
        raise ValueError(f"{VIEW_SCORE} needs the list of views")
    scores = tuple(s for s in scores if s != VIEW_SCORE)
    need_aug = any(s in RANDOM_VIEW_SCORES for s in scores)
    if need_aug and augment is None:
        raise ValueError("mean-aug-norm and mean-sq-norm need an augmentation")
    if need_aug and k < 1:
        raise ValueError("K (augmented views per image) must be at least 1")
    # Keep the plain view plus K views of a sub-batch within one forward of `batch` images.
    sub = max(1, batch // (k + 1)) if need_aug else batch
    out: dict[str, list[np.ndarray]] = {s: [] for s in scores}
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        # With only mean-view-norm asked for there is nothing to do here.
        for x, raw in _batches(images, sub, device) if scores else ():
            n = len(x)
            stack = [x]
            if need_aug:
                aug = augment(raw.repeat(k, 1, 1, 1))
                stack.append(aug.contiguous(memory_format=torch.channels_last))
            with autocast(device, precision):
                z = net(torch.cat(stack)).float()
            z_views = z.view(-1, n, z.shape[1])  # (1 + K, n, d): view-major like the repeat
            if "norm" in scores:
                out["norm"].append(torch.linalg.vector_norm(z_views[0], dim=1).cpu().numpy())
            if "mean-aug-norm" in scores:
                mean_z = z_views.mean(0)
                out["mean-aug-norm"].append(torch.linalg.vector_norm(mean_z, dim=1).cpu().numpy())
            if "mean-sq-norm" in scores:
                out["mean-sq-norm"].append(z_views.square().sum(2).mean(0).cpu().numpy())
            if progress is not None:
                progress(n)
    result = {s: np.concatenate(v) if v else np.empty(0, np.float32) for s, v in out.items()}
    if want_views:
        result[VIEW_SCORE] = view_scores(net, images, views, device=device, precision=precision,
                                         batch=batch)
    return result


@torch.inference_mode()
def view_scores(
    net: torch.nn.Module,
    images,
    views: Sequence[View],
    *,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
    batch: int = 512,
) -> np.ndarray:
    """‖mean of z over `views`‖ of uint8 NCHW images (float32): the exported K-view graph's
    score, built from the same `ViewStack`. The views are resampled in float32 outside
    autocast (as the graph does); only the network runs at `precision`."""
    device = torch.device(device)
    net.eval()
    h, w = images.shape[2], images.shape[3]
    stack = ViewStack(views, h, w).to(device)
    sub = max(1, batch // stack.k)  # K views of a sub-batch fill one forward of `batch`
    out = []
    for x, _ in _batches(images, sub, device):
        stacked = stack(x.contiguous()).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            z = net(stacked)
        out.append(torch.linalg.vector_norm(mean_over_views(z, stack.k), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.empty(0, np.float32)
