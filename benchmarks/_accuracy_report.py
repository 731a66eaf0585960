"""The accuracy benchmark's summaries and tables: the mean AUROC per method and score, the
top-level `served` entry and the view study's means, and the markdown printed from them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from _accuracy_runs import DEEP
from _harness import log, md_table


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


def served_summary(per_class: dict[str, dict], methods: list[str],
                   args: argparse.Namespace) -> dict[str, Any] | None:
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
