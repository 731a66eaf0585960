"""Export a trained run to a model artifact: ONNX (fp32, fp16, int8), TensorRT, oecl.json.

Stages, each timed on stderr:
1. export: the eval-mode network with every BatchNorm folded into the layer before it, wrapped
   so that uint8 NCHW images go in and `norm` (and optionally the 128-d `embedding`) come out,
   through the dynamo ONNX exporter with a dynamic batch dimension. The fp16 file is the same
   graph with weights and compute in half precision (uint8 in, float32 out).
2. quantise: static int8 QDQ quantisation with onnxruntime, calibrated on the run's own ID
   training images: `model.int8.onnx` (u8s8, for onnxruntime) and its symmetric twin
   `model.int8.symmetric.onnx` (for TensorRT, here or on the edge box).
3. metadata: threshold and norm statistics from the PyTorch model on the run's held-out data,
   and the golden set (`oecl_runtime.golden`) that lets any machine check its backend.
4. tensorrt: engines built from the artifact by `oecl_runtime.engine`, as `oecl engine` does.
5. verify: held-out ID and OOD images scored by the PyTorch model and by every exported file
   through the runtime's backends, compared by `oecl_runtime.golden.compare` (the check `oecl
   verify` makes), written to `verify.json`; an export outside the tolerances fails.

Everything is built in a temporary directory and renamed into place only when all stages
pass, so a crash or a failed check leaves nothing under the output name.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oecl_runtime.artifact import (
    METADATA_NAME,
    SCHEMA_VERSION,
    file_entry,
    norm_stats,
    threshold_at_tpr,
    write_metadata,
)
from oecl_runtime.atomic import atomic_dir, with_file, write_json
from oecl_runtime.names import EXPORT_FORMATS
from oecl_runtime.preprocess import InputSpec
from oecl_train.data import Splits
from oecl_train.views import DEFAULT_VIEWS

INPUT_NAME = "images"
OPSET = 18
# Verification fails beyond these (module constants so tests can tighten them).
FP32_REL_TOL = 1e-4  # largest |norm - norm_torch| / norm_torch of the fp32 files
AUROC_TOL = 0.005  # largest |AUROC - AUROC_torch| of any file
VERIFY_PER_SIDE = 500  # at most this many ID and this many OOD images are verified
OE_STATS_MAX = 2000  # at most this many OE images make `score.oe_norm`
CALIB_BATCH = 32
# Ops that only make sense in training; none may survive into a served graph.
TRAINING_OPS = frozenset({"BatchNormalization", "Dropout"})
# Initializer names of the K-view graph's resampling maps (`ViewStack.rows` / `.cols`).
VIEW_MAP_NAMES = ("stack.rows", "stack.cols")

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
INT8_SYMMETRIC_FILE = "model.int8.symmetric.onnx"
WEIGHTS_FILE = "model.safetensors"
VERIFY_FILE = "verify.json"

Log = Callable[[str], None]


class ExportError(ValueError):
    """An export that cannot be made; the message is one line naming the cause."""


class VerificationFailed(ExportError):
    """An exported file scores outside the tolerances; nothing was written."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def _stage(log: Log, label: str, timings: dict[str, float], key: str) -> Iterator[None]:
    log(f"{label} ...")
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    timings[key] = round(dt, 3)
    log(f"{label}: {dt:.1f} s")


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """Known formats in canonical order; the fp32 ONNX file is always included (every other
    file is made from it)."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    wanted = {f.strip().lower() for f in items if f.strip()}
    unknown = sorted(wanted - set(EXPORT_FORMATS))
    if unknown:
        raise ExportError(
            f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(EXPORT_FORMATS)}"
        )
    wanted.add("onnx")
    return [f for f in EXPORT_FORMATS if f in wanted]


# ---------------------------------------------------------------- the graphs


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of `net` with each BatchNorm folded into the Conv/Linear before it.

    Pairs are taken where data flow is known: consecutive entries of an nn.Sequential, and the
    conv1/bn1, conv2/bn2 pairs of a BasicBlock. Any BatchNorm left over is an error, so an
    architecture this does not understand is refused instead of exported with BN inside.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    from oecl_train.model import BasicBlock

    def fuse(a: nn.Module, b: nn.Module) -> nn.Module | None:
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
            return fuse_conv_bn_eval(a, b)
        if isinstance(a, nn.Linear) and isinstance(b, nn.BatchNorm1d):
            return fuse_linear_bn_eval(a, b)
        return None

    net = copy.deepcopy(net).cpu().float().eval()
    for module in list(net.modules()):
        if isinstance(module, BasicBlock):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                fused = fuse(getattr(module, conv), getattr(module, bn))
                if fused is not None:
                    setattr(module, conv, fused)
                    setattr(module, bn, nn.Identity())
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                fused = fuse(module[i], module[i + 1])
                if fused is not None:
                    module[i], module[i + 1] = fused, nn.Identity()
    batchnorm = nn.modules.batchnorm._BatchNorm
    left = [name for name, m in net.named_modules() if isinstance(m, batchnorm)]
    if left:
        raise ExportError(
            f"cannot fold BatchNorm layer(s) {', '.join(left)} into a preceding layer"
        )
    return net


class _Served(nn.Module):
    """uint8 NCHW in; `norm` (float32) and optionally `embedding` (float32) out.

    With the plain view alone (K = 1), fp32 is `ScoreModel` itself. fp16 casts the images to
    half before the network (weights are half too) and the projection back to float32 before
    the norm, so clients see the same dtypes whatever the precision.

    With K views, the N images become K·N views inside the graph (`ViewStack`, resampled in
    float32 at every precision), the network runs once on all of them, and `norm` is the norm
    of the mean projection over each image's K views; `embedding` is that mean projection.
    """

    def __init__(self, net: nn.Module, half: bool, embedding: bool,
                 views: Sequence[Any] | None = None, hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        from oecl_train.model import ScoreModel
        from oecl_train.views import ViewScoreModel, is_plain

        self.half_precision = half
        self.embedding = embedding
        net = net.half() if half else net
        self.views = None
        if views is not None and hw is not None and not is_plain(views, *hw):
            self.views = ViewScoreModel(net, views, *hw, half=half)
        self.score = ScoreModel(net)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.views is not None:
            norm, z = self.views(images)
        elif self.half_precision:
            z = self.score.net(images.half() / 255.0).float()
            norm = torch.linalg.vector_norm(z, dim=1)
        else:
            norm, z = self.score(images)
        return (norm, z) if self.embedding else norm


def _score_views(views: Sequence[Any]) -> dict[str, Any]:
    """`score.name`, `score.views` and `score.resample` of oecl.json for a view set."""
    from oecl_train.score_names import served_score
    from oecl_train.views import RESAMPLE, views_to_json

    name = served_score(len(views))
    if name == "norm":
        return {"name": name, "views": views_to_json(views)}
    return {"name": name, "views": views_to_json(views), "resample": RESAMPLE}


def _export_onnx(model: nn.Module, path: Path, chw: tuple[int, int, int], embedding: bool) -> None:
    example = torch.randint(0, 256, (2, *chw), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    outputs = ["norm", "embedding"] if embedding else ["norm"]
    # The exporter announces optional torchvision ops and prints deprecation notes that say
    # nothing about this model; keep stderr for our own progress lines.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(), (example,), str(path), input_names=[INPUT_NAME],
                output_names=outputs, opset_version=OPSET, dynamo=True, optimize=True,
                dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=False, verbose=False,
            )
    finally:
        quiet.setLevel(level)


def check_onnx(path: Path, chw: tuple[int, int, int], embedding: bool) -> dict[str, Any]:
    """Checker-clean, opset >= 17, no training-only ops, and the declared signature."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails the ONNX checker: {' '.join(str(e).split())}") from e
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 17:
        raise ExportError(f"{path.name} has opset {opset}; 17 or newer is required")
    bad = sorted({n.op_type for n in model.graph.node} & TRAINING_OPS)
    if bad:
        raise ExportError(f"{path.name} still contains training-only op(s) {', '.join(bad)}")

    def sig(v: Any) -> tuple[int, list[Any]]:
        t = v.type.tensor_type
        return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    inputs = [i for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    want_out = ["norm", "embedding"] if embedding else ["norm"]
    if [i.name for i in inputs] != [INPUT_NAME] or outputs != want_out:
        raise ExportError(f"{path.name}: graph signature {[i.name for i in inputs]} -> {outputs}")
    dtype, shape = sig(inputs[0])
    if dtype != onnx.TensorProto.UINT8 or len(shape) != 4 or not isinstance(shape[0], str) \
            or tuple(shape[1:]) != chw:
        raise ExportError(f"{path.name}: input is {onnx.TensorProto.DataType.Name(dtype)} "
                          f"{shape}, expected uint8 [batch, {', '.join(map(str, chw))}]")
    for o in model.graph.output:
        if sig(o)[0] != onnx.TensorProto.FLOAT:
            raise ExportError(f"{path.name}: output {o.name} is not float32")
    return {"opset": opset, "nodes": len(model.graph.node)}


def _view_nodes(path: Path) -> list[str]:
    """Names of the nodes that apply the view maps (read a `ViewStack` buffer)."""
    import onnx

    model = onnx.load(str(path))
    maps = {i.name for i in model.graph.initializer if i.name.endswith(VIEW_MAP_NAMES)}
    return [n.name for n in model.graph.node if maps & set(n.input)]


def _quantize_int8(src: Path, dst: Path, calib: np.ndarray, scratch: Path,
                   for_tensorrt: bool = False) -> None:
    """Static QDQ int8 with per-channel symmetric int8 weights and MinMax ranges from `calib`.

    Two flavours, because their consumers' fast paths differ:
    - onnxruntime (the artifact's `model.int8.onnx`): uint8 activations with zero points
      (u8s8) and every supported op quantised, so residual adds and ReLUs stay in int8
      between convolutions. On x86 this is the layout onnxruntime's int8 kernels are fast
      with; symmetric int8 activations measured slower than fp32 there.
    - TensorRT: int8 activations with zero point 0 on convolutions and matrix products only,
      the one form TensorRT's explicit quantisation accepts.
    """
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
    # view. They are cheap next to the network, so they stay float.
    if view_nodes := _view_nodes(pre):
        kwargs["nodes_to_exclude"] = view_nodes
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
            # An int8 projection output would round small (anomalous) embeddings to zero; the
            # last product writes float so the norm keeps its resolution at the low end.
            "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
        },
        **kwargs,
    )


# ---------------------------------------------------------------- norms and data


@torch.inference_mode()
def torch_norms(net: nn.Module, images: np.ndarray, device: torch.device,
                batch: int = 256, views: Sequence[Any] | None = None) -> np.ndarray:
    """fp32 eval-mode scores of uint8 NCHW images: the reference every file is checked against.
    With `views` (more than the plain one), the K-view score `oecl eval` reports as
    mean-view-norm, from the same `oecl_train.views` code the graph is built with."""
    from oecl_train.model import ScoreModel
    from oecl_train.scores import view_scores
    from oecl_train.views import is_plain

    model = ScoreModel(net).to(device).eval()
    ensemble = views is not None and not is_plain(views, images.shape[2], images.shape[3])
    # TF32 would put GPU reference norms ~1e-3 off the fp32 graph; keep true fp32.
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        if ensemble:
            out = [view_scores(net, images, views, device=device, precision="fp32", batch=batch)]
        else:
            out = [model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch]))
                         .to(device))[0].float().cpu().numpy()
                   for i in range(0, len(images), batch)]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return np.concatenate(out) if out else np.empty(0, np.float32)


def _subsample(images: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(images) <= limit:
        return images
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:limit])
    return images[idx]


def _oe_images(splits: Any, seed: int) -> np.ndarray | None:
    """The images `score.oe_norm` describes: the run's external OE, or for self-OECL the
    held-out ID images turned by 180° and 270° (the shifts it was trained to push down)."""
    if splits.oe_mode == "external" and splits.oe is not None:
        return _subsample(splits.oe, OE_STATS_MAX, seed)
    if splits.oe_mode == "self":
        x = splits.id_val
        turns = [np.rot90(x, 2, axes=(2, 3))]
        if x.shape[2] == x.shape[3]:  # 270° changes the shape of a non-square input
            turns.append(np.rot90(x, 3, axes=(2, 3)))
        return np.ascontiguousarray(np.concatenate(turns))
    return None


# ---------------------------------------------------------------- verification


def verify_artifact(
    directory: Path, ref_norms: np.ndarray, images: np.ndarray, is_id: np.ndarray, log: Log
) -> dict[str, Any]:
    """Score `images` with every file of the artifact through the runtime; compare to torch."""
    from oecl_runtime import golden

    report = golden.verify_files(directory, images, is_id, ref_norms,
                                 {"fp32_max_rel_diff": FP32_REL_TOL, "AUROC_diff": AUROC_TOL}, log)
    report["images"] = "held-out ID validation + ID test images vs non-ID test images of the run"
    report["reference"]["model"] = "PyTorch eval fp32"
    return report


def _verification_summary(report: dict[str, Any]) -> dict[str, Any]:
    fp32 = [r for r in report["files"] if r["format"] == "onnx" and r["precision"] == "fp32"]
    return {
        "passed": report["pass"],
        "n_images": report["n_images"],
        "max_abs_diff_fp32": fp32[0]["max_abs_diff"] if fp32 else None,
        "max_rel_diff_fp32": fp32[0]["max_rel_diff"] if fp32 else None,
        "reference_AUROC": report["reference"]["AUROC"],
        "tolerances": report["tolerances"],
        "files": {r["path"]: {"backend": r["backend"], "max_abs_diff": r["max_abs_diff"],
                              "max_rel_diff": r["max_rel_diff"], "AUROC": r["AUROC"]}
                  for r in report["files"]},
        "report": VERIFY_FILE,
    }


# ---------------------------------------------------------------- the export


def _check_out_dir(out: Path, run_dir: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA_NAME).is_file():
        # The swap-in replaces the directory: never let that take something that is not ours.
        raise ExportError(f"--out {out} exists and is not an OECL artifact; choose another path")
    if out.resolve() == run_dir.resolve():
        raise ExportError("--out must not be the run directory")


def _producer(extra: dict[str, str]) -> dict[str, str]:
    import onnx
    import onnxruntime

    try:
        from importlib.metadata import version

        ours = version("oecl")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        from oecl_runtime import __version__ as ours
    return {"name": "oecl", "version": ours, "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, **extra}


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    formats: str | Sequence[str] = ("onnx",),
    max_batch: int = 64,
    threshold_tpr: float = 0.95,
    embedding: bool = False,
    calib_images: int = 256,
    verify: bool = True,
    device: str = "cpu",
    *,
    views: int = DEFAULT_VIEWS,
    splits: Any = None,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Export the run's latest checkpoint to an artifact directory `out_dir`; returns a summary.

    `views` = K bakes the run's K deterministic views (`oecl_train.views`) into every file:
    the served score is then ‖mean of z over the K views‖ (mean-view-norm); K = 1 is the
    single-pass norm. Threshold, norm statistics and verification use the same score.

    `splits` may pass the run's already-built data splits (saves reading the data again); by
    default they are rebuilt from the run's config. Raises ExportError (one line) for bad
    input, a missing TensorRT, or a failed verification; `out_dir` is then left untouched.
    """
    fmts = parse_formats(formats)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"--max-batch must be a positive integer, got {max_batch!r}")
    if not 0.0 < threshold_tpr <= 1.0:
        raise ExportError(f"--threshold-tpr must be in (0, 1], got {threshold_tpr}")
    if calib_images < 1:
        raise ExportError(f"--calib-images must be positive, got {calib_images}")
    if not isinstance(views, int) or views < 1:
        raise ExportError(f"--views must be a positive integer, got {views!r}")
    if "tensorrt" in fmts:
        from oecl_runtime import engine

        try:
            engine.preflight()
        except engine.EngineError as e:
            raise ExportError(f"--format tensorrt: {e}") from None

    run_dir, out = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    _check_out_dir(out, run_dir)

    from oecl_train.trainer import load_trained, resolve_device

    dev = resolve_device(device)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    cfg, net, meta = load_trained(run_dir, dev)
    arch = dict(meta["architecture"])
    spec = InputSpec.from_json(meta["input"])
    chw = (spec.channels, spec.height, spec.width)
    with _stage(log, "data: reading the run's held-out and calibration images", timings, "data"):
        if splits is None:
            splits = Splits.from_config(cfg)
    if splits.spec != spec:
        raise ExportError(f"the run's data now gives input {splits.spec}, but the checkpoint was "
                          f"trained on {spec}")
    if len(splits.id_val) == 0:
        raise ExportError("the run has no held-out ID validation images to set a threshold on")
    net_cpu = copy.deepcopy(net).cpu().float().eval()
    from oecl_train.views import views_for

    view_set = views_for(cfg, spec.height, spec.width, views)

    with atomic_dir(out) as tmp, _scratch() as scratch:
        files: list[dict[str, Any]] = []
        onnx_paths: dict[str, Path] = {}
        graph_info: dict[str, Any] = {}
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in net_cpu.state_dict().items()}
        with_file(tmp / WEIGHTS_FILE, lambda p: save_file(weights, str(p)))

        folded = fold_batchnorm(net_cpu)
        want_fp16 = "onnx-fp16" in fmts
        trt_fp16_src = "tensorrt" in fmts and _trt_needs_fp16_onnx()
        for precision, wanted in (("fp32", True), ("fp16", want_fp16 or trt_fp16_src)):
            if not wanted:
                continue
            # Shipped even when made only as TensorRT 11's source: the edge box builds from it.
            path = tmp / ONNX_FILES[precision]
            with _stage(log, f"export: {path.name} ({precision})", timings, f"export_{precision}"):
                model = _Served(copy.deepcopy(folded), precision == "fp16", embedding,
                                view_set, (spec.height, spec.width))
                _export_onnx(model, path, chw, embedding)
                graph_info[path.name] = check_onnx(path, chw, embedding)
            onnx_paths[precision] = path

        if "onnx-int8" in fmts:
            path = tmp / ONNX_FILES["int8"]
            calib = _subsample(splits.id_train, calib_images, cfg.seed)
            with _stage(log, f"quantise: {path.name} (int8 QDQ, {len(calib)} calibration images)",
                        timings, "quantise_int8"):
                _quantize_int8(onnx_paths["fp32"], path, calib, scratch)
                graph_info[path.name] = check_onnx(path, chw, embedding)
            onnx_paths["int8"] = path
            graph_info[path.name]["calibration_images"] = int(len(calib))
            # TensorRT takes only zero points of 0: the symmetric twin ships for it.
            sym = tmp / INT8_SYMMETRIC_FILE
            with _stage(log, f"quantise: {sym.name} (symmetric int8 QDQ, for TensorRT)",
                        timings, "quantise_int8_symmetric"):
                _quantize_int8(onnx_paths["fp32"], sym, calib, scratch, for_tensorrt=True)
                graph_info[sym.name] = check_onnx(sym, chw, embedding)

        for precision, name in ONNX_FILES.items():
            if precision in onnx_paths and onnx_paths[precision].parent == tmp:
                extra = _INT8_FORMS["onnxruntime"] if precision == "int8" else {}
                files.append(file_entry(tmp / name, "onnx", precision, **extra))
        if "int8" in onnx_paths:
            files.append(file_entry(tmp / INT8_SYMMETRIC_FILE, "onnx", "int8",
                                    **_INT8_FORMS["tensorrt"]))

        files.append(file_entry(tmp / WEIGHTS_FILE, "safetensors", "fp32"))
        from oecl_runtime import golden

        with _stage(log, "golden: held-out images and their PyTorch fp32 norms", timings,
                    "golden"):
            g_images, g_is_id = golden.select(*_held_out(splits), cfg.seed)
            g_entries, g_section = golden.write(
                tmp, g_images, g_is_id, torch_norms(net, g_images, dev, views=view_set),
                {"fp32_max_rel_diff": FP32_REL_TOL, "AUROC_diff": AUROC_TOL})
            files += g_entries

        with _stage(log, "metadata: threshold and norm statistics (PyTorch fp32)", timings,
                    "metadata"):
            id_norms = torch_norms(net, splits.id_val, dev, views=view_set)
            oe = _oe_images(splits, cfg.seed)
            oe_norms = None if oe is None else torch_norms(net, oe, dev, views=view_set)
            threshold = threshold_at_tpr(id_norms, threshold_tpr)
            from oecl_train.metrics import threshold_warning

            few = threshold_warning(len(id_norms), threshold_tpr)
            if few:
                log(f"warning: {few}")
            meta_out = _metadata(
                spec=spec, arch=arch, embedding=embedding, threshold=threshold,
                tpr=threshold_tpr, id_norms=id_norms, oe_norms=oe_norms, max_batch=max_batch,
                files=files, producer=_producer({}),
                source={"run": run_dir.name, "checkpoint_step": meta.get("step"),
                        "data": cfg.data, "id_class": cfg.id_class, "protocol": cfg.protocol,
                        "oe": cfg.oe, "oe_mode": splits.oe_mode},
            )
            meta_out["golden"] = g_section
            meta_out["score"].update(_score_views(view_set))
            if few:
                meta_out["score"]["threshold_warning"] = few
            meta_out["verification"] = {"passed": None, "skipped": True}
            write_metadata(tmp, meta_out)

        if "tensorrt" in fmts:
            from oecl_runtime import engine

            plans = ["fp16"] + (["int8"] if "int8" in onnx_paths else [])
            with _stage(log, f"tensorrt: {', '.join(plans)} engines", timings, "tensorrt"):
                try:
                    meta_out = engine.build_engines(tmp, plans, max_batch, verify=verify,
                                                    log=log)
                except engine.EngineError as e:
                    raise ExportError(str(e)) from None

        report = None
        if verify:
            images, is_id = _verification_images(splits, cfg.seed)
            with _stage(log, f"verify: {len(images)} held-out images through oecl_runtime",
                        timings, "verify"):
                ref = torch_norms(net, images, dev, views=view_set)
                report = verify_artifact(tmp, ref, images, is_id, log)
                write_json(tmp / VERIFY_FILE, report)
            if not report["pass"]:
                bad = next(r for r in report["files"] if not r["pass"])
                raise VerificationFailed(
                    f"verification failed for {bad['path']} ({bad['format']} {bad['precision']}"
                    f" on {bad['backend']}): {bad['problems'][0]}; nothing was written"
                )
            meta_out["verification"] = _verification_summary(report)
            write_metadata(tmp, meta_out)
        else:
            log("verify: skipped (--no-verify)")
        timings["total"] = round(time.perf_counter() - t_start, 3)
        log(f"artifact: {out} ({timings['total']:.1f} s in all)")

    return {
        "artifact": str(out),
        "formats": fmts,
        "files": [{"path": f["path"], "format": f["format"], "precision": f["precision"],
                   "bytes": f["bytes"], "sha256": f["sha256"]} for f in files],
        "threshold": meta_out["score"]["threshold"],
        "threshold_rule": meta_out["score"]["threshold_rule"],
        "threshold_warning": few,
        "score": f"{meta_out['score']['name']} (higher = normal)",
        "views": len(view_set),
        "id_norm": meta_out["score"]["id_norm"],
        "oe_norm": meta_out["score"]["oe_norm"],
        "graphs": graph_info,
        "verification": report,
        "timings_s": timings,
    }


@contextmanager
def _scratch() -> Iterator[Path]:
    """Working files that must not end up in the artifact (quantiser input, TensorRT sources)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="oecl-export.") as d:
        yield Path(d)


def _trt_needs_fp16_onnx() -> bool:
    from oecl_runtime import engine

    return engine.needs_fp16_onnx()


# The `files[]` keys of the two int8 ONNX files: who each is for and how it is quantised.
_INT8_FORMS: dict[str, dict[str, Any]] = {
    "onnxruntime": {"consumers": ["onnxruntime"], "quantization": {
        "format": "QDQ", "activations": "uint8, asymmetric (zero points), per tensor",
        "weights": "int8, symmetric, per channel", "ops": "every op onnxruntime quantises"}},
    "tensorrt": {"consumers": ["tensorrt"], "quantization": {
        "format": "QDQ", "activations": "int8, symmetric (zero point 0), per tensor",
        "weights": "int8, symmetric, per channel", "ops": "Conv, Gemm, MatMul"}},
}


def _held_out(splits: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ID, OOD) held-out images: ID validation plus ID test images, and the non-ID test ones."""
    id_imgs = np.concatenate([splits.id_val, splits.test_images[splits.test_is_id]])
    return id_imgs, splits.test_images[~splits.test_is_id]


def _verification_images(splits: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    id_imgs, ood_imgs = _held_out(splits)
    if len(ood_imgs) == 0:
        raise ExportError("the run's test set has no OOD images to verify AUROC on "
                          "(use --no-verify)")
    id_imgs = _subsample(id_imgs, VERIFY_PER_SIDE, seed)
    ood_imgs = _subsample(ood_imgs, VERIFY_PER_SIDE, seed + 1)
    images = np.ascontiguousarray(np.concatenate([id_imgs, ood_imgs]))
    is_id = np.concatenate([np.ones(len(id_imgs), bool), np.zeros(len(ood_imgs), bool)])
    return images, is_id


def _metadata(
    *, spec: InputSpec, arch: dict[str, Any], embedding: bool, threshold: float, tpr: float,
    id_norms: np.ndarray, oe_norms: np.ndarray | None, max_batch: int,
    files: list[dict[str, Any]], producer: dict[str, str], source: dict[str, Any],
) -> dict[str, Any]:
    s = spec.to_json()
    outputs: dict[str, Any] = {"norm": {"dtype": "float32", "shape": ["batch"]}}
    if embedding:
        outputs["embedding"] = {"dtype": "float32", "shape": ["batch", int(arch["proj_dim"])]}
    return {
        "schema_version": SCHEMA_VERSION,
        "producer": producer,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "input": {
            "name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW",
            "channels": s["channels"], "color_mode": s["color_mode"],
            "height": s["height"], "width": s["width"], "resize": s["resize"],
            "interpolation": s["interpolation"], "resize_rule": s["resize_rule"],
            "normalization": {"in_graph": True, "mean": [float(x) for x in arch["mean"]],
                              "std": [float(x) for x in arch["std"]]},
        },
        "outputs": outputs,
        "score": {
            "name": "norm", "direction": "higher_is_normal", "threshold": float(threshold),
            "threshold_rule": {"method": "id_validation_tpr", "tpr": float(tpr),
                               "n_images": int(len(id_norms))},
            "id_norm": norm_stats(id_norms),
            "oe_norm": None if oe_norms is None or len(oe_norms) == 0 else norm_stats(oe_norms),
        },
        "max_batch": int(max_batch),
        "architecture": arch,
        "files": files,
        "source": source,
    }
