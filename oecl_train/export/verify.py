"""Verification: held-out ID and OOD images scored by the PyTorch model and by every exported
file through the runtime's backends, compared by `oecl_runtime.golden` (the check `oecl verify`
makes) and written to `verify.json`; and the golden set that lets any machine repeat it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from oecl_model.views import views_from_json
from oecl_runtime import golden
from oecl_runtime.artifact import Artifact, write_metadata
from oecl_runtime.atomic import write_json
from oecl_train.data import Splits
from oecl_train.devices import resolve_device
from oecl_train.export.errors import VerificationFailed
from oecl_train.export.norms import Reference, require_ood, torch_norms, verification_images
from oecl_train.export.progress import Log, Progress, stderr
from oecl_train.export.source import Source
from oecl_train.trainer import load_trained

# Verification fails beyond these (module constants so tests can tighten them).
FP32_REL_TOL = 1e-4  # largest |norm - norm_torch| / norm_torch of the fp32 files
# fp16 and int8 files: the largest mean norm error (as a share of the median ID norm) and the
# smallest rank correlation (Spearman) with the PyTorch norms: what quantisation changes.
REDUCED_MEAN_REL_TOL = 0.02
RANK_CORRELATION_MIN = 0.99
AUROC_TOL = 0.005  # largest |AUROC - AUROC_torch| of any file, unless the model is near chance
VERIFY_FILE = "verify.json"


def tolerances() -> dict[str, float]:
    """The tolerances as `oecl_runtime.golden` takes them (read at call time)."""
    return {"fp32_max_rel_diff": FP32_REL_TOL, "AUROC_diff": AUROC_TOL,
            "reduced_mean_rel_diff": REDUCED_MEAN_REL_TOL,
            "rank_correlation_min": RANK_CORRELATION_MIN}


def write_golden(src: Source, directory: Path, progress: Progress,
                 ref: Reference) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The golden set (a seeded subset of the parity sample) and its PyTorch fp32 norms;
    returns their `files[]` entries and the `golden` section of oecl.json."""
    with progress.stage("golden: held-out images and their PyTorch fp32 norms", "golden"):
        is_id = ref.verify_is_id
        pick, _ = golden.select(np.flatnonzero(is_id), np.flatnonzero(~is_id), src.cfg.seed)
        return golden.write(directory, ref.verify_images[pick], is_id[pick],
                            ref.verify_norms[pick], tolerances())


def verify_artifact(
    directory: Path, ref_norms: np.ndarray, images: np.ndarray, is_id: np.ndarray, log: Log
) -> dict[str, Any]:
    """Score `images` with every file of the artifact through the runtime; compare to torch."""
    report = golden.verify_files(directory, images, is_id, ref_norms, tolerances(), log)
    report["images"] = "held-out ID validation + ID test images vs non-ID test images of the run"
    report["reference"]["model"] = "PyTorch eval fp32"
    return report


def check_against_torch(directory: Path, ref_norms: np.ndarray, images: np.ndarray,
                        is_id: np.ndarray, log: Log) -> dict[str, Any]:
    """Every file compared to the PyTorch reference norms of `images`, and the report written
    to `verify.json` beside the files (whether or not it passes)."""
    report = verify_artifact(directory, ref_norms, images, is_id, log)
    write_json(directory / VERIFY_FILE, report)
    return report


def verify_export(run_dir: str | Path, artifact_dir: str | Path, *, device: str = "cpu",
                  log: Log = stderr) -> dict[str, Any]:
    """Verify an artifact exported from `run_dir` as the exporter does (e.g. one exported
    with verify=False): same images, same reference, same tolerances. Writes `verify.json`
    into the artifact and returns the report; a failing report is returned, not raised."""
    artifact_dir = Path(artifact_dir)
    dev = resolve_device(device)
    cfg, net, _ = load_trained(run_dir, dev)
    views = views_from_json(Artifact.open(artifact_dir, verify=False).views)
    images, is_id = verification_images(Splits.from_config(cfg), cfg.seed)
    ref = torch_norms(net, images, dev, views=views)
    return check_against_torch(artifact_dir, ref, images, is_id, log)


def verify_or_fail(src: Source, directory: Path, meta: dict[str, Any],
                   progress: Progress, ref: Reference) -> dict[str, Any]:
    """The exporter's check on the parity sample of `ref`: raises VerificationFailed outside
    the tolerances, else records the summary in oecl.json and returns the report (the stage
    times so far are added to `verify.json`)."""
    require_ood(src.splits)
    images, is_id = ref.verify_images, ref.verify_is_id
    with progress.stage(f"verify: a sample of {len(images)} held-out images through "
                        "oecl_runtime", "verify"):
        report = check_against_torch(directory, ref.verify_norms, images, is_id,
                                     progress.log)
    withheld = withhold_int8(directory, meta, report, progress.log)
    if report["pass"] and golden.near_chance(report["reference"]["AUROC"]):
        progress.log(f"note: {golden.chance_note(report['reference']['AUROC'])}")
    if not report["pass"]:
        bad = next(r for r in report["files"] if not r["pass"])
        raise VerificationFailed(
            f"verification failed for {bad['path']} ({bad['format']} {bad['precision']}"
            f" on {bad['backend']}): {bad['problems'][0]}; nothing was written",
            tuple(sorted({r["precision"] for r in report["files"] if not r["pass"]})),
        )
    meta["verification"] = verification_summary(report)
    if withheld:
        meta["verification"]["withheld"] = withheld
    write_metadata(directory, meta)
    return report


def withhold_int8(directory: Path, meta: dict[str, Any], report: dict[str, Any],
                  log: Log) -> dict[str, str]:
    """The two int8 files serve different consumers (onnxruntime, TensorRT) and are quantised
    differently, so one can drift past the tolerances while the other holds: when every
    failing file is int8 and another int8 file passes, the failing ones (and any engine built
    from them) are taken out of the artifact and `meta`, the report passes on what remains,
    and {path: why} is returned. Otherwise nothing changes."""
    rows = report["files"]
    failed = [r for r in rows if not r["pass"]]
    if not failed or any(r["precision"] != "int8" for r in failed) or not any(
            r["pass"] and r["precision"] == "int8" for r in rows):
        return {}
    why = {r["path"]: r["problems"][0] for r in failed}
    for entry in meta["files"]:
        if entry.get("source") in why:
            why[entry["path"]] = f"built from {entry['source']}, which was withheld"
    for path in why:
        (directory / path).unlink(missing_ok=True)
        log(f"verify: {path} withheld from the artifact: {why[path]}")
    meta["files"] = [f for f in meta["files"] if f["path"] not in why]
    report["files"] = [r for r in rows if r["path"] not in why]
    report["withheld"] = why
    report["pass"] = True
    return why


def verification_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The `verification` section of oecl.json: the report's figures, file by file."""
    fp32 = [r for r in report["files"] if r["format"] == "onnx" and r["precision"] == "fp32"]
    return {
        "passed": report["pass"],
        "n_images": report["n_images"],
        "max_abs_diff_fp32": fp32[0]["max_abs_diff"] if fp32 else None,
        "max_rel_diff_fp32": fp32[0]["max_rel_diff"] if fp32 else None,
        "reference_AUROC": report["reference"]["AUROC"],
        "tolerances": report["tolerances"],
        "files": {r["path"]: {"backend": r["backend"], "max_abs_diff": r["max_abs_diff"],
                              "max_rel_diff": r["max_rel_diff"],
                              "mean_rel_diff": r["mean_rel_diff"],
                              "mean_diff_of_id_norm": r["mean_diff_of_id_norm"],
                              "rank_correlation": r["rank_correlation"], "AUROC": r["AUROC"],
                              "AUROC_diff": r["AUROC_diff"]}
                  for r in report["files"]},
        "report": VERIFY_FILE,
    }
