"""Whether a GPU is present is asked of the CUDA driver (cuda-python, else libcuda through
ctypes); the NVIDIA device files decide only where no driver library loads. The probes are
patched: these run on machines with and without GPUs alike."""

from __future__ import annotations

import ctypes
import sys
import types

import pytest

from oecl_runtime.backends import base


class FakeLibcuda:
    """libcuda's two entry points as ctypes calls them: CUresult return codes, the count
    written through a pointer."""

    def __init__(self, init_result: int = 0, count: int = 1):
        self.init_result, self.count, self.calls = init_result, count, []

    def cuInit(self, flags):
        self.calls.append(("cuInit", flags))
        return self.init_result

    def cuDeviceGetCount(self, ptr):
        self.calls.append(("cuDeviceGetCount",))
        ptr._obj.value = self.count
        return 0


@pytest.fixture
def no_cuda_python(monkeypatch):
    monkeypatch.setattr(base, "_count_via_cuda_python", lambda: None)


def _device_files(monkeypatch, present: bool) -> None:
    monkeypatch.setattr(base, "nvidia_device_files_present", lambda: present)


@pytest.mark.parametrize("count, want", [(2, True), (0, False)])
def test_libcuda_decides_over_the_device_files(monkeypatch, no_cuda_python, count, want):
    lib = FakeLibcuda(count=count)
    monkeypatch.setattr(base, "_load_libcuda", lambda: lib)
    _device_files(monkeypatch, not want)  # the files say the opposite; the driver wins
    assert base.cuda_driver_device_count() == count
    assert base.nvidia_gpu_present() is want
    assert lib.calls == 2 * [("cuInit", 0), ("cuDeviceGetCount",)]  # one pair per question


def test_jetson_gpu_without_nvidia_device_files_is_found(monkeypatch, no_cuda_python):
    monkeypatch.setattr(base, "_load_libcuda", lambda: FakeLibcuda(count=1))
    _device_files(monkeypatch, False)
    assert base.nvidia_gpu_present()


def test_failed_cuinit_means_no_usable_gpu(monkeypatch, no_cuda_python):
    lib = FakeLibcuda(init_result=100)  # CUDA_ERROR_NO_DEVICE
    monkeypatch.setattr(base, "_load_libcuda", lambda: lib)
    _device_files(monkeypatch, True)
    assert base.cuda_driver_device_count() == 0 and not base.nvidia_gpu_present()
    assert lib.calls == 2 * [("cuInit", 0)]


@pytest.mark.parametrize("files", [True, False])
def test_device_files_decide_only_without_a_driver_library(monkeypatch, no_cuda_python, files):
    monkeypatch.setattr(base, "_load_libcuda", lambda: None)
    _device_files(monkeypatch, files)
    assert base.cuda_driver_device_count() is None
    assert base.nvidia_gpu_present() is files


def _fake_cuda_python(monkeypatch, init_err: int, count: int) -> list:
    calls = []
    driver = types.SimpleNamespace(
        cuInit=lambda flags: calls.append("cuInit") or (init_err,),
        cuDeviceGetCount=lambda: calls.append("cuDeviceGetCount") or (0, count))
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = driver
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    return calls


def test_cuda_python_is_asked_first(monkeypatch):
    calls = _fake_cuda_python(monkeypatch, 0, 3)
    monkeypatch.setattr(base, "_load_libcuda", lambda: pytest.fail("libcuda loaded"))
    assert base.cuda_driver_device_count() == 3
    assert calls == ["cuInit", "cuDeviceGetCount"]


def test_cuda_python_reports_a_failed_cuinit(monkeypatch):
    _fake_cuda_python(monkeypatch, 100, 3)
    monkeypatch.setattr(base, "_load_libcuda", lambda: pytest.fail("libcuda loaded"))
    assert base.cuda_driver_device_count() == 0


def test_real_probe_agrees_with_the_libraries_here():
    # No patching: on a machine without libcuda the answer is "no driver", never an error.
    try:
        ctypes.CDLL(base.LIBCUDA_NAMES[0])
    except OSError:
        if base._count_via_cuda_python() is None:
            assert base.cuda_driver_device_count() is None
            assert base.nvidia_gpu_present() is base.nvidia_device_files_present()
            return
    assert isinstance(base.cuda_driver_device_count(), int)
