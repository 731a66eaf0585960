"""`oecl train --oe auto`: the OE mix chosen per data set on validation, then trained to length.

Every candidate mix trains a short probe (its own run directory under RUN/probes/); each probe
is judged by the AUROC of the served score (mean-view-norm, the artifact's K views) of the
held-out ID-validation images against a validation set of anomalies; only the chosen probe is
continued, as the run itself, to the configured length (its probe steps are kept, so its
cosine schedule is stretched from where the probe stopped, as `--resume RUN --steps N` does).

What the candidates are judged on, the first that applies:
1. `--val-ood DIR`: the user's known anomalies.
2. The other classes' *training* images of a labelled ID source (one-vs-rest: every other
   class; leave-one-out: the held-out class), never test images.
3. Held-out synthetic shifts of the ID-validation images: each candidate on the families of
   shifts it did not train with, so a user with normal images alone still gets a choice.

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

# name -> (settings over the far source, the shift families it trains with). A small set:
# the far source alone, each self-made near-OE as half of it, and self-OECL's rotations.
CANDIDATES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "far": ({}, ()),
    "far+overlay": ({"oe_overlay": 0.5}, ("overlay",)),
    "far+jigsaw": ({"oe_jigsaw": 0.5}, ("jigsaw",)),
    "far+cutpaste": ({"oe_cutpaste": 0.5}, ("cutpaste",)),
    "self": ({"oe": "self"}, ("rotation",)),
}
FAMILIES = ("rotation", "overlay", "jigsaw", "cutpaste")
PROBE_SHARE = 1 / 6  # a probe's share of the run's steps, by default
MAX_VAL_OOD = 2000  # validation anomalies scored per candidate, at most (a seeded sample)
JUDGED_ON = {
    "val-ood": "the known anomalies of --val-ood",
    "other-classes": "the other classes' training images (never test images)",
    "held-out-shifts": "held-out synthetic shifts of the ID-validation images, each candidate "
    "on the families it did not train with",
}
RECORD = "oe_auto.json"


def probe_config(cfg: TrainConfig, name: str, probe_steps: int) -> TrainConfig:
    """The config of candidate `name`'s probe: cfg with the candidate's OE, `probe_steps`
    long, in RUN/probes/NAME."""
    return dataclasses.replace(cfg, name=f"{cfg.run_name()}/probes/{name}",
                               **mix_settings(cfg, name), steps=probe_steps, epochs=None,
                               oe_auto=None)


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


# -- what the candidates are judged on ----------------------------------------------------------


def shifted(family: str, images: np.ndarray, seed: int) -> np.ndarray:
    """A synthetic shift of every image (uint8 NCHW), repeatable from `seed`."""
    import torch

    from oecl_train.augment import cutpaste, jigsaw, overlay, rotate

    x = torch.from_numpy(np.ascontiguousarray(images))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "rotation":
            # Quarter turns keep the shape only for square images; others turn by 180°.
            square = x.shape[2] == x.shape[3]
            turns = torch.randint(1, 4, (len(x),)) if square else torch.full((len(x),), 2)
            out = x.clone()
            for q in (1, 2, 3):
                pick = turns == q
                if pick.any():
                    out[pick] = rotate(x[pick], q)
        elif family == "overlay":
            out = overlay(x, x[torch.randperm(len(x))])
        elif family == "jigsaw":
            out = jigsaw(x)
        elif family == "cutpaste":
            out = cutpaste(x)
        else:
            raise ValueError(f"unknown shift family {family!r}")
    return out.numpy()


def _sample(images: np.ndarray, seed: int) -> np.ndarray:
    if len(images) <= MAX_VAL_OOD:
        return images
    pick = np.random.default_rng(seed).choice(len(images), MAX_VAL_OOD, replace=False)
    return images[np.sort(pick)]


def validation_sets(
    cfg: TrainConfig, splits, progress: bool | None = None
) -> tuple[str, dict[str, np.ndarray], str]:
    """What the candidates are judged on: (kind, {set name: OOD images}, why this kind)."""
    from oecl_train.data import DataError, Splits
    from oecl_train.data.readers import FolderReader, conform

    if cfg.val_ood:
        reader = FolderReader(cfg.val_ood, splits.spec, cfg.strict, seed=cfg.seed,
                              channels=splits.spec.channels, progress=progress)
        images = conform(reader.load_all().images, splits.spec)
        return "val-ood", {"val-ood": _sample(images, cfg.seed)}, "--val-ood given"
    far_is_id_source = cfg.oe_far == cfg.data and cfg.oe_root in (None, cfg.data_root)
    if far_is_id_source:
        why = "the far OE is the ID source's other classes, so they cannot judge it"
    else:
        try:
            other = Splits.from_config(cfg, oe=cfg.data, oe_root=None, progress=progress).oe
            return "other-classes", {"other-classes": _sample(other, cfg.seed)}, (
                f"{cfg.data} is labelled with other classes than the ID ones")
        except DataError:
            why = "no --val-ood and no other labelled training classes"
    sets = {f: shifted(f, splits.id_val, cfg.seed + i) for i, f in enumerate(FAMILIES)}
    return "held-out-shifts", sets, why


def judge(net, cfg: TrainConfig, splits, sets: dict[str, np.ndarray], device) -> dict[str, float]:
    """AUROC (ID positive) of the served score: ID-validation images against each set."""
    from oecl_model.views import views_for
    from oecl_train.evaluate import eval_precision
    from oecl_train.metrics import ood_metrics
    from oecl_train.scores import view_scores
    from oecl_train.view_count import view_count

    views = views_for(cfg, splits.spec.height, splits.spec.width, view_count())
    kw = dict(device=device, precision=eval_precision(cfg, device))
    s_id = view_scores(net, splits.id_val, views, **kw)
    out = {}
    for name, images in sets.items():
        s_ood = view_scores(net, images, views, **kw)
        is_id = np.r_[np.ones(len(s_id), bool), np.zeros(len(s_ood), bool)]
        out[name] = float(ood_metrics(np.r_[s_id, s_ood], is_id)["AUROC"])
    return out


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
    probe_steps = cfg.oe_probe_steps or max(1, round(steps * PROBE_SHARE))
    if probe_steps >= steps:
        raise ValueError(f"--oe-probe-steps ({probe_steps}) must be below the run's length "
                         f"({steps} steps)")
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
        "probe_steps": probe_steps,
        "steps": steps,
        "candidates": {},
    }
    if saved.get("judged_on") == kind and saved.get("probe_steps") == probe_steps:
        record["candidates"] = saved.get("candidates", {})
    # Self-OECL trains on quarter turns, which keep the shape of square images only.
    names = [n for n in CANDIDATES if n != "self" or splits.spec.height == splits.spec.width]
    echo(f"--oe auto: {len(names)} candidates, {probe_steps}-step probes, judged on "
         f"{JUDGED_ON[kind]} ({why})")
    for name in names:
        if name in record["candidates"]:
            continue
        try:
            record["candidates"][name] = _probe(cfg, name, probe_steps, splits, sets, kind,
                                                resume, progress)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(
                f"stopped in the probe of {name}; continue with: oecl train --resume {run_dir}",
                e.exit_code - 128) from None
        write_json(run_dir / RECORD, record)
    figures = {n: record["candidates"][n]["val_auroc"] for n in names}
    record["chosen"] = max(names, key=lambda n: figures[n])  # ties: the earlier candidate
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


def _probe(cfg: TrainConfig, name: str, probe_steps: int, splits, sets, kind: str,
           resume: bool, progress: bool) -> dict[str, Any]:
    """Train (or resume) one candidate's probe and judge it."""
    from oecl_train import checkpoint
    from oecl_train.trainer import Trainer

    pcfg = probe_config(cfg, name, probe_steps)
    psplits = splits
    if pcfg.oe == "self":
        psplits = dataclasses.replace(splits, oe=None, oe_mode="self")
    run_dir = Path(pcfg.out_dir) / pcfg.run_name()
    trainer = Trainer(pcfg, psplits, run_dir, progress=progress)
    if resume and checkpoint.list_checkpoints(run_dir / "checkpoints"):
        trainer.resume()
    else:  # a probe started afresh: nothing of an earlier one may be taken for it
        for old in (run_dir / "checkpoints").glob("epoch-*"):
            old.unlink()
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    if trainer.start_step < trainer.total_steps:
        trainer.fit()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    names = judged_sets(kind, name, sets)
    per_set = judge(trainer.net, pcfg, splits, {k: sets[k] for k in names}, trainer.device)
    return {
        "settings": {k: v for k, v in mix_settings(cfg, name).items()
                     if k == "oe" or (v and k != "oe_root")},
        "judged_on_sets": names,
        "per_set": per_set,
        "val_auroc": float(np.mean(list(per_set.values()))),
        "probe_train_s": round(train_s, 2),
        "judge_s": round(time.perf_counter() - t0, 2),
        "run_dir": str(run_dir),
    }


def _cost(record: dict[str, Any]) -> dict[str, Any]:
    c = record["candidates"].values()
    n, probe, steps = len(record["candidates"]), record["probe_steps"], record["steps"]
    return {
        "probe_train_s": round(sum(x["probe_train_s"] for x in c), 2),
        "judge_s": round(sum(x["judge_s"] for x in c), 2),
        "probe_steps_total": n * probe,
        # Steps beyond one run of the configured length: the probes not continued.
        "extra_steps": (n - 1) * probe,
        "extra_share": round((n - 1) * probe / steps, 4),
    }


def _adopt_probe(run_dir: Path, name: str) -> None:
    """Make the chosen probe the run: its checkpoints and epoch log into RUN, unless the
    continuation already started (it rewrites RUN/config.json with the concrete mix)."""
    if json.loads((run_dir / "config.json").read_text()).get("oe") != "auto":
        return
    probe = run_dir / "probes" / name
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        for old in ckpts.glob("epoch-*"):
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
