"""`oecl engine`: engines recorded in `oecl.json` (with a builder that writes bytes where TensorRT
cannot run), the timing cache, and the refusals; the real build runs where TensorRT and a GPU do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import copy_artifact, golden_images, torch_norms, with_golden

from oecl_runtime import Artifact, Scorer, golden
from oecl_runtime.backends.base import nvidia_gpu_present
from oecl_runtime.cli import main
from oecl_runtime.engine import (
    EngineError,
    GpuInfo,
    attach_timing_cache,
    build_engines,
    timing_cache_path,
)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None


class BytesBuilder:
    """Stands in for TensorRTBuilder where TensorRT cannot run: writes distinct bytes."""

    def __init__(self, strongly_typed: bool = False) -> None:
        self.strongly_typed = strongly_typed
        self.calls: list[dict[str, Any]] = []

    def build(self, onnx_path: Path, plan_path: Path, **kw: Any) -> dict[str, Any]:
        self.calls.append({"onnx": onnx_path.name, **kw})
        plan_path.write_bytes(f"plan {len(self.calls)} from {onnx_path.name}".encode())
        return {"tensorrt_version": "10.7.0", "gpu_name": "NVIDIA L4",
                "compute_capability": "8.9", "strongly_typed": self.strongly_typed}


def _cpu_check(view: Artifact, entry: dict[str, Any]) -> dict[str, Any]:
    # The bytes are no engine; the golden check itself is real, on the ONNX file.
    assert entry["format"] == "tensorrt" and (view.directory / entry["path"]).is_file()
    return golden.verify(view, backend="onnxruntime-cpu", precision="fp32")


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_engine_is_recorded_and_the_rest_kept(art: Path) -> None:
    before = json.loads((art / "oecl.json").read_text())
    builder = BytesBuilder()
    meta = build_engines(art, ["fp16"], 16, builder=builder, check=_cpu_check)
    assert builder.calls == [{"onnx": "model.onnx", "precision": "fp16", "input_name": "images",
                              "chw": (3, 32, 32), "max_batch": 16}]
    on_disk = json.loads((art / "oecl.json").read_text())
    assert on_disk == meta
    assert {k: v for k, v in on_disk.items() if k != "files"} == \
        {k: v for k, v in before.items() if k != "files"}
    assert on_disk["files"][:-1] == before["files"]
    plan = on_disk["files"][-1]
    assert plan["path"] == "model.plan" and plan["format"] == "tensorrt"
    assert plan["sha256"] == hashlib.sha256((art / "model.plan").read_bytes()).hexdigest()
    assert (plan["gpu_name"], plan["compute_capability"], plan["tensorrt_version"]) == \
        ("NVIDIA L4", "8.9", "10.7.0")
    assert plan["source"] == "model.onnx" and plan["max_batch"] == 16
    assert plan["golden"]["max_rel_diff"] < 1e-5
    Artifact.open(art)  # every hash still matches
    assert _leftovers(art) == []

    # Built again: the entry is replaced, not doubled, and points at the new bytes.
    build_engines(art, ["fp16"], builder=builder, check=_cpu_check)
    plans = [f for f in Artifact.open(art).files if f["format"] == "tensorrt"]
    assert len(plans) == 1 and plans[0]["sha256"] != plan["sha256"]
    assert plans[0]["max_batch"] == 32  # the artifact's max_batch by default


def test_engine_failing_the_golden_set_is_not_recorded(artifact_dir: Path, tmp_path: Path) -> None:
    reference = torch_norms(golden_images()) * 1.01  # the model no longer scores like this
    art = with_golden(copy_artifact(artifact_dir, tmp_path / "art"), reference)
    before = (art / "oecl.json").read_bytes()
    with pytest.raises(EngineError, match=r"model\.plan fails on the golden set: max relative"):
        build_engines(art, ["fp16"], builder=BytesBuilder(), check=_cpu_check)
    assert (art / "oecl.json").read_bytes() == before
    assert not (art / "model.plan").exists() and _leftovers(art) == []


def test_sources_follow_tensorrt_typing(art: Path) -> None:
    with pytest.raises(EngineError, match="symmetric int8 ONNX file"):
        build_engines(art, ["int8"], builder=BytesBuilder(), check=_cpu_check)
    # TensorRT 11 (strongly typed) builds fp16 only from an fp16 graph, which this one lacks.
    with pytest.raises(EngineError, match="fp16 ONNX file.*onnx-fp16"):
        build_engines(art, ["fp16"], builder=BytesBuilder(strongly_typed=True), check=_cpu_check)
    # ... and fp32 from the fp32 graph, as TensorRT 10 builds fp16.
    builder = BytesBuilder(strongly_typed=True)
    build_engines(art, ["fp32"], builder=builder, check=_cpu_check)
    assert builder.calls[0]["onnx"] == "model.onnx"
    assert Artifact.open(art).find("tensorrt", "fp32")["path"] == "model.fp32.plan"


def test_bad_requests_are_one_line(art: Path, artifact_dir: Path) -> None:
    with pytest.raises(EngineError, match="between 1 and the artifact's max_batch 32"):
        build_engines(art, ["fp16"], 64, builder=BytesBuilder(), check=_cpu_check)
    with pytest.raises(EngineError, match="must be one of fp32, fp16, int8"):
        build_engines(art, ["bf16"], builder=BytesBuilder(), check=_cpu_check)
    with pytest.raises(EngineError, match="no golden set"):
        build_engines(artifact_dir, ["fp16"], builder=BytesBuilder(), check=_cpu_check)


@pytest.mark.skipif(HAVE_TRT and nvidia_gpu_present(), reason="TensorRT can build here")
def test_cli_says_what_is_missing(art: Path) -> None:
    before = (art / "oecl.json").read_bytes()
    result = CliRunner().invoke(main, ["engine", str(art)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip()
    assert "\n" not in line
    assert ("tensorrt Python package" in line if not HAVE_TRT else "GPU" in line), line
    assert (art / "oecl.json").read_bytes() == before


# ---------------------------------------------------------------- timing cache


class FakeConfig:
    """The two IBuilderConfig calls the timing cache uses, with TensorRT's documented
    behaviour: set_timing_cache returns False for a cache from another version or device."""

    def __init__(self, accepts: bytes) -> None:
        self.accepts = accepts
        self.attached: bytes | None = None

    def create_timing_cache(self, data: bytes) -> bytes:
        if data.startswith(b"garbage"):
            raise RuntimeError("invalid timing cache")
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # a mismatched cache must be refused, not used
        ok = cache in (b"", self.accepts)
        if ok:
            self.attached = cache
        return ok


@pytest.mark.parametrize("stored,accepted,said", [
    (None, b"", "new timing cache"),
    (b"h200 cache", b"h200 cache", "reused"),
    (b"h100 cache", b"h200 cache", "rejected"),
    (b"garbage", b"h200 cache", "rejected"),
])
def test_timing_cache_reuse_is_checked(tmp_path: Path, stored: bytes | None, accepted: bytes,
                                       said: str) -> None:
    path = tmp_path / "timing.cache"
    if stored is not None:
        path.write_bytes(stored)
    logs: list[str] = []
    config = FakeConfig(accepted)
    cache = attach_timing_cache(config, path, logs.append)
    assert len(logs) == 1 and said in logs[0]
    assert config.attached == cache == (stored if said == "reused" else b"")


def test_timing_cache_keyed_by_gpu_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    h100 = timing_cache_path("10.7.0", GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    h200 = timing_cache_path("10.7.0", GpuInfo("NVIDIA H200", "9.0"))
    newer = timing_cache_path("10.8.0", GpuInfo("NVIDIA H200", "9.0"))
    assert len({h100, h200, newer}) == 3
    assert h200.parent == tmp_path / "oecl" / "tensorrt"
    assert h200.name == "timing-trt10.7.0-nvidia-h200-sm90.cache"


# ---------------------------------------------------------------- GPU boxes


MISSING = next((why for ok, why in ((HAVE_TRT, "tensorrt is not installed"),
                                     (nvidia_gpu_present(), "no NVIDIA GPU"),
                                     (HAVE_CUDA_PYTHON, "cuda-python is not installed"))
                if not ok), None)


@pytest.mark.gpu
@pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
def test_engine_built_here_scores_like_the_reference(art: Path) -> None:
    from oecl_runtime.engine import needs_fp16_onnx

    precision = "fp32" if needs_fp16_onnx() else "fp16"  # the tiny artifact has no fp16 graph
    result = CliRunner().invoke(main, ["engine", str(art), "--precision", precision,
                                       "--max-batch", "16", "--workspace-mb", "512"])
    assert result.exit_code == 0, result.output
    plan = Artifact.open(art).find("tensorrt", precision)
    assert plan["golden"]["AUROC_diff"] <= golden.TOLERANCES["AUROC_diff"]
    result = CliRunner().invoke(main, ["verify", str(art), "--backend", "tensorrt",
                                       "--precision", precision])
    assert result.exit_code == 0, result.output
    with Scorer.open(art) as s:  # auto picks the new engine
        assert s.backend.name == "tensorrt" and s.backend.max_batch == 16
