"""The golden set: written into an artifact, read back, and `oecl verify` on it (CPU backends)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    copy_artifact,
    golden_images,
    nchw_images,
    torch_artifact,
    torch_norms,
    with_golden,
)

from oecl_runtime import Artifact, ArtifactError, golden
from oecl_runtime.artifact import file_entry, update_files
from oecl_runtime.cli import main


def test_written_and_read_back(art: Path) -> None:
    a = Artifact.open(art)
    g = golden.load(a)
    assert g.images.dtype == np.uint8 and g.images.shape == (48, 3, 32, 32)
    assert g.is_id.sum() == 24 and g.reference.dtype == np.float32
    listed = {f["path"]: f for f in a.meta["files"]}
    for name in golden.GOLDEN_FILES.values():
        entry = listed[name]
        assert entry["format"] == "npy" and len(entry["sha256"]) == 64
        # plain .npy: readable without pickle by any numpy (or a hand-written reader)
        assert (art / name).read_bytes()[:6] == b"\x93NUMPY"
    assert a.meta["golden"]["n_id"] == 24 and a.meta["golden"]["n_ood"] == 24
    np.testing.assert_allclose(a.meta["golden"]["reference_AUROC"],
                               golden.auroc(g.reference, g.is_id))


def test_verify_on_onnxruntime_cpu(art: Path) -> None:
    result = CliRunner().invoke(main, ["verify", str(art), "--backend", "onnxruntime-cpu",
                                       "--out", str(art.parent / "v.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((art.parent / "v.json").read_text())
    assert report["pass"] and report["backend"] == "onnxruntime-cpu"
    assert report["max_rel_diff"] < 1e-5 and report["AUROC_diff"] == 0.0
    assert report["n_images"] == 48


def test_verify_on_torch_cpu(artifact_dir: Path, tmp_path: Path) -> None:
    net = torch_artifact(tmp_path, artifact_dir, width=4)
    import torch

    images = nchw_images(16, seed=8)
    with torch.no_grad():
        ref = net(torch.from_numpy(images))[0].numpy()
    entries, section = golden.write(tmp_path, images, np.arange(16) % 2 == 0, ref)
    meta = update_files(tmp_path, add=entries)
    meta["golden"] = section
    (tmp_path / "oecl.json").write_text(json.dumps(meta))
    report = golden.verify(tmp_path, backend="torch-cpu")
    assert report["pass"] and report["backend"] == "torch-cpu", report
    assert report["max_rel_diff"] < 1e-5


def test_tampered_golden_file_is_refused(art: Path) -> None:
    ref = np.load(art / "golden.norms.npy")
    np.save(art / "golden.norms.npy", ref * 1.01)
    result = CliRunner().invoke(main, ["verify", str(art), "--backend", "onnxruntime-cpu"])
    assert result.exit_code != 0
    assert "golden.norms.npy" in result.output and "sha256" in result.output
    assert "Traceback" not in result.output


def test_norms_off_the_reference_fail(artifact_dir: Path, tmp_path: Path) -> None:
    # A consistent artifact whose model no longer scores like the reference: 1% off in norm.
    reference = torch_norms(golden_images()) * 1.01
    art = with_golden(copy_artifact(artifact_dir, tmp_path / "art"), reference)
    result = CliRunner().invoke(main, ["verify", str(art), "--backend", "onnxruntime-cpu"])
    assert result.exit_code == 1
    assert "verification failed: max relative norm difference" in result.output
    report = json.loads(result.output.strip().splitlines()[-2])
    assert report["pass"] is False and report["max_rel_diff"] == pytest.approx(1 / 101, rel=1e-3)


def test_no_golden_set_is_one_line(artifact_dir: Path) -> None:
    result = CliRunner().invoke(main, ["verify", str(artifact_dir)])
    assert result.exit_code == 1 and "has no golden set" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_wrong_layout_is_refused(art: Path) -> None:
    meta = json.loads((art / "oecl.json").read_text())
    np.save(art / "golden.images.npy", np.zeros((48, 32, 32, 3), np.uint8))  # NHWC
    meta["files"] = [f for f in meta["files"] if f["path"] != "golden.images.npy"]
    meta["files"].append(file_entry(art / "golden.images.npy", "npy", "uint8"))
    (art / "oecl.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"expected uint8 \(N, 3, 32, 32\)"):
        golden.load(Artifact.open(art))


def test_pickled_array_is_refused(art: Path) -> None:
    meta = json.loads((art / "oecl.json").read_text())
    np.save(art / "golden.labels.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    meta["files"] = [f for f in meta["files"] if f["path"] != "golden.labels.npy"]
    meta["files"].append(file_entry(art / "golden.labels.npy", "npy", "uint8"))
    (art / "oecl.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="golden.labels.npy: not a readable"):
        golden.load(Artifact.open(art))


def test_auroc_matches_the_rank_definition() -> None:
    rng = np.random.default_rng(0)
    norms = np.round(rng.normal(size=200), 1)  # many ties
    is_id = rng.random(200) < 0.4
    pos, neg = norms[is_id], norms[~is_id]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert golden.auroc(norms, is_id) == pytest.approx(pairs, abs=1e-12)
    assert golden.auroc(norms, np.ones(200, bool)) is None


def test_compare_applies_the_fp32_bound_only_to_fp32() -> None:
    ref = np.linspace(1, 2, 10).astype(np.float32)
    is_id = np.arange(10) >= 5
    off = ref * 1.001
    tol = golden.TOLERANCES
    assert not golden.compare(off, ref, is_id, "fp32", tol)["pass"]
    assert golden.compare(off, ref, is_id, "fp16", tol)["pass"]  # same order: same AUROC
    flipped = ref[::-1].copy()
    row = golden.compare(flipped, ref, is_id, "int8", tol)
    assert not row["pass"] and any("AUROC" in p for p in row["problems"])
    assert any("rank correlation" in p for p in row["problems"])
