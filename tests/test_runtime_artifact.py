"""The artifact contract: what `Artifact.open` and `validate_metadata` accept and refuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_artifact
from PIL import Image

from oecl_runtime import Scorer
from oecl_runtime.artifact import (
    SCHEMA_VERSION,
    Artifact,
    ArtifactError,
    file_entry,
    validate_metadata,
)


@pytest.fixture
def plain_art(artifact_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny artifact as exported (no golden set), free to change."""
    return copy_artifact(artifact_dir, tmp_path / "artifact")


def _meta(d: Path) -> dict:
    return json.loads((d / "oecl.json").read_text())


def _write_meta(d: Path, meta: dict) -> None:
    (d / "oecl.json").write_text(json.dumps(meta))


def _refused(d: Path, match: str) -> str:
    """Refused when opened (metadata) or when its files are used (presence, size, hash)."""
    with pytest.raises(ArtifactError, match=match) as info:
        art = Artifact.open(d)
        for f in art.files:
            art.path_of(f)
    msg = str(info.value)
    assert "\n" not in msg, f"reason should be one line: {msg!r}"
    return msg


def test_valid_artifact_opens(plain_art: Path) -> None:
    a = Artifact.open(plain_art)
    assert a.meta["schema_version"] == SCHEMA_VERSION
    assert a.spec.height == 32 and a.input_name == "images"
    assert a.find("onnx")["path"] == "model.onnx"
    assert a.find("tensorrt") is None


def test_unknown_schema_version_is_refused(plain_art: Path) -> None:
    meta = _meta(plain_art)
    meta["schema_version"] = 3
    _write_meta(plain_art, meta)
    _refused(plain_art, r"unknown schema_version 3 \(this runtime reads 1, 2\)")


def test_version_1_artifacts_are_read_with_the_plain_norm_only(plain_art: Path) -> None:
    meta = _meta(plain_art)
    meta["schema_version"] = 1
    _write_meta(plain_art, meta)
    assert meta["score"]["name"] == "norm"
    assert Artifact.open(plain_art).meta["schema_version"] == 1
    meta["score"]["name"] = "mean-view-norm"
    _write_meta(plain_art, meta)
    _refused(plain_art, r"schema_version 1 has only the plain norm score")


def test_missing_file_is_refused_when_used_and_named_with_its_remedy(plain_art: Path) -> None:
    (plain_art / "model.onnx").unlink()
    art = Artifact.open(plain_art)  # nothing is opened yet
    with pytest.raises(ArtifactError, match=r"missing file model.onnx listed in oecl.json; "
                       r"remake the artifact with `oecl export RUN_DIR --out .*`"):
        Scorer.open(plain_art, backend="onnxruntime-cpu")
    meta = _meta(plain_art)
    (plain_art / "model.plan").write_bytes(b"engine")
    plan = file_entry(plain_art / "model.plan", "tensorrt", "fp16", tensorrt_version="10.7.0",
                      gpu_name="NVIDIA H100", compute_capability="9.0")
    (plain_art / "model.plan").unlink()
    meta["source"] = {"run": "runs/widgets"}
    _write_meta(plain_art, meta)
    art = Artifact.open(plain_art)
    with pytest.raises(ArtifactError, match="remake the artifact with `oecl export runs/widgets"):
        art.path_of(art.files[0])
    with pytest.raises(ArtifactError, match=r"missing file model.plan .*; rebuild it on this "
                       r"GPU with `oecl engine .* --precision fp16`"):
        art.path_of(plan)


def test_int8_scores_with_the_fp32_file_gone(plain_art: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from oecl_runtime.commands.score import score
    from oecl_train.export.quantize import INT8_FORMS, quantize_int8

    calib = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    quantize_int8(plain_art / "model.onnx", plain_art / "model.int8.onnx", calib, tmp_path)
    meta = _meta(plain_art)
    meta["files"].append(file_entry(plain_art / "model.int8.onnx", "onnx", "int8",
                                    **INT8_FORMS["onnxruntime"]))
    _write_meta(plain_art, meta)
    (plain_art / "model.onnx").unlink()
    with Scorer.open(plain_art, backend="onnxruntime-cpu", precision="int8") as s:
        assert s.backend.precision == "int8"
        assert np.isfinite(s.score_array(calib)).all()
    png = tmp_path / "a.png"
    Image.fromarray(calib[0].transpose(1, 2, 0)).save(png)
    res = CliRunner().invoke(score, [str(png), "--model", str(plain_art), "--precision", "int8",
                                     "--backend", "onnxruntime-cpu"])
    assert res.exit_code == 0, res.output
    assert "a.png" in res.stdout and "error" not in res.stdout.split("\n", 1)[1]
    res = CliRunner().invoke(score, [str(png), "--model", str(plain_art),
                                     "--backend", "onnxruntime-cpu", "--precision", "fp32"])
    assert res.exit_code != 0 and "missing file model.onnx" in res.output


def test_tampered_file_is_refused(plain_art: Path) -> None:
    model = plain_art / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one changed byte, same size
    model.write_bytes(bytes(data))
    msg = _refused(plain_art, "model.onnx sha256 .* does not match")
    assert "changed after export" in msg
    # Scorer.open goes through the same check.
    with pytest.raises(ArtifactError, match="sha256"):
        Scorer.open(plain_art, backend="onnxruntime-cpu")


def test_truncated_file_is_refused(plain_art: Path) -> None:
    model = plain_art / "model.onnx"
    model.write_bytes(model.read_bytes()[:-100])
    _refused(plain_art, r"model.onnx is \d+ bytes but oecl.json says \d+ \(truncated or replaced\)")


def test_missing_or_broken_metadata(plain_art: Path, tmp_path: Path) -> None:
    (plain_art / "oecl.json").write_text("{not json")
    _refused(plain_art, "is not valid JSON")
    (plain_art / "oecl.json").unlink()
    _refused(plain_art, "no oecl.json")
    _refused(tmp_path / "nowhere", "artifact directory not found")


def test_paths_cannot_leave_the_artifact_dir(plain_art: Path) -> None:
    meta = _meta(plain_art)
    meta["files"][0]["path"] = "../model.onnx"
    _write_meta(plain_art, meta)
    _refused(plain_art, "must be relative to the artifact directory")


def test_symlinks_cannot_lead_outside(plain_art: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x" * 1234)
    (plain_art / "link").symlink_to(outside, target_is_directory=True)
    meta = _meta(plain_art)
    meta["files"].append({**meta["files"][0], "path": "link/secret"})
    _write_meta(plain_art, meta)
    msg = _refused(plain_art, "link/secret resolves outside the artifact directory")
    assert "1234" not in msg  # the target's size does not leak
    # A file symlink leading out is refused the same way.
    meta["files"].pop()
    (plain_art / "model.onnx").rename(outside / "model.onnx")
    (plain_art / "model.onnx").symlink_to(outside / "model.onnx")
    _write_meta(plain_art, meta)
    _refused(plain_art, "model.onnx resolves outside")


def test_onnx_external_data_is_hashed(plain_art: Path) -> None:
    import onnx

    from oecl_runtime.artifact import onnx_external_data, write_metadata

    model = onnx.load(str(plain_art / "model.onnx"))
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    onnx.save(model, str(plain_art / "model.onnx"))
    assert onnx_external_data(plain_art / "model.onnx") == ["weights.bin"]
    meta = _meta(plain_art)
    entry = file_entry(plain_art / "model.onnx", "onnx", "fp32")
    assert [e["path"] for e in entry["external_data"]] == ["weights.bin"]
    meta["files"] = [entry]
    write_metadata(plain_art, meta)
    with Scorer.open(plain_art, backend="onnxruntime-cpu") as s:
        assert np.isfinite(s.score_array(np.zeros((1, 3, 32, 32), np.uint8))).all()
    weights = bytearray((plain_art / "weights.bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # the edit that moved a norm from 136 to 4080
    (plain_art / "weights.bin").write_bytes(bytes(weights))
    _refused(plain_art, "weights.bin sha256 .* does not match")
    meta["files"][0].pop("external_data")
    _write_meta(plain_art, meta)
    _refused(plain_art, "loads external data 'weights.bin' that oecl.json does not hash")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("score"), "missing key"),
        (lambda m: m["input"].update(dtype="float32"), "input.dtype must be 'uint8'"),
        (lambda m: m["input"].update(color_mode="L"), "input.color_mode must be 'RGB'"),
        (lambda m: m["input"]["normalization"].update(mean=[0.5]), "one number per channel"),
        (lambda m: m["input"]["normalization"].update(in_graph=False), "in_graph"),
        (lambda m: m["score"].update(direction="lower_is_normal"), "higher_is_normal"),
        (lambda m: m["score"].update(threshold="high"), "threshold must be a finite number"),
        (lambda m: m["score"]["id_norm"].pop("p95"), "score.id_norm lacks p95"),
        (lambda m: m.update(max_batch=0), "max_batch"),
        # JSON true is not 1; a huge max_batch made `oecl serve` die in a MemoryError.
        (lambda m: m.update(schema_version=True), "unknown schema_version True"),
        (lambda m: m.update(max_batch=10**9), "max_batch must be an integer from 1 to 4096"),
        (lambda m: m.update(max_batch=True), "max_batch must be"),
        (lambda m: m["input"].update(channels=True), "input.channels must be 1 or 3"),
        (lambda m: m["input"].update(height=100_000), "input.height and input.width"),
        (lambda m: m["files"][0].update(bytes=True), "bytes must be an integer"),
        (lambda m: m["files"][0].update(external_data=[{"path": "../w.bin", "sha256": "0" * 64,
                                                        "bytes": 1}]), "must be relative"),
        (lambda m: m.update(files=[]), "at least one model file"),
        (lambda m: m["files"][0].update(format="tflite"), "unknown format"),
        (lambda m: m["files"].append({**m["files"][0], "precision": "fp16"}), "same path twice"),
        (lambda m: m["files"].append({**m["files"][0], "path": "m.plan", "format": "tensorrt"}),
         "needs 'tensorrt_version'"),
    ],
)
def test_validate_metadata_refusals(artifact_dir: Path, edit, match: str) -> None:
    meta = copy.deepcopy(_meta(artifact_dir))
    validate_metadata(meta)
    edit(meta)
    with pytest.raises(ArtifactError, match=match):
        validate_metadata(meta)


def test_file_entry(artifact_dir: Path, tmp_path: Path) -> None:
    e = file_entry(artifact_dir / "model.onnx", "onnx", "fp32", opset=18)
    assert e["path"] == "model.onnx" and e["opset"] == 18
    assert e["bytes"] == (artifact_dir / "model.onnx").stat().st_size and len(e["sha256"]) == 64
    with pytest.raises(ArtifactError, match="unknown precision"):
        file_entry(artifact_dir / "model.onnx", "onnx", "fp8")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(ArtifactError, match="needs 'gpu_name'"):
        file_entry(plan, "tensorrt", "fp16", tensorrt_version="10.3.0", compute_capability="9.0")
    e = file_entry(plan, "tensorrt", "fp16", tensorrt_version="10.3.0", gpu_name="NVIDIA H100",
                   compute_capability="9.0")
    assert e["compute_capability"] == "9.0"
