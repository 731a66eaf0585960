"""What the artifact loader and the backends refuse, each in one line: a model whose `norm`
output is not one value per image, external data named anywhere in an ONNX model and not
hashed, non-finite norms and thresholds, and malformed `oecl.json` contents."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import copy_artifact, random_images
from onnx import TensorProto, helper

from oecl_runtime import Scorer, golden
from oecl_runtime.artifact import (
    Artifact,
    ArtifactError,
    file_entry,
    onnx_external_data,
    validate_metadata,
)
from oecl_runtime.backends import open_backend
from oecl_runtime.scorer import ScoreError, check_threshold

CHW = (3, 32, 32)


def _meta(d: Path) -> dict:
    return json.loads((d / "oecl.json").read_text())


def _write_meta(d: Path, meta: dict) -> None:
    (d / "oecl.json").write_text(json.dumps(meta))


def _one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def _graph_model(nodes: list, output_shape: list) -> onnx.ModelProto:
    """uint8 images [N, 3, 32, 32] -> float `norm` of `output_shape`, through `nodes`, which
    read `x` (the images as float) and write `norm`."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT), *nodes], "g",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", *CHW])],
        [helper.make_tensor_value_info("norm", TensorProto.FLOAT, output_shape)],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
                     helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _with_model(art: Path, model: onnx.ModelProto) -> Path:
    onnx.save(model, str(art / "model.onnx"))
    meta = _meta(art)
    meta["files"] = [file_entry(art / "model.onnx", "onnx", "fp32")]
    _write_meta(art, meta)
    return art


@pytest.fixture
def plain_art(artifact_dir: Path, tmp_path: Path) -> Path:
    return copy_artifact(artifact_dir, tmp_path / "artifact")


# ------------------------------------------------------------------ the norm output's shape

BATCH_MEAN = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
              helper.make_node("Reshape", ["m", "one"], ["norm"])]
PAIR = [helper.make_node("ReduceMean", ["x", "axes23"], ["m"], keepdims=0),
        helper.make_node("Slice", ["m", "starts", "ends", "ax1"], ["norm"])]


def _consts(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.initializer.extend([
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes23", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [2]),
        helper.make_tensor("ax1", TensorProto.INT64, [1], [1])])
    return model


@pytest.mark.parametrize("nodes,shape,got", [(BATCH_MEAN, [1], r"\[1\]"),
                                              (PAIR, ["N", 2], r"\[2, 2\]")])
def test_a_norm_output_of_another_shape_is_refused_at_load(plain_art: Path, nodes, shape,
                                                           got: str) -> None:
    _with_model(plain_art, _consts(_graph_model(nodes, shape)))
    with pytest.raises(ArtifactError, match=rf"model.onnx: the norm output has shape {got} for "
                       r"a batch of 2 images; oecl.json says \[batch\]") as info:
        Scorer.open(plain_art, backend="onnxruntime-cpu")
    _one_line(info)


def test_the_norm_output_is_checked_on_every_call(plain_art: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    bad = tmp_path / "mean.onnx"
    onnx.save(_consts(_graph_model(BATCH_MEAN, [1])), str(bad))
    backend = open_backend(Artifact.open(plain_art), "onnxruntime-cpu")
    batch = np.zeros((3, *CHW), np.uint8)
    assert backend.run(batch).shape == (3,)
    # The file swapped under an open backend: the same check holds per call, not only at load.
    backend.session = ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])
    with pytest.raises(ArtifactError, match=r"shape \[1\] for a batch of 3 images"):
        backend.run(batch)


def test_torch_backend_checks_the_norm_shape(plain_art: Path, tmp_path: Path) -> None:
    from helpers import torch_artifact

    torch_artifact(tmp_path, plain_art, width=4)
    backend = open_backend(Artifact.open(tmp_path), "torch-cpu")
    real = backend.model
    backend.model = lambda x: (real(x)[0].mean(0, keepdim=True), None)  # a batch mean
    with pytest.raises(ArtifactError, match=r"model.safetensors: the norm output has shape "
                       r"\[1\] for a batch of 2 images"):
        backend.run(np.zeros((2, *CHW), np.uint8))


# ------------------------------------------------------------------ non-finite norms

def _dark_images_give_nan(art: Path) -> Path:
    """norm = sqrt(mean pixel - 100): NaN for a dark image, a number for a bright one."""
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
             helper.make_node("Sub", ["m", "hundred"], ["d"]),
             helper.make_node("Sqrt", ["d"], ["norm"])]
    return _with_model(art, _graph_model(nodes, ["N"]))


def test_a_non_finite_norm_is_an_error_for_that_image_only(plain_art: Path,
                                                           tmp_path: Path) -> None:
    from PIL import Image

    _dark_images_give_nan(plain_art)
    dark, bright = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8)
    with Scorer.open(plain_art, backend="onnxruntime-cpu") as s:
        assert s.score(bright)[0].norm == pytest.approx(10.0)
        with pytest.raises(ScoreError, match=r"image 1: the model returned a non-finite norm "
                           r"\(nan\)"):
            s.score([bright, dark])
        Image.fromarray(dark).save(tmp_path / "dark.png")
        Image.fromarray(bright).save(tmp_path / "bright.png")
        rows = list(s.score_files([str(tmp_path / "dark.png"), str(tmp_path / "bright.png")]))
    assert rows[0].norm is None and rows[0].is_anomaly is None
    assert "non-finite norm (nan)" in rows[0].error
    assert rows[1].error is None and rows[1].norm == pytest.approx(10.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_a_threshold_must_be_finite_and_not_negative(plain_art: Path, bad: float) -> None:
    meta = _meta(plain_art)
    meta["score"]["threshold"] = bad
    _write_meta(plain_art, meta)  # json writes NaN / Infinity, which json.loads reads back
    with pytest.raises(ArtifactError, match="score.threshold must be a finite number >= 0") as i:
        Artifact.open(plain_art)
    _one_line(i)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        check_threshold(bad)


# ------------------------------------------------------------------ external data

def _external(name: str, values: np.ndarray, location: str, where: Path) -> TensorProto:
    """A float tensor whose bytes live in `where/location`."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(values.shape))
    (where / location).write_bytes(values.astype(np.float32).tobytes())
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"),
                       ("length", str(values.size * 4))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _sparse(values: TensorProto) -> onnx.SparseTensorProto:
    indices = helper.make_tensor("idx", TensorProto.INT64, [2], [0, 3])
    return helper.make_sparse_tensor(values, indices, [4])


def _hidden_in(place: str, where: Path) -> onnx.ModelProto:
    """A model that names `w.bin` as external data only in `place`."""
    ext = _external("w", np.array([1.0, 2.0]), "w.bin", where)
    model = _consts(_graph_model(BATCH_MEAN, [1]))
    g = model.graph
    if place == "sparse initializer":
        g.sparse_initializer.append(_sparse(ext))
    elif place == "sparse_value attribute":
        g.node.append(helper.make_node("Constant", [], ["c"], sparse_value=_sparse(ext)))
    elif place == "tensors attribute":
        g.node.append(helper.make_node("Custom", [], ["c"], domain="x", tensors=[ext]))
    elif place == "function body":
        body = helper.make_node("Constant", [], ["c"], value=ext)
        model.functions.append(helper.make_function("x", "F", [], ["c"], [body],
                                                    [helper.make_opsetid("", 18)]))
    elif place == "subgraph":
        inner = helper.make_graph([], "inner", [], [], initializer=[ext])
        g.node.append(helper.make_node("If", ["cond"], ["c"], then_branch=inner,
                                       else_branch=inner))
    return model


PLACES = ["sparse initializer", "sparse_value attribute", "tensors attribute", "function body",
          "subgraph"]


@pytest.mark.parametrize("place", PLACES)
def test_external_data_anywhere_is_found(tmp_path: Path, place: str) -> None:
    onnx.save(_hidden_in(place, tmp_path), str(tmp_path / "m.onnx"))
    assert onnx_external_data(tmp_path / "m.onnx") == ["w.bin"]


@pytest.mark.parametrize("place", PLACES)
def test_unlisted_external_data_is_refused_and_listed_data_is_hashed(plain_art: Path,
                                                                     place: str) -> None:
    onnx.save(_hidden_in(place, plain_art), str(plain_art / "model.onnx"))
    meta = _meta(plain_art)
    entry = file_entry(plain_art / "model.onnx", "onnx", "fp32")
    assert [e["path"] for e in entry["external_data"]] == ["w.bin"]
    meta["files"] = [{k: v for k, v in entry.items() if k != "external_data"}]
    _write_meta(plain_art, meta)
    art = Artifact.open(plain_art)
    with pytest.raises(ArtifactError, match="model.onnx loads external data 'w.bin' that "
                       "oecl.json does not hash"):
        art.path_of(art.files[0])
    meta["files"] = [entry]
    _write_meta(plain_art, meta)
    art = Artifact.open(plain_art)
    art.path_of(art.files[0])  # listed and hashed: accepted
    data = bytearray((plain_art / "w.bin").read_bytes())
    data[3] ^= 0x01  # eight bytes of weights, one bit changed
    (plain_art / "w.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="w.bin sha256 .* does not match"):
        Artifact.open(plain_art).path_of(art.files[0])


def test_an_unreadable_graph_is_one_line(plain_art: Path) -> None:
    (plain_art / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 64)
    meta = _meta(plain_art)
    meta["files"] = [_raw_entry(plain_art)]  # file_entry itself would refuse to list it
    _write_meta(plain_art, meta)
    art = Artifact.open(plain_art)
    with pytest.raises(ArtifactError, match="model.onnx: not a readable ONNX graph") as info:
        art.path_of(art.files[0])
    _one_line(info)


def _raw_entry(art: Path) -> dict:
    from oecl_runtime.artifact import sha256_file

    p = art / "model.onnx"
    return {"path": p.name, "format": "onnx", "precision": "fp32", "sha256": sha256_file(p),
            "bytes": p.stat().st_size}


# ------------------------------------------------------------------ malformed oecl.json

def test_deeply_nested_json_is_one_line(plain_art: Path) -> None:
    (plain_art / "oecl.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArtifactError, match="nests too deeply") as info:
        Artifact.open(plain_art)
    _one_line(info)


def test_golden_tolerances_must_be_an_object(art: Path) -> None:
    meta = _meta(art)
    meta["golden"]["tolerances"] = [1e-4, 0.005]
    _write_meta(art, meta)
    with pytest.raises(ArtifactError, match="golden.tolerances must be an object") as info:
        golden.load(Artifact.open(art))
    _one_line(info)
    meta["golden"]["tolerances"] = {"AUROC_diff": "lots"}
    _write_meta(art, meta)
    with pytest.raises(ArtifactError, match="golden.tolerances.AUROC_diff must be a finite"):
        golden.load(Artifact.open(art))


@pytest.mark.parametrize("shape", ["batch", [["batch"]], ["batch", 2], [], None, ["N"]])
def test_a_malformed_norm_shape_is_refused(artifact_dir: Path, shape) -> None:
    meta = copy.deepcopy(_meta(artifact_dir))
    meta["outputs"]["norm"]["shape"] = shape
    with pytest.raises(ArtifactError, match=r"outputs.norm.shape must be") as info:
        validate_metadata(meta)
    _one_line(info)


@pytest.mark.parametrize("shape", ["batch", ["batch", -1], ["batch", "128"], [128, "batch"]])
def test_a_malformed_embedding_shape_is_refused(artifact_dir: Path, shape) -> None:
    meta = copy.deepcopy(_meta(artifact_dir))
    meta["outputs"]["embedding"]["shape"] = shape
    with pytest.raises(ArtifactError, match=r"outputs.embedding.shape must be"):
        validate_metadata(meta)


def test_long_paths_and_symlink_loops_are_one_line(plain_art: Path, tmp_path: Path) -> None:
    meta = _meta(plain_art)
    meta["files"][0]["path"] = "m" * 5000 + ".onnx"
    _write_meta(plain_art, meta)
    with pytest.raises(ArtifactError, match="is not a usable file name") as info:
        Artifact.open(plain_art)
    assert "5005 characters" in _one_line(info)
    with pytest.raises(ArtifactError, match="cannot open artifact directory") as info:
        Artifact.open(tmp_path / ("d" * 5000))
    _one_line(info)
    (plain_art / "a").symlink_to(plain_art / "b")
    (plain_art / "b").symlink_to(plain_art / "a")
    meta["files"][0]["path"] = "a/model.onnx"
    _write_meta(plain_art, meta)
    with pytest.raises(ArtifactError, match="a/model.onnx cannot be resolved") as info:
        Artifact.open(plain_art)
    _one_line(info)


_JUNK = [None, True, -1, 1e308, math.nan, "x" * 3000, [], {}, [[[[]]]], {"a": {"b": None}}]


def _leaves(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def test_any_value_anywhere_in_oecl_json_is_accepted_or_refused_in_one_line(
        artifact_dir: Path) -> None:
    base = _meta(artifact_dir)
    tried = 0
    for path in list(_leaves(base))[1:]:
        for junk in _JUNK:
            meta = copy.deepcopy(base)
            parent = meta
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = junk
            try:
                validate_metadata(meta)
            except ArtifactError as e:
                assert "\n" not in str(e) and len(str(e)) < 600, (path, junk, str(e)[:200])
            tried += 1
    assert tried > 500


def test_scoring_still_works_after_all_checks(artifact_dir: Path) -> None:
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu") as s:
        results = s.score(list(random_images(3, seed=4)))
    assert all(np.isfinite(r.norm) for r in results)
