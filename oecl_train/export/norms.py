"""The PyTorch reference: fp32 scores of the run's images, and which images are scored (held
out for the threshold, verification and golden set; OE for `score.oe_norm`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from oecl_model.model import ScoreModel
from oecl_model.views import View, is_plain
from oecl_train.data import Splits
from oecl_train.export.errors import ExportError
from oecl_train.scores import view_scores

VERIFY_PER_SIDE = 500  # at most this many ID and this many OOD images are verified
OE_STATS_MAX = 2000  # at most this many OE images make `score.oe_norm`


@torch.inference_mode()
def torch_norms(net: nn.Module, images: np.ndarray, device: torch.device,
                batch: int = 256, views: Sequence[View] | None = None) -> np.ndarray:
    """fp32 eval-mode scores of uint8 NCHW images: the reference every file is checked against.
    With `views` (more than the plain one), the K-view score `oecl eval` reports as
    mean-view-norm, from the same `oecl_model.views` code the graph is built with."""
    model = ScoreModel(net).to(device).eval()
    ensemble = views is not None and not is_plain(views, images.shape[2], images.shape[3])
    # TF32 would put GPU reference norms ~1e-3 off the fp32 graph; keep true fp32.
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        if ensemble:
            out = [view_scores(net, images, views, device=device, precision="fp32", batch=batch)]
        else:
            out = [model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch]))
                         .to(device))[0].float().cpu().numpy()
                   for i in range(0, len(images), batch)]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return np.concatenate(out) if out else np.empty(0, np.float32)


def subsample(images: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of `images`, drawn by `seed`, in their original order."""
    if len(images) <= limit:
        return images
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:limit])
    return images[idx]


def oe_images(splits: Splits, seed: int) -> np.ndarray | None:
    """The images `score.oe_norm` describes: the run's external OE, or for self-OECL the
    held-out ID images turned by 180° and 270° (the shifts it was trained to push down)."""
    if splits.oe_mode == "external" and splits.oe is not None:
        return subsample(splits.oe, OE_STATS_MAX, seed)
    if splits.oe_mode == "self":
        x = splits.id_val
        turns = [np.rot90(x, 2, axes=(2, 3))]
        if x.shape[2] == x.shape[3]:  # 270° changes the shape of a non-square input
            turns.append(np.rot90(x, 3, axes=(2, 3)))
        return np.ascontiguousarray(np.concatenate(turns))
    return None


def held_out(splits: Splits) -> tuple[np.ndarray, np.ndarray]:
    """(ID, OOD) held-out images: ID validation plus ID test images, and the non-ID test ones."""
    id_imgs = np.concatenate([splits.id_val, splits.test_images[splits.test_is_id]])
    return id_imgs, splits.test_images[~splits.test_is_id]


def verification_images(splits: Splits, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, is_id): up to VERIFY_PER_SIDE held-out ID and as many OOD images."""
    id_imgs, ood_imgs = held_out(splits)
    if len(ood_imgs) == 0:
        raise ExportError("the run's test set has no OOD images to verify AUROC on "
                          "(use --no-verify)")
    id_imgs = subsample(id_imgs, VERIFY_PER_SIDE, seed)
    ood_imgs = subsample(ood_imgs, VERIFY_PER_SIDE, seed + 1)
    images = np.ascontiguousarray(np.concatenate([id_imgs, ood_imgs]))
    is_id = np.concatenate([np.ones(len(id_imgs), bool), np.zeros(len(ood_imgs), bool)])
    return images, is_id
