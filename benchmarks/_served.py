"""The served side of the accuracy benchmark: export a trained run, score a split through
`oecl_runtime` on the exported files, and time the served graph at each K.

What is reported here is what `oecl serve` would answer: the runtime's own pre-processing-free
array path (`Scorer.score_array`, the images are already the model's uint8 input), the
exported threshold, and the onnxruntime CPU backend at each precision.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "int8")
EXPORT_FORMAT = {"fp32": "onnx", "int8": "onnx-int8"}
BACKEND = "onnxruntime-cpu"


def export_views(run_dir: Path, out: Path, views: int, splits: Any, *, verify: bool = True,
                 precisions: tuple[str, ...] = PRECISIONS,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """`oecl export RUN --views K --format onnx,onnx-int8` (verified), replacing `out`."""
    from oecl_train.export import export_run

    if out.exists() and not (out / "oecl.json").is_file():
        shutil.rmtree(out)  # a half-written directory from an interrupted benchmark
    fmts = ",".join(EXPORT_FORMAT[p] for p in precisions)
    return export_run(run_dir, out, fmts, views=views, verify=verify, device="cpu",
                      splits=splits, log=lambda m: log(f"    export: {m}"))


def served_metrics(artifact: Path, images: np.ndarray, is_id: np.ndarray,
                   threads: int | None = None,
                   precisions: tuple[str, ...] = PRECISIONS) -> dict[str, dict[str, Any]]:
    """Per precision: the OOD metrics of the scores the runtime returns for `images`, and the
    TPR / FPR that the artifact's own threshold gives on them."""
    from oecl_runtime import Scorer
    from oecl_train.metrics import ood_metrics, rates_at_threshold

    out: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        t0 = time.perf_counter()
        with Scorer.open(artifact, backend=BACKEND, precision=precision,
                         threads=threads) as scorer:
            scores = scorer.score_array(np.ascontiguousarray(images))
            threshold = scorer.threshold
            name = scorer.artifact.score_name
            k = len(scorer.artifact.views)
        out[precision] = {
            "score": name, "k": k, "backend": BACKEND,
            "metrics": ood_metrics(scores, is_id),
            "threshold": threshold,
            "at_threshold": rates_at_threshold(scores, is_id, threshold),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return out


def throughput(artifacts: dict[int, Path], batch: int, log: Callable[[str], None],
               threads: int | None = None,
               precisions: tuple[str, ...] = PRECISIONS) -> dict[str, dict[str, float]]:
    """Served images/s of each K's files at each precision (median of rotated rounds)."""
    from _timing import rotated_rounds

    from oecl_runtime import Artifact, Scorer

    scorers, runs = [], {}
    try:
        for k, path in artifacts.items():
            for precision in precisions:
                s = Scorer.open(path, backend=BACKEND, precision=precision, threads=threads)
                scorers.append(s)
                runs[f"{k}/{precision}"] = s.backend.run
        spec = Artifact.open(next(iter(artifacts.values()))).spec
        rows = rotated_rounds(runs, (spec.channels, spec.height, spec.width), batch, rounds=3,
                              iterations=20, warmup=3, max_seconds=4.0, pause=0.2, log=log)
    finally:
        for s in scorers:
            s.close()
    out: dict[str, dict[str, float]] = {}
    for label, r in rows.items():
        k, precision = label.split("/")
        out.setdefault(k, {})[precision] = round(
            statistics.median(x["images_per_s"] for x in r), 1)
    return out


def mean_served(per_class: dict[str, dict[str, Any]], k: int) -> dict[str, dict[str, Any]]:
    """Mean over classes of each metric and threshold rate, per precision, at K = k. A class
    whose file of a precision failed verification (an `error` entry) has no score to average:
    the row then says over how many classes it is (`classes`), and which failed."""
    out: dict[str, dict[str, Any]] = {}
    for precision in PRECISIONS:
        rows = {name: c[str(k)][precision] for name, c in per_class.items()
                if precision in c.get(str(k), {})}
        entries = [e for e in rows.values() if "error" not in e]
        if not entries:
            continue
        keys = list(entries[0]["metrics"])
        row = {m: float(np.mean([e["metrics"][m] for e in entries])) for m in keys}
        for rate in ("TPR", "FPR"):
            row[f"{rate}_at_threshold"] = float(np.mean([e["at_threshold"][rate]
                                                         for e in entries]))
        if len(entries) < len(per_class):
            row["classes"] = len(entries)
            row["failed_classes"] = sorted(n for n, e in rows.items() if "error" in e)
        out[precision] = row
    return out


def parse_ks(text: str) -> list[int]:
    """'1,4,8' → [1, 4, 8] (sorted, unique, positive)."""
    ks = sorted({int(t) for t in text.split(",") if t.strip()})
    if not ks or ks[0] < 1:
        raise ValueError(f"view counts must be positive integers, got {text!r}")
    return ks


# Named families of the view study; any other entry is a square-crop range 'lo-hi'.
#   train: the run's own square crops (what `views_for` exports); aspect: the same area range
#   with RandomResizedCrop's aspect ratios; random / random-crops: the plain image and K - 1
#   random SimCLR views per image (the paper's ensemble; -crops without colour jitter), the
#   reference a fixed set is measured against.
VIEW_FAMILIES = ("train", "aspect", "random", "random-crops")


def parse_families(text: str) -> list[str | tuple[float, float]]:
    """'train,aspect,0.75-1' → ['train', 'aspect', (0.75, 1.0)]."""
    out: list[str | tuple[float, float]] = []
    for f in (t.strip() for t in text.split(",")):
        if f in VIEW_FAMILIES:
            out.append(f)
        elif f:
            try:
                lo, hi = (float(x) for x in f.split("-"))
            except ValueError:
                raise ValueError(f"view family {f!r} is not one of {', '.join(VIEW_FAMILIES)} "
                                 "or a crop-scale range 'lo-hi'") from None
            out.append((lo, hi))
    if not out:
        raise ValueError("no view family given")
    return out


def view_study(net: Any, cfg: Any, spec: Any, images: np.ndarray, is_id: np.ndarray,
               ks: Sequence[int], families: Sequence[str | tuple[float, float]]
               ) -> dict[str, dict[str, float | None]]:
    """Validation AUROC of the K-view score for each K and family (`VIEW_FAMILIES`) on the
    images of `spec`, the fixed sets scored in PyTorch by the code the graph is built from."""
    import dataclasses

    from oecl_model.views import make_views
    from oecl_train.augment import CROP_RATIO
    from oecl_train.evaluate import augment_for
    from oecl_train.metrics import ood_metrics
    from oecl_train.scores import compute_scores, view_scores

    h, w = images.shape[2], images.shape[3]
    out: dict[str, dict[str, float | None]] = {}
    for fam in families:
        label = fam if isinstance(fam, str) else f"{fam[0]:g}-{fam[1]:g}"
        augment = None
        if label.startswith("random"):
            run = dataclasses.replace(cfg, jitter_p=0.0) if label == "random-crops" else cfg
            augment = augment_for(run, spec, "cpu")
        scale = fam if isinstance(fam, tuple) else tuple(cfg.crop_scale)
        ratio = CROP_RATIO if fam == "aspect" else (1.0, 1.0)
        row: dict[str, float | None] = {}
        for k in ks:
            if augment is not None and k > 1:  # K = 1 is the plain image in every family
                s = compute_scores(net, images, scores=("mean-aug-norm",), k=k - 1,
                                   augment=augment, precision="fp32", batch=1024)["mean-aug-norm"]
            else:
                try:
                    views = make_views(k, h, w, scale, bool(cfg.hflip), ratio)
                except ValueError:  # a narrow family on a small input has fewer distinct views
                    row[str(k)] = None
                    continue
                s = view_scores(net, images, views, precision="fp32", batch=1024)
            row[str(k)] = ood_metrics(s, is_id)["AUROC"]
        out[label] = row
    return out
