"""`oecl export`: a tiny trained run exported to ONNX fp32/fp16/int8, and what the artifact
holds (graphs, metadata and files, golden set, int8 forms), checked through the runtime that
serves it.

One tiny OECL run is trained per module (digits, class 0 vs photo crops, 16x16, ResNet-10 of
width 16) and exported once to all CPU formats; most tests read that artifact. How an export is
asked for (the command, --views K, refusals, TensorRT, cost) is in test_export_options.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from export_support import float_input_convs, one_torch_thread, train_tiny_run  # noqa: E402

from oecl_runtime import Artifact, ArtifactError, Scorer  # noqa: E402
from oecl_runtime.artifact import sha256_file, validate_metadata  # noqa: E402
from oecl_runtime.golden import GOLDEN_FILES  # noqa: E402
from oecl_train import export  # noqa: E402
from oecl_train.export import export_run  # noqa: E402
from oecl_train.metrics import threshold_at_tpr  # noqa: E402

MAX_BATCH = 64
PRECISIONS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


# Declared in each export test module: pytest shares fixtures between modules through conftest
# only.
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _one_torch_thread):
    """(run_dir, splits) of a tiny OECL run trained for a few dozen steps."""
    return train_tiny_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def artifact(trained, tmp_path_factory):
    """(artifact dir, summary) of one export to every format that runs on the CPU."""
    run_dir, splits = trained
    out = tmp_path_factory.mktemp("export") / "model"
    summary = export_run(
        run_dir, out, "onnx,onnx-fp16,onnx-int8", max_batch=MAX_BATCH, threshold_tpr=0.95,
        embedding=True, calib_images=64, verify=True, device="cpu", views=1, splits=splits,
        log=lambda msg: None,
    )
    return out, summary


# ---------------------------------------------------------------- the graphs


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_graph_contract(artifact, precision):
    out, _ = artifact
    model = onnx.load(str(out / PRECISIONS[precision]))
    onnx.checker.check_model(model, full_check=True)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Dropout" not in ops
    # constant-folded: no shape arithmetic or constant-producing nodes left for the runtime
    assert not ops & {"Identity", "Shape", "Constant", "ConstantOfShape", "Gather"}
    if precision == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    (inp,) = model.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 16, 16]  # dynamic batch, NCHW
    outs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(outs) == ["norm", "embedding"]
    assert all(t.elem_type == onnx.TensorProto.FLOAT for t in outs.values())
    assert [d.dim_value for d in outs["embedding"].shape.dim][1:] == [128]


def test_fp16_graph_is_half(artifact):
    out, _ = artifact
    model = onnx.load(str(out / "model.fp16.onnx"))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    types = {t.data_type for t in model.graph.initializer if t.name in conv_weights}
    assert types == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_dynamic_batch_through_runtime(artifact, trained, precision):
    out, _ = artifact
    _, splits = trained
    images = splits.test_images[:MAX_BATCH]
    with Scorer.open(out, backend="onnxruntime-cpu", precision=precision) as scorer:
        assert scorer.backend.precision == precision
        full = scorer.backend.run(np.ascontiguousarray(images))
        assert full.shape == (MAX_BATCH,) and full.dtype == np.float32
        for n in (1, 7):
            part = scorer.backend.run(np.ascontiguousarray(images[:n]))
            assert part.shape == (n,)
            np.testing.assert_allclose(part, full[:n], rtol=1e-5, atol=1e-6)


def test_embedding_output_matches_norm(artifact, trained):
    import onnxruntime as ort

    out, _ = artifact
    _, splits = trained
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    norm, z = sess.run(["norm", "embedding"], {"images": splits.id_val})
    assert z.shape == (len(splits.id_val), 128) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), norm, rtol=1e-5)


def test_one_view_is_the_single_pass_graph(artifact, trained):
    """K = 1 (the API default, as `artifact` was made) is today's graph: no resampling,
    the plain view listed, the score named norm."""
    out, _ = artifact
    model = onnx.load(str(out / "model.onnx"))
    assert "MatMul" not in {n.op_type for n in model.graph.node}
    assert not {i.name for i in model.graph.initializer if i.name.endswith(
        export.VIEW_MAP_NAMES)}
    score = Artifact.open(out).meta["score"]
    assert score["name"] == "norm"
    assert score["views"] == [{"top": 0, "left": 0, "height": 16, "width": 16, "hflip": False}]


@pytest.mark.parametrize("name", ["model.int8.onnx", export.INT8_SYMMETRIC_FILE])
def test_int8_keeps_the_stem_convolution_float(artifact, name):
    """Quantising the normalised image the stem reads moves served norms by percents; both
    int8 files keep that one convolution float and quantise every later one."""
    out, _ = artifact
    floats = float_input_convs(onnx.load(str(out / name)))
    assert len(floats) > 2 and floats[0] and not any(floats[1:])


# ---------------------------------------------------------------- metadata and files


def test_metadata_validates_and_hashes_match(artifact, trained):
    out, summary = artifact
    art = Artifact.open(out, verify=True)
    meta = art.meta
    validate_metadata(meta)
    assert meta["input"]["name"] == "images" and meta["input"]["color_mode"] == "L"
    assert meta["input"]["resize"] == 16 and meta["input"]["normalization"]["in_graph"] is True
    assert set(meta["outputs"]) == {"norm", "embedding"}
    assert meta["score"]["name"] == "norm" and meta["score"]["direction"] == "higher_is_normal"
    assert meta["score"]["oe_norm"]["n"] > 0  # external OE: the photo crops
    assert meta["max_batch"] == MAX_BATCH
    assert meta["architecture"]["depth"] == "resnet10"
    listed = {f["path"]: f for f in meta["files"]}
    assert set(listed) == {*PRECISIONS.values(), "model.safetensors", export.INT8_SYMMETRIC_FILE,
                           *GOLDEN_FILES.values()}
    for name, f in listed.items():
        assert f["sha256"] == sha256_file(out / name)
        assert f["bytes"] == (out / name).stat().st_size
    assert meta["verification"]["passed"] is True
    assert {f["path"] for f in summary["files"]} == set(listed)


def test_threshold_is_id_validation_norm_at_tpr(artifact, trained):
    from oecl_train.trainer import load_trained

    out, _ = artifact
    run_dir, splits = trained
    _, net, _ = load_trained(run_dir, "cpu")
    norms = export.torch_norms(net, splits.id_val, torch.device("cpu"))
    meta = Artifact.open(out).meta
    rule = meta["score"]["threshold_rule"]
    assert rule == {"method": "id_validation_tpr", "tpr": 0.95, "n_images": len(splits.id_val)}
    assert meta["score"]["threshold"] == pytest.approx(threshold_at_tpr(norms, 0.95), rel=1e-6)
    assert meta["score"]["id_norm"]["n"] == len(splits.id_val)


def test_safetensors_serves_through_torch_backend(artifact, trained):
    from safetensors.numpy import load_file

    from oecl_model.model import build_model

    out, _ = artifact
    _, splits = trained
    meta = Artifact.open(out).meta
    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(build_model(**meta["architecture"]).state_dict())
    images = splits.test_images[:32]
    with Scorer.open(out, backend="torch-cpu") as t, \
            Scorer.open(out, backend="onnxruntime-cpu", precision="fp32") as o:
        np.testing.assert_allclose(t.score_array(images), o.score_array(images), rtol=1e-4)


def test_parity_within_tolerances(artifact):
    out, _ = artifact
    report = json.loads((out / "verify.json").read_text())
    assert report["pass"] is True
    assert report["n_id"] > 0 and report["n_ood"] > 0 and report["n_images"] >= 100
    rows = {r["path"]: r for r in report["files"]}
    assert set(rows) == {*PRECISIONS.values(), "model.safetensors", export.INT8_SYMMETRIC_FILE}
    assert rows["model.onnx"]["backend"] == "onnxruntime-cpu"
    assert rows["model.onnx"]["max_rel_diff"] <= 1e-4
    assert rows["model.safetensors"]["max_rel_diff"] <= 1e-4
    for r in rows.values():
        assert r["AUROC_diff"] <= 0.005, r
    # int8 against the fp32 file as well as against PyTorch
    assert abs(rows["model.int8.onnx"]["AUROC"] - rows["model.onnx"]["AUROC"]) <= 0.005
    # fp16 rounds, but far less than int8's coarse steps
    assert rows["model.fp16.onnx"]["mean_rel_diff"] < 1e-2


def test_artifact_permissions_are_ordinary(artifact):
    out, _ = artifact
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 & ~mask
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644 & ~mask, p.name


def test_verify_json_records_the_time_of_each_stage(artifact):
    out, summary = artifact
    t = json.loads((out / "verify.json").read_text())["timings_s"]
    assert {"data", "export_fp32", "quantise_int8", "reference", "golden", "metadata",
            "verify", "total"} <= set(t)
    assert all(v >= 0 for v in t.values()) and t["total"] >= max(
        v for k, v in t.items() if k != "total")
    assert summary["timings_s"] == t


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_damaged_model_file_is_refused(artifact, tmp_path, damage, name):
    out, _ = artifact
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    data = bytearray((copy / name).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    (copy / name).write_bytes(bytes(data))
    art = Artifact.open(copy)  # files are checked when used
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
        art.path_of(next(f for f in art.files if f["path"] == name))
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
        Scorer.open(copy, backend="onnxruntime-cpu", precision="int8" if "int8" in name else None)


# ---------------------------------------------------------------- golden set, int8 forms


def test_golden_set_holds_reference_norms_of_the_run(artifact, trained):
    from oecl_runtime import golden
    from oecl_train.trainer import load_trained

    out, _ = artifact
    art = Artifact.open(out)
    listed = {f["path"]: f for f in art.meta["files"]}
    for name in GOLDEN_FILES.values():
        assert listed[name]["format"] == "npy"
    g = golden.load(art)
    assert g.images.dtype == np.uint8 and g.images.shape[1:] == (1, 16, 16)
    assert 0 < g.is_id.sum() <= golden.PER_SIDE and 0 < (~g.is_id).sum() <= golden.PER_SIDE
    _, net, _ = load_trained(trained[0], torch.device("cpu"))
    want = export.torch_norms(net, g.images, torch.device("cpu"))
    np.testing.assert_allclose(g.reference, want, rtol=1e-6)
    assert art.meta["golden"]["tolerances"] == {
        "fp32_max_rel_diff": export.FP32_REL_TOL, "AUROC_diff": export.AUROC_TOL,
        "reduced_mean_rel_diff": export.verify.REDUCED_MEAN_REL_TOL,
        "rank_correlation_min": export.verify.RANK_CORRELATION_MIN}


@pytest.mark.parametrize("backend,precision", [("onnxruntime-cpu", "fp32"),
                                               ("onnxruntime-cpu", "int8"), ("torch-cpu", None)])
def test_oecl_verify_passes_on_the_export(artifact, backend, precision):
    from oecl_train.cli import main

    out, _ = artifact
    args = ["verify", str(out), "--backend", backend] + (["--precision", precision]
                                                         if precision else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-2])  # the JSON, then "pass"
    assert report["pass"] is True and report["backend"] == backend
    assert report["precision"] == (precision or "fp32")


def test_two_int8_files_each_for_its_consumer(artifact):
    out, _ = artifact
    art = Artifact.open(out)
    for_ort = art.find("onnx", "int8")
    for_trt = art.find("onnx", "int8", consumer="tensorrt")
    assert for_ort["path"] == "model.int8.onnx" and for_ort["consumers"] == ["onnxruntime"]
    assert for_trt["path"] == export.INT8_SYMMETRIC_FILE and for_trt["consumers"] == ["tensorrt"]
    assert "symmetric" in for_trt["quantization"]["activations"]

    def zero_points(name):
        model = onnx.load(str(out / name))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        return [inits[n.input[2]] for n in model.graph.node
                if n.op_type == "QuantizeLinear" and len(n.input) > 2]

    sym = zero_points(export.INT8_SYMMETRIC_FILE)
    assert sym and all(z.dtype == np.int8 and not z.any() for z in sym)  # TensorRT's rule
    assert any(z.dtype == np.uint8 for z in zero_points("model.int8.onnx"))
