"""Evaluation reports: JSON (machine), markdown and a console table (human), ROC curves and
ID-vs-OOD histograms (PNG), and the per-image scores as CSV. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oecl_runtime.atomic import with_file, write_json, write_text
from oecl_train.metrics import METRICS, roc_points
from oecl_train.score_names import DIRECTION

# Beyond these many OOD classes (CIFAR-100: 99) the per-class table stays in report.md and the
# histogram shows one merged OOD series: that many overlaid series would be unreadable.
CONSOLE_CLASSES = 20
HIST_CLASSES = 10


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def budget_line(b: dict[str, Any]) -> str:
    wall = _fmt_seconds(b.get("wall_time_s"))
    if b.get("wall_time_s") is not None and "throughput" in b.get("wall_time_source", ""):
        wall += " (from logged throughput)"
    done = "" if b.get("complete", True) else f" of {b.get('total_steps')} (incomplete)"
    return (
        f"{b.get('steps')} steps{done}, {b.get('epochs')} epochs, batch {b.get('batch_size')}, "
        f"OE {b.get('oe')}, wall time {wall}, device {b.get('device')}"
    )


def threshold_line(t: dict[str, Any] | None) -> str:
    if t is None:
        return "threshold: none (no ID-validation images)"
    line = (
        f"threshold ({t.get('score', 'norm')}, {t['rule']}, {t.get('n_val', '?')} images, fp32, "
        f"{DIRECTION}): "
        f"{t['value']:.6g}"
    )
    if t.get("test"):
        line += (
            f"; on the test split it accepts {t['test']['TPR']:.1%} of ID "
            f"and {t['test']['FPR']:.1%} of OOD"
        )
    if t.get("warning"):
        line += f"\nwarning: {t['warning']}"
    return line


def per_class_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per OOD class: its image count, and each score's AUROC and mean against ID."""
    names = [n for n, s in report["scores"].items() if s.get("per_ood_class")]
    if not names:
        return [], []
    classes = list(report["scores"][names[0]]["per_ood_class"])
    header = ["OOD class", "n", *(f"{n} AUROC" for n in names), *(f"{n} mean" for n in names)]
    rows = []
    for c in classes:
        per = [report["scores"][n]["per_ood_class"][c] for n in names]
        rows.append(
            [c, str(per[0]["n"]), *(f"{p['AUROC']:.4f}" for p in per),
             *(f"{p['mean']:.4g}" for p in per)]
        )
    id_means = [f"{report['scores'][n]['id']['mean']:.4g}" for n in names]
    rows.append(["(ID)", str(report["data"]["n_test_id"]), *(["-"] * len(names)), *id_means])
    return header, rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _score_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [name, *(f"{s['metrics'][m]:.4f}" for m in METRICS)] for name, s in report["scores"].items()
    ]


def choice_table(record: dict[str, Any]) -> str:
    """The candidates' validation figures, the choice and its cost, as console lines."""
    rows = [["candidate", "OE", "judged on", "val AUROC", "probe s"]]
    for name, c in record["candidates"].items():
        mix = ", ".join(f"{k.removeprefix('oe_')} {v:g}" if k != "oe" else str(v)
                        for k, v in c["settings"].items())
        mark = " *" if name == record.get("chosen") else ""
        rows.append([name + mark, mix, ", ".join(c["judged_on_sets"]), f"{c['val_auroc']:.4f}",
                     f"{c['probe_train_s']:.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"OE chosen on {record['judged_on_text']}; score: {record['score']}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    if "chosen" in record:
        cost = record["cost"]
        lines.append(
            f"chosen: {record['chosen']}, continued from its probe to {record['steps']} steps; "
            f"cost: {len(record['candidates'])} probes of {record['probe_steps']} steps "
            f"({cost['probe_train_s']:.0f} s training, {cost['judge_s']:.0f} s judging), "
            f"{cost['extra_steps']} steps beyond one run (+{cost['extra_share']:.0%})")
    return "\n".join(lines)


def format_run_table(report: dict[str, Any]) -> str:
    """The console summary of one run's report."""
    d = report["data"]
    lines = [
        f"run: {report['run_dir']}  ({d['source']}, {d['protocol']}, ID class {d['id_class']}: "
        f"{d['n_test_id']} ID / {d['n_test_ood']} OOD test images)",
        f"scores: {DIRECTION}; K = {report['evaluation']['k']} augmented views",
        _table(["score", *METRICS], _score_rows(report)),
    ]
    header, rows = per_class_rows(report)
    if 2 < len(rows) <= CONSOLE_CLASSES + 1:  # several OOD classes, each against the ID
        lines.append(_table(header, rows))
    elif len(rows) > 2:
        lines.append(f"AUROC of each of the {len(rows) - 1} OOD classes: see report.md")
    lines += [threshold_line(report["threshold"]), "budget: " + budget_line(report["budget"])]
    if report.get("oe_auto"):
        lines.append(choice_table(report["oe_auto"]))
    return "\n".join(lines)


def run_markdown(report: dict[str, Any], files: dict[str, Any]) -> str:
    d, e = report["data"], report["evaluation"]
    lines = [
        f"# Evaluation of `{report['run_dir']}`",
        "",
        f"- data: {d['source']}, protocol {d['protocol']}, ID class {d['id_class']} "
        f"(ID classes: {', '.join(d['id_classes'])})",
        f"- test split: {d['n_test_id']} ID and {d['n_test_ood']} OOD images; "
        f"{d['n_val_id']} ID-validation images",
        f"- checkpoint: {report['checkpoint']['file']} (epoch {report['checkpoint']['epoch']}, "
        f"step {report['checkpoint']['step']})",
        f"- scoring: K = {e['k']} SimCLR views (seed {e['seed']}), {e['precision']}, "
        f"batch {e['batch_size']}, device {e['device']}, {e['seconds']:.1f} s",
        "",
        f"Every score: **{DIRECTION}**. Metrics take ID as the positive class.",
        "",
        _md_table(["score", *METRICS], _score_rows(report)),
        "",
        "| score | meaning | ID mean ± std | OOD mean ± std |",
        "|---|---|---|---|",
    ]
    for name, s in report["scores"].items():
        lines.append(
            f"| {name} | {s['description']} | {s['id']['mean']:.4g} ± {s['id']['std']:.3g} | "
            f"{s['ood']['mean']:.4g} ± {s['ood']['std']:.3g} |"
        )
    header, rows = per_class_rows(report)
    if rows:
        lines += [
            "",
            "Per OOD class (all ID test images against that class alone):",
            "",
            _md_table(header, rows),
        ]
    lines += [
        "",
        "- " + threshold_line(report["threshold"]).replace("\n", "\n- "),
        "- budget: " + budget_line(report["budget"]),
        "",
    ]
    if report.get("oe_auto"):
        lines += ["```", choice_table(report["oe_auto"]), "```", ""]
    if files["roc"]:
        lines.append(f"![ROC curves]({files['roc']}) ![ID vs OOD histograms]({files['hist']})")
    if files.get("scores_csv"):
        lines += ["", f"Per-image scores: `{files['scores_csv']}`."]
    return "\n".join(lines) + "\n"


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt  # optional, as in _pyplot

    with_file(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def _pyplot():
    # matplotlib is optional (the train extra) and slow to import; the backend must be chosen
    # before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(
    path: Path, report: dict[str, Any], test_scores: dict[str, np.ndarray], is_id: np.ndarray
) -> None:
    """One ROC curve per score on one set of axes, so the scores compare at a glance."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, s in test_scores.items():
        fpr, tpr = roc_points(s, is_id)
        auroc = report["scores"][name]["metrics"]["AUROC"]
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.4f})")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
    ax.axhline(0.95, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("false positive rate (OOD accepted)")
    ax.set_ylabel("true positive rate (ID accepted)")
    ax.set_title(f"ROC ({DIRECTION}, ID positive)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _savefig(fig, path)


def plot_hist(
    path: Path,
    report: dict[str, Any],
    test_scores: dict[str, np.ndarray],
    is_id: np.ndarray,
    labels: Sequence[str] | None = None,
) -> None:
    """ID vs OOD histogram of each score, one panel per score and one series per OOD class
    (two defect types on opposite sides of the ID would cancel out in one merged OOD series);
    the threshold on the score it was taken on (the served one)."""
    plt = _pyplot()
    names = list(test_scores)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
    thr = report["threshold"]["value"] if report["threshold"] else None
    thr_score = report["threshold"].get("score", "norm") if report["threshold"] else None
    ood_labels = np.asarray(labels if labels is not None else ["OOD"] * len(is_id))[~is_id]
    if len(set(ood_labels.tolist())) > HIST_CLASSES:
        ood_labels = np.full(len(ood_labels), "OOD")
    ood_classes = sorted(set(ood_labels.tolist()))
    for ax, name in zip(axes[0], names, strict=True):
        s = test_scores[name]
        bins = np.histogram_bin_edges(s, bins=50)
        ax.hist(s[is_id], bins=bins, alpha=0.6, density=True, label=f"ID ({is_id.sum()})")
        for c in ood_classes:
            sel = s[~is_id][ood_labels == c]
            tag = "OOD" if c == "OOD" else f"OOD {c}"
            ax.hist(sel, bins=bins, alpha=0.5, density=True, histtype="stepfilled",
                    label=f"{tag} ({len(sel)})")
        if name == thr_score and thr is not None:
            ax.axvline(thr, color="black", lw=1, ls="--", label="threshold (ID-val, 95% TPR)")
        ax.set_xlabel(f"{name} ({DIRECTION})")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle("ID vs OOD test scores")
    fig.tight_layout()
    _savefig(fig, path)


def scores_csv(
    test_scores: dict[str, np.ndarray],
    is_id: np.ndarray,
    labels: Sequence[str],
    paths: Sequence[str] | None,
) -> str:
    """One row per test image: index, path (when read from files), class label, is_id, scores."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = list(test_scores)
    w.writerow(["index", "path", "label", "is_id", *names])
    for i in range(len(is_id)):
        w.writerow(
            [
                i,
                "" if paths is None else paths[i],
                labels[i],
                int(bool(is_id[i])),
                *(repr(float(test_scores[n][i])) for n in names),
            ]
        )
    return buf.getvalue()


def write_run_report(
    eval_dir: str | Path,
    report: dict[str, Any],
    *,
    test_scores: dict[str, np.ndarray],
    is_id: np.ndarray,
    labels: Sequence[str],
    paths: Sequence[str] | None,
    save_scores: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Write report.json, report.md, the PNGs and (optionally) scores.csv; record the file
    names in report["files"] and return them."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"report_md": "report.md", "roc": None, "hist": None}
    files["scores_csv"] = None
    if plots:
        files["roc"], files["hist"] = "roc.png", "hist.png"
        plot_roc(eval_dir / files["roc"], report, test_scores, is_id)
        plot_hist(eval_dir / files["hist"], report, test_scores, is_id, labels)
    if save_scores:
        files["scores_csv"] = "scores.csv"
        write_text(eval_dir / "scores.csv", scores_csv(test_scores, is_id, labels, paths))
    else:
        # A scores.csv from an earlier evaluation would no longer match this report.
        (eval_dir / "scores.csv").unlink(missing_ok=True)
    report["files"] = files
    write_text(eval_dir / "report.md", run_markdown(report, files))
    # JSON last: a report.json exists only once everything it names has been written.
    write_json(eval_dir / "report.json", report)
    return files


# -- sweeps --------------------------------------------------------------------------------------


def sweep_rows(sweep: dict[str, Any], metric: str = "AUROC") -> tuple[list[str], list[list[str]]]:
    names = list(sweep["mean"])
    header = ["class", *(f"{n} {metric}" for n in names)]
    rows = [
        [str(e["class"]), *(f"{e['metrics'][n][metric]:.4f}" for n in names)]
        for e in sweep["per_class"]
    ]
    rows.append(["mean", *(f"{sweep['mean'][n][metric]:.4f}" for n in names)])
    return header, rows


def format_sweep_table(sweep: dict[str, Any]) -> str:
    header, rows = sweep_rows(sweep)
    return "\n".join(
        [
            f"sweep: {sweep['sweep_dir']} ({sweep['protocol']}, OE {sweep['oe']}; "
            f"scores {DIRECTION})",
            _table(header, rows),
        ]
    )


def sweep_markdown(sweep: dict[str, Any]) -> str:
    lines = [
        f"# Sweep `{sweep['sweep_dir']}`",
        "",
        f"{sweep['data']}, protocol {sweep['protocol']}, OE {sweep['oe']}; K = {sweep['k']}. "
        f"Every score: **{DIRECTION}**; ID is the positive class.",
        "",
    ]
    for metric in METRICS:
        header, rows = sweep_rows(sweep, metric)
        lines += [f"## {metric}", "", _md_table(header, rows), ""]
    lines += ["## Budget", "", "| class | budget |", "|---|---|"]
    lines += [f"| {e['class']} | {budget_line(e['budget'])} |" for e in sweep["per_class"]]
    return "\n".join(lines) + "\n"


def write_sweep_report(sweep_dir: str | Path, sweep: dict[str, Any]) -> None:
    sweep_dir = Path(sweep_dir)
    write_text(sweep_dir / "sweep.md", sweep_markdown(sweep))
    write_json(sweep_dir / "sweep.json", sweep)
