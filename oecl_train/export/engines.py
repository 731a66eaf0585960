"""TensorRT engines built into the artifact by `oecl_runtime.engine`, as `oecl engine` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oecl_runtime import engine
from oecl_train.export.errors import ExportError
from oecl_train.export.progress import Progress


def preflight() -> None:
    """Fails before any work when TensorRT or a GPU to build on is missing."""
    try:
        engine.preflight()
    except engine.EngineError as e:
        raise ExportError(f"--format tensorrt: {e}") from None


def build_engines(directory: Path, max_batch: int, *, int8: bool, verify: bool,
                  progress: Progress) -> dict[str, Any]:
    """The fp16 plan, and with `int8` the int8 one; returns the metadata with them recorded."""
    plans = ["fp16"] + (["int8"] if int8 else [])
    with progress.stage(f"tensorrt: {', '.join(plans)} engines", "tensorrt"):
        try:
            return engine.build_engines(directory, plans, max_batch, verify=verify,
                                        log=progress.log)
        except engine.EngineError as e:
            raise ExportError(str(e)) from None
