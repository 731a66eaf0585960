"""The golden set: a few hundred held-out images with labels and reference norms, in the artifact.

`oecl export` writes three `.npy` files (no pickle) beside the model files and hashes them in
`files[]`:

- `golden.images.npy`: uint8 (N, C, H, W), already in the model's input form;
- `golden.labels.npy`: uint8 (N,), 1 = in-distribution (normal), 0 = out-of-distribution;
- `golden.norms.npy`: float32 (N,), the norms of the fp32 PyTorch model the files came from.

`verify` scores the images with any backend and compares: max and mean relative difference to
the reference norms, and the AUROC of both (ID positive, norm: higher = normal). The exporter's
own parity check runs `compare` too, so an edge box checks an engine exactly as the export was
checked. numpy only: no torch, no training code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import Artifact, ArtifactError, file_entry
from .atomic import with_file
from .backends import open_backend
from .errors import one_line
from .scorer import Scorer

GOLDEN_FILES = {"images": "golden.images.npy", "labels": "golden.labels.npy",
                "reference_norms": "golden.norms.npy"}
PER_SIDE = 128  # at most this many ID and this many OOD images
# The exporter's defaults; an artifact records the tolerances it was exported with.
# fp32 files must reproduce each norm; a reduced-precision (fp16, int8) file is judged on what
# quantisation changes: the norms' mean relative error and their order (Spearman's rank
# correlation with the reference). The AUROC difference is judged only for a model that is not
# near chance (reference AUROC within NEAR_CHANCE of 0.5): there it measures sampling noise.
TOLERANCES = {"fp32_max_rel_diff": 1e-4, "AUROC_diff": 0.005,
              "reduced_mean_rel_diff": 0.02, "rank_correlation_min": 0.99}
NEAR_CHANCE = 0.1
# Which runtime backend checks a file of each format on the exporting machine. ONNX runs on
# onnxruntime's CPU provider, whose fp32 is exact (a GPU provider may use TF32).
CHECK_BACKEND = {"onnx": "onnxruntime-cpu", "safetensors": "torch-cpu", "tensorrt": "tensorrt"}

Log = Callable[[str], None]


@dataclass(frozen=True)
class GoldenSet:
    images: np.ndarray  # uint8 (N, C, H, W)
    is_id: np.ndarray  # bool (N,)
    reference: np.ndarray  # float32 (N,)
    tolerances: dict[str, float]


def select(id_images: np.ndarray, ood_images: np.ndarray, seed: int,
           per_side: int = PER_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_side` images of each side (a seeded choice, kept in order) and their labels."""
    def pick(x: np.ndarray, s: int) -> np.ndarray:
        if len(x) <= per_side:
            return x
        return x[np.sort(np.random.default_rng(s).permutation(len(x))[:per_side])]

    a, b = pick(id_images, seed), pick(ood_images, seed + 1)
    images = np.ascontiguousarray(np.concatenate([a, b]))
    return images, np.concatenate([np.ones(len(a), bool), np.zeros(len(b), bool)])


def write(directory: str | os.PathLike, images: np.ndarray, is_id: np.ndarray,
          reference: np.ndarray, tolerances: dict[str, float] | None = None,
          reference_model: str = "PyTorch eval, fp32 (TF32 off)",
          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write the three files into `directory`; returns their `files[]` entries and the
    `golden` object of `oecl.json`."""
    directory = Path(directory)
    images = np.ascontiguousarray(images)
    is_id = np.asarray(is_id, bool)
    reference = np.asarray(reference, np.float32)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ArtifactError(f"golden images must be uint8 (N, C, H, W), N > 0; got "
                            f"{images.dtype} {images.shape}")
    if is_id.shape != (len(images),) or reference.shape != (len(images),):
        raise ArtifactError("golden labels and reference norms need one value per image")
    arrays = {"images": (images, "uint8"), "labels": (is_id.astype(np.uint8), "uint8"),
              "reference_norms": (reference, "fp32")}
    entries = []
    for key, (array, precision) in arrays.items():
        path = directory / GOLDEN_FILES[key]
        with_file(path, lambda p, a=array: _save(p, a))
        entries.append(file_entry(path, "npy", precision, role=f"golden-{key}".replace("_", "-"),
                                  shape=list(array.shape)))
    ref_auroc = auroc(reference, is_id)
    section = {
        **GOLDEN_FILES,
        "n_images": int(len(images)), "n_id": int(is_id.sum()), "n_ood": int((~is_id).sum()),
        "labels_meaning": "1 = in-distribution (normal), 0 = out-of-distribution",
        "reference": reference_model,
        "reference_AUROC": ref_auroc,
        "tolerances": dict(tolerances or TOLERANCES),
        "score": "norm (higher = normal)",
    }
    return entries, section


def _save(path: Path, array: np.ndarray) -> None:
    # Through a file object: given a name, np.save appends ".npy" to the temporary one.
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def load(artifact: Artifact) -> GoldenSet:
    """The artifact's golden set, checked for shape and type (its hashes were checked when the
    artifact was opened, since every golden file is listed in `files[]`)."""
    section = artifact.meta.get("golden")
    if not isinstance(section, dict):
        raise ArtifactError(f"{artifact.directory} has no golden set (exported before it "
                            "existed, or by another tool)")
    listed = {f["path"]: f for f in artifact.meta["files"]}
    tol = _tolerances(section.get("tolerances", {}))
    arrays = {}
    for key in GOLDEN_FILES:
        name = section.get(key)
        if not isinstance(name, str) or name not in listed:
            raise ArtifactError(f"golden.{key} must name a file listed in files[] (so its hash "
                                "is checked)")
        try:
            arrays[key] = np.load(artifact.path_of(listed[name]), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{name}: not a readable .npy array: {one_line(e)}") from None
    images, labels, ref = arrays["images"], arrays["labels"], arrays["reference_norms"]
    spec = artifact.spec
    chw = (spec.channels, spec.height, spec.width)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != chw:
        raise ArtifactError(f"{section['images']}: {images.dtype} {images.shape}, expected "
                            f"uint8 (N, {', '.join(map(str, chw))})")
    n = len(images)
    if labels.dtype != np.uint8 or labels.shape != (n,) or not np.isin(labels, (0, 1)).all():
        raise ArtifactError(f"{section['labels']}: expected uint8 (N,) of 0 and 1, got "
                            f"{labels.dtype} {labels.shape}")
    if ref.dtype != np.float32 or ref.shape != (n,) or not np.isfinite(ref).all():
        raise ArtifactError(f"{section['reference_norms']}: expected finite float32 (N,), got "
                            f"{ref.dtype} {ref.shape}")
    return GoldenSet(images, labels.astype(bool), ref, tol)


def _tolerances(given: Any) -> dict[str, float]:
    """`golden.tolerances` over the defaults: an object of finite numbers >= 0."""
    if not isinstance(given, dict):
        raise ArtifactError(f"golden.tolerances must be an object like {TOLERANCES}, got "
                            f"{type(given).__name__}")
    tol = {**TOLERANCES, **given}
    for key in TOLERANCES:
        v = tol[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ArtifactError(f"golden.tolerances.{key} must be a finite number >= 0, got "
                                f"{str(v)[:40]}")
    return tol


# ---------------------------------------------------------------- comparing


def auroc(norms: np.ndarray, is_id: np.ndarray) -> float | None:
    """AUROC with ID as the positive class and the norm as its score (higher = normal): the
    Mann-Whitney statistic with tied norms counted half. None without both classes."""
    x = np.asarray(norms, np.float64)
    pos = np.asarray(is_id, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _ranks(x)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two score vectors (ties at their average rank); None when
    either is constant or has fewer than two values."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def near_chance(reference_auroc: float | None) -> bool:
    return reference_auroc is not None and abs(reference_auroc - 0.5) < NEAR_CHANCE


def compare(norms: np.ndarray, reference: np.ndarray, is_id: np.ndarray, precision: str,
            tolerances: dict[str, float]) -> dict[str, Any]:
    """Differences to the reference, rank agreement, both AUROCs, and the problems outside
    `tolerances` (see TOLERANCES). When the reference model is near chance, the first problem
    says so: a file can then fail only on its norms, and its AUROC difference is not judged."""
    tol = {**TOLERANCES, **tolerances}
    got = np.asarray(norms, np.float64)
    ref = np.asarray(reference, np.float64)
    is_id = np.asarray(is_id, bool)
    diff = np.abs(got - ref)
    tiny = np.finfo(np.float32).tiny
    rel = diff / np.maximum(np.abs(ref), tiny)
    # Reduced precision is judged on its error as a share of the typical ID norm, the scale
    # the threshold sits on. Per image, relative to each image's own norm, the error of an
    # anomaly whose norm the model drove near zero looks large although it moves no decision:
    # the better a model separates, the more it would fail.
    scale = float(np.median(np.abs(ref[is_id] if is_id.any() else ref)))
    a, a_ref = auroc(got, is_id), auroc(ref, is_id)
    chance = near_chance(a_ref)
    finite = bool(np.isfinite(got).all())
    row: dict[str, Any] = {
        "max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max()),
        "mean_rel_diff": float(rel.mean()),
        "mean_diff_of_id_norm": float(diff.mean() / max(scale, tiny)),
        "rank_correlation": rank_correlation(got, ref) if finite else None,
        "AUROC": a, "reference_AUROC": a_ref,
        "AUROC_diff": None if a is None or a_ref is None else float(abs(a - a_ref)),
        "near_chance": chance,
    }
    problems = []
    if not finite:
        problems.append("non-finite norms")
    if precision == "fp32":
        if not row["max_rel_diff"] <= tol["fp32_max_rel_diff"]:
            problems.append(f"max relative norm difference {row['max_rel_diff']:.3g} exceeds "
                            f"{tol['fp32_max_rel_diff']:g}")
    else:
        if not row["mean_diff_of_id_norm"] <= tol["reduced_mean_rel_diff"]:
            problems.append(f"mean norm difference {row['mean_diff_of_id_norm']:.3g} of the "
                            f"median ID norm exceeds {tol['reduced_mean_rel_diff']:g}")
        rho = row["rank_correlation"]
        if not chance and rho is not None and rho < tol["rank_correlation_min"]:
            problems.append(f"rank correlation with the reference {rho:.4f} is below "
                            f"{tol['rank_correlation_min']:g}")
    if not chance and row["AUROC_diff"] is not None and row["AUROC_diff"] > tol["AUROC_diff"]:
        problems.append(f"AUROC {a:.4f} differs from the reference's {a_ref:.4f} by "
                        f"{row['AUROC_diff']:.4f} (limit {tol['AUROC_diff']:g})")
    if problems and chance:
        problems[0] = f"{chance_note(a_ref)}; {problems[0]}"
    row["pass"] = not problems
    row["problems"] = problems
    return row


def chance_note(reference_auroc: float) -> str:
    """What a near-chance reference means, said before any figure that depends on it."""
    return (f"the model itself is near chance (reference AUROC {reference_auroc:.4f} on these "
            f"images, within {NEAR_CHANCE:g} of 0.5; train it longer), so AUROC and rank "
            "differences are noise and only the norms are judged")


def only(artifact: Artifact, entry: dict[str, Any]) -> Artifact:
    """The artifact with `entry` as its one model file, open to any consumer: how one given
    file (say the int8 ONNX meant for TensorRT) is scored by a chosen backend."""
    solo = {k: v for k, v in entry.items() if k != "consumers"}
    keep = [f for f in artifact.meta["files"] if f["format"] == "npy"]
    return Artifact(artifact.directory, {**artifact.meta, "files": [solo, *keep]},
                    artifact.verify)


def score(artifact: Artifact, images: np.ndarray, backend: str = "auto",
          precision: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Norms of `images` through a runtime backend, and that backend's description."""
    with Scorer(artifact, open_backend(artifact, backend, precision)) as scorer:
        return scorer.score_array(images), scorer.backend.describe()


def verify(artifact: Artifact | str | os.PathLike, backend: str = "auto",
           precision: str | None = None) -> dict[str, Any]:
    """Score the golden set with `backend` and compare it to the reference (`oecl verify`)."""
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    golden = load(art)
    norms, used = score(art, golden.images, backend, precision)
    row = compare(norms, golden.reference, golden.is_id, used["precision"], golden.tolerances)
    return {"artifact": str(art.directory), "backend": used["name"],
            "precision": used["precision"], "n_images": int(len(golden.images)),
            "n_id": int(golden.is_id.sum()), "n_ood": int((~golden.is_id).sum()),
            "tolerances": golden.tolerances, "score": f"{art.score_name} (higher = normal)", **row}


def verify_files(directory: str | os.PathLike, images: np.ndarray, is_id: np.ndarray,
                 reference: np.ndarray, tolerances: dict[str, float], log: Log,
                 ) -> dict[str, Any]:
    """Every model file of the artifact scored on `images` with its checking backend
    (`CHECK_BACKEND`) and compared to `reference`: the exporter's parity check."""
    art = Artifact.open(directory)
    rows = []
    for entry in art.meta["files"]:
        if entry["format"] not in CHECK_BACKEND:
            continue  # the golden set's own files
        t0 = time.perf_counter()
        norms, used = score(only(art, entry), images, CHECK_BACKEND[entry["format"]],
                            entry["precision"])
        row = {"path": entry["path"], "format": entry["format"],
               "precision": entry["precision"], "backend": used["name"],
               **compare(norms, reference, is_id, entry["precision"], tolerances),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"verify: {entry['path']} on {used['name']}: {parity_line(row)} "
            f"({'pass' if row['pass'] else 'FAIL'})")
    return {
        "n_images": int(len(images)), "n_id": int(is_id.sum()), "n_ood": int((~is_id).sum()),
        "reference": {"AUROC": auroc(reference, is_id)},
        "tolerances": dict(tolerances), "score": f"{art.score_name} (higher = normal)",
        "files": rows, "pass": all(r["pass"] for r in rows),
    }


def fmt_auroc(a: float | None) -> str:
    return "n/a" if a is None else f"{a:.4f}"


def parity_line(row: dict[str, Any]) -> str:
    """A file's comparison in one line: what its precision is judged on first, then AUROC."""
    if row["precision"] == "fp32":
        judged = f"max rel diff {row['max_rel_diff']:.2e}"
    else:
        rho = row.get("rank_correlation")
        judged = (f"mean diff {row['mean_diff_of_id_norm']:.2e} of the median ID norm "
                  f"(per image {row['mean_rel_diff']:.2e}), rank correlation "
                  f"{'n/a' if rho is None else f'{rho:.5f}'}")
    diff = row.get("AUROC_diff")
    line = (f"{judged}, AUROC {fmt_auroc(row['AUROC'])} (reference "
            f"{fmt_auroc(row.get('reference_AUROC'))}"
            f"{'' if diff is None else f', diff {diff:.4f}'})")
    return line


