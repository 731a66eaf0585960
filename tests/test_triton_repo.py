"""`oecl triton-repo`: the model repository, its config.pbtxt read by Triton's own schema.

Triton's `inference.ModelConfig` comes from tritonclient (its generated protobuf classes); the
server itself needs its container and does not run here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import copy_artifact

from oecl_runtime import Artifact, ArtifactError
from oecl_runtime.artifact import file_entry, update_files
from oecl_runtime.cli import main
from oecl_runtime.triton_repo import write_repository

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="needs tritonclient[grpc] (Triton's model-configuration schema)")
from google.protobuf import text_format  # noqa: E402


def _parse(path: Path):  # -> model_config_pb2.ModelConfig
    # Parse, not Merge: an unknown field or a misspelt enum is an error, as in tritonserver.
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_onnx_repository_parses_against_tritons_schema(artifact_dir: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "repo"
    result = CliRunner().invoke(main, ["triton-repo", str(artifact_dir), "--out", str(out),
                                       "--name", "digits-oecl", "--max-delay-us", "2000",
                                       "--no-image-bytes"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["platform"] == "onnxruntime_onnx" and summary["max_batch_size"] == 32
    cfg = _parse(out / "digits-oecl" / "config.pbtxt")
    T = model_config_pb2
    assert cfg.name == "digits-oecl" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == Artifact.open(artifact_dir).max_batch
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, inp.format, list(inp.dims)) == \
        ("images", T.TYPE_UINT8, T.ModelInput.FORMAT_NCHW, [3, 32, 32])
    outs = {o.name: o for o in cfg.output}
    assert set(outs) == {"norm", "embedding"}
    assert outs["norm"].data_type == T.TYPE_FP32 and list(outs["norm"].dims) == [1]
    assert outs["norm"].HasField("reshape") and list(outs["norm"].reshape.shape) == []
    assert list(outs["embedding"].dims) == [128] and not outs["embedding"].HasField("reshape")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [1, 4, 8, 16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert cfg.instance_group[0].kind == T.ModelInstanceGroup.KIND_GPU
    assert not cfg.cc_model_filenames and not cfg.default_model_filename  # ONNX: any GPU

    # The config describes the file it sits beside.
    model = out / "digits-oecl" / "1" / "model.onnx"
    assert model.read_bytes() == (artifact_dir / "model.onnx").read_bytes()
    graph = onnx.load(str(model)).graph
    assert [i.name for i in graph.input] == [inp.name]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {o.name for o in graph.output} == set(outs)
    readme = (out / "digits-oecl" / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "client.infer('digits-oecl'" in readme
    assert f"{Artifact.open(artifact_dir).threshold:.6g}" in readme
    assert "--gpus all" in readme

    # A second model in the same repository leaves the first alone; written again over its own
    # output, a model is replaced.
    for kind in ("gpu", "cpu"):
        assert CliRunner().invoke(main, ["triton-repo", str(artifact_dir), "--out", str(out),
                                         "--kind", kind]).exit_code == 0
    assert _parse(out / "oecl_model" / "config.pbtxt").instance_group[0].kind == \
        T.ModelInstanceGroup.KIND_CPU
    assert _parse(out / "digits-oecl" / "config.pbtxt").name == "digits-oecl"
    assert sorted(p.name for p in out.iterdir()) == ["digits-oecl", "oecl", "oecl_model",
                                                     "oecl_preprocess"]
    # A CPU repository's command asks for no GPU, and its client does not call port 8000,
    # where `oecl serve` listens by default.
    readme = (out / "oecl" / "README.md").read_text()
    assert "--gpus" not in readme and "-p 8010:8000" in readme
    assert 'InferenceServerClient("127.0.0.1:8010")' in readme
    assert "pip install --no-deps /wheels/oecl-" in readme  # the decoding step needs oecl


def test_plan_repository(artifact_dir: Path, tmp_path: Path) -> None:
    art = copy_artifact(artifact_dir, tmp_path / "art")
    (art / "model.plan").write_bytes(b"a serialized engine would be here")
    update_files(art, add=[file_entry(art / "model.plan", "tensorrt", "fp16", max_batch=16,
                                      tensorrt_version="10.7.0", gpu_name="NVIDIA L4",
                                      compute_capability="8.9")])
    summary = write_repository(art, tmp_path / "repo", fmt="tensorrt")
    cfg = _parse(tmp_path / "repo" / "oecl_model" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and summary["precision"] == "fp16"
    assert cfg.max_batch_size == 16  # the plan's own profile, below the artifact's 32
    # The whole ensemble batches no more than the plan takes.
    assert {_parse(tmp_path / "repo" / m / "config.pbtxt").max_batch_size
            for m in ("oecl", "oecl_preprocess")} == {16}
    assert (tmp_path / "repo" / "oecl_model" / "1" / "model.plan").is_file()
    assert "TensorRT 10.7.0" in (tmp_path / "repo" / "oecl" / "README.md").read_text()
    # Loaded on an L4 (8.9) only; any other GPU finds no file for its capability and the
    # default name tells why.
    assert dict(cfg.cc_model_filenames) == {"8.9": "model.plan"}
    assert cfg.default_model_filename == "plan-built-for-compute-capability-8.9-only"


def test_refusals(artifact_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="has no tensorrt file"):
        write_repository(artifact_dir, tmp_path / "a", fmt="tensorrt")
    with pytest.raises(ArtifactError, match="cannot run a tensorrt model"):
        write_repository(artifact_dir, tmp_path / "a", fmt="tensorrt", kind="cpu")
    with pytest.raises(ArtifactError, match="model name"):
        write_repository(artifact_dir, tmp_path / "a", name="../x")
    # A model directory oecl did not write is never replaced.
    other = tmp_path / "repo"
    (other / "oecl").mkdir(parents=True)
    (other / "oecl" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["triton-repo", str(artifact_dir), "--out", str(other)])
    assert result.exit_code == 1 and "is not a model made by oecl" in result.output
    assert (other / "oecl" / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["triton-repo", str(artifact_dir), "--out", str(other),
                                       "--name", 'x" platform: "y'])
    assert result.exit_code == 2 and "--name" in result.output


def test_tensor_names_are_escaped(artifact_dir: Path, tmp_path: Path) -> None:
    """An input name with quotes cannot end its string and add fields to config.pbtxt."""
    art = copy_artifact(artifact_dir, tmp_path / "art")
    meta = json.loads((art / "oecl.json").read_text())
    evil = 'images" } ] output [ { name: "x'
    meta["input"]["name"] = evil
    (art / "oecl.json").write_text(json.dumps(meta))
    from oecl_runtime.triton_repo import config_pbtxt, python_config_pbtxt

    a = Artifact.open(art, verify=False)
    for text in (config_pbtxt(a, "m", "onnx", 8, 100, "cpu", 1),
                 python_config_pbtxt(a, "m", "onnxruntime-cpu", "fp32", 8, 100, "cpu", 1)):
        cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert cfg.input[0].name == evil


def test_python_backend_repository(artifact_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = CliRunner().invoke(main, ["triton-repo", str(artifact_dir), "--out", str(out),
                                       "--backend", "python", "--kind", "cpu"])
    assert result.exit_code == 0, result.output
    cfg = _parse(out / "oecl" / "config.pbtxt")
    T = model_config_pb2
    assert cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 32
    ins = {i.name: i for i in cfg.input}
    assert ins["images"].data_type == T.TYPE_UINT8 and list(ins["images"].dims) == [3, 32, 32]
    assert ins["image_bytes"].data_type == T.TYPE_STRING and list(ins["image_bytes"].dims) == [1]
    assert all(i.optional for i in cfg.input)
    assert [(o.name, o.data_type) for o in cfg.output] == [("norm", T.TYPE_FP32),
                                                          ("is_anomaly", T.TYPE_BOOL)]
    assert cfg.parameters["oecl_backend"].string_value == "onnxruntime-cpu"
    version = out / "oecl" / "1"
    assert "from oecl_runtime.serving.triton_model import TritonPythonModel" in \
        (version / "model.py").read_text()
    # The copied artifact opens and verifies (hashes included) where model.py looks for it.
    assert Artifact.open(version / "artifact").input_name == "images"


def test_native_ensemble_takes_image_bytes(artifact_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    summary = write_repository(artifact_dir, out, name="m", max_delay_us=700)
    assert summary["models"] == ["m_model", "m_preprocess", "m"]
    T = model_config_pb2
    ens, pre, model = (_parse(out / n / "config.pbtxt") for n in ("m", "m_preprocess",
                                                                   "m_model"))
    assert ens.platform == "ensemble" and pre.backend == "python"
    assert model.platform == "onnxruntime_onnx" and model.name == "m_model"
    assert model.dynamic_batching.max_queue_delay_microseconds == 700
    assert {i.name: (i.data_type, i.optional) for i in ens.input} == {
        "images": (T.TYPE_UINT8, True), "image_bytes": (T.TYPE_STRING, True)}
    assert [(o.name, list(o.dims)) for o in ens.output] == [("norm", [1])]
    # Each step's maps name tensors the step model declares, and the wiring connects.
    first, second = ens.ensemble_scheduling.step
    assert (first.model_name, second.model_name) == ("m_preprocess", "m_model")
    assert set(first.input_map) == {i.name for i in pre.input}
    assert set(first.output_map) == {o.name for o in pre.output} == {"pixels"}
    assert set(second.input_map) == {i.name for i in model.input}
    assert second.input_map["images"] == first.output_map["pixels"]
    assert second.output_map["norm"] == "norm"
    (pixels,) = pre.output
    assert list(pixels.dims) == list(model.input[0].dims) == [3, 32, 32]
    assert "import TritonPreprocessModel as TritonPythonModel" in \
        (out / "m_preprocess" / "1" / "model.py").read_text()
    assert json.loads((out / "m_preprocess" / "1" / "oecl.json").read_text()) == \
        Artifact.open(artifact_dir).meta
    assert "A step of the ensemble `m`" in (out / "m_model" / "README.md").read_text()
