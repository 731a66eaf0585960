"""Training one run as a library call: its config from options (or from the run it resumes),
then splits, training and the quick test-set AUROC. `oecl train`, sweeps, the quickstart and
the benchmarks all train through `run_training`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from torch.distributed.elastic.multiprocessing.errors import record

from oecl_model.views import views_for
from oecl_train import checkpoint
from oecl_train.config import TrainConfig, read_config_file
from oecl_train.data import Splits
from oecl_train.distributed import distributed_context, torchrun_environment
from oecl_train.metrics import (
    FEW_THRESHOLD_IMAGES,
    ood_metrics,
    per_class_metrics,
    threshold_warning,
)
from oecl_train.rundir import require_run_dir
from oecl_train.score_names import served_score
from oecl_train.scores import compute_scores
from oecl_train.selection import selection_summary
from oecl_train.trainer import Trainer
from oecl_train.view_count import view_count

# Options `--resume` may change: where and how it runs, and how long (--steps / --epochs).
RESUME_OPTIONS = (
    "device", "steps", "epochs", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
    "dist_timeout",
)


def build_config(options: dict[str, Any], config_file: str | None) -> TrainConfig:
    """Defaults < config file < explicit CLI options."""
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    for k, v in options.items():
        if v is None:
            continue
        default = getattr(TrainConfig(), k)
        if isinstance(default, tuple):
            try:
                v = tuple(float(p) for p in str(v).split(","))
            except ValueError:
                raise ValueError(f"--{k.replace('_', '-')} takes comma-separated numbers") from None
            if len(v) != len(default):
                raise ValueError(f"--{k.replace('_', '-')} takes {len(default)} numbers")
        values[k] = v
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    return cfg


def resume_config(
    run: str, options: dict[str, Any], config_file: str | None
) -> tuple[TrainConfig, bool]:
    """The run's own config for `--resume RUN`, with the options a resume may change; and
    whether --steps / --epochs give the run a new length."""
    require_run_dir(run, checkpoint_needed=False)
    given = sorted(k for k, v in options.items() if v is not None and k not in RESUME_OPTIONS)
    if given or config_file:
        flags = [f"--{k.replace('_', '-')}" for k in given] + (["--config"] if config_file else [])
        raise ValueError(
            f"--resume continues {run} with its own settings; {', '.join(flags)} cannot change "
            "them (start a new run, or give only --steps/--epochs to extend it)"
        )
    cfg = TrainConfig.from_dict(json.loads((Path(run) / "config.json").read_text()))
    cfg.out_dir, cfg.name = str(Path(run).parent), Path(run).name
    if options.get("steps") is not None and options.get("epochs") is not None:
        raise ValueError("give --epochs or --steps, not both")
    extend = False
    if options.get("steps") is not None:
        cfg.steps, cfg.epochs, extend = options["steps"], None, True
    elif options.get("epochs") is not None:
        cfg.epochs, cfg.steps, extend = options["epochs"], None, True
    for k in RESUME_OPTIONS:
        if k not in ("steps", "epochs") and options.get(k) is not None:
            setattr(cfg, k, options[k])
    cfg.validate()
    return cfg, extend


def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    quick_eval: bool = True,
    extend: bool = False,
    warn_threshold: bool = True,
    echo: Callable[[str], None] = lambda m: click.echo(m, err=True),
) -> dict[str, Any]:
    """Build the splits, train (or resume), and report the test-split metrics of the score an
    export of the run serves (`served_test_metrics`).

    `extend` (with `resume`): cfg's --steps / --epochs are the run's new length. A resumed run
    that is already that long is not trained or evaluated again: the result says it is
    complete. `echo` takes the warnings and the resume line. `warn_threshold`: say, before
    training, when the threshold `oecl eval` and `oecl export` will set rests on too few
    ID-validation images (the one place the warning is printed: the place it can be acted on).

    Under torchrun every rank runs this; it trains data-parallel and only rank 0 evaluates.
    """
    if cfg.oe == "auto":
        from oecl_train.oe_auto import run_auto

        return run_auto(cfg, resume=resume, progress=progress, quick_eval=quick_eval, echo=echo,
                        warn_threshold=warn_threshold, train=run_training)
    kw = dict(resume=resume, progress=progress, quick_eval=quick_eval, extend=extend,
              warn_threshold=warn_threshold, echo=echo)
    if torchrun_environment() is None:
        return _run_training(cfg, **kw)
    # torchrun's error handling: an exception here is written to the error file its agent
    # reports as the job's root cause. Only under torchrun: `record` also re-routes
    # faulthandler, which a plain process (or a test runner) should keep as it is.
    return record(_run_training)(cfg, **kw)


def _run_training(
    cfg: TrainConfig,
    *,
    resume: bool,
    progress: bool,
    quick_eval: bool,
    extend: bool,
    warn_threshold: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    splits = Splits.from_config(cfg, progress=progress)
    if warn_threshold and not resume:
        few = few_validation_images(splits, cfg)
        if few:
            echo(f"warning: {few}")
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    with distributed_context(cfg.device, cfg.dist_timeout) as dist:
        trainer = Trainer(cfg, splits, run_dir, dist=dist, progress=progress)
        if resume:
            epoch = trainer.resume(extend=extend)
            if trainer.start_step >= trainer.total_steps:
                return {
                    "run_dir": str(run_dir),
                    "complete": True,
                    "steps": trainer.start_step,
                    "note": f"{run_dir} is complete ({trainer.start_step} steps"
                    + (f"; --steps {cfg.steps} asks for no more" if extend and cfg.steps else "")
                    + f"); extend it with: oecl train --resume {run_dir} --steps N "
                    f"(N > {trainer.start_step}), or evaluate it with: oecl eval {run_dir}",
                    **({"rank": dist.rank} if dist.rank else {}),
                }
            if dist.rank == 0:
                echo(
                    f"resuming {run_dir} at epoch {epoch} of {trainer.epochs} "
                    f"(step {trainer.start_step} of {trainer.total_steps})"
                )
        last = trainer.fit()
    result = {"run_dir": str(run_dir), "final": last, "skipped_images": splits.skipped}
    if dist.world > 1:
        result["world_size"] = dist.world
    if dist.rank != 0:
        # The process group is gone: rank 0 evaluates alone and the others just exit, so a
        # long evaluation cannot run into the collective timeout.
        result["rank"] = dist.rank
        return result
    selected = selection_summary(run_dir) if trainer.selection is not None else None
    if selected is not None:
        result["selected"] = selected
        echo(selected_line(selected))
        checkpoint.load(checkpoint.model_checkpoint(run_dir), trainer.net, None, trainer.device)
        trainer.net.eval()
    if quick_eval:
        # K forward passes per image: on a CPU a large test split takes a while, so say so.
        echo(f"scoring the test split ({len(splits.test_images)} images over {view_count()} "
             "views, the served score) ...")
        result["test"] = served_test_metrics(trainer.net, splits, cfg, trainer.device,
                                             trainer.execution.precision)
    return result


def served_test_metrics(
    net, splits: Splits, cfg: TrainConfig, device, precision: str
) -> dict[str, Any]:
    """Metrics on the whole test split of the score `oecl export` serves by default
    (mean-view-norm over `view_count()` views; `oecl eval` reports the same number), at the
    run's `precision` (as it ran), overall and per OOD class."""
    k = view_count()
    name = served_score(k)
    views = views_for(cfg, splits.spec.height, splits.spec.width, k)
    s = compute_scores(net, splits.test_images, scores=(name,), views=views, device=device,
                       precision=precision)[name]
    is_id = splits.test_is_id
    return {
        "score": f"{name} (higher = normal)",
        "views": k,
        "images": f"whole test split: {int(is_id.sum())} ID + {int((~is_id).sum())} OOD",
        **ood_metrics(s, is_id),
        "per_ood_class": {
            c: m["AUROC"]
            for c, m in per_class_metrics(s, is_id, splits.test_labels, splits.classes).items()
        },
    }


def few_validation_images(splits: Splits, cfg: TrainConfig, tpr: float = 0.95) -> str | None:
    """The warning for a threshold on too few ID-validation images, with the --val-fraction
    that would hold out enough of them (when the ID class is large enough to spare them)."""
    warning = threshold_warning(len(splits.id_val), tpr)
    if warning is None:
        return None
    n_id = len(splits.id_val) + len(splits.id_train)
    needed = FEW_THRESHOLD_IMAGES / max(n_id, 1)
    if needed <= 0.5 and needed > cfg.val_fraction:
        fraction = math.ceil(needed * 100) / 100
        warning += f" (--val-fraction {fraction:g} holds out {round(fraction * n_id)})"
    return warning


def selected_line(selected: dict[str, Any]) -> str:
    """One line on the checkpoint `--select val` made the run's model."""
    last = selected.get("last")
    tail = (f"; the last, step {last['step']}, scored {last['val_auroc']:.3f}"
            if last and last["step"] != selected["step"] else "")
    return (f"model: the checkpoint at step {selected['step']} of {selected['total_steps']}, "
            f"validation AUROC {selected['val_auroc']:.3f} on {selected['judged_on_text']}, the "
            f"best of {selected['checkpoints_judged']} judged{tail} (--select last keeps the "
            "last)")

