"""Accuracy benchmark on MNIST: SimCLR, self-OECL and OECL against raw-pixel baselines.

    python benchmarks/bench_accuracy.py                    # one-vs-rest, all 10 classes
    python benchmarks/bench_accuracy.py --classes 0,3 --steps oecl-photos=1200
    python benchmarks/bench_accuracy.py --protocol leave-one-out
    python benchmarks/bench_accuracy.py --eval-split val --classes 8 --methods oecl-photos
    python benchmarks/bench_accuracy.py --depth resnet18 --width 64 --image-size 28 \
        --steps 3000 --k 32                                # the paper's backbone, on a GPU
    python benchmarks/bench_accuracy.py --eval-split val --classes 1,8 --methods oecl-photos \
        --views 1,2,4,8,16 --view-families train,0.75-1    # choose the served K and views
    python benchmarks/bench_accuracy.py --oe auto         # each class's OE chosen on validation

Split, for each class (the same for every method, rebuilt from the seed): train = that class
of the 60k MNIST training set (leave-one-out: every other class), less the 10% held out as ID
validation; test = the whole 10k test set, ID positive. Data: the four IDX files under
--data-root (default ../shared/data/mnist, relative to the repository root).

Methods:
- simclr (oe=none), self-oecl (oe=self) and oecl-photos (oe=photos, the built-in far-OE), each
  trained through the project's own `run_training` (--steps per method, at --batch-size ID
  images per step; self-OECL's steps carry 4x the views, OECL's 2x, as in the paper) and
  evaluated by `evaluate_run` with all three scores (higher = normal). Runs are kept under
  --runs-dir (one per method and class: other settings need another --runs-dir); a run that
  finished with the same settings is reused, not retrained, and with --extend one that
  finished with fewer --steps is continued to --steps (benchmarks/oe_choice.py probes that way).
  With `--oe auto`, oecl-photos trains as `oecl train --oe auto` (probes of five OE mixes judged
  on the other classes' training images, the chosen one continued to --steps; the choice, its
  validation figures and cost are in the class's record under `oe_auto`).
- nn: raw pixels in [0, 1], score = -(L2 distance to the nearest ID training image).
- pca: raw pixels, PCA fitted on the ID training images with as many components as explain
  --pca-variance of their variance (default 0.9, fixed in advance); score = -(squared
  reconstruction error). `--pca-variance val` instead picks the share among PCA_CANDIDATES
  on the validation split (below), never on the test set.

Choosing settings: `--eval-split val` trains exactly as the benchmark does but scores a
validation split of the training classes instead of the test set: the held-out 10% of the ID
class against 500 training images of each other class. The CPU defaults (16x16 inputs,
ResNet-10 width 16, fp32, crop scale 0.5-1, lr 0.1, OECL 3,600 steps, no ID overlays in the
OE) were chosen that way on classes 8 and 1 (benchmarks/RESULTS.md has every trial); no
horizontal flips (a mirrored digit is another shape). SimCLR and self-OECL get smaller
budgets; every method's steps, epochs and wall time are recorded with it.

Cost on a quiet 2-core Xeon with the defaults, per class: OECL ~0.09 s per step (~5 min),
self-OECL ~0.17 s per step, SimCLR ~0.05 s; scoring 10k test images with K = 16 ~25 s per
run; the two baselines ~20 s.

The served score: on the test split, every trained run of the --serve-methods is exported
(`export_run`, verified, fp32 and int8 ONNX) once per K of --serve-views, and the test set is
scored through `oecl_runtime` on the exported files with the onnxruntime CPU backend: AUROC,
AUPR-IN, AUPR-OUT, FPR@95TPR, and the TPR / FPR the artifact's own threshold gives, per class
and mean; then the served images/s of each K (first class's files, batch 64). The `served`
entry of the JSON is K = --served-k (default: the exporter's DEFAULT_VIEWS). On the
validation split, --views and --view-families instead compare the K-view score (in PyTorch,
from the code the graph is built with) for each K and view family, to choose K there.

Writes benchmarks/results/accuracy-mnist[-leave-one-out][-val].json (per class and mean
AUROC, the device, each method's budget: steps, epochs, wall time, and `served`) and prints
markdown tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from _harness import REPO, RESULTS, command_line, device_name, log, md_table

DEEP = {"simclr": "none", "self-oecl": "self", "oecl-photos": "photos"}
BASELINES = ("nn", "pca")
METHODS = (*DEEP, *BASELINES)
PCA_CANDIDATES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
VAL_OOD_PER_CLASS = 2000  # other-class training images drawn for the PCA validation split
VAL_OOD_PER_CLASS_DEEP = 500  # the same for the deep methods' validation (scoring is dearer)
DEFAULT_STEPS = 300


def parse_steps(text: str) -> dict[str, int]:
    """'300' (every deep method) or 'simclr=200,oecl-photos=1000' (others: DEFAULT_STEPS)."""
    try:
        if "=" not in text:
            return dict.fromkeys(DEEP, int(text))
        out = dict.fromkeys(DEEP, DEFAULT_STEPS)
        for part in filter(None, (t.strip() for t in text.split(","))):
            method, _, n = part.partition("=")
            if method.strip() not in DEEP:
                raise ValueError(f"unknown deep method {method.strip()!r}")
            out[method.strip()] = int(n)
    except ValueError as e:
        sys.exit(f"error: --steps {text!r}: {e}")
    if min(out.values()) < 1:
        sys.exit("error: --steps must be positive")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data/mnist", help="MNIST IDX directory.")
    p.add_argument("--classes", default="all", help="'all' or e.g. '0,3,5'.")
    p.add_argument("--protocol", default="one-vs-rest", choices=("one-vs-rest", "leave-one-out"))
    p.add_argument("--methods", default=",".join(METHODS), help="Subset of " + ",".join(METHODS))
    p.add_argument(
        "--steps",
        default="simclr=300,self-oecl=300,oecl-photos=3600",
        help="Training steps per deep run: one number for all, or per method "
        f"(unnamed methods: {DEFAULT_STEPS}); default %(default)s.",
    )
    p.add_argument("--depth", default="resnet10", choices=("resnet10", "resnet18"))
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64, help="ID images per step.")
    # fp32: on the 2-core Xeon, bf16 autocast makes these small convolutions slower, not faster.
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0, help="OE norm weight (OECL, self-OECL).")
    p.add_argument("--crop-scale", default="0.5,1.0", help="RandomResizedCrop scale 'lo,hi'.")
    p.add_argument("--oe", default="photos", choices=("photos", "auto"),
                   help="oecl-photos: photo OE (with the shares below), or auto: `oecl train "
                   "--oe auto` chooses each class's OE mix on validation (photos as its far OE).")
    p.add_argument("--oe-probe-steps", type=int, default=None,
                   help="With --oe auto: steps of each candidate's probe (default: the trainer's).")
    p.add_argument("--oe-overlay", type=float, default=0.0,
                   help="oecl-photos: share of each step's OE images made by overlaying two ID "
                   "images, one shifted (the rest are photo crops); 0 = photos alone.")
    p.add_argument("--oe-jigsaw", type=float, default=0.0,
                   help="oecl-photos: share of each step's OE images made by putting an ID "
                   "image's quadrants in another order (the rest: photos and overlays).")
    p.add_argument("--oe-cutpaste", type=float, default=0.0,
                   help="oecl-photos: share of each step's OE images made by CutPaste (a patch "
                   "of an ID image pasted elsewhere in it; the rest: photos, overlays, jigsaws).")
    p.add_argument("--jitter-p", type=float, default=0.8,
                   help="Probability of brightness/contrast jitter per view.")
    p.add_argument(
        "--eval-split",
        default="test",
        choices=("test", "val"),
        help="test: the 10k test set (the benchmark). val: for choosing settings without the "
        "test set: held-out ID training images vs other classes' training images.",
    )
    p.add_argument(
        "--k",
        default="auto",
        help="Augmented views per test image (auto: 32 on "
        "CUDA, 16 on the CPU, to keep scoring a small share of the budget).",
    )
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--serve-methods", default="oecl-photos",
                   help="Deep methods whose runs are exported and scored through the runtime "
                   "on the test split ('' = none).")
    p.add_argument("--serve-views", default=None,
                   help="K values exported and served per run (default '1,<served-k>').")
    p.add_argument("--served-k", type=int, default=None,
                   help="The K reported as `served` (default: oecl_model.views.DEFAULT_VIEWS).")
    p.add_argument("--serve-threads", type=int, default=None,
                   help="onnxruntime intra-op threads (default: one per physical core).")
    p.add_argument("--views", default="1,2,4,8,16",
                   help="Validation split only: K values of the view study.")
    p.add_argument("--view-families", default="train",
                   help="Validation split only: view families of the study, comma-separated: "
                   "'train' (the run's own square crops, what export uses), 'aspect' (with "
                   "RandomResizedCrop's aspect ratios), 'random' / 'random-crops' (K - 1 random "
                   "SimCLR views with / without colour jitter), or square crops 'lo-hi'.")
    p.add_argument("--pca-variance", default="0.9", help="Explained-variance share, or 'val'.")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="benchmarks/runs", help="Where the deep runs are kept.")
    p.add_argument("--extend", action="store_true",
                   help="Continue a finished run with fewer --steps (same settings otherwise) "
                        "to --steps, instead of refusing it.")
    p.add_argument("--out", default=None, help="Result JSON (default benchmarks/results/...).")
    p.add_argument("--progress", action="store_true", help="Progress bars while training.")
    return p.parse_args(argv)


# -- baselines ---------------------------------------------------------------------------------


def flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def nn_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """-(distance to the nearest ID training image): higher = normal."""
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(train).kneighbors(test)
    return -dist[:, 0]


class PcaModel:
    """PCA of the ID training images, truncated at an explained-variance share."""

    def __init__(self, train: np.ndarray, seed: int):
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


def validation_set(splits, seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation split of the training classes (uint8 images, is-ID mask): held-out ID
    training images vs a sample of the other classes' training images (`splits.oe`)."""
    rng = np.random.default_rng(seed)
    other = splits.oe
    n_ood = min(len(other), per_class * max(1, len(splits.classes) - 1))
    ood = other[rng.choice(len(other), n_ood, replace=False)]
    is_id = np.r_[np.ones(len(splits.id_val), bool), np.zeros(n_ood, bool)]
    return np.concatenate([splits.id_val, ood]), is_id


def pca_validation_auroc(splits, pca: PcaModel, seed: int) -> dict[float, float]:
    """AUROC of each candidate share on the validation split of the training classes."""
    from oecl_train.metrics import ood_metrics

    images, is_id = validation_set(splits, seed, VAL_OOD_PER_CLASS)
    x = flat(images)
    return {v: ood_metrics(pca.scores(x, v), is_id)["AUROC"] for v in PCA_CANDIDATES}


# -- one class -----------------------------------------------------------------------------------


def base_config(args: argparse.Namespace, data_root: str, cls: str, method: str):
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


def validation_report(run_dir: Path, splits, k: int, args) -> dict[str, Any]:
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


def serve_run(run_dir: Path, cls: str, method: str, args) -> dict[str, Any]:
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


def run_deep(args, data_root: str, cls: str, method: str, k: int, val_splits=None) -> dict:
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
                                                    "cost")}
        extra["oe_auto"]["val_auroc"] = {n: c["val_auroc"]
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


def baseline_splits(cfg, with_validation: bool):
    """The split every method of this class uses (evaluation's own rebuild from the config);
    with validation also the other classes' training images, as validation OOD."""

    from oecl_train.data import Splits

    splits = Splits.from_config(cfg, oe="none")
    if with_validation:
        # Same source as OE = the non-ID training classes; the ID splits do not depend on OE.
        splits.oe = Splits.from_config(cfg, oe=cfg.data, oe_root=None).oe
    return splits


def run_baselines(args, splits, methods, pca_variance: float | str) -> dict[str, dict]:
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


# -- tables ------------------------------------------------------------------------------------


def columns(methods: list[str]) -> list[tuple[str, str | None]]:
    from oecl_train.scores import SCORES

    cols: list[tuple[str, str | None]] = []
    for m in methods:
        cols += [(m, s) for s in SCORES] if m in DEEP else [(m, None)]
    return cols


def value(entry: dict, score: str | None) -> float:
    return entry["auroc"][score] if score else entry["auroc"]


def markdown(result: dict[str, Any]) -> str:
    cols = columns(result["methods"])
    head = ["class", *(f"{m} {s}" if s else m for m, s in cols)]
    rows = [[cls, *(f"{value(per[m], s):.4f}" for m, s in cols)]
            for cls, per in result["per_class"].items()]
    mean = result["mean_auroc"]
    rows.append(["**mean**", *(f"**{mean[m][s] if s else mean[m]:.4f}**" for m, s in cols)])
    return "\n".join(md_table(head, rows))


def mean_auroc(per_class: dict[str, dict], methods: list[str]) -> dict[str, Any]:
    from oecl_train.scores import SCORES

    out: dict[str, Any] = {}
    for m in methods:
        entries = [per[m] for per in per_class.values()]
        if m in DEEP:
            out[m] = {s: float(np.mean([e["auroc"][s] for e in entries])) for s in SCORES}
        else:
            out[m] = float(np.mean([e["auroc"] for e in entries]))
    return out


def view_study_means(per_class: dict[str, dict], methods: list[str]) -> dict[str, Any]:
    """Mean validation AUROC of mean-view-norm per method, family and K."""
    out: dict[str, Any] = {}
    for m in methods:
        studies = [per[m]["view_study"]["auroc"] for per in per_class.values()
                   if "view_study" in per.get(m, {})]
        if studies:
            out[m] = {fam: {k: None if any(s[fam][k] is None for s in studies)
                            else float(np.mean([s[fam][k] for s in studies])) for k in row}
                      for fam, row in studies[0].items()}
    return out


def served_summary(per_class: dict[str, dict], methods: list[str], args) -> dict[str, Any] | None:
    """The top-level `served` entry: the served score at K = --served-k of the first served
    method, per class and mean, plus every served K's mean and the served images/s."""
    from _served import BACKEND, PRECISIONS, mean_served, throughput

    from oecl_train.score_names import served_score

    served = [m for m in methods if m in args.serve_methods and m in DEEP]
    if not served:
        return None
    m, k = served[0], args.served_k
    per = {cls: per_m[m]["served"] for cls, per_m in per_class.items()}

    def row(entry: dict[str, Any]) -> dict[str, Any]:
        if "error" in entry:  # this precision's file failed verification: nothing served
            return {"error": entry["error"]}
        return {"AUROC": entry["metrics"]["AUROC"], **entry["metrics"],
                **entry["at_threshold"], "threshold": entry["threshold"]}

    # Throughput needs every precision's files: the first class that has them all.
    first = next((c for c, v in per.items()
                  if not any("error" in e for byk in v.values() for e in byk.values())),
                 next(iter(per)))
    timed = tuple(p for p in PRECISIONS
                  if not any("error" in per[first][str(kk)][p] for kk in args.serve_views))
    log(f"served images/s ({BACKEND}, batch 64), class {first} files")
    artifacts = {kk: Path(per[first][str(kk)]["fp32"]["artifact"]) for kk in args.serve_views}
    return {
        "method": m,
        "score": served_score(k),
        "k": k,
        "backend": BACKEND,
        "precisions": list(PRECISIONS),
        "per_class": {cls: {p: row(v[str(k)][p]) for p in PRECISIONS} for cls, v in per.items()},
        "mean": mean_served(per, k),
        "mean_by_k": {str(kk): mean_served(per, kk) for kk in args.serve_views},
        "images_per_s": throughput(artifacts, 64, log, args.serve_threads, timed),
        "images_per_s_note": f"median of 3 rotated rounds, batch 64, class {first}'s files",
    }


def served_markdown(result: dict[str, Any]) -> str:
    served = result.get("served")
    if not served:
        return ""
    rows = []
    for cls, per in [*served["per_class"].items(), ("**mean**", None)]:
        for p in served["precisions"]:
            # No mean where every class's file of this precision failed verification.
            r = served["mean"].get(p, {"error": "none"}) if per is None else per[p]
            if "error" in r:
                rows.append([cls, p, "failed verification", "", "", "", "", ""])
                continue
            tpr = r.get("TPR_at_threshold", r.get("TPR"))
            fpr = r.get("FPR_at_threshold", r.get("FPR"))
            label = f"{cls} ({r['classes']} classes)" if "classes" in r else cls
            rows.append([label, p, f"{r['AUROC']:.4f}", f"{r['AUPR-IN']:.4f}",
                         f"{r['AUPR-OUT']:.4f}", f"{r['FPR@95TPR']:.4f}", f"{tpr:.3f}",
                         f"{fpr:.3f}"])
    by_k = []
    for k, by_p in served["mean_by_k"].items():
        ips = served["images_per_s"].get(k, {})
        by_k.append([k, *(f"{by_p[p]['AUROC']:.4f}" if p in by_p else "n/a"
                          for p in ("fp32", "int8")),
                     f"{ips.get('fp32', float('nan')):.0f}",
                     f"{ips.get('int8', float('nan')):.0f}"])
    return "\n".join([
        f"Served through oecl_runtime ({served['backend']}), {served['method']}: "
        f"{served['score']} at K = {served['k']}", "",
        *md_table(["class", "precision", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR@95TPR",
                   "TPR at thr", "FPR at thr"], rows), "",
        *md_table(["K", "mean AUROC fp32", "mean AUROC int8", "images/s fp32", "images/s int8"],
                  by_k)])


def view_study_markdown(result: dict[str, Any]) -> str:
    study = result.get("view_study")
    if not study:
        return ""
    rows = [[m, fam, *("n/a" if v is None else f"{v:.4f}" for v in row.values())]
            for m, fams in study.items() for fam, row in fams.items()]
    # Every row has the Ks of the first (the study's --views).
    ks = next((list(row) for fams in study.values() for row in fams.values()), [])
    lines = md_table(["method", "family", *(f"K={k}" for k in ks)], rows) if rows else []
    return "Validation AUROC of mean-view-norm (mean over classes)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.steps = parse_steps(args.steps)
    from _served import parse_families, parse_ks

    from oecl_model.views import DEFAULT_VIEWS

    args.served_k = DEFAULT_VIEWS if args.served_k is None else args.served_k
    try:
        args.views = parse_ks(args.views)
        args.serve_views = parse_ks(args.serve_views or f"1,{args.served_k}")
        args.view_families = parse_families(args.view_families)
    except ValueError as e:
        sys.exit(f"error: {e}")
    args.serve_methods = [m.strip() for m in args.serve_methods.split(",") if m.strip()]
    if args.served_k not in args.serve_views:
        sys.exit(f"error: --served-k {args.served_k} is not among --serve-views")
    try:
        lo, hi = (float(v) for v in args.crop_scale.split(","))
    except ValueError:
        sys.exit(f"error: --crop-scale {args.crop_scale!r}: expected 'lo,hi'")
    args.crop_scale = (lo, hi)
    import torch

    from oecl_runtime.atomic import write_json
    from oecl_train.evaluate import EvalError
    from oecl_train.sweep import parse_classes

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"error: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.pca_variance != "val" and not 0 < float(args.pca_variance) <= 1:
        sys.exit("error: --pca-variance must be in (0, 1] or 'val'")
    root = Path(args.data_root)
    data_root = str(root if root.is_absolute() else (REPO / root).resolve())
    if not Path(data_root).is_dir():
        sys.exit(f"error: {args.data_root}: no such directory (MNIST IDX files)")
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    k = (32 if cuda else 16) if args.k == "auto" else int(args.k)
    classes = parse_classes(args.classes, [str(i) for i in range(10)])
    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "data": "mnist",
        "protocol": args.protocol,
        "eval_split": args.eval_split,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("bench_accuracy.py", argv),
        "device": device_name(args.device),
        "direction": "higher = normal (AUROC, ID positive)",
        "methods": methods,
        "settings": {
            "depth": args.depth,
            "width": args.width,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "precision": args.precision,
            "lr": args.lr,
            "alpha": args.alpha,
            "crop_scale": list(args.crop_scale),
            "jitter_p": args.jitter_p,
            "oe_overlay": args.oe_overlay,
            "oe_jigsaw": args.oe_jigsaw,
            "oe_cutpaste": args.oe_cutpaste,
            "oe": args.oe,
            "oe_probe_steps": args.oe_probe_steps,
            "hflip": False,
            "k": k,
            "views": args.views if args.eval_split == "val" else None,
            "view_families": args.view_families if args.eval_split == "val" else None,
            "serve_views": args.serve_views if args.eval_split == "test" else None,
            "serve_methods": args.serve_methods if args.eval_split == "test" else None,
            "seed": args.seed,
            "pca_variance": args.pca_variance,
            "data_root": args.data_root,
        },
        "per_class": {},
    }
    t_all = time.perf_counter()
    validate = args.eval_split == "val"
    for cls in classes:
        cfg = base_config(args, data_root, cls, "simclr")
        splits = baseline_splits(cfg, validate or args.pca_variance == "val")
        if validate:
            # Every method scores the validation split in place of the test set (labels and
            # paths of the test set are not read on this path).
            images, is_id = validation_set(splits, args.seed, VAL_OOD_PER_CLASS_DEEP)
            splits = replace(splits, test_images=images, test_is_id=is_id, test_paths=None)
        per: dict[str, Any] = {}
        t0 = time.perf_counter()
        base = run_baselines(args, splits, methods, args.pca_variance)
        for m, entry in base.items():
            per[m] = entry
            extra = f" ({entry['n_components']} components)" if m == "pca" else ""
            log(f"class {cls} {m}: AUROC {entry['auroc']:.4f}{extra}")
        for m in (m for m in methods if m in DEEP):
            log(f"class {cls} {m}: {args.steps[m]} steps (trained, or reused where "
                f"{args.runs_dir} holds it finished)")
            try:
                per[m] = run_deep(args, data_root, cls, m, k, splits if validate else None)
            except EvalError as e:  # e.g. --runs-dir holds this run with other settings
                sys.exit(f"error: {e}")
            b = per[m]["budget"]
            aurocs = ", ".join(f"{s} {a:.4f}" for s, a in per[m]["auroc"].items())
            log(
                f"class {cls} {m}: AUROC {aurocs}  [{per[m]['run']}, {b['epochs']} epochs, "
                f"train {b['train_wall_s']} s, eval {b['eval_wall_s']} s]"
            )
        result["per_class"][cls] = {m: per[m] for m in methods}
        log(f"class {cls}: done in {time.perf_counter() - t0:.0f} s")
    result["mean_auroc"] = mean_auroc(result["per_class"], methods)
    if validate:
        result["view_study"] = view_study_means(result["per_class"], methods)
    else:
        result["served"] = served_summary(result["per_class"], methods, args)
    result["wall_time_s"] = round(time.perf_counter() - t_all, 1)
    suffix = "" if args.protocol == "one-vs-rest" else f"-{args.protocol}"
    suffix += "-val" if validate else ""
    out = (
        Path(args.out) if args.out else RESULTS / f"accuracy-mnist{suffix}.json"
    )
    write_json(out, result)
    budget = "raw-pixel baselines only"
    if any(m in DEEP for m in methods):
        steps = ", ".join(f"{m} {args.steps[m]}" for m in methods if m in DEEP)
        budget = (
            f"steps ({steps}) of {args.batch_size} ID images, {args.depth} width "
            f"{args.width}, {args.precision}, K = {k}"
        )
    pca = f"; PCA at {args.pca_variance} explained variance" if "pca" in methods else ""
    where = "validation split of the training classes" if validate else "test set"
    print(
        f"MNIST {args.protocol} ({where}), AUROC (higher = normal score, ID positive); device "
        f"{result['device']}; {budget}{pca}\n"
    )
    print(markdown(result))
    for table in (served_markdown(result), view_study_markdown(result)):
        if table:
            print("\n" + table)
    print(f"\ncommand: `{result['command']}`")
    log(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
