"""`oecl verify`: a backend here checked on the artifact's golden set against the exporter's
reference norms."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..atomic import write_json
from ..names import BACKEND_CHOICES, PRECISIONS
from .common import artifact_argument, say


@click.command("verify")
@artifact_argument
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Backend to check (auto: the one `oecl serve` would pick here).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Model file precision; default: fp32 where present.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report to this JSON file.")
def verify(artifact: Path, backend: str, precision: str | None, out: Path | None) -> None:
    """Score the artifact's golden set here and compare with the exporter's reference norms.

    Reports max/mean relative norm difference and the AUROC of both (ID positive; norm:
    higher = normal); exits 1 outside the tolerances the artifact was exported with.
    """
    # Deferred: the golden set's check loads numpy and a backend.
    from ..artifact import ArtifactError
    from ..backends import BackendUnavailable
    from ..golden import fmt_auroc
    from ..golden import verify as run_verify

    try:
        report = run_verify(artifact, backend, precision)
    except (ArtifactError, BackendUnavailable, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{report['backend']} ({report['precision']}) on {report['n_id']} ID + "
               f"{report['n_ood']} OOD golden images: max rel diff {report['max_rel_diff']:.2e}, "
               f"mean rel diff {report['mean_rel_diff']:.2e}, AUROC {fmt_auroc(report['AUROC'])} "
               f"(reference {fmt_auroc(report['reference_AUROC'])}); score {report['score']}")
    if out is not None:
        write_json(out, report)
    click.echo(json.dumps(report))
    if not report["pass"]:
        raise click.ClickException(f"verification failed: {report['problems'][0]}")
    say("pass")
