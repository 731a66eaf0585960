"""Reduced-precision parity is judged on what quantisation changes (mean relative norm error,
rank agreement with the fp32 reference); the AUROC difference is reported beside it and judged
only for a model that is not near chance."""

from __future__ import annotations

import numpy as np

from oecl_runtime import golden

TOL = golden.TOLERANCES


def _chance_model(seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model near chance (labels unrelated to its norms, which all lie within 2.5 %) and an
    int8 file whose norms are ~0.6 % off: the ranks of near-equal norms swap, and the AUROC
    moves by sampling noise."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(2.0, 2.05, 500).astype(np.float32)
    is_id = rng.random(500) < 0.5
    int8 = (ref * (1 + rng.normal(0, 0.008, 500))).astype(np.float32)
    return ref, is_id, int8


def test_near_chance_int8_passes_on_its_norms_and_says_so():
    ref, is_id, int8 = _chance_model()
    row = golden.compare(int8, ref, is_id, "int8", TOL)
    assert abs(row["reference_AUROC"] - 0.5) < golden.NEAR_CHANCE and row["near_chance"]
    # What failed the export before: an AUROC difference above the 0.005 limit.
    assert row["AUROC_diff"] > TOL["AUROC_diff"]
    assert row["pass"], row["problems"]
    # Its ranks differ too (noise among near-equal norms): not judged near chance.
    assert row["mean_rel_diff"] < 0.01 and row["rank_correlation"] < TOL["rank_correlation_min"]


def test_near_chance_is_said_first_when_the_norms_fail():
    ref, is_id, _ = _chance_model()
    row = golden.compare(ref * 1.05, ref, is_id, "int8", TOL)
    assert not row["pass"]
    assert row["problems"][0].startswith("the model itself is near chance (reference AUROC ")
    assert "mean norm difference 0.0499 of the median ID norm exceeds 0.02" in row["problems"][0]


def test_reduced_precision_is_judged_on_the_id_norm_scale_not_per_image():
    """A model that drives anomalies' norms near zero: an int8 error of 0.5 % of the ID norm
    is many times an anomaly's own norm, yet it moves no decision and no rank."""
    rng = np.random.default_rng(1)
    is_id = np.arange(400) < 200
    ref = np.where(is_id, rng.uniform(1.2, 1.6, 400), rng.uniform(0.02, 0.3, 400))
    int8 = ref + rng.normal(0, 0.005 * 1.4, 400)
    row = golden.compare(int8, ref, is_id, "int8", TOL)
    assert row["mean_rel_diff"] > TOL["reduced_mean_rel_diff"]  # per image: would fail
    assert row["mean_diff_of_id_norm"] < 0.005 and row["pass"], row["problems"]
    # An error of 5 % of the ID norm still fails, whatever the per-image figure.
    off = golden.compare(ref + 0.05 * 1.4, ref, is_id, "int8", TOL)
    assert off["problems"][0].startswith("mean norm difference 0.05")


def test_a_useful_model_is_judged_on_rank_agreement_and_auroc():
    rng = np.random.default_rng(0)
    is_id = rng.random(400) < 0.5
    ref = np.where(is_id, 2.1, 2.0) + rng.normal(0, 0.04, 400)  # AUROC ~0.96, norms within 5 %
    good = ref * (1 + rng.normal(0, 0.0005, 400))
    row = golden.compare(good, ref, is_id, "int8", TOL)
    assert not row["near_chance"] and row["pass"] and row["rank_correlation"] > 0.999
    # Norms within 1 % on average, but enough to reorder these close norms: the ranks fail.
    noisy = ref * (1 + rng.normal(0, 0.008, 400))
    bad = golden.compare(noisy, ref, is_id, "int8", TOL)
    assert bad["mean_rel_diff"] < 0.01 and not bad["pass"]
    assert bad["problems"][0].startswith("rank correlation with the reference 0.")


def test_rank_correlation_by_hand():
    assert golden.rank_correlation(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == 1
    assert golden.rank_correlation(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == -1
    # Ties take their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3).
    r = golden.rank_correlation(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    assert abs(r - np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1]) < 1e-12
    assert golden.rank_correlation(np.ones(4), np.arange(4.0)) is None


def test_parity_line_leads_with_what_the_precision_is_judged_on():
    ref, is_id, int8 = _chance_model()
    row = {"precision": "int8", **golden.compare(int8, ref, is_id, "int8", TOL)}
    line = golden.parity_line(row)
    assert line.startswith("mean diff ") and "of the median ID norm (per image " in line
    assert ", rank correlation 0." in line
    assert f"diff {row['AUROC_diff']:.4f})" in line
    row = {"precision": "fp32", **golden.compare(ref, ref, is_id, "fp32", TOL)}
    assert golden.parity_line(row).startswith("max rel diff 0.00e+00, AUROC ")
