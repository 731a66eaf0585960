"""The run being exported: its checkpoint, data splits and view set, and its weights file."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from oecl_model.views import View, views_for
from oecl_runtime.artifact import file_entry
from oecl_runtime.atomic import with_file
from oecl_runtime.preprocess import InputSpec
from oecl_train.config import TrainConfig
from oecl_train.data import Splits
from oecl_train.devices import resolve_device
from oecl_train.export.errors import ExportError
from oecl_train.export.progress import Progress
from oecl_train.trainer import load_trained

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Source:
    """A trained run ready to export: `net` is on `device` in eval mode, `views` the K views
    every file is built with."""

    run_dir: Path
    cfg: TrainConfig
    net: nn.Module
    checkpoint: dict[str, Any]
    spec: InputSpec
    splits: Splits
    views: tuple[View, ...]
    device: torch.device

    @property
    def chw(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.height, self.spec.width)

    @property
    def hw(self) -> tuple[int, int]:
        return (self.spec.height, self.spec.width)


def load_source(run_dir: Path, device: str, views: int, splits: Splits | None,
                progress: Progress) -> Source:
    """The run's latest checkpoint, and its splits (rebuilt from its config unless given)."""
    dev = resolve_device(device)
    cfg, net, meta = load_trained(run_dir, dev)
    spec = InputSpec.from_json(meta["input"])
    with progress.stage("data: reading the run's held-out and calibration images", "data"):
        if splits is None:
            splits = Splits.from_config(cfg)
    if splits.spec != spec:
        raise ExportError(f"the run's data now gives input {splits.spec}, but the checkpoint was "
                          f"trained on {spec}")
    if len(splits.id_val) == 0:
        raise ExportError("the run has no held-out ID validation images to set a threshold on")
    return Source(run_dir, cfg, net, meta, spec, splits,
                  views_for(cfg, spec.height, spec.width, views), dev)


def write_weights(src: Source, directory: Path) -> dict[str, Any]:
    """The fp32 network as safetensors (BatchNorm unfolded); returns its `files[]` entry."""
    net = copy.deepcopy(src.net).cpu().float().eval()
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    path = directory / WEIGHTS_FILE
    with_file(path, lambda p: save_file(weights, str(p)))
    return file_entry(path, "safetensors", "fp32")
