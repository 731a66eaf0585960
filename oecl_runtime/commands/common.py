"""What the runtime's commands share: the model and backend options, opening a scorer with
one-line errors, and the model-name check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..names import BACKEND_CHOICES, PRECISIONS, valid_model_name


def model_option(f: Any) -> Any:
    return click.option("--model", "model_dir", required=True,
                        type=click.Path(exists=True, file_okay=False, path_type=Path),
                        help="Artifact directory (oecl.json + model files).")(f)


def artifact_argument(f: Any) -> Any:
    return click.argument("artifact", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path))(f)


def backend_options(f: Any) -> Any:
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU intra-op threads of onnxruntime-cpu / torch-cpu; default: one "
                          "per physical core.")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="Model file precision; default: fp32 where present.")(f)
    return click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
                        show_default=True,
                        help="auto: tensorrt > onnxruntime-cuda > torch-cuda > onnxruntime-cpu.")(f)


def open_scorer(model_dir: Path, backend: str, precision: str | None, threshold: float | None,
                batch_size: int | None = None, threads: int | None = None) -> Any:
    # Deferred: the scorer and its backends load numpy, onnxruntime or torch.
    from ..artifact import METADATA_NAME, ArtifactError
    from ..backends import BackendUnavailable
    from ..scorer import Scorer

    if not (model_dir / METADATA_NAME).is_file() and (model_dir / "config.json").is_file():
        # A training run (what `oecl train` writes) is not servable until it is exported.
        raise click.ClickException(
            f"{model_dir} is a training run directory, not a model artifact (no "
            f"{METADATA_NAME}); make one with: oecl export {model_dir} --out DIR, then pass "
            "--model DIR"
        )
    try:
        return Scorer.open(model_dir, backend=backend, precision=precision, threshold=threshold,
                           batch_size=batch_size, threads=threads)
    except (ArtifactError, BackendUnavailable, ValueError) as e:
        raise click.ClickException(str(e)) from None


def check_model_name(name: str) -> str:
    if not valid_model_name(name):
        raise click.BadParameter(f"{name!r}: use letters, digits, '-', '_' or '.' (not first)")
    return name


def say(msg: str) -> None:
    click.echo(msg, err=True)
