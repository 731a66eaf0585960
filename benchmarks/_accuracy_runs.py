"""The deep methods of the accuracy benchmark: one class's run trained (or reused) through the
project's training API, scored on the test set by `evaluate_run` or on the validation split
with the view study, and on the test set also exported and served through `oecl_runtime`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _harness import log

if TYPE_CHECKING:
    from oecl_train.config import TrainConfig
    from oecl_train.data import Splits

DEEP = {"simclr": "none", "self-oecl": "self", "oecl-photos": "photos"}
DEFAULT_STEPS = 300


def base_config(args: argparse.Namespace, data_root: str, cls: str,
                method: str) -> TrainConfig:
    from oecl_train.config import TrainConfig

    cfg = TrainConfig(
        name=f"mnist-{args.protocol}/{method}/class-{cls}",
        out_dir=args.runs_dir,
        seed=args.seed,
        data="mnist",
        data_root=data_root,
        id_class=cls,
        protocol=args.protocol,
        oe=args.oe if method == "oecl-photos" else DEEP.get(method, "none"),
        oe_probe_steps=args.oe_probe_steps if method == "oecl-photos" else None,
        oe_overlay=args.oe_overlay if method == "oecl-photos" else 0.0,
        oe_jigsaw=args.oe_jigsaw if method == "oecl-photos" else 0.0,
        oe_cutpaste=args.oe_cutpaste if method == "oecl-photos" else 0.0,
        image_size=args.image_size,
        depth=args.depth,
        width=args.width,
        alpha=args.alpha,
        batch_size=args.batch_size,
        steps=args.steps.get(method, DEFAULT_STEPS),
        lr=args.lr,
        crop_scale=args.crop_scale,
        jitter_p=args.jitter_p,
        hflip=False,
        device=args.device,
        precision=args.precision,
    )
    cfg.validate()
    return cfg


def validation_report(run_dir: Path, splits: Splits, k: int,
                      args: argparse.Namespace) -> dict[str, Any]:
    """The run's scores on `splits` (whose test part is the validation split), shaped like
    the parts of `evaluate_run`'s report this benchmark reads, plus the view study."""
    from _served import view_study

    from oecl_train.devices import resolve_device
    from oecl_train.evaluate import run_budget, score_model
    from oecl_train.metrics import ood_metrics
    from oecl_train.trainer import load_trained

    dev = resolve_device(args.device)
    cfg, net, meta = load_trained(run_dir, dev)
    t0 = time.perf_counter()
    scores, _ = score_model(net, cfg, splits, k=k, device=dev, batch_size=args.eval_batch_size)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    study = view_study(net, cfg, splits.spec, splits.test_images, splits.test_is_id, args.views,
                       args.view_families)
    return {
        "scores": {s: {"metrics": ood_metrics(v, splits.test_is_id)} for s, v in scores.items()},
        "budget": run_budget(run_dir, cfg, meta),
        "evaluation": {"seconds": round(seconds, 2)},
        "view_study": {"auroc": study, "seconds": round(time.perf_counter() - t0, 2)},
    }


def serve_run(run_dir: Path, cls: str, method: str,
              args: argparse.Namespace) -> dict[str, Any]:
    """Export the run at each served K and score the test set through the runtime."""
    from _served import PRECISIONS, export_views, served_metrics

    from oecl_train.data import Splits
    from oecl_train.export.errors import VerificationFailed
    from oecl_train.trainer import load_trained

    cfg, _, _ = load_trained(run_dir, "cpu")
    splits = Splits.from_config(cfg, oe="none")
    out: dict[str, Any] = {}
    for k in args.serve_views:
        path = Path(args.runs_dir) / "artifacts" / method / f"class-{cls}" / f"views-{k}"
        t0 = time.perf_counter()
        precisions, failed = PRECISIONS, {}
        try:
            summary = export_views(run_dir, path, k, splits, log=log)
        except VerificationFailed as e:
            if "fp32" in e.precisions:
                raise
            # The exporter refuses the whole artifact; serve what verifies and say what not.
            log(f"class {cls} {method} served K={k}: {e}; exporting without "
                f"{', '.join(e.precisions)}")
            precisions = tuple(p for p in PRECISIONS if p not in e.precisions)
            failed = {p: {"error": str(e)} for p in e.precisions}
            summary = export_views(run_dir, path, k, splits, precisions=precisions, log=log)
        export_s = time.perf_counter() - t0
        out[str(k)] = served_metrics(path, splits.test_images, splits.test_is_id,
                                     args.serve_threads, precisions)
        for precision, row in out[str(k)].items():
            row["export_s"] = round(export_s, 1)
            row["artifact"] = str(path)
            log(f"class {cls} {method} served K={k} {precision}: AUROC "
                f"{row['metrics']['AUROC']:.4f}, at threshold TPR {row['at_threshold']['TPR']:.3f}"
                f" FPR {row['at_threshold']['FPR']:.3f} (export {export_s:.0f} s, verified "
                f"{summary['verification']['pass']})")
        out[str(k)].update(failed)
    return out


def run_deep(args: argparse.Namespace, data_root: str, cls: str, method: str, k: int,
             val_splits: Splits | None = None) -> dict:
    """Train (through the project's training API) and evaluate one deep method on one class:
    on the test set, or on the test part of `val_splits` (the validation split) when given."""
    from oecl_train.evaluate import evaluate_run
    from oecl_train.scores import SCORES
    from oecl_train.sweep import train_or_reuse

    cfg = base_config(args, data_root, cls, method)
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    what, seconds = train_or_reuse(cfg, args.progress, extend=args.extend)
    oe_auto = json.loads((run_dir / "config.json").read_text()).get("oe_auto")
    if val_splits is not None:
        report = validation_report(run_dir, val_splits, k, args)
    else:
        report = evaluate_run(
            run_dir, SCORES, k, device=args.device, batch_size=args.eval_batch_size
        )
    b = report["budget"]
    trained_here = seconds is not None and what in ("trained", "extended")
    wall = round(seconds, 2) if trained_here else b["wall_time_s"]
    if oe_auto and not trained_here and wall is not None:
        # The run's epoch log holds the chosen probe and its continuation; the other probes
        # were trained for the choice too.
        wall = round(wall + sum(c["probe_train_s"] for n, c in oe_auto["candidates"].items()
                                if n != oe_auto["chosen"]), 2)
    extra: dict[str, Any] = {}
    if val_splits is not None:
        extra["view_study"] = report["view_study"]
    elif method in args.serve_methods:
        extra["served"] = serve_run(run_dir, cls, method, args)
    if oe_auto:
        extra["oe_auto"] = {k: oe_auto[k] for k in ("judged_on", "chosen", "probe_steps",
                                                    "rung_steps", "cost") if k in oe_auto}
        extra["oe_auto"]["val_auroc"] = {n: c.get("rungs", c["val_auroc"])
                                         for n, c in oe_auto["candidates"].items()}
    return {
        **extra,
        "auroc": {s: v["metrics"]["AUROC"] for s, v in report["scores"].items()},
        "metrics": {s: v["metrics"] for s, v in report["scores"].items()},
        "budget": {
            "steps": b["steps"],
            "epochs": b["epochs"],
            "batch_size": cfg.batch_size,
            "train_wall_s": wall,
            # The whole run's training time from its epoch log: for an extended run, the
            # steps it had before this invocation too.
            "run_wall_s": b["wall_time_s"],
            "train_wall_source": "measured" if trained_here else b["wall_time_source"],
            "eval_wall_s": report["evaluation"]["seconds"],
            "k": k,
        },
        "run": what,
    }
