"""The OE chosen per class on the validation split, and what the chosen runs serve on the test set.

Reads `bench_accuracy.py` results: for each OE variant, its validation runs (`--eval-split
val`) and its test runs through the runtime (`--serve-views`), any number of files each, e.g.
one per class subset. Per class it picks the variant whose validation mean-view-norm AUROC is
highest (never looking at the test set), then reports the chosen runs' served test metrics
beside the raw-pixel baselines of the same images, and writes one JSON and a markdown table.

    python benchmarks/oe_choice.py \\
        --val photos=VAL_PHOTOS.json --val overlay=VAL_OVERLAY.json \\
        --test photos=TEST_PHOTOS.json --test overlay=TEST_OVERLAY.json \\
        --out benchmarks/results/accuracy-mnist-oe-choice.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from _harness import command_line, log, md_table, shown

from oecl_runtime.atomic import write_json

METHOD = "oecl-photos"
CHOICE_SCORE = "mean-view-norm"
METRICS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR@95TPR", "TPR", "FPR")


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
        for cls, rec in doc["per_class"].items():
            served = (doc.get("served") or {}).get("per_class", {}).get(cls)
            out[cls] = {**rec, "served": served, "protocol": doc["protocol"],
                        "device": doc["device"]}
    return out


def choose(val: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per class: each variant's validation AUROC and the variant with the highest."""
    classes = sorted(set.intersection(*(set(v) for v in val.values())), key=str)
    out = {}
    for cls in classes:
        scores = {name: v[cls][METHOD]["auroc"][CHOICE_SCORE] for name, v in val.items()}
        out[cls] = {"val_auroc": scores, "chosen": max(scores, key=scores.get)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val", action="append", required=True, metavar="NAME=FILE[,FILE]")
    p.add_argument("--test", action="append", required=True, metavar="NAME=FILE[,FILE]")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    val = {n: _by_class(d, "val") for n, d in _variants(args.val, "--val").items()}
    test = {n: _by_class(d, "test") for n, d in _variants(args.test, "--test").items()}
    if set(val) != set(test):
        raise SystemExit(f"variants differ: --val {sorted(val)}, --test {sorted(test)}")
    picks = choose(val)
    per_class: dict[str, Any] = {}
    for cls, pick in picks.items():
        rec = test[pick["chosen"]].get(cls)
        if rec is None or rec["served"] is None:
            raise SystemExit(f"class {cls}: no served test result for {pick['chosen']}")
        per_class[cls] = {
            **pick,
            "served": rec["served"],
            "other_test_auroc": {n: t[cls]["served"]["fp32"]["AUROC"] for n, t in test.items()
                                 if n != pick["chosen"] and t.get(cls, {}).get("served")},
            "nn": rec["nn"]["auroc"], "pca": rec["pca"]["auroc"],
        }
    precisions = sorted({p for r in per_class.values() for p in r["served"]})
    mean = {prec: {m: statistics.fmean(r["served"][prec][m] for r in per_class.values())
                   for m in METRICS} for prec in precisions}
    first = next(iter(test.values()))[next(iter(picks))]
    record = {
        "benchmark": "accuracy-mnist-oe-choice",
        "protocol": first["protocol"],
        "device": first["device"],
        "rule": f"per class, the variant with the highest validation {CHOICE_SCORE} AUROC",
        "served": {"method": METHOD, "score": CHOICE_SCORE, "precisions": precisions,
                   "per_class": per_class, "mean": mean},
        "baselines_mean": {b: statistics.fmean(r[b] for r in per_class.values())
                           for b in ("nn", "pca")},
        "command": command_line("oe_choice.py", argv),
    }
    write_json(args.out, record)

    head = ["class", "OE", "precision", *METRICS, "NN", "PCA"]
    rows = []
    for cls, r in per_class.items():
        for i, prec in enumerate(precisions):
            m = r["served"][prec]
            rows.append([cls if i == 0 else "", r["chosen"] if i == 0 else "", prec,
                         *(f"{m[k]:.4f}" for k in METRICS),
                         f"{r['nn']:.4f}" if i == 0 else "", f"{r['pca']:.4f}" if i == 0 else ""])
    for i, prec in enumerate(precisions):
        base = record["baselines_mean"]
        rows.append(["**mean**" if i == 0 else "", "", prec,
                     *(f"{mean[prec][k]:.4f}" for k in METRICS),
                     f"{base['nn']:.4f}" if i == 0 else "", f"{base['pca']:.4f}" if i == 0 else ""])
    print("\n".join(md_table(head, rows)))
    log(f"wrote {shown(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
