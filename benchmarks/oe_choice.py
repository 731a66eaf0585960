"""The OE chosen per class on the validation split, and what the chosen runs serve on the test set.

Two ways in, one choice and one report (or, from test files of one variant alone, the
report of that variant over all its files, e.g. class subsets run side by side):

- From files: `bench_accuracy.py` results, for each OE variant its validation runs
  (`--eval-split val`) and its test runs through the runtime (`--serve-views`), any number of
  files each, e.g. one per class subset.
- Probe, then continue (`--probe-steps`): for every class, a short run of each variant
  (`--variant NAME=OVERLAY[,JIGSAW[,CUTPASTE]]`, the shares of ID overlays, jigsaws and
  CutPastes in the OE batch)
  is scored on the validation split; only the variant chosen there is continued to `--steps`
  (the same run extended, so the probe's steps are not thrown away) and scored on the test
  set through the runtime, beside the raw-pixel baselines. The `bench_accuracy.py` jobs run
  `--jobs` at a time, single-threaded each (on a small CPU two one-thread processes train
  faster than one two-thread process). Their JSON and logs go under --runs-dir; a job whose
  JSON exists is not run again, so a stopped invocation is picked up by running it again.

Per class the choice is the variant whose validation mean-view-norm AUROC is highest (never
looking at the test set). The report gives the chosen runs' served test metrics beside the
baselines, and what training and scoring cost (core-seconds, and the wall time of a --probe-steps
invocation), as one JSON and a markdown table.

    python benchmarks/oe_choice.py \\
        --val photos=VAL_PHOTOS.json --val overlay=VAL_OVERLAY.json \\
        --test photos=TEST_PHOTOS.json --test overlay=TEST_OVERLAY.json \\
        --out benchmarks/results/accuracy-mnist-oe-choice.json
    python benchmarks/oe_choice.py --probe-steps 600 --steps 3600 --classes all \\
        --variant photos=0 --variant overlay=0.5 --runs-dir benchmarks/runs/oe-probe \\
        --out benchmarks/results/accuracy-mnist-oe-probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _harness import BENCHMARKS, command_line, log, md_table, shown

from oecl_runtime.atomic import write_json
from oecl_train.config import NEAR_OE_SHARES

METHOD = "oecl-photos"
CHOICE_SCORE = "mean-view-norm"
METRICS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR@95TPR", "TPR", "FPR")
# One thread per job: the jobs, not torch's intra-op threads, fill the cores.
ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def _variants(specs: list[str], flag: str) -> dict[str, list[dict[str, Any]]]:
    """`NAME=FILE[,FILE...]` arguments -> {NAME: [loaded JSON, ...]}."""
    out: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        if not sep or not files:
            raise SystemExit(f"{flag} {spec!r}: expected NAME=FILE[,FILE...]")
        for f in files.split(","):
            path = Path(f)
            if not path.is_file():
                raise SystemExit(f"{flag} {name}: no such file: {f}")
            out.setdefault(name, []).append(json.loads(path.read_text()))
    return out


def _by_class(docs: list[dict[str, Any]], split: str) -> dict[str, dict[str, Any]]:
    """class -> that class's `per_class` record (and its file's `served`), over all files."""
    out: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if doc.get("eval_split", "test") != split:
            raise SystemExit(f"a --{split} file holds a {doc.get('eval_split')!r} run")
        served = doc.get("served") or {}
        for cls, rec in doc["per_class"].items():
            # Throughput is measured on the first class's files of each file: this class's
            # own only where the file holds this class alone.
            ips = served.get("images_per_s") if len(doc["per_class"]) == 1 else None
            out[cls] = {**rec, "served": served.get("per_class", {}).get(cls),
                        "served_k": served.get("k"), "images_per_s": ips,
                        "protocol": doc["protocol"], "device": doc["device"]}
    return out


def choose(val: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per class: each variant's validation AUROC and the variant with the highest."""
    classes = sorted(set.intersection(*(set(v) for v in val.values())), key=str)
    out = {}
    for cls in classes:
        scores = {name: v[cls][METHOD]["auroc"][CHOICE_SCORE] for name, v in val.items()}
        out[cls] = {"val_auroc": scores, "chosen": max(scores, key=scores.get)}
    return out


def _seconds(rec: dict[str, Any], key: str) -> float:
    """A `bench_accuracy.py` method record's budget entry in seconds (0 when not recorded)."""
    return float(rec["budget"].get(key) or 0.0)


def budget(val: dict[str, dict[str, dict[str, Any]]], test: dict[str, dict[str, dict[str, Any]]],
           picks: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Core-seconds of every run behind the choice, where the records carry them: all
    variants' validation runs, and the chosen runs' test training and scoring. A chosen run
    that continued its probe counts once: its whole training (`run_wall_s`, the probe and
    every extension, as the sum of its logged epoch times, so without each process's start-up
    and data loading) plus the other variants' probes (measured around the whole training)."""
    try:
        probes = {c: {n: v[c][METHOD] for n, v in val.items()} for c in picks}
        chosen = {c: test[p["chosen"]][c][METHOD] for c, p in picks.items()}
    except KeyError:
        return None
    train = 0.0
    for c, p in picks.items():
        whole = chosen[c]["budget"].get("run_wall_s")
        probe_s = {n: _seconds(r, "train_wall_s") for n, r in probes[c].items()}
        if chosen[c].get("oe_auto"):
            # Trained by `--oe auto`: its training time holds all of its own probes.
            train += _seconds(chosen[c], "train_wall_s")
        elif chosen[c].get("run") in ("extended", "reused") and whole is not None:
            train += float(whole) + sum(t for n, t in probe_s.items() if n != p["chosen"])
        else:
            train += sum(probe_s.values()) + _seconds(chosen[c], "train_wall_s")
    val_eval = sum(_seconds(r, "eval_wall_s") for per in probes.values() for r in per.values())
    test_eval = sum(_seconds(r, "eval_wall_s") for r in chosen.values())
    return {
        "probe_train_s": round(sum(_seconds(r, "train_wall_s") for per in probes.values()
                                   for r in per.values()), 1),
        "validation_eval_s": round(val_eval, 1),
        "test_train_s": round(sum(_seconds(r, "train_wall_s") for r in chosen.values()), 1),
        "test_eval_s": round(test_eval, 1),
        "test_runs_extended_probes": all(r.get("run") == "extended" for r in chosen.values()),
        "train_core_s": round(train, 1),
        "core_s": round(train + val_eval + test_eval, 1),
    }


def report(val_docs: dict[str, list[dict]], test_docs: dict[str, list[dict]], command: str,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The choice from validation and the chosen runs' served test metrics, as one record.
    The test files need to hold only the chosen variant of each class."""
    val = {n: _by_class(d, "val") for n, d in val_docs.items()}
    test = {n: _by_class(d, "test") for n, d in test_docs.items()}
    unknown = sorted(set(test) - set(val))
    if val and unknown:
        raise SystemExit(f"--test variant {unknown[0]!r} has no --val results")
    if val:
        picks = choose(val)
        rule = f"per class, the variant with the highest validation {CHOICE_SCORE} AUROC"
    else:  # one variant, chosen beforehand for every class: nothing to choose per class
        (name, runs), = test.items()
        picks = {cls: {"val_auroc": {}, "chosen": name} for cls in sorted(runs, key=str)}
        rule = "one variant for every class, chosen before the test set was read"
    per_class: dict[str, Any] = {}
    for cls, pick in picks.items():
        rec = test.get(pick["chosen"], {}).get(cls)
        if rec is None or rec["served"] is None:
            raise SystemExit(f"class {cls}: no served test result for {pick['chosen']}")
        per_class[cls] = {
            **pick,
            "served": rec["served"],
            "other_test_auroc": {n: t[cls]["served"]["fp32"]["AUROC"] for n, t in test.items()
                                 if n != pick["chosen"] and t.get(cls, {}).get("served")},
            "nn": rec["nn"]["auroc"], "pca": rec["pca"]["auroc"],
            # A run trained with `--oe auto`: the mix it chose, on what, and at what cost.
            **({"oe_auto": rec[METHOD]["oe_auto"]}
               if "oe_auto" in rec.get(METHOD, {}) else {}),
        }
    chosen = {cls: test[pick["chosen"]][cls] for cls, pick in picks.items()}
    precisions = sorted({p for r in per_class.values() for p in r["served"]})
    mean: dict[str, dict[str, Any]] = {}
    for prec in precisions:
        # A class whose file of this precision failed verification serves nothing to average.
        ok = {c: r["served"][prec] for c, r in per_class.items()
              if "error" not in r["served"].get(prec, {"error": "missing"})}
        mean[prec] = {m: statistics.fmean(v[m] for v in ok.values()) for m in METRICS}
        if len(ok) < len(per_class):
            mean[prec]["classes"] = len(ok)
            mean[prec]["failed_classes"] = sorted(set(per_class) - set(ok), key=str)
    first = next(iter(chosen.values()))
    return {
        "benchmark": "accuracy-mnist-oe-choice",
        "protocol": first["protocol"],
        "device": first["device"],
        "rule": rule,
        "served": {
            "method": METHOD, "score": CHOICE_SCORE, "k": first["served_k"],
            "precisions": precisions, "per_class": per_class, "mean": mean,
            "images_per_s": {c: r["images_per_s"] for c, r in chosen.items() if r["images_per_s"]},
            "images_per_s_note": "per K and precision, onnxruntime CPU, batch 64, each class's "
                                 "own files, measured inside its bench_accuracy.py job (beside "
                                 "the other jobs)",
        },
        "baselines_mean": {b: statistics.fmean(r[b] for r in per_class.values())
                           for b in ("nn", "pca")},
        "budget": budget(val, test, picks),
        **(extra or {}),
        "command": command,
    }


def markdown(record: dict[str, Any]) -> str:
    served, base = record["served"], record["baselines_mean"]
    head = ["class", "OE", "precision", *METRICS, "NN", "PCA"]
    rows = []
    for cls, r in served["per_class"].items():
        for i, prec in enumerate(served["precisions"]):
            m = r["served"][prec]
            cells = (["failed verification", *[""] * (len(METRICS) - 1)] if "error" in m
                     else [f"{m[k]:.4f}" for k in METRICS])
            rows.append([cls if i == 0 else "", r["chosen"] if i == 0 else "", prec, *cells,
                         f"{r['nn']:.4f}" if i == 0 else "", f"{r['pca']:.4f}" if i == 0 else ""])
    for i, prec in enumerate(served["precisions"]):
        n = served["mean"][prec].get("classes")
        rows.append([("**mean**" if i == 0 else "") + (f" ({n} classes)" if n else ""), "", prec,
                     *(f"{served['mean'][prec][k]:.4f}" for k in METRICS),
                     f"{base['nn']:.4f}" if i == 0 else "", f"{base['pca']:.4f}" if i == 0 else ""])
    return "\n".join(md_table(head, rows))


# -- probe, then continue ---------------------------------------------------------------------


# The self-made OE shares a variant sets, in the order `NAME=OVERLAY[,JIGSAW[,CUTPASTE]]`
# gives them.
SHARES = NEAR_OE_SHARES


def _parse_variants(specs: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        name, sep, shares = spec.partition("=")
        try:
            values = [float(v) for v in shares.split(",")]
        except ValueError:
            values = []
        if (not sep or not name or not 1 <= len(values) <= len(SHARES)
                or not all(0.0 <= v < 1.0 for v in values) or sum(values) >= 1.0):
            raise SystemExit(f"--variant {spec!r}: expected NAME=OVERLAY[,JIGSAW[,CUTPASTE]], "
                             "shares in "
                             "[0, 1) that leave some photos")
        values += [0.0] * (len(SHARES) - len(values))
        out[name] = dict(zip(SHARES, values, strict=True))
    if len(out) < 2:
        raise SystemExit("--variant: give at least two variants to choose between")
    return out


def _job(argv: list[str], out: Path, log_path: Path) -> Path:
    """One `bench_accuracy.py` invocation writing `out`; skipped when `out` exists."""
    if out.is_file():
        log(f"reusing {shown(out)}")
        return out
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w") as f:
        proc = subprocess.run(
            [sys.executable, str(BENCHMARKS / "bench_accuracy.py"), *argv, "--out", str(out)],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD}, check=False)
    if proc.returncode != 0 or not out.is_file():
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"job failed ({shown(log_path)}): {tail[0]}")
    log(f"done {shown(out)} in {time.perf_counter() - t0:.0f} s")
    return out


def _run_all(jobs: dict[Any, tuple[list[str], Path, Path]], workers: int) -> dict[Any, dict]:
    """Run the jobs `workers` at a time; each key's loaded result JSON."""
    with ThreadPoolExecutor(workers) as ex:
        outs = list(ex.map(lambda j: _job(*j), jobs.values()))
    return {key: json.loads(out.read_text()) for key, out in zip(jobs, outs, strict=True)}


def probe_and_continue(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    from oecl_train.data import DataError
    from oecl_train.sweep import parse_classes

    variants = _parse_variants(args.variant)
    try:
        classes = parse_classes(args.classes, [str(i) for i in range(10)])
    except DataError as e:
        raise SystemExit(str(e)) from None
    root = Path(args.runs_dir)
    common = ["--data-root", args.data_root, "--protocol", args.protocol, "--seed",
              str(args.seed), *args.bench_args]
    k = str(args.served_k)

    def job(name: str, cls: str, split: str, steps: int, extra: list[str]) -> tuple:
        stem = f"{name}-class-{cls}-steps-{steps}"
        shares = [a for key, v in variants[name].items()
                  for a in (f"--{key.replace('_', '-')}", str(v))]
        return ([*common, *shares, "--steps", f"{METHOD}={steps}",
                 "--runs-dir", str(root / name), "--classes", cls, *extra],
                root / split / f"{stem}.json", root / "logs" / f"{split}-{stem}.log")

    t0 = time.perf_counter()
    log(f"probes: {len(classes) * len(variants)} runs of {args.probe_steps} steps, "
        f"{args.jobs} at a time")
    probed = _run_all({(c, n): job(n, c, "val", args.probe_steps, [
        "--methods", METHOD, "--eval-split", "val", "--views", k, "--k", k])
        for c in classes for n in variants}, args.jobs)
    probe_wall = time.perf_counter() - t0
    val_docs: dict[str, list[dict]] = {}
    for (_, name), doc in probed.items():
        val_docs.setdefault(name, []).append(doc)
    picks = choose({n: _by_class(d, "val") for n, d in val_docs.items()})
    for c, p in picks.items():
        shown_scores = ", ".join(f"{n} {a:.4f}" for n, a in p["val_auroc"].items())
        log(f"class {c}: validation {shown_scores} -> {p['chosen']}")

    t1 = time.perf_counter()
    log(f"continuing the chosen runs to {args.steps} steps, {args.jobs} at a time")
    tested = _run_all({c: job(p["chosen"], c, "test", args.steps, [
        "--methods", f"{METHOD},nn,pca", "--extend", "--serve-views", k, "--served-k", k])
        for c, p in picks.items()}, args.jobs)
    test_docs: dict[str, list[dict]] = {}
    for c, doc in tested.items():
        test_docs.setdefault(picks[c]["chosen"], []).append(doc)
    extra = {
        "settings": {"variants": variants, "probe_steps": args.probe_steps, "steps": args.steps,
                     "served_k": args.served_k, "jobs": args.jobs, "threads_per_job": 1,
                     "bench_args": args.bench_args},
        "wall_s": {"probes": round(probe_wall, 1),
                   "continue_and_test": round(time.perf_counter() - t1, 1)},
    }
    return val_docs, test_docs, extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    files = p.add_argument_group("from files")
    files.add_argument("--val", action="append", metavar="NAME=FILE[,FILE]")
    files.add_argument("--test", action="append", metavar="NAME=FILE[,FILE]")
    run = p.add_argument_group("probe, then continue")
    run.add_argument("--probe-steps", type=int, help="Steps of each variant's validation run.")
    run.add_argument("--steps", type=int, help="Steps the chosen run is continued to.")
    run.add_argument("--variant", action="append", default=[],
                     metavar="NAME=OVERLAY[,JIGSAW[,CUTPASTE]]",
                     help="A variant and its --oe-overlay (and --oe-jigsaw, --oe-cutpaste) "
                     "share (default photos=0, overlay=0.5).")
    run.add_argument("--classes", default="all", help="'all' or e.g. '1,8'.")
    run.add_argument("--protocol", default="one-vs-rest", choices=("one-vs-rest", "leave-one-out"))
    run.add_argument("--served-k", type=int, default=8, help="Views of the served score.")
    run.add_argument("--jobs", type=int, default=2, help="bench_accuracy.py jobs at a time.")
    run.add_argument("--runs-dir", default="benchmarks/runs/oe-probe")
    run.add_argument("--data-root", default="../shared/data/mnist")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--bench-args", nargs=argparse.REMAINDER, default=[],
                     help="The rest is passed to every bench_accuracy.py job.")
    args = p.parse_args(argv)

    if args.probe_steps is not None:
        if args.val or args.test:
            raise SystemExit("--probe-steps trains its own runs; --val/--test read files instead")
        if args.steps is None or not 0 < args.probe_steps < args.steps:
            raise SystemExit("--probe-steps needs --steps larger than it")
        if args.jobs < 1:
            raise SystemExit("--jobs must be at least 1")
        args.variant = args.variant or ["photos=0", "overlay=0.5"]
        val_docs, test_docs, extra = probe_and_continue(args)
    else:
        if not args.test:
            raise SystemExit("give --val and --test files, or --probe-steps and --steps")
        val_docs = _variants(args.val or [], "--val")
        test_docs = _variants(args.test, "--test")
        if not val_docs and len(test_docs) != 1:
            raise SystemExit("without --val files there is nothing to choose by: give one "
                             "--test variant, or --val files for each")
        extra = None
    record = report(val_docs, test_docs, command_line("oe_choice.py", argv), extra)
    write_json(args.out, record)
    print(markdown(record))
    log(f"wrote {shown(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
