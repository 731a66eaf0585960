"""`oecl train`: one option per TrainConfig field; trains a run, resumes one, or sweeps
classes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from oecl_train.config import TrainConfig
from oecl_train.data.reader_base import progress_enabled
from oecl_train.errors import user_errors


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
    defaults = TrainConfig()
    for f in reversed(dataclasses.fields(TrainConfig)):
        if f.metadata.get("cli") is False:
            continue  # a record the run writes, not a setting
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
    help="Show progress bars on stderr (default: only when stderr is a terminal); without "
    "one, a plain progress line every 30 s or 5% of the run.",
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

    Prints the expected duration after the first steps, and at the end the test AUROC of
    the score an export serves (mean-view-norm over 8 views) on the whole test split.
    Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and exits non-zero;
    `--resume RUN` continues from it, and `--resume RUN --steps N` extends a finished run.
    """
    # torch is imported once the verb runs, so that `oecl train --help` does without it.
    from oecl_train.sweep import print_sweep, run_sweep
    from oecl_train.trainer import TrainingInterrupted
    from oecl_train.training import build_config, resume_config, run_training

    progress = progress_enabled(progress)
    try:
        if classes is not None:
            if resume_run:
                raise ValueError("--classes and --resume do not combine; rerun the sweep instead")
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


def print_result(result: dict) -> None:
    """A training result for people (stdout), then as JSON on the last line."""
    if result.get("rank", 0) != 0:
        return  # under torchrun, rank 0 reports for the job
    if result.get("note"):
        click.echo(result["note"], err=True)
    click.echo(f"run directory: {result['run_dir']}")
    if result.get("skipped_images"):
        click.echo(f"unreadable images skipped: {result['skipped_images']}")
    if "test" in result:
        t = result["test"]
        score = t["score"].split(" ")[0]
        click.echo(
            f"test AUROC {t['AUROC']:.4f} ({score} over {t['views']} views, the score `oecl "
            f"export` serves; higher = normal; {t['images']} images)"
        )
        click.echo(
            "same score, same images: "
            + "  ".join(f"{k} {t[k]:.4f}" for k in ("AUPR-IN", "AUPR-OUT", "FPR@95TPR"))
        )
        if len(t.get("per_ood_class", {})) > 1:
            click.echo(
                "AUROC per OOD class: "
                + "  ".join(f"{c} {a:.4f}" for c, a in t["per_ood_class"].items())
                + "  (same score; all ID test images against each class)"
            )
    click.echo(json.dumps(result))
