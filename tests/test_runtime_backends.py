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
from helpers import SIZE, SPEC, copy_artifact, random_images, torch_artifact

from oecl_runtime import Artifact, ArtifactError, BackendUnavailable, Scorer
from oecl_runtime.artifact import file_entry, write_metadata
from oecl_runtime.backends import nvidia_gpu_present
from oecl_runtime.preprocess import load


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.stack([load(im, SPEC) for im in random_images(20, seed=41)])


@pytest.fixture(scope="module")
def cpu_norms(artifact_dir: Path, batch: np.ndarray) -> np.ndarray:
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu") as s:
        return s.score_array(batch)


def _add_file(art: Path, path: Path, fmt: str, precision: str, **extra: object) -> None:
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
        assert why.startswith("tensorrt: skipped, because ")
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
    # Idle pool threads sleep instead of spinning (they would take the event loop's cores).
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_torch_cuda_refused_without_gpu(artifact_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        Scorer.open(artifact_dir, backend="torch-cuda")


def _raises(exc: BaseException):
    def factory(artifact, precision, threads):
        raise exc

    return factory


@pytest.mark.parametrize("exc,said", [
    (RuntimeError("CUDA error 999: unknown error"), "RuntimeError: CUDA error 999: unknown error"),
    (ArtifactError("model.plan: TensorRT could not deserialize the engine"),
     "model.plan: TensorRT could not deserialize the engine"),
    (OSError("libnvinfer.so.10: cannot open shared object file"),
     "OSError: libnvinfer.so.10: cannot open shared object file"),
])
def test_auto_falls_through_any_init_failure(artifact_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                             exc: BaseException, said: str) -> None:
    import oecl_runtime.backends as backends

    real = backends._auto_candidates

    def candidates(artifact, precision):
        return [("tensorrt", _raises(exc), ""), *[c for c in real(artifact, precision)
                                                  if c[0] == "onnxruntime-cpu"]]

    monkeypatch.setattr(backends, "_auto_candidates", candidates)
    with Scorer.open(artifact_dir) as s:
        assert s.backend.name == "onnxruntime-cpu"
        assert s.backend.passed_over == (f"tensorrt: skipped, because {said}",)
    monkeypatch.setattr(backends, "_auto_candidates",
                        lambda a, p: [("tensorrt", _raises(exc), "")])
    with pytest.raises(ArtifactError, match="no backend can run.*tensorrt: skipped, because"):
        Scorer.open(artifact_dir)


def test_tensorrt_provider_gets_its_own_cache_and_int8_file(
        artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from oecl_runtime.backends import ort as ort_backend

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_backend, "gpu_models", lambda: ["NVIDIA RTX A4000"])
    monkeypatch.setattr(ort_backend, "tensorrt_version", lambda: "10.7.0")
    art = Artifact.open(artifact_dir)
    entry = art.require("onnx", "fp32")
    def options(providers: list) -> dict:
        return {p[0]: p[1] for p in providers if isinstance(p, tuple)}

    providers = options(ort_backend.OnnxRuntimeBackend._providers(art, entry, "tensorrt", 0))
    trt_opts = providers["TensorrtExecutionProvider"]
    cache = Path(trt_opts["trt_engine_cache_path"])
    assert cache.is_dir() and cache.name == f"ort{ort.__version__}-trt10.7.0-nvidia-rtx-a4000"
    assert cache.parent.name == entry["sha256"][:16]
    monkeypatch.setattr(ort_backend, "gpu_models", lambda: ["NVIDIA L4"])
    other = options(ort_backend.OnnxRuntimeBackend._providers(art, entry, "tensorrt", 0))
    assert other["TensorrtExecutionProvider"]["trt_engine_cache_path"] != str(cache)
    # fp32 on the CUDA provider is fp32, not TF32.
    assert providers["CUDAExecutionProvider"]["use_tf32"] == 0

    # The two int8 files: the TensorRT provider is handed the symmetric one.
    copy = copy_artifact(artifact_dir, tmp_path / "art")
    for name, who in (("model.int8.onnx", "onnxruntime"), ("model.int8.symmetric.onnx",
                                                            "tensorrt")):
        (copy / name).write_bytes((copy / "model.onnx").read_bytes())
        _add_file(copy, copy / name, "onnx", "int8", consumers=[who])
    a = Artifact.open(copy)
    assert a.require("onnx", "int8")["path"] == "model.int8.onnx"
    assert a.require("onnx", "int8", consumer="tensorrt")["path"] == "model.int8.symmetric.onnx"


def test_both_onnxruntime_wheels_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    from oecl_runtime.backends import ort as ort_backend

    if "cuda" in ort_backend.available_devices():
        pytest.skip("this onnxruntime has the CUDA provider")
    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda d: "1.31.0" if d == "onnxruntime-gpu" else real(d))
    assert "both installed" in ort_backend.cuda_provider_problem()
    monkeypatch.setattr(metadata, "version", real)
    if not _have_dist("onnxruntime-gpu"):
        assert "in place of onnxruntime" in ort_backend.cuda_provider_problem()


def _have_dist(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_cuda_graph_buckets() -> None:
    from oecl_runtime.backends.torch_model import graph_buckets

    assert graph_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert graph_buckets(1) == (1,)
    assert graph_buckets(32, [8, 8, 4]) == (4, 8, 32)  # max_batch always: every batch fits one
    with pytest.raises(ValueError, match="1..32"):
        graph_buckets(32, [0, 64])


# ----------------------------------------------------------------------------- GPU


def _build_plan(onnx_path: Path, plan_path: Path, max_batch: int) -> tuple[str, dict[str, str]]:
    """An engine from the fp32 ONNX file through the runtime's one builder: fp16 on TensorRT 10,
    fp32 on TensorRT >= 11 (which builds fp16 only from an fp16 graph); (precision, entry info)."""
    from oecl_runtime.engine import TensorRTBuilder

    builder = TensorRTBuilder(workspace_mb=512)
    precision = "fp32" if builder.strongly_typed else "fp16"
    info = builder.build(onnx_path, plan_path, precision=precision, input_name="images",
                         chw=(3, SIZE, SIZE), max_batch=max_batch)
    return precision, info


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
    precision, info = _build_plan(art / "model.onnx", art / "model.plan", max_batch=16)
    _add_file(art, art / "model.plan", "tensorrt", precision, **info)
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
        # Captured at open, one graph per bucket; 7 images pad to the bucket of 8.
        assert s.backend.describe()["cuda_graph_batch_sizes"] == [1, 2, 4, 8, 16, 32]
        assert sorted(s.backend._graphs) == [1, 2, 4, 8, 16, 32]
        # fp32 is true fp32 (TF32 off), so the GPU agrees with the CPU to fp32 rounding.
        np.testing.assert_allclose(s.score_array(x), want, rtol=1e-4)
        np.testing.assert_allclose(s.backend.run(x[:3]), want[:3], rtol=1e-4)
        np.testing.assert_allclose(s.score_array(x), want, rtol=1e-4)  # after another bucket
        assert sorted(s.backend._graphs) == [1, 2, 4, 8, 16, 32]  # none added on the way
    with Scorer.open(tmp_path, backend="torch-cuda", precision="bf16") as s:
        np.testing.assert_allclose(s.score_array(x), want, rtol=5e-2)

