"""oecl.json: input contract, score with its threshold and norm statistics from the PyTorch
model on the run's held-out data, the files, and who produced them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from oecl_model.views import RESAMPLE, View, views_to_json
from oecl_runtime import __version__ as runtime_version
from oecl_runtime.artifact import SCHEMA_VERSION, ArtifactError, write_metadata
from oecl_runtime.preprocess import RESIZE_RULE, InputSpec
from oecl_train.export.graph import INPUT_NAME
from oecl_train.export.norms import Reference
from oecl_train.export.progress import Progress
from oecl_train.export.source import Source
from oecl_train.metrics import threshold_at_tpr, threshold_warning
from oecl_train.score_names import served_score


def producer() -> dict[str, str]:
    """`producer` of oecl.json: this package's version and those of torch, onnx, onnxruntime."""
    try:
        ours = version("oecl")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        ours = runtime_version
    return {"name": "oecl", "version": ours, "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def norm_stats(norms: Iterable[float] | np.ndarray) -> dict[str, float | int]:
    """Summary of a set of norms in the shape `score.id_norm` / `score.oe_norm` expect."""
    x = np.asarray(norms, dtype=np.float64).ravel()
    if x.size == 0:
        raise ArtifactError("norm statistics need at least one norm")
    p05, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std()),
            "min": float(x.min()), "p05": float(p05), "p50": float(p50), "p95": float(p95),
            "max": float(x.max())}


def score_views(views: Sequence[View]) -> dict[str, Any]:
    """`score.name`, `score.views` and `score.resample` of oecl.json for a view set."""
    name = served_score(len(views))
    if name == "norm":
        return {"name": name, "views": views_to_json(views)}
    return {"name": name, "views": views_to_json(views), "resample": RESAMPLE}


def build_metadata(
    *, spec: InputSpec, arch: dict[str, Any], embedding: bool, threshold: float, tpr: float,
    id_norms: np.ndarray, oe_norms: np.ndarray | None, max_batch: int,
    files: list[dict[str, Any]], producer: dict[str, str], source: dict[str, Any],
) -> dict[str, Any]:
    """oecl.json for the single-pass norm; the exporter adds the view set, golden set and
    verification sections."""
    s = spec.to_json()
    outputs: dict[str, Any] = {"norm": {"dtype": "float32", "shape": ["batch"]}}
    if embedding:
        outputs["embedding"] = {"dtype": "float32", "shape": ["batch", int(arch["proj_dim"])]}
    return {
        "schema_version": SCHEMA_VERSION,
        "producer": producer,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "input": {
            "name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW",
            "channels": s["channels"], "color_mode": s["color_mode"],
            # Always a number: a run trained at its images' own size states that size, so a
            # served image of another size is resized to it, as it would be for any other run.
            "height": s["height"], "width": s["width"], "resize": spec.short_side,
            "interpolation": s["interpolation"], "resize_rule": RESIZE_RULE,
            "normalization": {"in_graph": True, "mean": [float(x) for x in arch["mean"]],
                              "std": [float(x) for x in arch["std"]]},
        },
        "outputs": outputs,
        "score": {
            "name": "norm", "direction": "higher_is_normal", "threshold": float(threshold),
            "threshold_rule": {"method": "id_validation_tpr", "tpr": float(tpr),
                               "n_images": int(len(id_norms))},
            "id_norm": norm_stats(id_norms),
            "oe_norm": None if oe_norms is None or len(oe_norms) == 0 else norm_stats(oe_norms),
        },
        "max_batch": int(max_batch),
        "architecture": arch,
        "files": files,
        "source": source,
    }


def write_export_metadata(
    src: Source, directory: Path, *, files: list[dict[str, Any]], golden: dict[str, Any],
    embedding: bool, threshold_tpr: float, max_batch: int, progress: Progress,
    ref: Reference,
) -> dict[str, Any]:
    """oecl.json with the threshold at `threshold_tpr` of the held-out ID images and the norm
    statistics, all from the PyTorch fp32 scores in `ref`; verification is marked skipped
    until it has run."""
    with progress.stage("metadata: threshold and norm statistics", "metadata"):
        id_norms, oe_norms = ref.id_val, ref.oe_norms
        threshold = threshold_at_tpr(id_norms, threshold_tpr)
        # Recorded, not printed: `oecl train` says it before training, where it can be acted on.
        few = threshold_warning(len(id_norms), threshold_tpr)
        cfg = src.cfg
        meta = build_metadata(
            spec=src.spec, arch=dict(src.checkpoint["architecture"]), embedding=embedding,
            threshold=threshold, tpr=threshold_tpr, id_norms=id_norms, oe_norms=oe_norms,
            max_batch=max_batch, files=files, producer=producer(),
            source={"run": src.run_dir.name, "checkpoint_step": src.checkpoint.get("step"),
                    "data": cfg.data, "id_class": cfg.id_class, "protocol": cfg.protocol,
                    "oe": cfg.oe, "oe_mode": src.splits.oe_mode},
        )
        meta["golden"] = golden
        meta["score"].update(score_views(src.views))
        if few:
            meta["score"]["threshold_warning"] = few
        meta["verification"] = {"passed": None, "skipped": True}
        write_metadata(directory, meta)
    return meta
