"""The export's arguments, checked before any work starts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from oecl_runtime.artifact import METADATA_NAME
from oecl_runtime.names import EXPORT_FORMATS
from oecl_train.export import engines
from oecl_train.export.errors import ExportError


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """Known formats in canonical order; the fp32 ONNX file is always included (every other
    file is made from it)."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    wanted = {f.strip().lower() for f in items if f.strip()}
    unknown = sorted(wanted - set(EXPORT_FORMATS))
    if unknown:
        raise ExportError(
            f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(EXPORT_FORMATS)}"
        )
    wanted.add("onnx")
    return [f for f in EXPORT_FORMATS if f in wanted]


def check_options(fmts: Sequence[str], *, max_batch: int, threshold_tpr: float,
                  calib_images: int, views: int) -> None:
    """Raises ExportError naming the first bad option (or a TensorRT that cannot build)."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"--max-batch must be a positive integer, got {max_batch!r}")
    if not 0.0 < threshold_tpr <= 1.0:
        raise ExportError(f"--threshold-tpr must be in (0, 1], got {threshold_tpr}")
    if calib_images < 1:
        raise ExportError(f"--calib-images must be positive, got {calib_images}")
    if not isinstance(views, int) or views < 1:
        raise ExportError(f"--views must be a positive integer, got {views!r}")
    if "tensorrt" in fmts:
        engines.preflight()


def check_paths(run_dir: Path, out: Path) -> None:
    """The run directory exists, and `out` is new, empty, or an artifact this may replace."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA_NAME).is_file():
        # The swap-in replaces the directory: never let that take something that is not ours.
        raise ExportError(f"--out {out} exists and is not an OECL artifact; choose another path")
    if out.resolve() == run_dir.resolve():
        raise ExportError("--out must not be the run directory")
