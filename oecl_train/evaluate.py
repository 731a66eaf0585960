"""Evaluate a trained run: the three scores on the test split, OOD metrics, a threshold, a report.

The splits are rebuilt from the run's config.json (deterministic by seed), so evaluation sees
exactly the test and ID-validation images the run was set up with. Scores are computed under
inference mode with the run's mixed precision in large batches; every score is higher = normal.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from oecl_model.views import views_for, views_to_json
from oecl_train.augment import AugmentConfig, SimCLRAugment
from oecl_train.checkpoint import model_checkpoint
from oecl_train.data import Splits
from oecl_train.devices import resolve_device
from oecl_train.execution import eval_precision
from oecl_train.metrics import (
    METRICS,
    ood_metrics,
    per_class_metrics,
    rates_at_threshold,
    threshold_at_tpr,
    threshold_warning,
)
from oecl_train.report import write_run_report
from oecl_train.rundir import RunDirError, require_run_dir
from oecl_train.score_names import served_score
from oecl_train.scores import (
    DESCRIPTIONS,
    RANDOM_VIEW_SCORES,
    SCORES,
    VIEW_SCORE,
    compute_scores,
    parse_scores,
)
from oecl_train.trainer import load_trained
from oecl_train.view_count import view_count

REPORT_SCHEMA = "oecl-eval-report/1"
# The machine-readable direction: the same token as oecl.json's `score.direction`.
DIRECTION_KEY = "higher_is_normal"
THRESHOLD_TPR = 0.95
EVAL_SEED = 0  # augmentation draws for the K views; fixed so reports are repeatable
# Keys a trainer may log per epoch with that epoch's seconds (summed into the wall time).
_TIME_KEYS = ("epoch_s", "epoch_seconds", "elapsed_s", "wall_s", "time_s")


class EvalError(ValueError):
    """A problem with what was asked to be evaluated; the message is one line for the user."""


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory, if it holds a config and at least one complete checkpoint."""
    try:
        return require_run_dir(run_dir)
    except RunDirError as e:
        raise EvalError(str(e)) from None


def augment_for(cfg, spec, device):
    """The run's own SimCLR augmentation: the K views of the ensemble scores are drawn from the
    distribution the network was trained on."""
    aug_cfg = AugmentConfig(cfg.crop_scale, cfg.hflip, cfg.jitter, cfg.jitter_p, cfg.grayscale_p)
    return SimCLRAugment((spec.height, spec.width), spec.channels, aug_cfg).to(device)


def score_model(
    net,
    cfg,
    splits,
    *,
    scores: Sequence[str] = SCORES,
    k: int = 32,
    device="cpu",
    batch_size: int = 1024,
    progress: bool = False,
    views: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Test-set scores (each requested score, at the run's precision) and the fp32
    ID-validation values of the served score (for the threshold). mean-view-norm uses the
    run's `views`-view set (default: `view_count`), the one `oecl export --views` bakes in."""
    views = view_count(views)
    device = torch.device(device)
    scores = parse_scores(scores)
    need_aug = any(s in RANDOM_VIEW_SCORES for s in scores)
    augment = augment_for(cfg, splits.spec, device) if need_aug else None
    view_set = views_for(cfg, splits.spec.height, splits.spec.width, views)
    precision = eval_precision(cfg, device)
    total = len(splits.test_images) + len(splits.id_val)
    with tqdm(total=total, disable=not progress, unit="img", desc="scoring") as bar:
        test = compute_scores(
            net,
            splits.test_images,
            scores=scores,
            augment=augment,
            k=k,
            views=view_set,
            device=device,
            precision=precision,
            batch=batch_size,
            seed=EVAL_SEED,
            progress=bar.update,
        )
        # The threshold is taken on the served score in fp32, as the exporter takes it: one
        # threshold per run, the one oecl.json ships, whatever precision the test scores were
        # computed in.
        served = served_score(views)
        val = compute_scores(
            net,
            splits.id_val,
            scores=(served,),
            views=view_set,
            device=device,
            precision="fp32",
            batch=batch_size,
            progress=bar.update,
        )[served]
    return test, val


def read_metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash carries no usable budget
    return rows


def _images_per_step(cfg) -> int:
    oe_batch = cfg.oe_batch_size or cfg.batch_size
    if cfg.oe == "none":
        return cfg.batch_size
    if cfg.oe == "self":
        return 2 * cfg.batch_size + 2 * oe_batch  # 0°/90° ID and 180°/270° OE copies
    return cfg.batch_size + oe_batch


def run_budget(run_dir: Path, cfg, meta: dict) -> dict[str, Any]:
    """What the run was trained with: steps, epochs, wall time (when metrics.jsonl tells it)."""
    rows = read_metrics_rows(run_dir)
    world = int(meta.get("world_size", 1))
    wall, source = None, "unknown"
    if rows and all(any(key in r for key in _TIME_KEYS) for r in rows):
        wall = sum(float(next(r[key] for key in _TIME_KEYS if key in r)) for r in rows)
        source = "metrics.jsonl epoch times"
    elif rows and all("images_per_s" in r and "step" in r for r in rows):
        # Per epoch: images seen (by all ranks) / the logged global throughput.
        per_step = _images_per_step(cfg) * world
        prev, wall = 0, 0.0
        for r in rows:
            steps = int(r["step"]) - prev
            prev = int(r["step"])
            if r["images_per_s"] > 0:
                wall += steps * per_step / float(r["images_per_s"])
        source = "metrics.jsonl throughput"
    return {
        "steps": int(meta.get("step", 0)),
        "total_steps": int(meta.get("total_steps", 0)),
        "epochs": int(meta.get("epoch", 0)),
        "planned_epochs": int(meta.get("epochs", 0)),
        "complete": bool(meta.get("complete", False)),
        "batch_size": cfg.batch_size,
        "oe": cfg.oe,
        "precision": cfg.precision,
        "device": meta.get("device", cfg.device),
        "world_size": world,
        "wall_time_s": None if wall is None else round(wall, 2),
        "wall_time_source": source,
    }


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "n": int(len(x))}


def build_report(
    *,
    run_dir: Path,
    cfg,
    meta: dict,
    checkpoint_name: str,
    splits,
    test_scores: dict[str, np.ndarray],
    val_norms: np.ndarray,
    k: int,
    device: str,
    batch_size: int,
    seconds: float,
    views: int | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict (schema: REPORT_SCHEMA)."""
    views = view_count(views)
    is_id = splits.test_is_id
    classes = splits.classes
    per_score = {}
    for name, s in test_scores.items():
        per_score[name] = {
            "direction": DIRECTION_KEY,
            "description": DESCRIPTIONS[name],
            "metrics": ood_metrics(s, is_id),
            "id": _summary(s[is_id]),
            "ood": _summary(s[~is_id]),
            # ID test images against each OOD class alone: one defect type the model misses
            # hides inside the overall AUROC.
            "per_ood_class": per_class_metrics(s, is_id, splits.test_labels, classes),
        }
    threshold = None
    if len(val_norms):
        value = threshold_at_tpr(val_norms, THRESHOLD_TPR)
        served = served_score(views)
        test_norm = test_scores.get(served)
        threshold = {
            "score": served,
            "direction": DIRECTION_KEY,
            "value": value,
            "rule": f"ID-validation {served} at {THRESHOLD_TPR:.0%} TPR",
            "tpr_target": THRESHOLD_TPR,
            "precision": "fp32",
            "n_val": int(len(val_norms)),
            "warning": threshold_warning(len(val_norms), THRESHOLD_TPR),
            # How the validation threshold carries over to the test split.
            "test": None if test_norm is None else rates_at_threshold(test_norm, is_id, value),
        }
    return {
        "schema": REPORT_SCHEMA,
        "run_dir": str(run_dir),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "direction": DIRECTION_KEY,
        "checkpoint": {
            "file": checkpoint_name,
            "epoch": int(meta.get("epoch", 0)),
            "step": int(meta.get("step", 0)),
            **({"selected": meta["selected"]} if "selected" in meta else {}),
        },
        "data": {
            "source": cfg.data,
            "protocol": cfg.protocol,
            "id_class": cfg.id_class,
            "id_classes": [classes[c] for c in splits.id_classes],
            "n_test": int(len(is_id)),
            "n_test_id": int(is_id.sum()),
            "n_test_ood": int((~is_id).sum()),
            "n_val_id": int(len(val_norms)),
            "ood_classes": {
                classes[c]: int((splits.test_labels[~is_id] == c).sum())
                for c in sorted(set(splits.test_labels[~is_id].tolist()))
            },
        },
        "evaluation": {
            "scores": list(test_scores),
            "served_score": served_score(views),
            "n_views": views,
            "k": k,
            "seed": EVAL_SEED,
            **({"views": views_to_json(views_for(cfg, splits.spec.height, splits.spec.width,
                                                 views))} if VIEW_SCORE in test_scores else {}),
            "device": device,
            "precision": cfg.precision,
            "batch_size": batch_size,
            "seconds": round(seconds, 2),
        },
        "scores": per_score,
        "threshold": threshold,
        "budget": run_budget(run_dir, cfg, meta),
        **({"oe_auto": cfg.oe_auto} if cfg.oe_auto else {}),
    }


def evaluate_run(
    run_dir: str | Path,
    scores: Sequence[str] | str = SCORES,
    k: int = 32,
    save_scores: bool = False,
    device: str = "auto",
    *,
    batch_size: int = 1024,
    progress: bool = False,
    plots: bool = True,
    views: int | None = None,
) -> dict[str, Any]:
    """Score a run's test split, write RUN/eval/report.{json,md} (+ plots, + scores.csv), and
    return the report dict. `views`: K of mean-view-norm (default: `view_count`). Raises
    EvalError (one line) on bad input."""
    scores = parse_scores(scores)
    views = view_count(views)
    if k < 1 and any(s in RANDOM_VIEW_SCORES for s in scores):
        raise EvalError("--k must be at least 1")
    if views < 1:
        raise EvalError("--views must be at least 1")
    if batch_size < 1:
        raise EvalError("--batch-size must be positive")
    run_dir = check_run_dir(run_dir)
    dev = resolve_device(device)
    ckpt = model_checkpoint(run_dir)
    cfg, net, meta = load_trained(run_dir, dev)
    # OE is never scored: the ID and test splits do not depend on it.
    splits = Splits.from_config(cfg, oe="none")
    if meta.get("input") and meta["input"] != splits.spec.to_json():
        raise EvalError(
            f"{run_dir}: the data rebuilt from config.json does not match the checkpoint's input"
        )
    t0 = time.perf_counter()
    test, val = score_model(
        net, cfg, splits, scores=scores, k=k, device=dev, batch_size=batch_size,
        progress=progress, views=views,
    )
    seconds = time.perf_counter() - t0
    for name, s in test.items():
        if not np.isfinite(s).all():
            bad = int((~np.isfinite(s)).sum())
            raise EvalError(f"{run_dir}: {bad} {name} scores are NaN or inf (a diverged run?)")
    report = build_report(
        run_dir=run_dir,
        cfg=cfg,
        meta=meta,
        checkpoint_name=ckpt.name,
        splits=splits,
        test_scores=test,
        val_norms=val,
        k=k,
        device=str(dev),
        batch_size=batch_size,
        seconds=seconds,
        views=views,
    )
    write_run_report(
        run_dir / "eval",
        report,
        test_scores=test,
        is_id=splits.test_is_id,
        labels=[splits.classes[int(c)] for c in splits.test_labels],
        paths=splits.test_paths,
        save_scores=save_scores,
        plots=plots,
    )
    return report


def mean_metrics(reports: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of each metric of each score over reports that all have that score."""
    names = [s for s in SCORES if all(s in r["scores"] for r in reports)]
    out = {}
    for s in names:
        out[s] = {
            m: float(np.mean([r["scores"][s]["metrics"][m] for r in reports])) for m in METRICS
        }
    return out
