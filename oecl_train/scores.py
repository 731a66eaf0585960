"""The paper's three scores, batched on the device, higher = normal.

- norm:          ‖z‖ of the plain test view (what the exported runtime serves)
- mean-aug-norm: ‖mean of z over the plain view and K SimCLR views‖
- mean-sq-norm:  mean of ‖z‖² over those views
"""

from __future__ import annotations

import numpy as np
import torch

from oecl_train.augment import SimCLRAugment
from oecl_train.trainer import autocast

SCORES = ("norm", "mean-aug-norm", "mean-sq-norm")
DIRECTION = "higher = normal"


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
    scores=SCORES,
    augment: SimCLRAugment | None = None,
    k: int = 32,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
    batch: int = 512,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Each requested score for every image. The K augmented views are made on the device from
    the batch already there (no re-reading), drawn from a fixed seed so scores are repeatable."""
    device = torch.device(device)
    net.eval()
    unknown = set(scores) - set(SCORES)
    if unknown:
        raise ValueError(f"unknown scores {sorted(unknown)}; choose from {', '.join(SCORES)}")
    need_aug = any(s != "norm" for s in scores)
    if need_aug and augment is None:
        raise ValueError("mean-aug-norm and mean-sq-norm need an augmentation")
    if need_aug:
        torch.manual_seed(seed)
    # Keep the plain view plus K views of a sub-batch within one forward of `batch` images.
    sub = max(1, batch // (k + 1)) if need_aug else batch
    out: dict[str, list[np.ndarray]] = {s: [] for s in scores}
    for x, raw in _batches(images, sub, device):
        n = len(x)
        views = [x]
        if need_aug:
            views.append(
                augment(raw.repeat(k, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
            )
        with autocast(device, precision):
            z = net(torch.cat(views)).float()
        z_views = z.view(-1, n, z.shape[1])  # (1 + K, n, d)
        if "norm" in scores:
            out["norm"].append(torch.linalg.vector_norm(z_views[0], dim=1).cpu().numpy())
        if "mean-aug-norm" in scores:
            out["mean-aug-norm"].append(
                torch.linalg.vector_norm(z_views.mean(0), dim=1).cpu().numpy()
            )
        if "mean-sq-norm" in scores:
            out["mean-sq-norm"].append((z_views.square().sum(2)).mean(0).cpu().numpy())
    return {s: np.concatenate(v) if v else np.empty(0, np.float32) for s, v in out.items()}
