"""The one OECL training loop: SimCLR (oe=none), self-OECL (oe=self) and OECL (external OE,
optionally mixed with overlays, jigsaws and CutPastes of ID images).

Per step: draw ID (and OE) images from uint8 tensors kept on the device, make two SimCLR views
of each on the device, run ID and OE views through ONE forward pass (BatchNorm sees both), and
minimise NT-Xent over the normalised ID features + α·mean‖z_oe‖ through `kernels.ntxent_oe`.

`Trainer` is assembled from its seams: the batches (here), the step (`train_step`), the loop
(`train_loop`) and the checkpoints (`train_checkpoints`); what runs on the device is resolved
once into an `Execution` record (`execution`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from oecl_model.model import Architecture, OECLNet
from oecl_train import checkpoint
from oecl_train.augment import AugmentConfig, SimCLRAugment, cutpaste, jigsaw, overlay, rotate
from oecl_train.config import DEFAULT_STEPS, TrainConfig
from oecl_train.data import Splits
from oecl_train.devices import resolve_device
from oecl_train.distributed import Dist
from oecl_train.execution import configure_cuda, resolve_execution
from oecl_train.optim import build_optimizer
from oecl_train.rundir import require_run_dir
from oecl_train.selection import Selection
from oecl_train.train_checkpoints import CheckpointMixin
from oecl_train.train_loop import LoopMixin, TrainingDiverged, TrainingInterrupted
from oecl_train.train_step import StepMixin

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "architecture_for",
           "epoch_order", "load_trained"]


def architecture_for(cfg: TrainConfig, channels: int) -> Architecture:
    return Architecture(
        depth=cfg.depth,
        width=cfg.width,
        stem=cfg.stem,
        in_channels=channels,
        proj_dim=cfg.proj_dim,
        mean=[0.5] * channels,
        std=[0.5] * channels,
    )


def epoch_order(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` indices into range(n): whole random permutations, concatenated as needed."""
    reps = math.ceil(count / n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])[:count]


class Trainer(LoopMixin, StepMixin, CheckpointMixin):
    """Trains one run of `cfg` on `splits` into `run_dir`: `fit()`, after `resume()` to continue
    from the run's latest checkpoint. `cfg` is read, never written: what runs on the device is
    `self.execution`, and config.json records both."""

    def __init__(
        self,
        cfg: TrainConfig,
        splits: Splits,
        run_dir: str | Path,
        *,
        dist: Dist | None = None,
        progress: bool = True,
    ):
        # cfg was validated where it was built (build_config, resume_config, the callers that
        # assemble one): the device-dependent choices are the only ones left to resolve.
        self.cfg, self.splits, self.run_dir = cfg, splits, Path(run_dir)
        self.dist = dist or Dist()
        self.progress = progress and self.dist.rank == 0
        # Under torchrun the launcher has bound this rank to its GPU (cuda:LOCAL_RANK).
        self.device = self.dist.device or resolve_device(cfg.device)
        self.execution = resolve_execution(cfg, self.device)
        if self.device.type == "cuda":
            configure_cuda(self.execution)
        spec = splits.spec
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.arch = architecture_for(cfg, spec.channels)
        self.net = OECLNet(self.arch).to(self.device, memory_format=torch.channels_last)
        if cfg.sync_bn and self.dist.world > 1:
            if self.device.type != "cuda":
                raise ValueError(
                    "--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU version)"
                )
            # Same parameters and buffer names as BatchNorm: checkpoints stay plain OECLNet.
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        self.optimizer = build_optimizer(
            cfg.optimizer, self.net, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lars_eta
        )
        self.model: nn.Module = self.net
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if self.execution.compile:
            self.model = torch.compile(self.model)
        fp16 = self.execution.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.augment = SimCLRAugment(
            (spec.height, spec.width),
            spec.channels,
            AugmentConfig(cfg.crop_scale, cfg.hflip, cfg.jitter, cfg.jitter_p, cfg.grayscale_p),
        ).to(self.device)
        # The whole uint8 data set lives on the training device: 4x smaller than float, and
        # batches are gathered by index without a DataLoader round trip.
        self.id_data = torch.from_numpy(splits.id_train).to(self.device)
        self.oe_data = None if splits.oe is None else torch.from_numpy(splits.oe).to(self.device)
        self.batch = cfg.batch_size
        self.oe_batch = cfg.oe_batch_size or cfg.batch_size
        self.n_overlay = round(cfg.oe_overlay * self.oe_batch)
        self.n_jigsaw = round(cfg.oe_jigsaw * self.oe_batch)
        self.n_cutpaste = round(cfg.oe_cutpaste * self.oe_batch)
        n_id = len(self.id_data)
        if n_id == 0:
            raise ValueError("no ID training images")
        # One step consumes batch x world ID images, so steps_per_epoch depends on the world.
        self.steps_per_epoch = max(1, math.ceil(n_id / (self.batch * self.dist.world)))
        if cfg.steps is not None:
            total_steps = cfg.steps
        elif cfg.epochs is not None:
            total_steps = cfg.epochs * self.steps_per_epoch
        else:
            total_steps = DEFAULT_STEPS
        self._set_schedule(total_steps)
        self.start_epoch = 0
        # The checkpoint that becomes the model, judged on validation by rank 0 alone; its
        # validation sets are read when training starts (`fit`), not for callers that only step.
        self.selection: Selection | None = None
        # A checkpoint written inside an epoch: its position there and the epoch's metric sums.
        self.start_step_in_epoch = 0
        self._partial: dict | None = None
        # Where `fit` pauses (a checkpoint, then return) short of the schedule's end: a probe
        # of `--oe auto` is the first steps of the very run it may become.
        self.stop_at: int | None = None

    @property
    def start_step(self) -> int:
        """The global step training (re)starts at."""
        return self.start_epoch * self.steps_per_epoch + self.start_step_in_epoch

    def _set_schedule(self, total_steps: int) -> None:
        """Derive everything counted in steps or epochs from the run's length in steps."""
        cfg = self.cfg
        self.total_steps = total_steps
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.alpha_warmup_steps = round(cfg.alpha_warmup * self.total_steps)
        self.lr_warmup_steps = round(cfg.lr_warmup * self.total_steps)
        self.ckpt_every = cfg.checkpoint_every or max(1, self.epochs // 10)

    # -- sampling -----------------------------------------------------------------------------
    def _orders(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This epoch's ID and OE index streams: equal on all ranks, each takes its slice.

        Seeded by the epoch (what `set_epoch` does for a DistributedSampler), so every epoch
        draws a new permutation and, when OE is larger than one epoch's need, a new OE subset.
        """
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        per_step = self.batch * self.dist.world
        id_order = epoch_order(len(self.id_data), self.steps_per_epoch * per_step, g)
        oe_order = None
        if self.splits.oe_mode != "none":
            n_oe = len(self.id_data) if self.oe_data is None else len(self.oe_data)
            oe_per_step = self.oe_batch * self.dist.world
            oe_order = epoch_order(n_oe, self.steps_per_epoch * oe_per_step, g)
            oe_order = oe_order.to(self.device)
        # One copy per epoch: slicing a device tensor per step then costs no host-device sync
        # (a per-step .to(device) from pageable memory would be one).
        return id_order.to(self.device), oe_order

    def _indices(self, s: int, id_order, oe_order) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's ID and OE indices at step `s`: slot s·world + rank of each stream, so
        the ranks' shards are disjoint within a pass over the stream."""
        slot = s * self.dist.world + self.dist.rank
        idx = id_order[slot * self.batch : (slot + 1) * self.batch]
        if oe_order is None:
            return idx, None
        return idx, oe_order[slot * self.oe_batch : (slot + 1) * self.oe_batch]

    def _batch(self, s: int, id_order, oe_order) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx, oidx = self._indices(s, id_order, oe_order)
        x = self.id_data[idx]
        if self.splits.oe_mode == "none":
            return x, None
        if self.splits.oe_mode == "self":
            # self-OECL: ID = images at 0° and 90° (separate instances); OE = a separately
            # shuffled draw of the ID images at 180° and 270°.
            xo = self.id_data[oidx]
            return torch.cat([x, rotate(x, 1)]), torch.cat([rotate(xo, 2), rotate(xo, 3)])
        n_made = self.n_overlay + self.n_jigsaw + self.n_cutpaste
        if not n_made:
            return x, self.oe_data[oidx]
        # Self-made near-OE takes the place of the external draw's tail (overlays, then
        # jigsaws, then CutPastes); its ID picks, shifts and orders come from the
        # epoch-seeded default generator, so a resumed run redraws them.
        parts = [self.oe_data[oidx[: len(oidx) - n_made]]]
        if self.n_overlay:
            pick = torch.randint(len(self.id_data), (2, self.n_overlay), device=self.device)
            parts.append(overlay(self.id_data[pick[0]], self.id_data[pick[1]]))
        if self.n_jigsaw:
            pick = torch.randint(len(self.id_data), (self.n_jigsaw,), device=self.device)
            parts.append(jigsaw(self.id_data[pick]))
        if self.n_cutpaste:
            pick = torch.randint(len(self.id_data), (self.n_cutpaste,), device=self.device)
            parts.append(cutpaste(self.id_data[pick]))
        return x, torch.cat(parts)


def load_trained(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[TrainConfig, OECLNet, dict]:
    """The config, network (eval mode) and checkpoint metadata of a run's model: its best
    checkpoint on validation when it selected one (`--select`), else its latest."""
    run_dir = require_run_dir(run_dir)
    cfg_path = run_dir / "config.json"
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    path = checkpoint.model_checkpoint(run_dir)
    meta = json.loads(path.read_text())
    net = OECLNet(Architecture(**meta["architecture"]))
    checkpoint.load(path, net, None, device)
    return cfg, net.to(device).eval(), meta
