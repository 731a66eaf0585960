"""`export_run`: a trained run to an artifact directory, stage by stage."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oecl_runtime.atomic import atomic_dir, write_json
from oecl_train.data import Splits
from oecl_train.export.engines import build_engines
from oecl_train.export.graph import Graphs, export_graphs, graph_entries
from oecl_train.export.metadata import write_export_metadata
from oecl_train.export.norms import reference_scores, require_ood
from oecl_train.export.options import check_options, check_paths, parse_formats
from oecl_train.export.progress import Log, Progress, stderr
from oecl_train.export.quantize import int8_entries, quantize_graphs
from oecl_train.export.source import load_source, write_weights
from oecl_train.export.verify import VERIFY_FILE, verify_or_fail, write_golden
from oecl_train.view_count import view_count


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    formats: str | Sequence[str] = ("onnx",),
    *,
    max_batch: int = 64,
    threshold_tpr: float = 0.95,
    embedding: bool = False,
    calib_images: int = 256,
    verify: bool = True,
    device: str = "cpu",
    views: int | None = None,
    splits: Splits | None = None,
    log: Log = stderr,
) -> dict[str, Any]:
    """Export the run's latest checkpoint to an artifact directory `out_dir`; returns a summary.

    `views` = K bakes the run's K deterministic views (`oecl_model.views`) into every file:
    the served score is then ‖mean of z over the K views‖ (mean-view-norm); K = 1 is the
    single-pass norm (default: `view_count`). Threshold, norm statistics and verification use
    the same score.

    `splits` may pass the run's already-built data splits (saves reading the data again); by
    default they are rebuilt from the run's config. Raises ExportError (one line) for bad
    input, a missing TensorRT, or a failed verification; `out_dir` is then left untouched.
    """
    fmts = parse_formats(formats)
    views = view_count(views)
    check_options(fmts, max_batch=max_batch, threshold_tpr=threshold_tpr,
                  calib_images=calib_images, views=views)
    run_dir, out = Path(run_dir), Path(out_dir)
    check_paths(run_dir, out)
    progress = Progress(log)
    src = load_source(run_dir, device, views, splits, progress)
    if verify:
        require_ood(src.splits)  # before the long stages, not after them

    with atomic_dir(out) as tmp, _scratch() as scratch:
        weights = write_weights(src, tmp)
        graphs = export_graphs(src, tmp, fmts, embedding, progress)
        if "onnx-int8" in fmts:
            quantize_graphs(src, graphs, tmp, scratch, calib_images, progress)
        files = [*graph_entries(graphs), *int8_entries(graphs), weights]
        ref = reference_scores(src.net, src.splits, src.cfg.seed, src.device, src.views,
                               progress)
        golden_files, golden = write_golden(src, tmp, progress, ref)
        files += golden_files
        meta = write_export_metadata(src, tmp, files=files, golden=golden, embedding=embedding,
                                     threshold_tpr=threshold_tpr, max_batch=max_batch,
                                     progress=progress, ref=ref)
        if "tensorrt" in fmts:
            meta = build_engines(tmp, max_batch, int8="int8" in graphs.paths, verify=verify,
                                 progress=progress)
        if verify:
            report = verify_or_fail(src, tmp, meta, progress, ref)
            files = [f for f in files if f["path"] not in report.get("withheld", {})]
        else:
            report = None
            log("verify: skipped (--no-verify)")
        log(f"artifact: {out} ({progress.finish():.1f} s in all)")
        if report is not None:
            # The time of each stage beside the parity figures (verify.json is not hashed).
            report["timings_s"] = dict(progress.timings)
            write_json(tmp / VERIFY_FILE, report)

    return _summary(out, fmts, files, meta, len(src.views), graphs, report, progress)


@contextmanager
def _scratch() -> Iterator[Path]:
    """Working files that must not end up in the artifact (quantiser input, TensorRT sources)."""
    with tempfile.TemporaryDirectory(prefix="oecl-export.") as d:
        yield Path(d)


def _summary(out: Path, fmts: list[str], files: list[dict[str, Any]], meta: dict[str, Any],
             views: int, graphs: Graphs, report: dict[str, Any] | None,
             progress: Progress) -> dict[str, Any]:
    score = meta["score"]
    return {
        "artifact": str(out),
        "formats": fmts,
        "files": [{"path": f["path"], "format": f["format"], "precision": f["precision"],
                   "bytes": f["bytes"], "sha256": f["sha256"]} for f in files],
        "threshold": score["threshold"],
        "threshold_rule": score["threshold_rule"],
        "threshold_warning": score.get("threshold_warning"),
        "score": f"{score['name']} (higher = normal)",
        "views": views,
        "id_norm": score["id_norm"],
        "oe_norm": score["oe_norm"],
        "graphs": graphs.info,
        "verification": report,
        "timings_s": progress.timings,
    }
