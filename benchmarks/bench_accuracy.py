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
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _accuracy_baselines import (
    BASELINES,
    VAL_OOD_PER_CLASS_DEEP,
    baseline_splits,
    run_baselines,
    validation_set,
)
from _accuracy_report import (
    markdown,
    mean_auroc,
    served_markdown,
    served_summary,
    view_study_markdown,
    view_study_means,
)
from _accuracy_runs import DEEP, DEFAULT_STEPS, base_config, run_deep
from _accuracy_runs import serve_run as serve_run  # the export tests drive it through this script
from _harness import REPO, RESULTS, command_line, device_name, log

METHODS = (*DEEP, *BASELINES)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.steps = parse_steps(args.steps)
    from _served import parse_families, parse_ks

    from oecl_train.view_count import view_count

    args.served_k = view_count(args.served_k)
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
