"""The `oecl` command. Verbs are imported only when called, so `oecl --help` stays instant
and `oecl score/serve/bench` never import torch."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from oecl_runtime.verbs import RUNTIME_VERBS, VerbGroup

# verb -> (module, attribute of its click command, short help): training's, then the runtime's
VERBS = {
    "quickstart": (
        "oecl_train.quickstart",
        "quickstart",
        "Train OECL on bundled digits and report AUROC.",
    ),
    "train": ("oecl_train.cli", "train", "Train an OECL / self-OECL / SimCLR model."),
    "eval": ("oecl_train.evaluate_cli", "eval_cmd", "Evaluate a run: scores, OOD metrics, plots."),
    "export": (
        "oecl_train.export_cli",
        "export_cmd",
        "Export a run to ONNX / TensorRT + oecl.json.",
    ),
    **RUNTIME_VERBS,
}


class LazyGroup(VerbGroup):
    verbs = VERBS


def version_text() -> str:
    """oecl's version and what decides where it runs: torch and its CUDA, onnxruntime."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("oecl")
    except PackageNotFoundError:  # run from a checkout that is not installed
        from oecl_runtime import __version__ as ours
    lines = [f"oecl {ours}"]
    try:
        import torch

        if torch.cuda.is_available():
            gpus = f"{torch.cuda.device_count()} GPU(s), {torch.cuda.get_device_name(0)}"
        else:
            gpus = "no GPU visible"
        lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; {gpus})")
    except ImportError:
        lines.append("torch: not installed (oecl train/eval/export need it; scoring does not)")
    try:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
        lines.append(f"onnxruntime {onnxruntime.__version__} ({providers})")
    except ImportError:
        lines.append("onnxruntime: not installed")
    return "\n".join(lines)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show oecl's, torch's (CUDA) and onnxruntime's "
              "versions and exit.")
def main() -> None:
    """oecl: out-of-distribution detection by the feature norm of contrastive networks (OECL).

    Score direction everywhere: norm, higher = normal.
    """


def user_errors() -> tuple[type[BaseException], ...]:
    from oecl_train.checkpoint import CheckpointError
    from oecl_train.data import DataError
    from oecl_train.trainer import TrainingDiverged

    return (ValueError, DataError, CheckpointError, TrainingDiverged, FileNotFoundError)


def _field_type(f: dataclasses.Field) -> tuple[Any, bool]:
    """click type for a TrainConfig field, and whether it is a boolean flag."""
    text = str(f.type)  # annotations are strings under `from __future__ import annotations`
    if text.startswith("bool"):
        return bool, True
    if text.startswith("tuple"):
        return str, False  # "lo,hi" lists
    if text.startswith("int"):
        return int, False
    if text.startswith("float"):
        return float, False
    return str, False


def config_options(fn):
    """Add one CLI option per TrainConfig field, with the field's help and default."""
    from oecl_train.config import TrainConfig

    defaults = TrainConfig()
    for f in reversed(dataclasses.fields(TrainConfig)):
        tp, is_flag = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if default not in (None, ""):
            # None and "" mean "derived": the help text itself says what from.
            help_text += f" [default: {shown}]"
        if is_flag:
            decl = f"{flag}/--no-{f.name.replace('_', '-')}"
            fn = click.option(decl, f.name, default=None, help=help_text)(fn)
        else:
            fn = click.option(flag, f.name, type=tp, default=None, help=help_text)(fn)
    return fn


def build_config(options: dict[str, Any], config_file: str | None):
    """Defaults < config file < explicit CLI options."""
    from oecl_train.config import TrainConfig, read_config_file

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


def run_training(
    cfg,
    *,
    resume: bool = False,
    progress: bool = True,
    quick_eval: bool = True,
    extend: bool = False,
) -> dict[str, Any]:
    """Build the splits, train (or resume), and report the plain-norm AUROC on the test set.

    `extend` (with `resume`): cfg's --steps / --epochs are the run's new length. A resumed run
    that is already that long is not trained or evaluated again: the result says it is
    complete.

    Under torchrun every rank runs this; it trains data-parallel and only rank 0 evaluates.
    """
    from oecl_train.distributed import torchrun_environment

    kw = dict(resume=resume, progress=progress, quick_eval=quick_eval, extend=extend)
    if torchrun_environment() is None:
        return _run_training(cfg, **kw)
    # torchrun's error handling: an exception here is written to the error file its agent
    # reports as the job's root cause. Only under torchrun: `record` also re-routes
    # faulthandler, which a plain process (or a test runner) should keep as it is.
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run_training)(cfg, **kw)


def _run_training(
    cfg, *, resume: bool, progress: bool, quick_eval: bool, extend: bool = False
) -> dict[str, Any]:
    from oecl_train.data import Splits
    from oecl_train.distributed import distributed_context
    from oecl_train.trainer import Trainer

    splits = Splits.from_config(cfg, progress=progress)
    from oecl_train.metrics import threshold_warning

    warning = threshold_warning(len(splits.id_val), 0.95)
    if warning:
        click.echo(f"warning: {warning}", err=True)
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
                click.echo(
                    f"resuming {run_dir} at epoch {epoch} of {trainer.epochs} "
                    f"(step {trainer.start_step} of {trainer.total_steps})",
                    err=True,
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
    if quick_eval:
        from oecl_train.metrics import ood_metrics, per_class_metrics
        from oecl_train.scores import compute_scores

        s = compute_scores(
            trainer.net,
            splits.test_images,
            scores=("norm",),
            device=trainer.device,
            precision=cfg.precision,
        )["norm"]
        result["test"] = {
            "score": "norm (higher = normal)",
            **ood_metrics(s, splits.test_is_id),
            "per_ood_class": {
                c: m["AUROC"]
                for c, m in per_class_metrics(
                    s, splits.test_is_id, splits.test_labels, splits.classes
                ).items()
            },
        }
    return result


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML, YAML or JSON file of options (CLI options override it).",
)
@click.option(
    "--resume",
    "resume_run",
    type=click.Path(file_okay=False),
    help="Continue the run in this directory from its latest checkpoint.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress bars on stderr (default: only when stderr is a terminal).",
)
@click.option(
    "--classes",
    default=None,
    help="Sweep: one run per class ('all' or e.g. '0,3,5'; the class is ID for one-vs-rest, "
    "held out for leave-one-out) under OUT_DIR/NAME/class-<k>, each evaluated, then a "
    "per-class table with the mean in OUT_DIR/NAME/sweep.json and sweep.md.",
)
@config_options
def train(
    config_file: str | None,
    resume_run: str | None,
    progress: bool | None,
    classes: str | None,
    **options,
) -> None:
    """Train an OECL model. --oe none = SimCLR, self = self-OECL, photos/<source> = OECL.

    Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and exits non-zero;
    `--resume RUN` continues from it, and `--resume RUN --steps N` extends a finished run.
    """
    from oecl_train.data.readers import progress_enabled
    from oecl_train.trainer import TrainingInterrupted

    progress = progress_enabled(progress)
    try:
        if classes is not None:
            if resume_run:
                raise ValueError("--classes and --resume do not combine; rerun the sweep instead")
            from oecl_train.sweep import print_sweep, run_sweep

            print_sweep(run_sweep(build_config(options, config_file), classes, progress=progress))
            return
        extend = False
        if resume_run:
            cfg, extend = resume_config(resume_run, options, config_file)
        else:
            cfg = build_config(options, config_file)
        result = run_training(cfg, resume=bool(resume_run), progress=progress, extend=extend)
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        raise SystemExit(e.exit_code) from None
    except user_errors() as e:
        raise click.ClickException(str(e)) from None
    print_result(result)


# Options `--resume` may change: where and how it runs, and how long (--steps / --epochs).
RESUME_OPTIONS = (
    "device", "steps", "epochs", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
    "dist_timeout",
)


def resume_config(
    run: str, options: dict[str, Any], config_file: str | None
) -> tuple[Any, bool]:
    """The run's own config for `--resume RUN`, with the options a resume may change; and
    whether --steps / --epochs give the run a new length."""
    from oecl_train.config import TrainConfig
    from oecl_train.rundir import require_run_dir

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


def print_result(result: dict) -> None:
    if result.get("rank", 0) != 0:
        return  # under torchrun, rank 0 reports for the job
    if result.get("note"):
        click.echo(result["note"], err=True)
    click.echo(f"run directory: {result['run_dir']}")
    if result.get("skipped_images"):
        click.echo(f"unreadable images skipped: {result['skipped_images']}")
    if "test" in result:
        t = result["test"]
        click.echo(
            "test (score: norm, higher = normal): "
            + "  ".join(f"{k} {t[k]:.4f}" for k in ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR@95TPR"))
        )
        if len(t.get("per_ood_class", {})) > 1:
            click.echo(
                "AUROC per OOD class: "
                + "  ".join(f"{c} {a:.4f}" for c, a in t["per_ood_class"].items())
            )
    click.echo(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
