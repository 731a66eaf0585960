"""A tiny exported OECL-style artifact (built once per test run), and the Scorer tests against it.

Other runtime test modules import `tiny_artifact_dir` / `torch_norms` from here; the build is
cached in this module so the ONNX export runs once per test run.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oecl_runtime import ArtifactError, ImageError, Scorer
from oecl_runtime.artifact import (
    SCHEMA_VERSION,
    file_entry,
    norm_stats,
    threshold_at_tpr,
    write_metadata,
)
from oecl_runtime.preprocess import InputSpec, load

SIZE = 32
MAX_BATCH = 32
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
SPEC = InputSpec(height=SIZE, width=SIZE, channels=3, resize=SIZE)

_cache: dict[str, object] = {}


def _tiny_net():
    import torch
    from torch import nn

    class TinyOECL(nn.Module):
        """uint8 NCHW → normalise → two convs → 128-d projection → (norm, projection)."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.proj = nn.Linear(8 * 8 * 8, 128)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (images.float() / 255.0 - self.mean) / self.std
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            z = self.proj(torch.flatten(x, 1))
            return torch.linalg.vector_norm(z, dim=1), z

    torch.manual_seed(0)
    return TinyOECL().eval()


def build_tiny_artifact(directory: Path) -> Path:
    """Export the tiny net to ONNX (dynamo, dynamic batch) and write a valid oecl.json."""
    import onnx
    import onnxruntime
    import torch

    net = _tiny_net()
    directory.mkdir(parents=True, exist_ok=True)
    example = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        net, (example,), str(directory / "model.onnx"), input_names=["images"],
        output_names=["norm", "embedding"], dynamo=True, opset_version=18,
        dynamic_shapes={"images": {0: batch}}, external_data=False, verbose=False,
    )
    rng = np.random.default_rng(1)
    val = rng.integers(0, 256, (64, 3, SIZE, SIZE), dtype=np.uint8)
    with torch.no_grad():
        id_norms = net(torch.from_numpy(val))[0].numpy()
    meta = {
        "schema_version": SCHEMA_VERSION,
        "producer": {"name": "oecl", "version": "0.1.0", "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", **SPEC.to_json(),
                  "normalization": {"in_graph": True, "mean": MEAN, "std": STD}},
        "outputs": {"norm": {"dtype": "float32", "shape": ["batch"]},
                    "embedding": {"dtype": "float32", "shape": ["batch", 128]}},
        "score": {"name": "norm", "direction": "higher_is_normal",
                  "threshold": threshold_at_tpr(id_norms, 0.95),
                  "threshold_rule": {"method": "id_validation_tpr", "tpr": 0.95,
                                     "n_images": len(id_norms)},
                  "id_norm": norm_stats(id_norms), "oe_norm": None},
        "max_batch": MAX_BATCH,
        "architecture": {"name": "tiny-test-net"},
        "files": [file_entry(directory / "model.onnx", "onnx", "fp32")],
        "verification": {"note": "test fixture"},
    }
    write_metadata(directory, meta)
    _cache["net"] = net
    return directory


def tiny_artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact of this test run (read-only by convention: copy it before changing it)."""
    if "dir" not in _cache:
        _cache["dir"] = build_tiny_artifact(tmp_path_factory.mktemp("tiny") / "artifact")
    return _cache["dir"]  # type: ignore[return-value]


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def torch_norms(batch: np.ndarray) -> np.ndarray:
    """The eager torch model's norms for a uint8 NCHW batch (the reference)."""
    import torch

    with torch.no_grad():
        return _cache["net"](torch.from_numpy(batch))[0].numpy()  # type: ignore[operator]


def random_images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """n distinct uint8 HWC images, each with its own brightness so their norms differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    scale = rng.uniform(0.2, 1.0, (n, 1, 1, 1))
    return (base * scale).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_artifact_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def scorer(artifact_dir: Path) -> Scorer:
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu") as s:
        yield s


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


def torch_artifact(tmp_path: Path, artifact_dir: Path, width: int):
    """An artifact holding only `model.safetensors` of a seeded resnet10 of `width`, and that
    network (eval mode) to compare the torch backends against."""
    import torch
    from safetensors.torch import save_file

    from oecl_train import model

    arch = {"depth": "resnet10", "width": width, "stem": "cifar", "in_channels": 3,
            "proj_dim": 128, "mean": MEAN, "std": STD}
    torch.manual_seed(0)
    net = model.build_model(**arch).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    meta = json.loads((artifact_dir / "oecl.json").read_text())
    meta["architecture"] = arch
    meta["files"] = [file_entry(tmp_path / "model.safetensors", "safetensors", "fp32")]
    write_metadata(tmp_path, meta)
    return model.ScoreModel(net).eval()


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
