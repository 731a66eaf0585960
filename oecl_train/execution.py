"""What a training run actually runs with: the config's device-dependent choices ("auto"
precision and compile, TF32) resolved once, for the device the run got, into a frozen record.

The record is what every later stage reads: the training step and its autocast, the process-wide
CUDA settings, config.json (which keeps the resolved values under the config's own keys and the
whole record under "execution"), and evaluation of the run. The config object a caller passes in
is never written to.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from oecl_train.config import TrainConfig


@dataclass(frozen=True)
class Execution:
    """How the network runs: on `device`, at `precision` (fp32, bf16 or fp16), compiled or
    not, with TF32 tensor cores for fp32 products or not."""

    device: str
    precision: str
    compile: bool
    tf32: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Execution:
        return cls(str(d["device"]), str(d["precision"]), bool(d["compile"]), bool(d["tf32"]))


def resolve_execution(cfg: TrainConfig, device: torch.device) -> Execution:
    """The config's choices as they run on ``device``: "auto" replaced, and no TF32 on a CPU
    (so that the record says none was used)."""
    cuda = device.type == "cuda"
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    compile_ = cfg.compile == "on" or (cfg.compile == "auto" and cuda)
    return Execution(str(device), precision, compile_, cfg.tf32 and cuda)


def run_execution(cfg: TrainConfig, device: torch.device) -> Execution:
    """What a run of ``cfg`` ran with: the record of its config.json, or, for a run saved before
    the record existed (or a config not trained yet), its choices resolved for ``device``."""
    if cfg.execution:
        return Execution.from_json(cfg.execution)
    return resolve_execution(cfg, device)


def recorded_config(cfg: TrainConfig, execution: Execution) -> dict[str, Any]:
    """config.json of a run: the config with its choices as they ran (so the file reads back as
    the configuration that ran, and `--resume` continues with it) and the record itself."""
    ran = dataclasses.replace(
        cfg,
        precision=execution.precision,
        compile="on" if execution.compile else "off",
        tf32=execution.tf32,
        execution=execution.to_json(),
    )
    return ran.to_json()


def configure_cuda(execution: Execution) -> None:
    """Process-wide CUDA settings of a training run."""
    # Every step has the same input shapes, so cuDNN's one-off search for the fastest
    # convolution algorithms pays back from the second step.
    torch.backends.cudnn.benchmark = True
    # TF32 is an explicit choice, never left to library defaults that differ between matmuls
    # (off) and convolutions (on); the loss kernel follows the matmul one.
    torch.set_float32_matmul_precision("high" if execution.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = execution.tf32


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on CPU and GPU, fp16 on GPU, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):  # "auto" is resolved per device before this
        raise ValueError(f"precision must be fp32, bf16 or fp16 here, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def eval_precision(cfg, device) -> str:
    """The precision a run is scored at on `device`: the one it ran at."""
    precision = run_execution(cfg, device).precision
    # fp16 autocast exists only on CUDA; a CUDA-trained fp16 run scored on the CPU uses bf16.
    return "bf16" if precision == "fp16" and device.type != "cuda" else precision
