"""The raw-pixel baselines of the accuracy benchmark (nearest neighbour and PCA reconstruction
on pixels in [0, 1]) and the validation split of the training classes that the PCA share and
the deep methods' settings are chosen on, never the test set."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from oecl_train.config import TrainConfig
    from oecl_train.data import Splits

BASELINES = ("nn", "pca")
PCA_CANDIDATES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
VAL_OOD_PER_CLASS = 2000  # other-class training images drawn for the PCA validation split
VAL_OOD_PER_CLASS_DEEP = 500  # the same for the deep methods' validation (scoring is dearer)


def flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def nn_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """-(distance to the nearest ID training image): higher = normal."""
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(train).kneighbors(test)
    return -dist[:, 0]


class PcaModel:
    """PCA of the ID training images, truncated at an explained-variance share."""

    def __init__(self, train: np.ndarray, seed: int) -> None:
        from sklearn.decomposition import PCA

        self.pca = PCA(svd_solver="full", random_state=seed).fit(train)

    def n_components(self, variance: float) -> int:
        cum = np.cumsum(self.pca.explained_variance_ratio_)
        return int(min(np.searchsorted(cum, variance) + 1, len(cum)))

    def scores(self, x: np.ndarray, variance: float) -> np.ndarray:
        """-(squared reconstruction error) with the first n components: higher = normal."""
        comps = self.pca.components_[: self.n_components(variance)]
        centred = x - self.pca.mean_
        recon = (centred @ comps.T) @ comps
        return -np.square(centred - recon).sum(1)


def validation_set(splits: Splits, seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation split of the training classes (uint8 images, is-ID mask): held-out ID
    training images vs a sample of the other classes' training images (`splits.oe`)."""
    rng = np.random.default_rng(seed)
    other = splits.oe
    n_ood = min(len(other), per_class * max(1, len(splits.classes) - 1))
    ood = other[rng.choice(len(other), n_ood, replace=False)]
    is_id = np.r_[np.ones(len(splits.id_val), bool), np.zeros(n_ood, bool)]
    return np.concatenate([splits.id_val, ood]), is_id


def pca_validation_auroc(splits: Splits, pca: PcaModel, seed: int) -> dict[float, float]:
    """AUROC of each candidate share on the validation split of the training classes."""
    from oecl_train.metrics import ood_metrics

    images, is_id = validation_set(splits, seed, VAL_OOD_PER_CLASS)
    x = flat(images)
    return {v: ood_metrics(pca.scores(x, v), is_id)["AUROC"] for v in PCA_CANDIDATES}


def baseline_splits(cfg: TrainConfig, with_validation: bool) -> Splits:
    """The split every method of this class uses (evaluation's own rebuild from the config);
    with validation also the other classes' training images, as validation OOD."""

    from oecl_train.data import Splits

    splits = Splits.from_config(cfg, oe="none")
    if with_validation:
        # Same source as OE = the non-ID training classes; the ID splits do not depend on OE.
        splits.oe = Splits.from_config(cfg, oe=cfg.data, oe_root=None).oe
    return splits


def run_baselines(args: argparse.Namespace, splits: Splits, methods: list[str],
                  pca_variance: float | str) -> dict[str, dict]:
    from oecl_train.metrics import ood_metrics

    out: dict[str, dict] = {}
    train, test, is_id = flat(splits.id_train), flat(splits.test_images), splits.test_is_id
    if "nn" in methods:
        t0 = time.perf_counter()
        s = nn_scores(train, test)
        out["nn"] = {"auroc": ood_metrics(s, is_id)["AUROC"], "seconds": time.perf_counter() - t0}
    if "pca" in methods:
        t0 = time.perf_counter()
        pca = PcaModel(train, args.seed)
        entry: dict[str, Any] = {}
        if pca_variance == "val":
            val = pca_validation_auroc(splits, pca, args.seed)
            variance = max(val, key=val.get)
            entry["validation_auroc"] = {str(v): a for v, a in val.items()}
        else:
            variance = float(pca_variance)
        s = pca.scores(test, variance)
        entry.update(
            auroc=ood_metrics(s, is_id)["AUROC"],
            variance=variance,
            n_components=pca.n_components(variance),
            seconds=time.perf_counter() - t0,
        )
        out["pca"] = entry
    return out
