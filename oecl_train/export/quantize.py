"""Static int8 QDQ quantisation with onnxruntime, calibrated on the run's own ID training
images: `model.int8.onnx` (u8s8, for onnxruntime) and its symmetric twin
`model.int8.symmetric.onnx` (for TensorRT, here or on the edge box)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from oecl_runtime.artifact import file_entry
from oecl_train.export import trt_compat
from oecl_train.export.errors import ExportError
from oecl_train.export.graph import INPUT_NAME, ONNX_FILES, Graphs, float_nodes
from oecl_train.export.norms import subsample
from oecl_train.export.progress import Progress
from oecl_train.export.source import Source

CALIB_BATCH = 32
INT8_SYMMETRIC_FILE = "model.int8.symmetric.onnx"

# The `files[]` keys of the two int8 ONNX files: who each is for and how it is quantised.
INT8_FORMS: dict[str, dict[str, Any]] = {
    "onnxruntime": {"consumers": ["onnxruntime"], "quantization": {
        "format": "QDQ", "activations": "uint8, asymmetric (zero points), per tensor",
        "weights": "int8, symmetric, per channel", "biases": "int32",
        "ops": "every op onnxruntime quantises, except the view maps and the stem convolution"}},
    "tensorrt": {"consumers": ["tensorrt"], "quantization": {
        "format": "QDQ", "activations": "int8, symmetric (zero point 0), per tensor",
        "weights": "int8, symmetric, per channel", "biases": "float (TensorRT quantises them)",
        "ops": "Conv, Gemm, MatMul, except the view maps and the stem convolution"}},
}


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, scratch: Path,
                  for_tensorrt: bool = False) -> None:
    """Static QDQ int8 with per-channel symmetric int8 weights and MinMax ranges from `calib`.

    Two flavours, because their consumers' fast paths differ:
    - onnxruntime (the artifact's `model.int8.onnx`): uint8 activations with zero points
      (u8s8) and every supported op quantised, so residual adds and ReLUs stay in int8
      between convolutions. On x86 this is the layout onnxruntime's int8 kernels are fast
      with; symmetric int8 activations measured slower than fp32 there.
    - TensorRT: int8 activations with zero point 0 on convolutions and matrix products only,
      biases left float, the one form TensorRT's explicit quantisation accepts: its ONNX
      parser dequantises INT8 only (an INT32 bias is refused) and quantises biases itself.
    """
    # Only an int8 export needs the quantiser, and it is slow to import.
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(range(0, len(calib), CALIB_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._batches, None)
            if start is None:
                return None
            return {INPUT_NAME: np.ascontiguousarray(calib[start:start + CALIB_BATCH])}

    pre = scratch / "model.pre.onnx"
    if not pre.exists():
        quant_pre_process(str(src), str(pre))
    kwargs: dict[str, Any] = {}
    # The view maps resample the image (weights in [0, 1]); int8 weights would blur every
    # view. The stem convolution reads the normalised image itself: quantising that input
    # to 256 levels moved served norms by several percent (its int8 weights alone were
    # harmless). Both are cheap next to the network, so they stay float.
    if nodes := float_nodes(pre):
        kwargs["nodes_to_exclude"] = nodes
    if for_tensorrt:
        kwargs["op_types_to_quantize"] = ["Conv", "Gemm", "MatMul"]
    quantize_static(
        str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8 if for_tensorrt else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "ActivationSymmetric": for_tensorrt,
            "WeightSymmetric": True,
            "QuantizeBias": not for_tensorrt,
            # An int8 projection output would round small (anomalous) embeddings to zero; the
            # last product writes float so the norm keeps its resolution at the low end.
            "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
        },
        **kwargs,
    )


def quantize_graphs(src: Source, graphs: Graphs, directory: Path, scratch: Path,
                    calib_images: int, progress: Progress) -> None:
    """Both int8 files from the fp32 graph, checked and added to `graphs`."""
    path = directory / ONNX_FILES["int8"]
    calib = subsample(src.splits.id_train, calib_images, src.cfg.seed)
    with progress.stage(f"quantise: {path.name} (int8 QDQ, {len(calib)} calibration images)",
                        "quantise_int8"):
        quantize_int8(graphs.paths["fp32"], path, calib, scratch)
        graphs.record(path, "int8")
    graphs.info[path.name]["calibration_images"] = int(len(calib))
    # TensorRT takes only zero points of 0: the symmetric twin ships for it.
    sym = directory / INT8_SYMMETRIC_FILE
    with progress.stage(f"quantise: {sym.name} (symmetric int8 QDQ, for TensorRT)",
                        "quantise_int8_symmetric"):
        quantize_int8(graphs.paths["fp32"], sym, calib, scratch, for_tensorrt=True)
        if problems := trt_compat.check(sym):
            raise ExportError(f"{len(problems)} TensorRT incompatibilities, first: {problems[0]}")
        graphs.record(sym)


def int8_entries(graphs: Graphs) -> list[dict[str, Any]]:
    """The `files[]` entries of the two int8 files (none without an int8 export)."""
    if "int8" not in graphs.paths:
        return []
    path = graphs.paths["int8"]
    return [file_entry(path, "onnx", "int8", **INT8_FORMS["onnxruntime"]),
            file_entry(path.parent / INT8_SYMMETRIC_FILE, "onnx", "int8",
                       **INT8_FORMS["tensorrt"])]
