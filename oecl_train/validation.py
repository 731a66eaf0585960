"""What a run is judged on before the test split: the ID-validation images against a set of
validation anomalies, by the AUROC of the served score (mean-view-norm over the artifact's K
views). `--oe auto` chooses its OE mix by it and `--select val` its checkpoint.

The anomalies, the first that applies:
1. `--val-ood DIR`: the user's known anomalies.
2. The other classes' *training* images of a labelled ID source (one-vs-rest: every other
   class; leave-one-out: the held-out class), never test images.
3. Held-out synthetic shifts of the ID-validation images (rotations, overlays, jigsaws,
   CutPastes), so a user with normal images alone still gets a figure.
"""

from __future__ import annotations

import numpy as np

from oecl_train.config import TrainConfig

FAMILIES = ("rotation", "overlay", "jigsaw", "cutpaste")
MAX_VAL_OOD = 2000  # validation anomalies scored per set, at most (a seeded sample)
JUDGED_ON = {
    "val-ood": "the known anomalies of --val-ood",
    "other-classes": "the other classes' training images (never test images)",
    "held-out-shifts": "held-out synthetic shifts of the ID-validation images, each candidate "
    "on the families it did not train with",
}


def shifted(family: str, images: np.ndarray, seed: int) -> np.ndarray:
    """A synthetic shift of every image (uint8 NCHW), repeatable from `seed`."""
    import torch

    from oecl_train.augment import cutpaste, jigsaw, overlay, rotate

    x = torch.from_numpy(np.ascontiguousarray(images))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "rotation":
            # Quarter turns keep the shape only for square images; others turn by 180°.
            square = x.shape[2] == x.shape[3]
            turns = torch.randint(1, 4, (len(x),)) if square else torch.full((len(x),), 2)
            out = x.clone()
            for q in (1, 2, 3):
                pick = turns == q
                if pick.any():
                    out[pick] = rotate(x[pick], q)
        elif family == "overlay":
            out = overlay(x, x[torch.randperm(len(x))])
        elif family == "jigsaw":
            out = jigsaw(x)
        elif family == "cutpaste":
            out = cutpaste(x)
        else:
            raise ValueError(f"unknown shift family {family!r}")
    return out.numpy()


def _sample(images: np.ndarray, seed: int) -> np.ndarray:
    if len(images) <= MAX_VAL_OOD:
        return images
    pick = np.random.default_rng(seed).choice(len(images), MAX_VAL_OOD, replace=False)
    return images[np.sort(pick)]


def validation_sets(
    cfg: TrainConfig, splits, progress: bool | None = None
) -> tuple[str, dict[str, np.ndarray], str]:
    """What the candidates are judged on: (kind, {set name: OOD images}, why this kind)."""
    from oecl_train.data import DataError, Splits
    from oecl_train.data.readers import FolderReader, conform

    if cfg.val_ood:
        reader = FolderReader(cfg.val_ood, splits.spec, cfg.strict, seed=cfg.seed,
                              channels=splits.spec.channels, progress=progress)
        images = conform(reader.load_all().images, splits.spec)
        return "val-ood", {"val-ood": _sample(images, cfg.seed)}, "--val-ood given"
    far_is_id_source = cfg.oe_far == cfg.data and cfg.oe_root in (None, cfg.data_root)
    if far_is_id_source:
        why = "the far OE is the ID source's other classes, so they cannot judge it"
    else:
        try:
            other = Splits.from_config(cfg, oe=cfg.data, oe_root=None, progress=progress).oe
            return "other-classes", {"other-classes": _sample(other, cfg.seed)}, (
                f"{cfg.data} is labelled with other classes than the ID ones")
        except DataError:
            why = "no --val-ood and no other labelled training classes"
    sets = {f: shifted(f, splits.id_val, cfg.seed + i) for i, f in enumerate(FAMILIES)}
    return "held-out-shifts", sets, why


def judge(net, cfg: TrainConfig, splits, sets: dict[str, np.ndarray], device) -> dict[str, float]:
    """AUROC (ID positive) of the served score: ID-validation images against each set."""
    from oecl_model.views import views_for
    from oecl_train.execution import eval_precision
    from oecl_train.metrics import ood_metrics
    from oecl_train.scores import view_scores
    from oecl_train.view_count import view_count

    views = views_for(cfg, splits.spec.height, splits.spec.width, view_count())
    kw = dict(device=device, precision=eval_precision(cfg, device))
    s_id = view_scores(net, splits.id_val, views, **kw)
    out = {}
    for name, images in sets.items():
        s_ood = view_scores(net, images, views, **kw)
        is_id = np.r_[np.ones(len(s_id), bool), np.zeros(len(s_ood), bool)]
        out[name] = float(ood_metrics(np.r_[s_id, s_ood], is_id)["AUROC"])
    return out
