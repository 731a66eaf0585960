"""`oecl eval RUN`: score a run's test split, print the metrics, write RUN/eval/ reports."""

from __future__ import annotations

from pathlib import Path

import click

from oecl_runtime.errors import one_line
from oecl_train.data.reader_base import progress_enabled
from oecl_train.errors import user_errors
from oecl_train.report import format_run_table
from oecl_train.score_names import SCORES


@click.command("eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--scores",
    "scores",
    default=",".join(SCORES),
    show_default=True,
    help="Comma-separated scores (all: higher = normal).",
)
@click.option(
    "--k", "k", default=32, show_default=True, type=int, help="Augmented views per test image."
)
@click.option(
    "--views", "views", default=None, type=click.IntRange(min=1),
    help="Fixed views of mean-view-norm (the --views K export serves); default: "
    "oecl_model.views.DEFAULT_VIEWS.",
)
@click.option("--save-scores", is_flag=True, help="Also write RUN/eval/scores.csv (per image).")
@click.option(
    "--batch-size",
    default=1024,
    show_default=True,
    type=int,
    help="Images (views) per forward pass.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr (default: only when stderr is a terminal).",
)
def eval_cmd(
    run: Path,
    scores: str,
    k: int,
    views: int | None,
    save_scores: bool,
    batch_size: int,
    device: str,
    progress: bool | None,
) -> None:
    """Evaluate RUN (a run directory, or a sweep directory of class-* runs).

    Scores the run's test split (rebuilt from its config.json) with norm, mean-aug-norm,
    mean-sq-norm and mean-view-norm (higher = normal, ID positive), and writes
    RUN/eval/report.json, report.md, ROC curves and ID-vs-OOD histograms. On a sweep
    directory, evaluates each class run and writes the per-class table with the mean to
    sweep.json and sweep.md.
    """
    # torch is imported once the verb runs, so that `oecl eval --help` does without it.
    from oecl_train.evaluate import evaluate_run
    from oecl_train.scores import parse_scores
    from oecl_train.sweep import evaluate_sweep, is_sweep_dir, print_sweep

    progress = progress_enabled(progress)
    try:
        names = parse_scores(scores)
        if is_sweep_dir(run):
            if views is not None:
                raise click.ClickException("--views applies to one run; a sweep uses the default")
            sweep = evaluate_sweep(
                run, names, k, save_scores, device, batch_size=batch_size, progress=progress
            )
            print_sweep(sweep)
            return
        report = evaluate_run(
            run, names, k, save_scores, device, batch_size=batch_size, progress=progress,
            views=views,
        )
    except user_errors() as e:
        raise click.ClickException(one_line(e)) from None
    click.echo(format_run_table(report))
    f = report["files"]
    written = ["report.json", "report.md", *(f[k] for k in ("roc", "hist", "scores_csv") if f[k])]
    click.echo(f"written to {run / 'eval'}: {', '.join(written)}")
