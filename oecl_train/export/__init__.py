"""Export a trained run to a model artifact: ONNX (fp32, fp16, int8), TensorRT, oecl.json.

Stages, each timed on stderr with progress inside the long ones, the times also in
`verify.json` (`export_run` in `run.py` calls them in this order):
1. export (`graph`): the eval-mode network with every BatchNorm folded into the layer before
   it, wrapped so that uint8 NCHW images go in and `norm` (and optionally the 128-d
   `embedding`) come out, through the dynamo ONNX exporter with a dynamic batch dimension. The
   fp16 file is the same graph with weights and compute in half precision (uint8 in, float32
   out).
2. quantise (`quantize`): static int8 QDQ quantisation with onnxruntime, calibrated on the
   run's own ID training images: `model.int8.onnx` (u8s8, for onnxruntime) and its symmetric
   twin `model.int8.symmetric.onnx` (for TensorRT, here or on the edge box).
3. reference (`norms.reference_scores`): the PyTorch fp32 served scores of every image the
   later stages need, each image once: the ID-validation images (threshold), a parity sample
   of held-out ID and OOD images (verification; the golden set is a subset) and an OE sample.
   Then metadata (`metadata`, `verify.write_golden`): threshold and norm statistics from those
   scores, and the golden set (`oecl_runtime.golden`) that lets any machine check its backend.
4. tensorrt (`engines`): engines built from the artifact by `oecl_runtime.engine`, as `oecl
   engine` does.
5. verify (`verify`): held-out ID and OOD images scored by the PyTorch model and by every
   exported file through the runtime's backends, compared by `oecl_runtime.golden.compare` (the
   check `oecl verify` makes), written to `verify.json`; an export outside the tolerances fails.
   `verify_export` makes the same check on an artifact exported without it.

Everything is built in a temporary directory and renamed into place only when all stages
pass, so a crash or a failed check leaves nothing under the output name.
"""

from oecl_train.export.errors import ExportError, VerificationFailed
from oecl_train.export.graph import (
    INPUT_NAME,
    ONNX_FILES,
    OPSET,
    TRAINING_OPS,
    VIEW_MAP_NAMES,
    ServedModel,
    check_onnx,
    export_onnx,
    fold_batchnorm,
)
from oecl_train.export.norms import OE_STATS_MAX, VERIFY_PER_SIDE, torch_norms
from oecl_train.export.options import parse_formats
from oecl_train.export.quantize import CALIB_BATCH, INT8_SYMMETRIC_FILE, quantize_int8
from oecl_train.export.run import export_run
from oecl_train.export.source import WEIGHTS_FILE
from oecl_train.export.verify import (
    AUROC_TOL,
    FP32_REL_TOL,
    VERIFY_FILE,
    verify_artifact,
    verify_export,
)

__all__ = [
    "AUROC_TOL",
    "CALIB_BATCH",
    "FP32_REL_TOL",
    "INPUT_NAME",
    "INT8_SYMMETRIC_FILE",
    "OE_STATS_MAX",
    "ONNX_FILES",
    "OPSET",
    "TRAINING_OPS",
    "VERIFY_FILE",
    "VERIFY_PER_SIDE",
    "VIEW_MAP_NAMES",
    "WEIGHTS_FILE",
    "ExportError",
    "ServedModel",
    "VerificationFailed",
    "check_onnx",
    "export_onnx",
    "export_run",
    "fold_batchnorm",
    "parse_formats",
    "quantize_int8",
    "torch_norms",
    "verify_artifact",
    "verify_export",
]
