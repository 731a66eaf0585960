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
                                       "--name", "digits-oecl", "--max-delay-us", "2000"])
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
    readme = (out / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and 'client.infer("digits-oecl"' in readme
    assert f"{Artifact.open(artifact_dir).threshold:.6g}" in readme

    # Written again over its own output: replaced.
    assert CliRunner().invoke(main, ["triton-repo", str(artifact_dir), "--out", str(out),
                                     "--kind", "cpu"]).exit_code == 0
    assert _parse(out / "oecl" / "config.pbtxt").instance_group[0].kind == \
        T.ModelInstanceGroup.KIND_CPU
    assert not (out / "digits-oecl").exists()


def test_plan_repository(artifact_dir: Path, tmp_path: Path) -> None:
    art = copy_artifact(artifact_dir, tmp_path / "art")
    (art / "model.plan").write_bytes(b"a serialized engine would be here")
    update_files(art, add=[file_entry(art / "model.plan", "tensorrt", "fp16", max_batch=16,
                                      tensorrt_version="10.7.0", gpu_name="NVIDIA L4",
                                      compute_capability="8.9")])
    summary = write_repository(art, tmp_path / "repo", fmt="tensorrt")
    cfg = _parse(tmp_path / "repo" / "oecl" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and summary["precision"] == "fp16"
    assert cfg.max_batch_size == 16  # the plan's own profile, below the artifact's 32
    assert (tmp_path / "repo" / "oecl" / "1" / "model.plan").is_file()
    # Loaded on an L4 (8.9) only; any other GPU finds no file for its capability and the
    # default name tells why.
    assert dict(cfg.cc_model_filenames) == {"8.9": "model.plan"}
    assert cfg.default_model_filename == "plan-built-for-compute-capability-8.9-only"
    assert "TensorRT 10.7.0" in (tmp_path / "repo" / "README.md").read_text()


def test_refusals(artifact_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="has no tensorrt file"):
        write_repository(artifact_dir, tmp_path / "a", fmt="tensorrt")
    with pytest.raises(ArtifactError, match="cannot run a tensorrt model"):
        write_repository(artifact_dir, tmp_path / "a", fmt="tensorrt", kind="cpu")
    with pytest.raises(ArtifactError, match="model name"):
        write_repository(artifact_dir, tmp_path / "a", name="../x")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["triton-repo", str(artifact_dir), "--out", str(other)])
    assert result.exit_code == 1 and "not a model repository made by oecl" in result.output
    assert (other / "keep.txt").read_text() == "mine"
