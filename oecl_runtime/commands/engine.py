"""`oecl engine`: TensorRT engines built from the artifact's ONNX files on this GPU and recorded
in its `oecl.json`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..names import ENGINE_PRECISIONS
from .common import artifact_argument, say


@click.command("engine")
@artifact_argument
@click.option("--precision", "precisions", type=click.Choice(ENGINE_PRECISIONS), multiple=True,
              default=("fp16",), show_default=True,
              help="Engine to build (repeat for several): fp16 -> model.plan, int8 -> "
                   "model.int8.plan (from the symmetric int8 ONNX), fp32 -> model.fp32.plan.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Largest batch of the engine's profile; default: the artifact's max_batch.")
@click.option("--workspace-mb", type=click.IntRange(min=1), default=4096, show_default=True,
              help="TensorRT builder workspace (lower it on a small Jetson).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Score the golden set with the new engine; refuse to record one that fails.")
def engine(artifact: Path, precisions: tuple[str, ...], max_batch: int | None,
           workspace_mb: int, verify: bool) -> None:
    """Build TensorRT engines from ARTIFACT's ONNX files on this GPU and record them.

    The engine is valid only for this GPU model and TensorRT version; `oecl.json` gets its
    sha256, TensorRT version, GPU name and compute capability. Needs tensorrt, cuda-python
    and an NVIDIA GPU (no torch).
    """
    # Deferred: the artifact and the engine builder load numpy.
    from ..artifact import ArtifactError
    from ..engine import EngineError, build_engines

    try:
        meta = build_engines(artifact, precisions, max_batch, workspace_mb=workspace_mb,
                             verify=verify, log=say)
    except (ArtifactError, EngineError) as e:
        raise click.ClickException(str(e)) from None
    plans = [f for f in meta["files"] if f["format"] == "tensorrt"]
    click.echo(json.dumps({"artifact": str(artifact), "engines": plans}))
