"""The Scorer against the tiny exported OECL-style artifact (helpers.py builds it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import MAX_BATCH, SIZE, SPEC, random_images, torch_artifact, torch_norms
from PIL import Image

from oecl_runtime import ArtifactError, ImageError, Scorer
from oecl_runtime.preprocess import load


def test_scores_match_torch_model(scorer: Scorer) -> None:
    imgs = random_images(10, seed=3)
    batch = np.stack([load(im, SPEC) for im in imgs])
    got = scorer.score_array(batch)
    want = torch_norms(batch)
    assert got.dtype == np.float32 and got.shape == (10,)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.ptp(want) > 0.05 * want.mean(), "test images should give clearly different norms"


def test_every_input_form_gives_the_same_norm(scorer: Scorer, tmp_path: Path) -> None:
    img = random_images(1, seed=5, size=40)[0]  # 40x40: exercises resize + centre crop
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    chw = load(img, SPEC)
    want = float(torch_norms(chw[None])[0])
    forms = {
        "path str": str(path), "path": path, "bytes": path.read_bytes(),
        "PIL": Image.fromarray(img), "HWC": img, "NHWC": img[None], "NCHW": chw[None],
        "CHW": chw, "list": [img],
    }
    for name, form in forms.items():
        res = scorer.score(form)
        assert len(res) == 1, name
        assert res[0].norm == pytest.approx(want, rel=1e-4), name
    gray = np.asarray(Image.fromarray(img).convert("L"))
    want_gray = float(torch_norms(load(gray, SPEC)[None])[0])
    assert scorer.score(gray)[0].norm == pytest.approx(want_gray, rel=1e-4)


def test_batches_split_at_max_batch(scorer: Scorer) -> None:
    imgs = random_images(70, seed=7)
    together = [r.norm for r in scorer.score(list(imgs))]
    one_by_one = [scorer.score(im)[0].norm for im in imgs]
    assert scorer.batch_size == MAX_BATCH
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5)
    nchw = np.stack([load(im, SPEC) for im in imgs])
    np.testing.assert_allclose(scorer.score_array(nchw), together, rtol=1e-5)
    assert len(scorer.score([])) == 0


def test_threshold_override_per_call_and_per_scorer(artifact_dir: Path, scorer: Scorer) -> None:
    meta = json.loads((artifact_dir / "oecl.json").read_text())
    img = random_images(1, seed=9)[0]
    r = scorer.score(img)[0]
    assert r.threshold == meta["score"]["threshold"]
    assert r.is_anomaly == (r.norm < r.threshold)
    above, below = r.norm + 1.0, r.norm - 1.0
    assert scorer.score(img, threshold=above)[0].is_anomaly is True
    assert scorer.score(img, threshold=below)[0].is_anomaly is False
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu", threshold=above) as s2:
        res = s2.score(img)[0]
        assert (res.threshold, res.is_anomaly) == (above, True)
        assert s2.score(img, threshold=below)[0].is_anomaly is False


def test_bad_inputs_raise_image_error(scorer: Scorer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="image 1: cannot decode"):
        scorer.score([random_images(1)[0], bad])
    with pytest.raises(ImageError, match="uint8"):
        scorer.score(np.zeros((SIZE, SIZE, 3), np.float32))
    with pytest.raises(ImageError, match="NCHW"):
        scorer.score(np.zeros((2, 5, SIZE, 7), np.uint8))
    with pytest.raises(ValueError, match="score_array takes uint8"):
        scorer.score_array(np.zeros((2, 3, SIZE, SIZE + 1), np.uint8))


def test_auto_backend_on_cpu_box_is_onnxruntime_cpu(artifact_dir: Path) -> None:
    from oecl_runtime.backends import nvidia_gpu_present

    if nvidia_gpu_present():
        pytest.skip("auto picks a GPU backend on this machine")
    with Scorer.open(artifact_dir) as s:
        assert s.backend.name == "onnxruntime-cpu"
        assert any(p.startswith("tensorrt:") for p in s.backend.passed_over)


def test_missing_precision_or_backend_is_a_clear_error(artifact_dir: Path) -> None:
    with pytest.raises(ArtifactError, match="no onnx/int8 file"):
        Scorer.open(artifact_dir, backend="onnxruntime-cpu", precision="int8")
    with pytest.raises(ValueError, match="unknown backend"):
        Scorer.open(artifact_dir, backend="tflite")


def test_import_and_onnxruntime_scoring_never_import_torch(artifact_dir: Path) -> None:
    code = (
        "import sys, numpy as np, oecl_runtime\n"
        "assert 'torch' not in sys.modules, 'import oecl_runtime pulled in torch'\n"
        f"s = oecl_runtime.Scorer.open({str(artifact_dir)!r})\n"
        f"r = s.score(np.zeros(({SIZE}, {SIZE}, 3), np.uint8))\n"
        "assert len(r) == 1 and r[0].norm > 0\n"
        "assert 'torch' not in sys.modules, 'scoring pulled in torch'\n"
        "print(s.backend.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("onnxruntime")


def test_torch_backend_matches_score_model(artifact_dir: Path, tmp_path: Path) -> None:
    import torch

    from oecl_runtime.artifact import Artifact

    scorer_model = torch_artifact(tmp_path, artifact_dir, width=4)
    batch = np.stack([load(im, SPEC) for im in random_images(5, seed=11)])
    with torch.no_grad():
        want = scorer_model(torch.from_numpy(batch))[0].numpy()
    with Scorer.open(tmp_path, backend="torch-cpu") as s:
        assert s.backend.name == "torch-cpu"
        np.testing.assert_allclose(s.score_array(batch), want, rtol=1e-5)
    assert Artifact.open(tmp_path).find("onnx") is None
