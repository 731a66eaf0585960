"""`oecl train --oe auto`: the OE mix chosen per data set on validation, then trained to length.

Every candidate mix trains a short probe (its own run directory under RUN/probes/); each probe
is judged by the AUROC of the served score (mean-view-norm, the artifact's K views) of the
held-out ID-validation images against a validation set of anomalies. The probes run in two
rungs (successive halving): every candidate for a twelfth of the run, then the best two
continued to a third of it and judged again; the better of those is continued, as the run
itself, to the configured length. A probe is the first steps of that run, on the run's own
schedule (learning rate, α warm-up), paused with a checkpoint: a continued probe is the run
it would have been trained from scratch (one process), not a short run restarted longer.

Why two rungs: the near-OE families made from the ID images themselves (rotations above all)
learn fastest, so a decision taken early favours them over mixes that catch up later; a
first rung that only drops the clear losers lets the real decision come later at about the
same cost in steps as one rung of five at a sixth of the run.

What the candidates are judged on is `oecl_train.validation`'s: known anomalies, else the other
classes' training images, else held-out synthetic shifts (each candidate on the families of
shifts it did not train with).

Interrupted anywhere, the run continues with `oecl train --resume RUN`: finished probes are
kept with their figures (RUN/oe_auto.json), a stopped probe or continuation resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oecl_runtime.atomic import write_json
from oecl_train.config import DEFAULT_STEPS, NEAR_OE_SHARES, TrainConfig
from oecl_train.report import choice_table
from oecl_train.validation import JUDGED_ON, judge, validation_sets

# name -> (settings over the far source, the shift families it trains with). A small set:
# the far source alone, each self-made near-OE as half of it, and self-OECL's rotations.
CANDIDATES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "far": ({}, ()),
    "far+overlay": ({"oe_overlay": 0.5}, ("overlay",)),
    "far+jigsaw": ({"oe_jigsaw": 0.5}, ("jigsaw",)),
    "far+cutpaste": ({"oe_cutpaste": 0.5}, ("cutpaste",)),
    "self": ({"oe": "self"}, ("rotation",)),
}
FIRST_RUNG_SHARE = 1 / 12  # the first rung's share of the run's steps, by default
RUNG_GROWTH = 4  # the second rung is this many times as long as the first
KEEP = 2  # candidates continued to the second rung
RECORD = "oe_auto.json"


def rung_steps(first: int, steps: int) -> list[int]:
    """The probe lengths of the rungs: the second only where it ends before the run does."""
    second = first * RUNG_GROWTH
    return [first, second] if second < steps else [first]


def probe_config(cfg: TrainConfig, name: str, steps: int) -> TrainConfig:
    """The config of candidate `name`'s probe: cfg with the candidate's OE, on the schedule of
    the whole run (`steps` long), in RUN/probes/NAME."""
    return dataclasses.replace(cfg, name=f"{cfg.run_name()}/probes/{name}",
                               **mix_settings(cfg, name), steps=steps, epochs=None,
                               oe_auto=None, select="last")


def mix_settings(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """The OE fields of candidate `name` (the far source is cfg.oe_far)."""
    settings, _ = CANDIDATES[name]
    out: dict[str, Any] = {"oe": cfg.oe_far, "oe_root": cfg.oe_root,
                           **dict.fromkeys(NEAR_OE_SHARES, 0.0)}
    out.update(settings)
    if out["oe"] == "self":
        out["oe_root"] = None
    return out


def total_steps(cfg: TrainConfig, n_id: int) -> int:
    """The run's length in steps, as the Trainer counts it (one process)."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return cfg.epochs * max(1, math.ceil(n_id / cfg.batch_size))
    return DEFAULT_STEPS


def judged_sets(kind: str, name: str, sets: dict[str, np.ndarray]) -> list[str]:
    """The sets candidate `name` is judged on: under held-out shifts, those it did not train
    with; otherwise all."""
    if kind != "held-out-shifts":
        return list(sets)
    return [f for f in sets if f not in CANDIDATES[name][1]]


# -- the run --------------------------------------------------------------------------------------


def run_auto(
    cfg: TrainConfig,
    *,
    resume: bool,
    progress: bool,
    quick_eval: bool,
    echo: Callable[[str], None],
    train: Callable[..., dict[str, Any]],
    warn_threshold: bool = True,
) -> dict[str, Any]:
    """Probe every candidate, choose on validation, continue the chosen probe as the run:
    one ordinary run resumed by `train` (`training.run_training`, which calls this)."""
    from oecl_train.data import Splits
    from oecl_train.distributed import torchrun_environment
    from oecl_train.trainer import TrainingInterrupted

    if torchrun_environment() is not None:
        raise ValueError("--oe auto trains its probes in one process; run it without torchrun")
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    splits = Splits.from_config(cfg, oe=cfg.oe_far, progress=progress)
    steps = total_steps(cfg, len(splits.id_train))
    first = cfg.oe_probe_steps or max(1, round(steps * FIRST_RUNG_SHARE))
    if first >= steps:
        raise ValueError(f"--oe-probe-steps ({first}) must be below the run's length "
                         f"({steps} steps)")
    rungs = rung_steps(first, steps)
    kind, sets, why = validation_sets(cfg, splits, progress)  # bad input fails before a write
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_json())  # what `--resume RUN` continues
    saved = _read_record(run_dir) if resume else {}
    record: dict[str, Any] = {
        "judged_on": kind,
        "judged_on_text": JUDGED_ON[kind],
        "why": why,
        "score": "mean-view-norm AUROC, ID-validation images positive",
        "n_val_id": int(len(splits.id_val)),
        "n_val_ood": {k: int(len(v)) for k, v in sets.items()},
        "rung_steps": rungs,
        "keep": KEEP,
        "probe_steps": rungs[-1],  # where the choice is made
        "steps": steps,
        "candidates": {},
    }
    # Probes of another record (other rungs, other judge, or an older layout whose probes
    # were short runs of their own) are trained afresh, not resumed.
    same = not saved or (saved.get("judged_on") == kind and saved.get("rung_steps") == rungs)
    if saved and same:
        record["candidates"] = saved.get("candidates", {})
    # Self-OECL trains on quarter turns, which keep the shape of square images only.
    names = [n for n in CANDIDATES if n != "self" or splits.spec.height == splits.spec.width]
    echo(f"--oe auto: {len(names)} candidates, probes of {rungs[0]} steps"
         + (f", the best {KEEP} continued to {rungs[1]}" if len(rungs) > 1 else "")
         + f"; judged on {JUDGED_ON[kind]} ({why})")
    for i, rung in enumerate(rungs):
        if i:
            names = _best(record, names, rungs[i - 1], KEEP)
        for name in names:
            figures = record["candidates"].get(name, {}).get("rungs", {})
            if str(rung) in figures:
                continue
            try:
                record["candidates"][name] = _probe(
                    cfg, name, rung, steps, splits, sets, kind, (resume and same) or i > 0,
                    progress,
                    record["candidates"].get(name))
            except TrainingInterrupted as e:
                raise TrainingInterrupted(
                    f"stopped in the probe of {name}; continue with: oecl train --resume "
                    f"{run_dir}", e.exit_code - 128) from None
            write_json(run_dir / RECORD, record)
    record["chosen"] = _best(record, names, rungs[-1], 1)[0]
    record["cost"] = _cost(record)
    write_json(run_dir / RECORD, record)
    for line in choice_table(record).splitlines():
        echo(line)
    chosen = dataclasses.replace(cfg, **mix_settings(cfg, record["chosen"]), name=cfg.run_name(),
                                 oe_auto=record)
    _adopt_probe(run_dir, record["chosen"])
    result = train(chosen, resume=True, progress=progress, quick_eval=quick_eval, extend=True,
                   warn_threshold=warn_threshold, echo=echo)
    result["oe_auto"] = record
    return result


def _best(record: dict[str, Any], names: list[str], rung: int, n: int) -> list[str]:
    """The `n` best of `names` by their figure at `rung` (ties: the earlier candidate)."""
    figure = {name: record["candidates"][name]["rungs"][str(rung)] for name in names}
    return sorted(names, key=lambda name: -figure[name])[:n]


def _probe(cfg: TrainConfig, name: str, probe_steps: int, steps: int, splits, sets,
           kind: str, resume: bool, progress: bool, before: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """Train (or resume, or continue from an earlier rung) one candidate's probe to
    `probe_steps` of the `steps`-long run and judge it; `before` is its record from the
    earlier rung."""
    from oecl_train import checkpoint
    from oecl_train.trainer import Trainer

    pcfg = probe_config(cfg, name, steps)
    psplits = splits
    if pcfg.oe == "self":
        psplits = dataclasses.replace(splits, oe=None, oe_mode="self")
    run_dir = Path(pcfg.out_dir) / pcfg.run_name()
    trainer = Trainer(pcfg, psplits, run_dir, progress=progress)
    trainer.stop_at = probe_steps
    if resume and checkpoint.list_checkpoints(run_dir / "checkpoints"):
        trainer.resume()
    else:  # a probe started afresh: nothing of an earlier one may be taken for it
        for old in (run_dir / "checkpoints").glob("epoch-*"):
            old.unlink()
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    if trainer.start_step < probe_steps:
        trainer.fit()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    names = judged_sets(kind, name, sets)
    per_set = judge(trainer.net, pcfg, splits, {k: sets[k] for k in names}, trainer.device)
    val_auroc = float(np.mean(list(per_set.values())))
    earlier = before or {}
    return {
        "settings": {k: v for k, v in mix_settings(cfg, name).items()
                     if k == "oe" or (v and k != "oe_root")},
        "judged_on_sets": names,
        "per_set": per_set,
        "val_auroc": val_auroc,  # at its last rung
        "rungs": {**earlier.get("rungs", {}), str(probe_steps): val_auroc},
        "probe_steps": probe_steps,
        "probe_train_s": round(earlier.get("probe_train_s", 0.0) + train_s, 2),
        "judge_s": round(earlier.get("judge_s", 0.0) + time.perf_counter() - t0, 2),
        "run_dir": str(run_dir),
    }


def _cost(record: dict[str, Any]) -> dict[str, Any]:
    c = record["candidates"]
    total = sum(x["probe_steps"] for x in c.values())
    # Steps beyond one run of the configured length: the probes not continued.
    extra = total - c[record["chosen"]]["probe_steps"]
    return {
        "probe_train_s": round(sum(x["probe_train_s"] for x in c.values()), 2),
        "judge_s": round(sum(x["judge_s"] for x in c.values()), 2),
        "probe_steps_total": total,
        "extra_steps": extra,
        "extra_share": round(extra / record["steps"], 4),
    }


def _adopt_probe(run_dir: Path, name: str) -> None:
    """Make the chosen probe the run: its checkpoints and epoch log into RUN, unless the
    continuation already started (it rewrites RUN/config.json with the concrete mix)."""
    if json.loads((run_dir / "config.json").read_text()).get("oe") != "auto":
        return
    probe = run_dir / "probes" / name
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        for old in [*ckpts.glob("epoch-*"), *ckpts.glob("best.*")]:
            old.unlink()  # a stale run under the same name, never this run's continuation
    ckpts.mkdir(exist_ok=True)
    # Tensors first, JSON last: a checkpoint counts once its JSON is there.
    for suffix in (".safetensors", ".json"):
        for src in sorted((probe / "checkpoints").glob(f"epoch-*{suffix}")):
            tmp = ckpts / f".{src.name}.tmp"
            shutil.copy2(src, tmp)
            tmp.replace(ckpts / src.name)
    if (probe / "metrics.jsonl").exists():
        shutil.copy2(probe / "metrics.jsonl", run_dir / ".metrics.jsonl.tmp")
        (run_dir / ".metrics.jsonl.tmp").replace(run_dir / "metrics.jsonl")


def as_saved(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """An `--oe auto` config as its run saved it once the choice was made (the chosen mix and
    the record), so a finished auto run is compared, reused or extended like any other."""
    path = run_dir / "config.json"
    if cfg.oe != "auto" or not path.exists():
        return cfg
    try:
        record = json.loads(path.read_text()).get("oe_auto") or {}
    except (OSError, ValueError):
        return cfg
    if "chosen" not in record:
        return cfg  # stopped during the probes: training resumes them
    return dataclasses.replace(cfg, **mix_settings(cfg, record["chosen"]), oe_auto=record)


def _read_record(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}
