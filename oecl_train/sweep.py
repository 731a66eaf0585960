"""Per-class sweeps: one-vs-rest (each class ID in turn) or leave-one-class-out (each class held
out in turn). One run per class under OUT_DIR/BASE/class-<k>, each trained and evaluated, then
a per-class table with the mean in OUT_DIR/BASE/sweep.{json,md}.

A sweep that stopped part-way is picked up by running the same command again: a class whose
run finished is only evaluated, one with a checkpoint is resumed, the rest are trained.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from oecl_train import checkpoint
from oecl_train.config import TrainConfig
from oecl_train.data import DataError, make_reader
from oecl_train.devices import resolve_device
from oecl_train.evaluate import EvalError, evaluate_run, mean_metrics
from oecl_train.execution import recorded_config, resolve_execution
from oecl_train.oe_auto import as_saved
from oecl_train.report import format_sweep_table, write_sweep_report
from oecl_train.scores import DIRECTION, SCORES, parse_scores
from oecl_train.training import run_training

SWEEP_SCHEMA = "oecl-sweep/1"
CLASS_PREFIX = "class-"


def available_classes(cfg) -> list[str]:
    """The class names of the run's ID source, in index order."""
    return list(make_reader(cfg.data, cfg.data_root, seed=cfg.seed).load("train").classes)


def parse_classes(text: str, classes: Sequence[str]) -> list[str]:
    """'all' or a comma list of class names or indices → class names; unknown → ValueError."""
    text = text.strip()
    if text == "all":
        return list(classes)
    picked = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in classes:
            picked.append(part)
            continue
        try:
            i = int(part)
        except ValueError:
            raise DataError(f"--classes: no class {part!r}; classes are {list(classes)}") from None
        if not 0 <= i < len(classes):
            raise DataError(
                f"--classes: no class {i}; there are {len(classes)} classes (0..{len(classes) - 1})"
            )
        picked.append(classes[i])
    if not picked:
        raise DataError("--classes: give 'all' or a comma-separated list of classes")
    return list(dict.fromkeys(picked))


def sweep_base(cfg) -> str:
    return cfg.name or f"{cfg.data}-{cfg.protocol}-oe_{cfg.oe}"


def class_dir_name(cls: str) -> str:
    # Class names come from folder names or data set metadata; keep them path-safe.
    return CLASS_PREFIX + re.sub(r"[^A-Za-z0-9._-]+", "_", cls)


def _saved_config(run_dir: Path) -> TrainConfig | None:
    # Through TrainConfig, so a run saved before an option existed reads as its default.
    try:
        return TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (ValueError, TypeError):
        return None


def _config_differences(saved: TrainConfig | None, cfg) -> list[str]:
    """The settings in which `saved` differs from `cfg` (['config.json'] when unreadable)."""
    if saved is None:
        return ["config.json"]
    # A saved config records what ran ("auto" resolved for its device): compare like with like.
    device = resolve_device(cfg.device)
    a, b = (json.loads(json.dumps(recorded_config(c, resolve_execution(c, device))))
            for c in (saved, cfg))
    # out_dir is where the run was found, however it is spelled (relative, moved), and the
    # execution record names the device it ran on (cuda:0 under torchrun): not settings.
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and k not in ("out_dir", "execution"))


def train_or_reuse(cfg, progress: bool, extend: bool = False) -> tuple[str, float | None]:
    """Train (or resume, or reuse) the run of `cfg`; returns what was done and the seconds
    training took (None when nothing was trained here).

    `extend`: a finished run whose settings differ from `cfg` only in a shorter --steps is
    continued to cfg.steps (the cosine schedule is stretched to the new length from where the
    run stopped) instead of refused, as `oecl train --resume RUN --steps N` does."""
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    cfg = as_saved(cfg, run_dir)  # an --oe auto run that made its choice: the mix it chose
    resume = longer = False
    if (run_dir / "config.json").exists():
        saved = _saved_config(run_dir)
        if extend and saved is not None and None not in (saved.steps, cfg.steps):
            # Only the length may differ, and only upwards.
            longer = saved.steps < cfg.steps
            if longer:
                saved = dataclasses.replace(saved, steps=cfg.steps)
        if differ := _config_differences(saved, cfg):
            raise EvalError(
                f"{run_dir} holds a run with different settings ({', '.join(differ)}); pick "
                "another --name or remove it"
            )
        found = checkpoint.list_checkpoints(run_dir / "checkpoints")
        last = json.loads(found[-1].read_text()) if found else {}
        if not found:
            # Stopped before its first checkpoint: start over without the stale log lines.
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            longer = False
        elif last.get("complete"):
            # The newest checkpoint says how far the run got; an extension stopped before its
            # first checkpoint has config.json at the new length and the short run's last here.
            step = int(last.get("step", cfg.steps or 0))
            if not (extend and cfg.steps is not None and step < cfg.steps):
                return "reused", None
            longer = True
        resume = bool(found)
    t0 = time.perf_counter()
    result = run_training(cfg, resume=resume, progress=progress, quick_eval=False, extend=longer)
    if result.get("rank", 0) != 0:
        return "trained on a non-zero rank", None  # under torchrun, rank 0 evaluates
    return ("extended" if longer else "resumed" if resume else "trained"), time.perf_counter() - t0


def _entry(cls: str, run_name: str, report: dict[str, Any]) -> dict[str, Any]:
    thr = report["threshold"]
    return {
        "class": cls,
        "run_dir": run_name,
        "metrics": {n: s["metrics"] for n, s in report["scores"].items()},
        "threshold": None if thr is None else thr["value"],
        "budget": report["budget"],
        "report": f"{run_name}/eval/report.json",
    }


def _summary(
    sweep_dir: Path, meta: dict[str, Any], entries: list[dict], reports: list[dict]
) -> dict[str, Any]:
    return {
        "schema": SWEEP_SCHEMA,
        "sweep_dir": str(sweep_dir),
        "direction": DIRECTION,
        **meta,
        "classes": [e["class"] for e in entries],
        "per_class": entries,
        "mean": mean_metrics(reports),
    }


def run_sweep(
    cfg,
    classes: str,
    *,
    scores: Sequence[str] = SCORES,
    k: int = 32,
    batch_size: int = 1024,
    progress: bool = True,
    echo: Callable[[str], None] = lambda m: click.echo(m, err=True),
) -> dict[str, Any] | None:
    """Train and evaluate one run per class; write and return the sweep summary (None on a
    non-zero rank of a torchrun job)."""
    scores = parse_scores(scores)
    names = parse_classes(classes, available_classes(cfg))
    device = str(resolve_device(cfg.device))
    base = sweep_base(cfg)
    sweep_dir = Path(cfg.out_dir) / base
    entries, reports = [], []
    t_all = time.perf_counter()
    for i, cls in enumerate(names, 1):
        run_name = class_dir_name(cls)
        c_cfg = dataclasses.replace(cfg, id_class=cls, name=f"{base}/{run_name}")
        echo(f"[{i}/{len(names)}] class {cls}: training {sweep_dir / run_name}")
        what, seconds = train_or_reuse(c_cfg, progress)
        if what.endswith("non-zero rank"):
            continue
        report = None
        if what == "reused":
            report = reusable_report(
                sweep_dir / run_name / "eval" / "report.json", scores, k, False
            )
        if report is None:
            echo(f"[{i}/{len(names)}] class {cls}: {what}; evaluating")
            report = evaluate_run(
                sweep_dir / run_name,
                scores,
                k,
                device=cfg.device,
                batch_size=batch_size,
                progress=progress,
            )
        else:
            echo(f"[{i}/{len(names)}] class {cls}: finished before, report up to date")
        entry = _entry(cls, run_name, report)
        entry["budget"]["device"] = device
        if seconds is not None and what == "trained":
            entry["budget"].update(wall_time_s=round(seconds, 2), wall_time_source="measured")
        entries.append(entry)
        reports.append(report)
        aurocs = ", ".join(f"{n} {s['metrics']['AUROC']:.4f}" for n, s in report["scores"].items())
        echo(f"[{i}/{len(names)}] class {cls}: AUROC {aurocs}")
    meta = {
        "data": cfg.data,
        "protocol": cfg.protocol,
        "oe": cfg.oe,
        "scores": list(scores),
        "k": k,
        "device": device,
        "wall_time_s": round(time.perf_counter() - t_all, 2),
    }
    if not entries:
        return None  # a non-zero rank of a torchrun job: rank 0 writes the sweep
    sweep = _summary(sweep_dir, meta, entries, reports)
    write_sweep_report(sweep_dir, sweep)
    return sweep


def print_sweep(sweep: dict[str, Any] | None) -> None:
    """The per-class table on stdout, then where the files are."""
    if sweep is None:
        return
    click.echo(format_sweep_table(sweep))
    sweep_dir = Path(sweep["sweep_dir"])
    click.echo(f"sweep report: {sweep_dir / 'sweep.json'}, {sweep_dir / 'sweep.md'}")


def class_runs(path: str | Path) -> list[Path]:
    """The class runs of a sweep directory, in natural order of their names."""
    path = Path(path)
    if not path.is_dir():
        return []
    runs = [p for p in path.glob(CLASS_PREFIX + "*") if (p / "config.json").is_file()]

    def key(p: Path) -> tuple:
        rest = p.name[len(CLASS_PREFIX) :]
        return (0, int(rest), "") if rest.isdigit() else (1, 0, rest)

    return sorted(runs, key=key)


def is_sweep_dir(path: str | Path) -> bool:
    path = Path(path)
    return not (path / "config.json").exists() and bool(class_runs(path))


def reusable_report(
    report_path: Path, scores: Sequence[str], k: int, save_scores: bool
) -> dict | None:
    """A class's existing report, if it was made from its latest checkpoint with these options."""
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    run_dir = report_path.parent.parent
    found = checkpoint.list_checkpoints(run_dir / "checkpoints")
    ok = (
        bool(found)
        and report.get("checkpoint", {}).get("file") == found[-1].name
        and report.get("evaluation", {}).get("scores") == list(scores)
        and (report["evaluation"].get("k") == k or list(scores) == ["norm"])
        and (not save_scores or (report_path.parent / "scores.csv").is_file())
    )
    return report if ok else None


# evaluate_run's options, in its order, so that a sweep evaluates each class run as one run is.
def evaluate_sweep(
    sweep_dir: str | Path,
    scores: Sequence[str] | str = SCORES,
    k: int = 32,
    save_scores: bool = False,
    device: str = "auto",
    *,
    batch_size: int = 1024,
    progress: bool = False,
    echo: Callable[[str], None] = lambda m: click.echo(m, err=True),
) -> dict[str, Any]:
    """Evaluate every class run of a sweep (reusing reports made with the same options) and
    write the per-class table with the mean."""
    sweep_dir = Path(sweep_dir)
    scores = parse_scores(scores)
    runs = class_runs(sweep_dir)
    if not runs:
        raise EvalError(f"{sweep_dir}: not a sweep directory (no class-* runs)")
    previous = {}
    if (sweep_dir / "sweep.json").is_file():
        # Training wall times were measured by the sweep itself; keep them.
        old = json.loads((sweep_dir / "sweep.json").read_text())
        previous = {e["run_dir"]: e for e in old.get("per_class", [])}
    entries, reports, cfgs = [], [], []
    for i, run in enumerate(runs, 1):
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
        cfgs.append(cfg)
        report = reusable_report(run / "eval" / "report.json", scores, k, save_scores)
        if report is None:
            echo(f"[{i}/{len(runs)}] {run.name}: evaluating")
            report = evaluate_run(
                run, scores, k, save_scores, device, batch_size=batch_size, progress=progress
            )
        else:
            echo(f"[{i}/{len(runs)}] {run.name}: report up to date")
        entry = _entry(cfg.id_class, run.name, report)
        old_budget = previous.get(run.name, {}).get("budget", {})
        if old_budget.get("wall_time_source") == "measured":
            entry["budget"].update(
                {k_: old_budget[k_] for k_ in ("wall_time_s", "wall_time_source", "device")}
            )
        entries.append(entry)
        reports.append(report)

    def common(attr: str) -> str:
        values = {getattr(c, attr) for c in cfgs}
        return values.pop() if len(values) == 1 else "mixed"

    meta = {
        "data": common("data"),
        "protocol": common("protocol"),
        "oe": common("oe"),
        "scores": list(scores),
        "k": k,
        "device": reports[0]["evaluation"]["device"],
        "wall_time_s": None,
    }
    sweep = _summary(sweep_dir, meta, entries, reports)
    write_sweep_report(sweep_dir, sweep)
    return sweep
