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


def threshold_line(t: dict[str, Any] | None, warning: bool = False) -> str:
    """The threshold in one line; `warning` adds the few-images warning on a second one (for
    report.md: on the console it is `oecl train`'s to say, once, before training)."""
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
    if warning and t.get("warning"):
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


def _score_label(report: dict[str, Any], name: str) -> str:
    """The score's name, marked when it is the one an export of the run serves."""
    return f"{name} (served)" if name == report["evaluation"].get("served_score") else name


def _score_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [_score_label(report, name), *(f"{s['metrics'][m]:.4f}" for m in METRICS)]
        for name, s in report["scores"].items()
    ]


def scores_line(report: dict[str, Any]) -> str:
    """What the table's numbers are computed on, in one line."""
    d, e = report["data"], report["evaluation"]
    parts = [f"whole test split ({d['n_test_id']} ID + {d['n_test_ood']} OOD images)", DIRECTION]
    if e.get("served_score") in report["scores"]:
        views = f" over {e['n_views']} views" if e.get("n_views", 1) > 1 else ""
        parts.append(f"(served) = the score `oecl export` serves{views}")
    if any(n in report["scores"] for n in ("mean-aug-norm", "mean-sq-norm")):
        parts.append(f"K = {e['k']} random augmented views")
    return "scores on the " + "; ".join(parts)


def choice_table(record: dict[str, Any]) -> str:
    """The candidates' validation figures at each rung, the choice and its cost, as console
    lines (records written before the rungs have one figure per candidate)."""
    rungs = [str(r) for r in record.get("rung_steps", [record["probe_steps"]])]
    rows = [["candidate", "OE", "judged on", *(f"val AUROC @{r}" for r in rungs), "probe s"]]
    for name, c in record["candidates"].items():
        mix = ", ".join(f"{k.removeprefix('oe_')} {v:g}" if k != "oe" else str(v)
                        for k, v in c["settings"].items())
        mark = " *" if name == record.get("chosen") else ""
        figures = c.get("rungs", {rungs[0]: c["val_auroc"]})
        rows.append([name + mark, mix, ", ".join(c["judged_on_sets"]),
                     *(f"{figures[r]:.4f}" if r in figures else "-" for r in rungs),
                     f"{c['probe_train_s']:.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"OE chosen on {record['judged_on_text']}; score: {record['score']}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    if "chosen" in record:
        cost = record["cost"]
        lines.append(
            f"chosen: {record['chosen']}, continued from its probe to {record['steps']} steps; "
            f"cost: {cost['probe_steps_total']} probe steps over {len(record['candidates'])} "
            f"candidates ({cost['probe_train_s']:.0f} s training, {cost['judge_s']:.0f} s "
            f"judging), {cost['extra_steps']} steps beyond one run "
            f"(+{cost['extra_share']:.0%})")
    return "\n".join(lines)


def format_run_table(report: dict[str, Any]) -> str:
    """The console summary of one run's report."""
    d = report["data"]
    lines = [
        f"run: {report['run_dir']}  ({d['source']}, {d['protocol']}, ID class {d['id_class']}: "
        f"{d['n_test_id']} ID / {d['n_test_ood']} OOD test images)",
        scores_line(report),
        _table(["score", *METRICS], _score_rows(report)),
    ]
    header, rows = per_class_rows(report)
    if 2 < len(rows) <= CONSOLE_CLASSES + 1:  # several OOD classes, each against the ID
        lines.append(_table(header, rows))
    elif len(rows) > 2:
        lines.append(f"AUROC of each of the {len(rows) - 1} OOD classes: see report.md")
    lines += [threshold_line(report["threshold"]), "budget: " + budget_line(report["budget"])]
    if report["checkpoint"].get("selected"):
        lines.append(checkpoint_line(report["checkpoint"]))
    if report.get("oe_auto"):
        lines.append(choice_table(report["oe_auto"]))
    return "\n".join(lines)


def checkpoint_line(ckpt: dict[str, Any]) -> str:
    """Which checkpoint was evaluated, and why when `--select` chose it."""
    line = f"checkpoint: {ckpt['file']} (epoch {ckpt['epoch']}, step {ckpt['step']})"
    sel = ckpt.get("selected")
    if sel:
        line += (f", the best on validation: AUROC {sel['val_auroc']:.3f} on "
                 f"{sel['judged_on_text']}")
    return line


def run_markdown(report: dict[str, Any], files: dict[str, Any]) -> str:
    d, e = report["data"], report["evaluation"]
    lines = [
        f"# Evaluation of `{report['run_dir']}`",
        "",
        f"- data: {d['source']}, protocol {d['protocol']}, ID class {d['id_class']} "
        f"(ID classes: {', '.join(d['id_classes'])})",
        f"- test split: {d['n_test_id']} ID and {d['n_test_ood']} OOD images; "
        f"{d['n_val_id']} ID-validation images",
        "- " + checkpoint_line(report["checkpoint"]),
        f"- scoring: K = {e['k']} SimCLR views (seed {e['seed']}), {e['precision']}, "
        f"batch {e['batch_size']}, device {e['device']}, {e['seconds']:.1f} s",
        "",
        f"Every score: **{DIRECTION}**. Metrics take ID as the positive class; "
        + scores_line(report) + ".",
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
        "- " + threshold_line(report["threshold"], warning=True).replace("\n", "\n- "),
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


def hist_scores(report: dict[str, Any], names: Sequence[str]) -> list[str]:
    """The scores hist.png shows: the served one (with the threshold) and the plain norm; the
    others are research scores whose ROC and metrics are in the report. Without either of
    those, every score asked for."""
    served = report["evaluation"].get("served_score")
    keep = [n for n in dict.fromkeys([served, "norm"]) if n in names]
    return keep or list(names)


def hist_bins(values: np.ndarray, n: int = 60) -> tuple[np.ndarray, bool]:
    """Bin edges that show every series: the 0.5-99.5 percentile range of all the scores (a
    few extreme values cannot squeeze the rest into one bin), on a log axis when positive
    scores span more than 30x (OE-trained norms put OOD near 0 and ID far above it)."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    if lo > 0 and hi / lo > 30:
        return np.geomspace(lo, hi, n + 1), True
    if hi <= lo:  # all (nearly) equal
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1), False


def plot_hist(
    path: Path,
    report: dict[str, Any],
    test_scores: dict[str, np.ndarray],
    is_id: np.ndarray,
    labels: Sequence[str] | None = None,
) -> None:
    """ID against each OOD class, one wide panel per score that matters (`hist_scores`), on a
    scale where both show (`hist_bins`), each series as its share of images per bin (so a
    small class is as visible as a large one), the threshold on top of the served score's."""
    plt = _pyplot()
    names = hist_scores(report, list(test_scores))
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.8 * len(names)), squeeze=False,
                             layout="constrained")
    t = report["threshold"]
    ood_labels = np.asarray(labels if labels is not None else ["OOD"] * len(is_id))[~is_id]
    if len(set(ood_labels.tolist())) > HIST_CLASSES:
        ood_labels = np.full(len(ood_labels), "OOD")
    ood_classes = sorted(set(ood_labels.tolist()))
    # ID in a neutral blue, filled; each OOD class an outline in its own tab10 colour.
    colours = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 0]
    for ax, name in zip(axes[:, 0], names, strict=True):
        s = np.asarray(test_scores[name], np.float64)
        bins, log = hist_bins(s)
        clip = (bins[0], bins[-1])

        def share(x: np.ndarray) -> np.ndarray:
            return np.full(len(x), 1.0 / max(len(x), 1))

        ids = np.clip(s[is_id], *clip)
        ax.hist(ids, bins=bins, weights=share(ids), color="tab:blue", alpha=0.35,
                label=f"ID ({is_id.sum()})")
        ax.hist(ids, bins=bins, weights=share(ids), color="tab:blue", histtype="step", lw=1.5)
        for c, colour in zip(ood_classes, colours * 2, strict=False):
            sel = np.clip(s[~is_id][ood_labels == c], *clip)
            tag = "OOD" if c == "OOD" else f"OOD {c}"
            ax.hist(sel, bins=bins, weights=share(sel), histtype="step", lw=2, color=colour,
                    label=f"{tag} ({len(sel)})")
        if log:
            ax.set_xscale("log")
        if t and name == t.get("score", "norm"):
            ax.axvline(t["value"], color="black", lw=2.5, ls="--", zorder=10,
                       label=f"threshold {t['value']:.4g} (ID-val, {t['tpr_target']:.0%} TPR)")
        auroc = report["scores"][name]["metrics"]["AUROC"]
        served = " (served)" if name == report["evaluation"].get("served_score") else ""
        ax.set_title(f"{name}{served}: AUROC {auroc:.4f}, whole test split", fontsize=11)
        scale = "log scale, " if log else ""
        ax.set_xlabel(f"{name} ({DIRECTION}; {scale}0.5-99.5 percentile range, "
                      "outside values in the end bins)")
        ax.set_ylabel("share of the series' images")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
        ax.grid(axis="x", alpha=0.3, which="both")
    fig.suptitle("ID vs OOD test scores")
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
