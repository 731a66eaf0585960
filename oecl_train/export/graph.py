"""The served ONNX graphs: BatchNorm folded away, uint8 images in, `norm` (and optionally the
`embedding`) out, exported by the dynamo ONNX exporter with a dynamic batch dimension and
checked. The fp16 file is the same graph with weights and compute in half precision."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from oecl_model.model import BasicBlock, ScoreModel
from oecl_model.views import View, ViewScoreModel, is_plain
from oecl_runtime import engine
from oecl_runtime.artifact import file_entry
from oecl_train.export.errors import ExportError
from oecl_train.export.progress import Progress
from oecl_train.export.source import Source

INPUT_NAME = "images"
OPSET = 18
# Ops that only make sense in training; none may survive into a served graph.
TRAINING_OPS = frozenset({"BatchNormalization", "Dropout"})
# Initializer names of the K-view graph's resampling maps (`ViewStack.rows` / `.cols`).
VIEW_MAP_NAMES = ("stack.rows", "stack.cols")
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of `net` with each BatchNorm folded into the Conv/Linear before it.

    Pairs are taken where data flow is known: consecutive entries of an nn.Sequential, and the
    conv1/bn1, conv2/bn2 pairs of a BasicBlock. Any BatchNorm left over is an error, so an
    architecture this does not understand is refused instead of exported with BN inside.
    """

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


class ServedModel(nn.Module):
    """uint8 NCHW in; `norm` (float32) and optionally `embedding` (float32) out.

    With the plain view alone (K = 1), fp32 is `ScoreModel` itself. fp16 casts the images to
    half before the network (weights are half too) and the projection back to float32 before
    the norm, so clients see the same dtypes whatever the precision.

    With K views, the N images become K·N views inside the graph (`ViewStack`, resampled in
    float32 at every precision), the network runs once on all of them, and `norm` is the norm
    of the mean projection over each image's K views; `embedding` is that mean projection.
    """

    def __init__(self, net: nn.Module, half: bool, embedding: bool,
                 views: Sequence[View] | None = None, hw: tuple[int, int] | None = None) -> None:
        super().__init__()
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


def export_onnx(model: nn.Module, path: Path, chw: tuple[int, int, int], embedding: bool) -> None:
    """`model` (uint8 NCHW in) as an ONNX file with a dynamic batch dimension."""
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


def float_nodes(path: Path) -> list[str]:
    """Names of the nodes that int8 keeps float: those that apply the view maps (read a
    `ViewStack` buffer), then the network's first convolution (the stem, which reads the
    normalised image)."""
    model = onnx.load(str(path))
    maps = {i.name for i in model.graph.initializer if i.name.endswith(VIEW_MAP_NAMES)}
    views = [n.name for n in model.graph.node if maps & set(n.input)]
    stem = next((n.name for n in model.graph.node
                 if n.op_type == "Conv" and n.name not in views), None)
    return views + ([stem] if stem else [])


@dataclass
class Graphs:
    """The ONNX files made so far: `paths` by precision, `info` (check_onnx's summary) by
    file name."""

    chw: tuple[int, int, int]
    embedding: bool
    paths: dict[str, Path] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, path: Path, precision: str | None = None) -> dict[str, Any]:
        """Checks the file at `path` and lists it (under `precision`, when it is one's file)."""
        self.info[path.name] = check_onnx(path, self.chw, self.embedding)
        if precision is not None:
            self.paths[precision] = path
        return self.info[path.name]


def export_graphs(src: Source, directory: Path, fmts: Sequence[str], embedding: bool,
                  progress: Progress) -> Graphs:
    """The fp32 graph, and the fp16 one when asked for or when TensorRT builds from it."""
    folded = fold_batchnorm(src.net)
    graphs = Graphs(src.chw, embedding)
    want_fp16 = "onnx-fp16" in fmts or ("tensorrt" in fmts and engine.needs_fp16_onnx())
    for precision in ("fp32", "fp16") if want_fp16 else ("fp32",):
        # Shipped even when made only as TensorRT 11's source: the edge box builds from it.
        path = directory / ONNX_FILES[precision]
        with progress.stage(f"export: {path.name} ({precision})", f"export_{precision}"):
            model = ServedModel(copy.deepcopy(folded), precision == "fp16", embedding,
                                src.views, src.hw)
            export_onnx(model, path, src.chw, embedding)
            graphs.record(path, precision)
    return graphs


def graph_entries(graphs: Graphs) -> list[dict[str, Any]]:
    """The `files[]` entries of the fp32 and fp16 files."""
    return [file_entry(graphs.paths[p], "onnx", p) for p in ("fp32", "fp16") if p in graphs.paths]
