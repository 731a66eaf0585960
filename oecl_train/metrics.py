"""OOD metrics with ID as the positive class (higher score = more normal), via scikit-learn."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from oecl_runtime.artifact import ArtifactError

__all__ = ["METRICS", "ood_metrics", "rates_at_threshold", "roc_points", "threshold_at_tpr"]

METRICS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR@95TPR")


def _check(scores: np.ndarray, is_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_id = np.asarray(is_id, dtype=bool).ravel()
    if len(scores) != len(is_id):
        raise ValueError(f"{len(scores)} scores but {len(is_id)} labels")
    if is_id.all() or not is_id.any():
        raise ValueError("metrics need both ID and OOD samples")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return scores, is_id


def roc_points(scores: np.ndarray, is_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, ID positive."""
    from sklearn.metrics import roc_curve  # optional (the train extra) and slow to import

    scores, is_id = _check(scores, is_id)
    # Keep every threshold: dropping "collinear" points can skip the one where TPR first
    # reaches the target on a run of tied scores, which would overstate FPR@95TPR.
    fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
    return fpr, tpr


def ood_metrics(scores: np.ndarray, is_id: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    """AUROC, AUPR-IN (ID positive), AUPR-OUT (OOD positive, score negated) and FPR at `tpr`.

    Tied scores count half in AUROC (the Mann-Whitney convention); AUPR is scikit-learn's
    average precision, where a run of tied scores is one threshold.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score  # as in roc_points

    scores, is_id = _check(scores, is_id)
    fpr, tpr_curve = roc_points(scores, is_id)
    # First ROC point whose TPR reaches the target: the FPR a user pays for that recall.
    fpr_at = float(fpr[np.searchsorted(tpr_curve, tpr - 1e-12, side="left")])
    return {
        "AUROC": float(roc_auc_score(is_id, scores)),
        "AUPR-IN": float(average_precision_score(is_id, scores)),
        "AUPR-OUT": float(average_precision_score(~is_id, -scores)),
        "FPR@95TPR": fpr_at,
    }


def rates_at_threshold(scores: np.ndarray, is_id: np.ndarray, threshold: float) -> dict[str, float]:
    """Share of ID accepted (score >= threshold) and of OOD accepted by mistake."""
    scores, is_id = _check(scores, is_id)
    accept = scores >= threshold
    return {"TPR": float(accept[is_id].mean()), "FPR": float(accept[~is_id].mean())}


def threshold_at_tpr(id_norms: Iterable[float] | np.ndarray, tpr: float = 0.95) -> float:
    """The one threshold rule of evaluation and export (the exported `score.threshold`): the
    norm above which a fraction `tpr` of in-distribution images lie (ID = positive).

    An image is called anomalous when its norm is below this value, so `tpr` of the ID
    validation images are accepted as normal.
    """
    x = np.asarray(id_norms, dtype=np.float64).ravel()
    if x.size == 0 or not 0.0 < tpr <= 1.0:
        raise ArtifactError(
            f"threshold needs ID norms and 0 < tpr <= 1 (got {x.size} norms, tpr {tpr})"
        )
    # The largest observed norm that still keeps at least `tpr` of ID at or above it.
    keep = max(1, math.ceil(tpr * x.size - 1e-9))
    return float(np.sort(x)[x.size - keep])


# Below this many ID-validation images the threshold is noisy: the 95%-TPR norm is set by the
# lowest 5% of them, i.e. by fewer than 5 images, and moves a lot with which images were drawn.
FEW_THRESHOLD_IMAGES = 100


def threshold_warning(n_images: int, tpr: float) -> str | None:
    """A one-line warning when a threshold at `tpr` rests on too few ID-validation images."""
    if n_images >= FEW_THRESHOLD_IMAGES:
        return None
    below = (1.0 - tpr) * n_images
    return (
        f"the {tpr:.0%}-TPR threshold rests on only {n_images} ID-validation images (about "
        f"{below:.1f} fall below it; {FEW_THRESHOLD_IMAGES}+ give a stable one): expect the "
        "test TPR to differ; add ID training images or raise --val-fraction"
    )


def per_class_metrics(
    scores: np.ndarray, is_id: np.ndarray, labels: np.ndarray, classes: list[str]
) -> dict[str, dict[str, float]]:
    """For each OOD class of the test split: all ID test images against that class alone
    (the way anomaly-detection benchmarks report each defect type), with its count and mean."""
    scores, is_id = np.asarray(scores), np.asarray(is_id, bool)
    labels = np.asarray(labels)
    out = {}
    for c in sorted(set(labels[~is_id].tolist()), key=lambda c: classes[c]):
        pick = is_id | (labels == c)
        m = ood_metrics(scores[pick], is_id[pick])
        sel = scores[labels == c]
        out[classes[c]] = {"n": int(len(sel)), "mean": float(sel.mean()), **m}
    return out
