"""TensorRT backend: a serialized engine (`model.plan`) run with the TensorRT 10 Python API.

Memory and the stream come from cuda-python, not torch, so a serving box needs neither torch
nor PyCUDA. Buffers are sized once for the largest batch the engine's profile allows; the
host side is pinned so the copies run asynchronously on the one stream.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..artifact import Artifact, ArtifactError
from ..errors import one_line
from .base import Backend, BackendUnavailable, nvidia_gpu_present
from .outputs import check_norm_shape, probe


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as e:
            raise BackendUnavailable(
                "the TensorRT backend needs cuda-python (pip install 'cuda-python>=12.6,<13' "
                "for a CUDA 12 driver, <14 for CUDA 13)"
            ) from e
        except Exception as e:  # installed but broken (e.g. built for a newer driver)
            raise BackendUnavailable(f"cuda-python does not import: {one_line(e)}") from e
    except Exception as e:
        raise BackendUnavailable(f"cuda-python does not import: {one_line(e)}") from e
    return cudart




class _Cuda:
    """The few CUDA runtime calls we need, each checked (cuda-python returns (err, *values))."""

    def __init__(self) -> None:
        self.rt = _import_cudart()

    def __call__(self, result: tuple[Any, ...]) -> Any:
        err, *values = result
        if err != self.rt.cudaError_t.cudaSuccess:
            _, msg = self.rt.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {int(err)}: {msg.decode(errors='replace')}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)


class _PinnedArray:
    """A numpy array over page-locked host memory (needed for truly asynchronous copies)."""

    def __init__(self, cuda: _Cuda, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._cuda = cuda
        nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = int(cuda(cuda.rt.cudaMallocHost(nbytes)))
        raw = (ctypes.c_uint8 * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self._cuda(self._cuda.rt.cudaFreeHost(self.ptr))
            self.ptr = 0


class TensorRTBackend(Backend):
    """Deserialize `model.plan`, set the input shape per batch, run on one CUDA stream."""

    def __init__(
        self, artifact: Artifact, precision: str | None = None, device_id: int = 0
    ) -> None:
        entry = artifact.require("tensorrt", precision)
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendUnavailable("tensorrt is not installed (pip install tensorrt)") from e
        except Exception as e:  # a broken install: missing libnvinfer, mismatched CUDA
            raise BackendUnavailable(f"tensorrt does not import: {one_line(e)}") from e
        if not nvidia_gpu_present():
            raise BackendUnavailable("no NVIDIA GPU is visible, the TensorRT backend needs one")
        cuda = _Cuda()
        rt = cuda.rt
        self._cuda = cuda
        self._trt = trt
        self._device_id = device_id
        self._buffers: list[int] = []
        self._pinned: list[_PinnedArray] = []
        self._stream: Any = None

        cuda(rt.cudaSetDevice(device_id))
        props = cuda(rt.cudaGetDeviceProperties(device_id))
        gpu = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
        cc = f"{props.major}.{props.minor}"
        # A plan is only valid on the GPU architecture and TensorRT version it was built with.
        if cc != entry["compute_capability"]:
            raise BackendUnavailable(
                f"{entry['path']} was built for compute capability {entry['compute_capability']} "
                f"({entry['gpu_name']}), this GPU is {gpu} ({cc}): rebuild the engine here"
            )
        if trt.__version__ != entry["tensorrt_version"]:
            raise BackendUnavailable(
                f"{entry['path']} was built with TensorRT {entry['tensorrt_version']}, "
                f"installed is {trt.__version__}: rebuild the engine or install that version"
            )

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        plan = artifact.path_of(entry).read_bytes()
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(f"{entry['path']}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()

        self._input = artifact.input_name
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [self._input] or "norm" not in outputs:
            raise ArtifactError(
                f"{entry['path']}: engine tensors in={inputs} out={outputs}, "
                f"expected in=[{self._input!r}] and a 'norm' output"
            )
        in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self._input)))
        if in_dtype != np.uint8:
            raise ArtifactError(f"{entry['path']}: engine input is {in_dtype}, not uint8")
        spec = artifact.spec
        chw = (spec.channels, spec.height, spec.width)
        engine_shape = tuple(self.engine.get_tensor_shape(self._input))
        if len(engine_shape) != 4 or engine_shape[1:] != chw:
            raise ArtifactError(
                f"{entry['path']}: engine input shape {engine_shape} is not (N, {chw}) as in "
                "oecl.json"
            )

        _, _, max_shape = self.engine.get_tensor_profile_shape(self._input, 0)
        self.max_batch = min(artifact.max_batch, int(max_shape[0]))
        self.name = "tensorrt"
        self.precision = entry["precision"]
        in_shape = (self.max_batch, spec.channels, spec.height, spec.width)

        try:
            self._stream = cuda(rt.cudaStreamCreate())
            self._h_in = self._pin(in_shape, np.dtype(np.uint8))
            self._d_in = self._malloc(int(np.prod(in_shape)))
            self.context.set_input_shape(self._input, in_shape)
            # Every I/O tensor needs an address, the embedding too; addresses never change, so
            # they are set once at the largest shape and only the input shape varies per batch.
            self._d_out: dict[str, int] = {}
            for out in outputs:
                shape = tuple(self.context.get_tensor_shape(out))
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(out)))
                self._d_out[out] = self._malloc(int(np.prod(shape)) * dtype.itemsize)
                self.context.set_tensor_address(out, self._d_out[out])
            self.context.set_tensor_address(self._input, self._d_in)
            self._norm_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype("norm")))
            self._h_norm = self._pin((self.max_batch,), self._norm_dtype)
            self._source = entry["path"]
            probe(self, chw)
        except Exception:
            self.close()
            raise

    def _malloc(self, nbytes: int) -> int:
        ptr = int(self._cuda(self._cuda.rt.cudaMalloc(nbytes)))
        self._buffers.append(ptr)
        return ptr

    def _pin(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        p = _PinnedArray(self._cuda, shape, dtype)
        self._pinned.append(p)
        return p.array

    def run(self, batch: np.ndarray) -> np.ndarray:
        cuda, rt = self._cuda, self._cuda.rt
        n = batch.shape[0]
        if self._device_id:
            # The current device is per host thread; the server calls run from its worker thread.
            cuda(rt.cudaSetDevice(self._device_id))
        self._h_in[:n] = batch
        if not self.context.set_input_shape(self._input, batch.shape):
            raise ValueError(f"engine rejects input shape {batch.shape}")
        # Checked before the copy: the host buffer holds one norm per image of max_batch.
        check_norm_shape(tuple(self.context.get_tensor_shape("norm")), n, self._source)
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda(rt.cudaMemcpyAsync(self._d_in, self._h_in.ctypes.data, batch.nbytes, h2d,
                                self._stream))
        if not self.context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        nbytes = n * self._norm_dtype.itemsize
        cuda(rt.cudaMemcpyAsync(self._h_norm.ctypes.data, self._d_out["norm"], nbytes, d2h,
                                self._stream))
        cuda(rt.cudaStreamSynchronize(self._stream))
        return self._h_norm[:n].astype(np.float32, copy=True)

    def close(self) -> None:
        rt = self._cuda.rt
        if self._stream is not None:
            self._cuda(rt.cudaStreamSynchronize(self._stream))
        for ptr in self._buffers:
            self._cuda(rt.cudaFree(ptr))
        self._buffers.clear()
        for p in self._pinned:
            p.free()
        self._pinned.clear()
        if self._stream is not None:
            self._cuda(rt.cudaStreamDestroy(self._stream))
            self._stream = None
        self.context = None
        self.engine = None
