"""Backend choice and the GPU backends (TensorRT, onnxruntime-CUDA, torch-CUDA).

The GPU tests need the hardware and libraries and skip with the reason otherwise; the refusal
paths (library or GPU missing) run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from test_runtime_tinymodel import (
    SIZE,
    SPEC,
    copy_artifact,
    random_images,
    tiny_artifact_dir,
    torch_artifact,
)

from oecl_runtime import BackendUnavailable, Scorer
from oecl_runtime.artifact import file_entry, write_metadata
from oecl_runtime.backends import nvidia_gpu_present
from oecl_runtime.preprocess import load


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_artifact_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.stack([load(im, SPEC) for im in random_images(20, seed=41)])


@pytest.fixture(scope="module")
def cpu_norms(artifact_dir: Path, batch: np.ndarray) -> np.ndarray:
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu") as s:
        return s.score_array(batch)


def _add_file(art: Path, path: Path, fmt: str, precision: str, **extra: str) -> None:
    meta = json.loads((art / "oecl.json").read_text())
    meta["files"].append(file_entry(path, fmt, precision, **extra))
    write_metadata(art, meta)


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _cuda_ort() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and nvidia_gpu_present()


# ----------------------------------------------------------------------------- everywhere


def test_unavailable_backends_say_why_in_one_line(artifact_dir: Path, tmp_path: Path) -> None:
    if _have("tensorrt") and nvidia_gpu_present():
        pytest.skip("TensorRT and a GPU are present here; the refusal cannot be shown")
    art = copy_artifact(artifact_dir, tmp_path / "art")
    plan = art / "model.plan"
    plan.write_bytes(b"a serialized engine would be here")
    _add_file(art, plan, "tensorrt", "fp16", tensorrt_version="10.7.0",
              gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    with pytest.raises(BackendUnavailable) as info:
        Scorer.open(art, backend="tensorrt")
    msg = str(info.value)
    assert "\n" not in msg and ("tensorrt is not installed" in msg or "no NVIDIA GPU" in msg)
    # auto passes over it, says why, and still scores.
    with Scorer.open(art) as s:
        assert s.backend.name in ("onnxruntime-cpu", "onnxruntime-cuda")
        (why,) = [p for p in s.backend.passed_over if p.startswith("tensorrt")]
        assert "not installed" in why or "no GPU" in why
        assert s.score(random_images(1)[0])[0].norm > 0


def test_onnxruntime_cuda_refused_without_provider(artifact_dir: Path) -> None:
    if _cuda_ort():
        pytest.skip("onnxruntime-gpu and a GPU are present here")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider|did not initialise"):
        Scorer.open(artifact_dir, backend="onnxruntime-cuda")


def test_onnxruntime_cpu_session_threads(artifact_dir: Path) -> None:
    # (No process-wide subnormal flushing: see test_runtime_limits.)
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu", threads=1) as s:
        opts = s.backend.session.get_session_options()
    assert opts.intra_op_num_threads == 1


def test_torch_cuda_refused_without_gpu(artifact_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        Scorer.open(artifact_dir, backend="torch-cuda")


# ----------------------------------------------------------------------------- GPU


def _build_plan(onnx_path: Path, plan_path: Path, max_batch: int) -> dict[str, str]:
    """Build an fp16 engine from the ONNX file the way an exporter would; return its entry info."""
    import tensorrt as trt

    from oecl_runtime.backends.trt import _Cuda

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("ONNX parse failed: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    chw = (3, SIZE, SIZE)
    profile.set_shape("images", (1, *chw), (max_batch, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "engine build failed"
    plan_path.write_bytes(bytes(plan))
    cuda = _Cuda()
    props = cuda(cuda.rt.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt_version": trt.__version__, "gpu_name": name.rstrip("\x00"),
            "compute_capability": f"{props.major}.{props.minor}"}


@pytest.mark.gpu
def test_tensorrt_backend_matches_onnxruntime(artifact_dir: Path, tmp_path: Path,
                                              batch: np.ndarray, cpu_norms: np.ndarray) -> None:
    if not _have("tensorrt"):
        pytest.skip("tensorrt is not installed")
    if not nvidia_gpu_present():
        pytest.skip("no NVIDIA GPU")
    if not (_have("cuda.bindings") or _have("cuda.cudart")):
        pytest.skip("cuda-python is not installed")
    art = copy_artifact(artifact_dir, tmp_path / "art")
    info = _build_plan(art / "model.onnx", art / "model.plan", max_batch=16)
    _add_file(art, art / "model.plan", "tensorrt", "fp16", **info)
    with Scorer.open(art) as s:  # auto must pick the engine
        assert s.backend.name == "tensorrt" and s.backend.max_batch == 16
        got = s.score_array(batch)  # 20 images: split into 16 + 4
    np.testing.assert_allclose(got, cpu_norms, rtol=2e-2)


@pytest.mark.gpu
def test_onnxruntime_cuda_matches_cpu(artifact_dir: Path, batch: np.ndarray,
                                      cpu_norms: np.ndarray) -> None:
    if not _cuda_ort():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider) and an NVIDIA GPU")
    with Scorer.open(artifact_dir, backend="onnxruntime-cuda") as s:
        assert s.backend.name == "onnxruntime-cuda"
        np.testing.assert_allclose(s.score_array(batch), cpu_norms, rtol=1e-3)


@pytest.mark.gpu
def test_torch_cuda_graphs_match_eager(tmp_path: Path, artifact_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    scorer_model = torch_artifact(tmp_path, artifact_dir, width=8)
    x = np.stack([load(im, SPEC) for im in random_images(7, seed=43)])
    with torch.no_grad():
        want = scorer_model(torch.from_numpy(x))[0].numpy()
    with Scorer.open(tmp_path, backend="torch-cuda") as s:
        np.testing.assert_allclose(s.score_array(x), want, rtol=1e-3)
        np.testing.assert_allclose(s.score_array(x), want, rtol=1e-3)  # graph replay
    with Scorer.open(tmp_path, backend="torch-cuda", precision="bf16") as s:
        np.testing.assert_allclose(s.score_array(x), want, rtol=5e-2)

