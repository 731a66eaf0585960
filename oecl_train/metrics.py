"""OOD metrics with ID as the positive class (higher score = more normal), via scikit-learn."""

from __future__ import annotations

import numpy as np

# One threshold rule for evaluation, export and serving.
from oecl_runtime.artifact import threshold_at_tpr

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
    from sklearn.metrics import roc_curve

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
    from sklearn.metrics import average_precision_score, roc_auc_score

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
