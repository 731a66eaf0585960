"""An image of another size is brought to the model's input size the way training saw it
(shorter side to the trained size, then centre crop), never cut to its centre, through every
backend that runs on a CPU and through `oecl score`; an artifact exported before the size was
always stated (`"resize": null`) is served by the same rule."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import MEAN, STD
from PIL import Image

from oecl_runtime import Scorer
from oecl_runtime.artifact import file_entry, write_metadata
from oecl_runtime.commands.score import score as score_cmd
from oecl_runtime.preprocess import RESIZE_RULE, InputSpec, load
from oecl_train.export.metadata import norm_stats

SIZE = 28
SIDES = (28, 56, 112, 224)
ARCH = {"depth": "resnet10", "width": 8, "stem": "cifar", "in_channels": 3, "proj_dim": 128,
        "mean": MEAN, "std": STD}


@pytest.fixture(scope="module")
def native_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet10 trained (seeded) at its images' own 28 x 28, exported as before every
    artifact stated its size: `"resize": null`. fp32 and int8 ONNX, and safetensors."""
    import torch
    from safetensors.torch import save_file

    from oecl_model import model
    from oecl_train.export.graph import ServedModel, export_onnx, fold_batchnorm
    from oecl_train.export.quantize import INT8_FORMS, quantize_int8

    d = tmp_path_factory.mktemp("native") / "artifact"
    d.mkdir()
    torch.manual_seed(0)
    net = model.build_model(**ARCH)
    # BatchNorm statistics of smooth pictures (one cumulative pass), so that the norm depends
    # on what an image shows (a fresh network's norm hardly does).
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    calib = np.stack([blob(seed) for seed in range(64)]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        net.train()(torch.from_numpy(calib).float() / 255.0)
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(d / "model.safetensors"))
    export_onnx(ServedModel(fold_batchnorm(net), half=False, embedding=False),
                d / "model.onnx", (3, SIZE, SIZE), embedding=False)
    scratch = tmp_path_factory.mktemp("scratch")
    quantize_int8(d / "model.onnx", d / "model.int8.onnx", calib, scratch)
    with torch.no_grad():
        id_norms = model.ScoreModel(net)(torch.from_numpy(calib))[0].numpy()
    spec = InputSpec(SIZE, SIZE, 3).to_json()
    spec["resize"] = None  # what such an export wrote
    meta = {
        "schema_version": 2, "producer": {"name": "oecl", "version": "0.1.0"},
        "created": "2026-12-01T00:00:00Z",
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", **spec,
                  "normalization": {"in_graph": True, "mean": MEAN, "std": STD}},
        "outputs": {"norm": {"dtype": "float32", "shape": ["batch"]}},
        "score": {"name": "norm", "direction": "higher_is_normal",
                  "threshold": float(np.median(id_norms)),
                  "threshold_rule": {"method": "id_validation_tpr", "tpr": 0.5, "n_images": 64},
                  "id_norm": norm_stats(id_norms), "oe_norm": None},
        "max_batch": 8, "architecture": ARCH,
        "files": [file_entry(d / "model.onnx", "onnx", "fp32"),
                  file_entry(d / "model.int8.onnx", "onnx", "int8",
                             **INT8_FORMS["onnxruntime"]),
                  file_entry(d / "model.safetensors", "safetensors", "fp32")],
    }
    write_metadata(d, meta)
    return d


def photo(side: int) -> np.ndarray:
    """One smooth colour picture, drawn at 224 px and shrunk to `side` (a camera frame of the
    same object at several distances)."""
    y, x = np.mgrid[0:224, 0:224] / 224.0
    r = 128 + 100 * np.sin(2 * np.pi * (0.8 * x + 0.3 * y))
    g = 128 + 90 * np.cos(2 * np.pi * (0.5 * x - 0.7 * y))
    b = 255 * np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) / 0.08)
    big = Image.fromarray(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))
    return np.asarray(big.resize((side, side), Image.BILINEAR))


def blob(seed: int) -> np.ndarray:
    """A smooth 28 x 28 colour picture of its own (bicubic from 4 x 4 random pixels)."""
    a = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BICUBIC))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("backend,precision,tol", [
    ("onnxruntime-cpu", "fp32", 0.03),
    # int8 of an untrained network moves norms by several percent on its own.
    ("onnxruntime-cpu", "int8", 0.12),
    ("torch-cpu", "fp32", 0.03),
])
def test_every_size_scores_like_the_trained_size(native_artifact: Path, backend: str,
                                                  precision: str, tol: float) -> None:
    with Scorer.open(native_artifact, backend=backend, precision=precision) as s:
        norms = [r.norm for r in s.score([_png(photo(side)) for side in SIDES])]
        crop = s.score(photo(224)[98:126, 98:126])[0].norm  # the centre 28 x 28 of 224 px
    ref = norms[0]
    for side, norm in zip(SIDES, norms, strict=True):
        assert norm == pytest.approx(ref, rel=tol), f"{side} px: {norm} vs {ref} at 28 px"
    # The bug this guards against: the old runtime served the centre crop, a different score.
    assert abs(crop - ref) > 3 * tol * ref


def test_oecl_score_resizes_files_of_every_size(native_artifact: Path, tmp_path: Path) -> None:
    for side in SIDES:
        Image.fromarray(photo(side)).save(tmp_path / f"p{side:03d}.png")
    res = CliRunner().invoke(score_cmd, [str(tmp_path), "--model", str(native_artifact),
                                         "--backend", "onnxruntime-cpu"])
    assert res.exit_code == 0, res.output
    rows = [r for r in csv.DictReader(io.StringIO(res.stdout)) if r.get("norm")]
    assert [Path(r["path"]).name for r in rows] == [f"p{s:03d}.png" for s in SIDES]
    norms = [float(r["norm"]) for r in rows]
    assert norms == pytest.approx([norms[0]] * len(SIDES), rel=0.03)


def test_unset_resize_means_the_input_size_not_a_crop() -> None:
    spec = InputSpec(SIZE, SIZE, 3)
    assert spec.short_side == SIZE
    big = photo(224)
    want = load(big, InputSpec(SIZE, SIZE, 3, resize=SIZE))
    np.testing.assert_array_equal(load(big, spec), want)
    # Not square: the shorter side goes to the input's shorter side, then the centre crop.
    wide = np.zeros((56, 112, 3), np.uint8)
    wide[:, 56:] = 255
    got = load(wide, InputSpec(28, 28, 3))
    assert got.shape == (3, 28, 28) and got[:, :, 0].max() < 60 and got[:, :, -1].min() > 200


def test_export_states_the_trained_size(tmp_path: Path) -> None:
    from oecl_train.export.metadata import build_metadata

    norms = np.linspace(1.0, 2.0, 20)
    (tmp_path / "m.onnx").write_bytes(b"x")
    meta = build_metadata(
        spec=InputSpec(SIZE, SIZE, 1), arch={**ARCH, "in_channels": 1, "mean": [0.5],
                                             "std": [0.25]},
        embedding=False, threshold=1.1, tpr=0.95, id_norms=norms, oe_norms=None,
        max_batch=8, files=[{"path": "m.onnx", "format": "onnx", "precision": "fp32",
                             "sha256": "0" * 64, "bytes": 1}],
        producer={"name": "oecl", "version": "0"}, source={})
    assert meta["input"]["resize"] == SIZE and meta["input"]["resize_rule"] == RESIZE_RULE
    assert json.loads(json.dumps(meta))["input"]["resize"] == SIZE


def test_oecl_serve_resizes_bodies_of_every_size(native_artifact: Path) -> None:
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from oecl_runtime.serving.app import create_app
    from oecl_runtime.serving.config import BatchPolicy, ServerConfig

    with Scorer.open(native_artifact, backend="onnxruntime-cpu") as s, \
            TestClient(create_app(s, ServerConfig(BatchPolicy(max_delay_ms=1.0)))) as client:
        files = [("file", (f"p{side}.png", _png(photo(side)), "image/png")) for side in SIDES]
        r = client.post("/v1/score", files=files)
    assert r.status_code == 200, r.text
    norms = [res["norm"] for res in r.json()["results"]]
    assert norms == pytest.approx([norms[0]] * len(SIDES), rel=0.03)


def _jpeg(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "JPEG", quality=90)
    return path


def test_training_reads_jpegs_as_serving_does(tmp_path: Path) -> None:
    """A folder read with --image-size gives exactly the pixels `oecl score` serves, large
    JPEGs included (the runtime decodes them at a reduced DCT scale)."""
    from oecl_train.data.readers import make_reader

    big = np.asarray(Image.fromarray(photo(224)).resize((900, 640), Image.BICUBIC))
    files = {"train/good/a.jpg": big, "train/good/g.jpg": big[..., 1],
             "test/good/b.jpg": big[::-1], "test/bad/c.jpg": big[:, ::-1]}
    for name, arr in files.items():
        _jpeg(arr, tmp_path / name)
    spec = InputSpec(16, 16, 3, resize=16)
    train = make_reader("folder", str(tmp_path), spec=spec).load("train")
    for path, arr in zip(train.paths, train.images, strict=True):
        np.testing.assert_array_equal(arr, load(path, spec), err_msg=path)


def test_a_colour_jpeg_for_a_gray_model_is_converted_as_documented(tmp_path: Path) -> None:
    from oecl_runtime.preprocess import decode, to_model_input

    noise = np.random.default_rng(0).integers(0, 256, (640, 900, 3), dtype=np.uint8)
    jpg = _jpeg(noise, tmp_path / "c.jpg")
    gray = InputSpec(64, 64, 1, resize=64)
    drafted = decode(jpg, spec=gray)  # at a reduced DCT scale, still in colour
    assert drafted.mode == "RGB" and drafted.size[0] < 900
    np.testing.assert_array_equal(load(jpg, gray), to_model_input(drafted.convert("L"), gray))


def _doc_client(spec: dict) -> object:
    """`prepare` of docs/ARTIFACT.md's minimal client, bound to `spec`."""
    from helpers import REPO

    text = (REPO / "docs" / "ARTIFACT.md").read_text()
    code = text[text.index('side = spec["resize"]'):text.index("batch = np.stack")]
    scope = {"spec": spec, "np": np, "Image": Image}
    exec(code, scope)  # noqa: S102 (the project's own document)
    return scope["prepare"]


@pytest.mark.parametrize("resize", [None, 28])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_documented_client_prepares_what_the_runtime_does(tmp_path: Path, resize,
                                                               channels: int) -> None:
    spec = InputSpec(28, 28, channels, resize=resize)
    prepare = _doc_client({**spec.to_json(), "name": "images"})
    big = np.asarray(Image.fromarray(photo(224)).resize((900, 640), Image.BICUBIC))
    images = [_jpeg(big, tmp_path / "big.jpg"), _jpeg(big[:100, :60], tmp_path / "small.jpg")]
    for side, arr in ((28, photo(28)), (112, photo(112)[:, :90])):
        images.append(tmp_path / f"p{side}.png")
        Image.fromarray(arr).save(images[-1])
    for path in images:
        np.testing.assert_array_equal(prepare(str(path)), load(path, spec), err_msg=path.name)
