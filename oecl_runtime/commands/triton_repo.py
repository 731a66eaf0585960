"""`oecl triton-repo`: the artifact as a model of a Triton Inference Server model repository."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..names import PRECISIONS, TRITON_MODEL_NAME
from ..serving.config import BatchPolicy, check_model_name
from .common import artifact_argument, checked, say


@click.command("triton-repo")
@artifact_argument
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model repository directory; only the model's own subdirectories are "
                   "written (each replaced only if oecl wrote it).")
@click.option("--name", default=TRITON_MODEL_NAME, show_default=True,
              callback=checked(check_model_name),
              help="Model name in the repository.")
@click.option("--backend", type=click.Choice(["native", "python"]), default="native",
              show_default=True,
              help="native: Triton's onnxruntime or TensorRT backend runs the file (see "
                   "--image-bytes); python: Triton's Python backend runs oecl_runtime's scorer "
                   "(uint8 images or encoded image_bytes in, norm and is_anomaly out; oecl "
                   "must be installed in Triton's Python).")
@click.option("--image-bytes/--no-image-bytes", default=True, show_default=True,
              help="native: NAME is an ensemble taking uint8 images or encoded image_bytes "
                   "(a Python step decodes with oecl_runtime, then NAME_model); without it, "
                   "NAME is the ONNX or TensorRT model alone (uint8 in, nothing to install).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx",
              show_default=True, help="onnx: Triton's onnxruntime backend; tensorrt: the plan.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Model file precision; default: fp32 where present.")
@click.option("--max-delay-us", type=click.IntRange(min=0), default=BatchPolicy().max_delay_us,
              show_default=True,
              help="Dynamic batching: longest a request waits for its batch to fill.")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Instance kind.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances per device.")
def triton_repo(artifact: Path, out: Path, name: str, backend: str, image_bytes: bool,
                fmt: str, precision: str | None, max_delay_us: int, kind: str,
                instances: int) -> None:
    """Write model NAME of a Triton Inference Server model repository for ARTIFACT.

    <name>/config.pbtxt (max_batch_size and dynamic batching from the artifact) and
    <name>/README.md with the tritonserver command and a client call; the model itself is the
    ONNX or TensorRT file (native), behind an ensemble with a decoding step (<name>_preprocess,
    <name>_model) unless --no-image-bytes, or oecl_runtime's scorer in Triton's Python backend
    (--backend python). Other models in --out are left alone. norm: higher = normal.
    """
    # Deferred: the artifact loads numpy.
    from ..artifact import ArtifactError
    from ..triton_repo import write_repository

    try:
        summary = write_repository(artifact, out, name=name, fmt=fmt, precision=precision,
                                   max_delay_us=max_delay_us, kind=kind, instances=instances,
                                   backend=backend, image_bytes=image_bytes)
    except ArtifactError as e:
        raise click.ClickException(str(e)) from None
    say(f"wrote {summary['config']} ({summary['platform']}, {summary['file']}, max batch "
        f"{summary['max_batch_size']}); see {out / name / 'README.md'}")
    click.echo(json.dumps(summary))
