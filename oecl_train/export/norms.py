"""The PyTorch reference: fp32 scores of the run's images, and which images are scored (held
out for the threshold, verification and golden set; OE for `score.oe_norm`), each once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from oecl_model.model import ScoreModel
from oecl_model.views import View, is_plain
from oecl_train.data import Splits
from oecl_train.export.errors import ExportError
from oecl_train.export.progress import Progress
from oecl_train.scores import view_scores

# Each image the export needs is scored once (`reference_scores`), on at most these many:
VERIFY_PER_SIDE = 256  # held-out ID and OOD images of the parity check (golden set: a subset)
OE_STATS_MAX = 512  # OE images of `score.oe_norm` (a mean, std and percentiles)
CHUNK = 128  # images per progress report of the reference scoring


@dataclass(frozen=True)
class Reference:
    """fp32 PyTorch served scores of the images an export needs, each image scored once:
    the ID-validation images (threshold, `score.id_norm`), the parity-check sample
    (verification; the golden set is a subset of it) and the OE sample (`score.oe_norm`)."""

    id_val: np.ndarray
    verify_images: np.ndarray
    verify_is_id: np.ndarray
    verify_norms: np.ndarray
    oe_norms: np.ndarray | None


@torch.inference_mode()
def torch_norms(net: nn.Module, images: np.ndarray, device: torch.device,
                batch: int = 256, views: Sequence[View] | None = None,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """fp32 eval-mode scores of uint8 NCHW images: the reference every file is checked against.
    With `views` (more than the plain one), the K-view score `oecl eval` reports as
    mean-view-norm, from the same `oecl_model.views` code the graph is built with.
    `progress(n)` is called after every CHUNK images."""
    model = ScoreModel(net).to(device).eval()
    ensemble = views is not None and not is_plain(views, images.shape[2], images.shape[3])
    # TF32 would put GPU reference norms ~1e-3 off the fp32 graph; keep true fp32.
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = []
    try:
        for i in range(0, len(images), CHUNK):
            chunk = images[i:i + CHUNK]
            if ensemble:
                out.append(view_scores(net, chunk, views, device=device, precision="fp32",
                                       batch=batch))
            else:
                out += [model(torch.from_numpy(np.ascontiguousarray(chunk[j:j + batch]))
                              .to(device))[0].float().cpu().numpy()
                        for j in range(0, len(chunk), batch)]
            if progress is not None:
                progress(len(chunk))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return np.concatenate(out) if out else np.empty(0, np.float32)


def subsample_index(n: int, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of range(n), drawn by `seed`, in order."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def subsample(images: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of `images`, drawn by `seed`, in their original order."""
    return images if len(images) <= limit else images[subsample_index(len(images), limit, seed)]


def oe_images(splits: Splits, seed: int) -> np.ndarray | None:
    """The images `score.oe_norm` describes (at most OE_STATS_MAX): the run's external OE, or
    for self-OECL the held-out ID images turned by 180° and 270° (the shifts it was trained to
    push down)."""
    if splits.oe_mode == "external" and splits.oe is not None:
        return subsample(splits.oe, OE_STATS_MAX, seed)
    if splits.oe_mode == "self":
        x = splits.id_val
        turns = [np.rot90(x, 2, axes=(2, 3))]
        if x.shape[2] == x.shape[3]:  # 270° changes the shape of a non-square input
            turns.append(np.rot90(x, 3, axes=(2, 3)))
        return subsample(np.ascontiguousarray(np.concatenate(turns)), OE_STATS_MAX, seed)
    return None


def held_out(splits: Splits) -> tuple[np.ndarray, np.ndarray]:
    """(ID, OOD) held-out images: ID validation plus ID test images, and the non-ID test ones."""
    id_imgs = np.concatenate([splits.id_val, splits.test_images[splits.test_is_id]])
    return id_imgs, splits.test_images[~splits.test_is_id]


def _verification_index(splits: Splits, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the parity-check sample into held_out()'s ID and OOD images."""
    n_id, n_ood = len(splits.id_val) + int(splits.test_is_id.sum()), int((~splits.test_is_id).sum())
    return (subsample_index(n_id, VERIFY_PER_SIDE, seed),
            subsample_index(n_ood, VERIFY_PER_SIDE, seed + 1))


def require_ood(splits: Splits) -> None:
    if not (~splits.test_is_id).any():
        raise ExportError("the run's test set has no OOD images to verify AUROC on "
                          "(use --no-verify)")


def verification_images(splits: Splits, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, is_id): up to VERIFY_PER_SIDE held-out ID and as many OOD images."""
    require_ood(splits)
    id_imgs, ood_imgs = held_out(splits)
    id_idx, ood_idx = _verification_index(splits, seed)
    images = np.ascontiguousarray(np.concatenate([id_imgs[id_idx], ood_imgs[ood_idx]]))
    is_id = np.concatenate([np.ones(len(id_idx), bool), np.zeros(len(ood_idx), bool)])
    return images, is_id


def reference_scores(net: nn.Module, splits: Splits, seed: int, device: torch.device,
                     views: Sequence[View], progress: Progress) -> Reference:
    """Every score the export needs from PyTorch, each image scored once: the ID-validation
    images and the parity sample's ID images are both drawn from the held-out ID images, so
    their union is scored once and split afterwards."""
    id_imgs, ood_imgs = held_out(splits)
    n_val = len(splits.id_val)
    id_idx, ood_idx = _verification_index(splits, seed)
    union = np.union1d(np.arange(n_val), id_idx)  # sorted, so the positions are searchsorted
    oe = oe_images(splits, seed)
    n_oe = 0 if oe is None else len(oe)
    total = len(union) + len(ood_idx) + n_oe
    label = (f"reference: PyTorch fp32 scores of {total} images over {len(views)} view(s)")
    with progress.stage(label, "reference"):
        tick = progress.counter("reference", total, "images")
        id_norms = torch_norms(net, np.ascontiguousarray(id_imgs[union]), device, views=views,
                               progress=tick)
        ood_norms = torch_norms(net, np.ascontiguousarray(ood_imgs[ood_idx]), device,
                                views=views, progress=tick)
        oe_norms = None if oe is None else torch_norms(net, oe, device, views=views,
                                                       progress=tick)
    images = np.ascontiguousarray(np.concatenate([id_imgs[id_idx], ood_imgs[ood_idx]]))
    is_id = np.concatenate([np.ones(len(id_idx), bool), np.zeros(len(ood_idx), bool)])
    norms = np.concatenate([id_norms[np.searchsorted(union, id_idx)], ood_norms])
    return Reference(id_val=id_norms[:n_val], verify_images=images, verify_is_id=is_id,
                     verify_norms=norms.astype(np.float32), oe_norms=oe_norms)
