"""OOD metrics with ID as the positive class (higher score = more normal), via scikit-learn."""

from __future__ import annotations

import numpy as np

# One threshold rule for evaluation, export and serving.
from oecl_runtime.artifact import threshold_at_tpr

__all__ = ["METRICS", "ood_metrics", "threshold_at_tpr"]

METRICS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR@95TPR")


def ood_metrics(scores: np.ndarray, is_id: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    """AUROC, AUPR-IN (ID positive), AUPR-OUT (OOD positive, score negated) and FPR at `tpr`."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    is_id = np.asarray(is_id, dtype=bool)
    if is_id.all() or not is_id.any():
        raise ValueError("metrics need both ID and OOD samples")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    fpr, tpr_curve, _ = roc_curve(is_id, scores)
    # First ROC point whose TPR reaches the target: the FPR a user pays for that recall.
    fpr_at = float(fpr[np.searchsorted(tpr_curve, tpr, side="left")])
    return {
        "AUROC": float(roc_auc_score(is_id, scores)),
        "AUPR-IN": float(average_precision_score(is_id, scores)),
        "AUPR-OUT": float(average_precision_score(~is_id, -scores)),
        "FPR@95TPR": fpr_at,
    }
