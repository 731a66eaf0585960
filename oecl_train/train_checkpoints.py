"""The trainer's checkpoints (in `oecl_train.checkpoint`'s files): what a checkpoint of a run
holds, resuming from the latest one, and the seeded randomness that lets a resumed run draw
exactly the views an uninterrupted one would."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import torch
from torch import nn

from oecl_model.model import Architecture
from oecl_train import checkpoint
from oecl_train.config import TrainConfig
from oecl_train.data import Splits
from oecl_train.distributed import Dist
from oecl_train.train_progress import truncate_metrics


class CheckpointMixin:
    """Checkpoints of `Trainer`, which sets these attributes and re-derives its schedule from a
    run's length with `_set_schedule`."""

    cfg: TrainConfig
    splits: Splits
    run_dir: Path
    dist: Dist
    device: torch.device
    arch: Architecture
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    total_steps: int
    epochs: int
    start_epoch: int
    start_step_in_epoch: int
    _partial: dict | None
    _last_save: float

    def resume(self, extend: bool = False) -> int:
        """Restore the latest checkpoint of this run; returns the epoch training continues at.

        A checkpoint written inside an epoch (on a signal or the time interval) resumes at the
        step after it, with that epoch's metric sums and (one process) its RNG state, so the
        run continues as if it had never stopped.

        Checkpoints hold no per-rank state, so any number of ranks can resume one. With a
        different world size the global batch, and so steps_per_epoch, changes: training
        continues at the start of the saved epoch and the run keeps its length in epochs, with
        the step schedule (cosine learning rate, α and learning-rate warm-ups) recomputed in
        steps. `extend`: the configured --steps / --epochs are a new length for the run, so the
        schedule follows them instead of the checkpoint's.
        """
        path = checkpoint.latest(self.run_dir / "checkpoints")
        meta = checkpoint.load(path, self.net, self.optimizer, self.device)
        if self.scaler is not None and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.start_epoch = int(meta["epoch"])
        saved_spe = meta.get("steps_per_epoch")
        if saved_spe is None and not meta.get("complete") and self.start_epoch > 0:
            saved_spe = int(meta["step"]) // self.start_epoch  # older checkpoints
        if saved_spe and saved_spe != self.steps_per_epoch:
            # --epochs runs already have their epochs; a --steps run keeps its share of
            # passes over the data rather than its count of (now differently sized) steps.
            if not extend:
                self._set_schedule(
                    max(1, round(int(meta["total_steps"]) * self.steps_per_epoch / saved_spe))
                )
        else:
            # Same step size: continue at the exact step, also where the last epoch was cut
            # short by the run's length (an extended run picks up inside that epoch).
            step = int(meta.get("step", self.start_epoch * self.steps_per_epoch))
            self.start_epoch, self.start_step_in_epoch = divmod(step, self.steps_per_epoch)
            self._partial = meta.get("partial") if self.start_step_in_epoch else None
        if self.dist.rank == 0:
            truncate_metrics(self.run_dir, self.start_epoch)
        return self.start_epoch

    def _save(
        self, epoch: int, last: dict, step_in_epoch: int = 0, partial: dict | None = None
    ) -> Path | None:
        """Checkpoint after `epoch` complete epochs and `step_in_epoch` steps of the next one
        (with that epoch's metric sums so far in `partial`)."""
        if self.dist.rank != 0:
            return None
        self._last_save = time.monotonic()
        step = epoch * self.steps_per_epoch + step_in_epoch
        info = {
            "step": min(step, self.total_steps),
            "step_in_epoch": step_in_epoch,
            "partial": partial,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            # Job facts, not per-rank state: resume() rescales the schedule when they change.
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.dist.world,
            "complete": step >= self.total_steps,
            "architecture": self.arch.to_json(),
            "device": str(self.device),
            "input": self.splits.spec.to_json(),
            "metrics": last,
        }
        if self.scaler is not None:
            info["grad_scaler"] = self.scaler.state_dict()
        return checkpoint.save(
            self.run_dir / "checkpoints",
            epoch,
            self.net,
            self.optimizer,
            info,
            keep=self.cfg.keep_checkpoints,
            step_in_epoch=step_in_epoch,
        )

    def _seed_augmentation(self, epoch: int, step_in_epoch: int = 0) -> None:
        """Augmentation randomness: distinct per rank and epoch, reproducible from the seed,
        so a resumed run (with the same world size) draws exactly the views an uninterrupted
        one would. A job of several ranks resumed inside an epoch re-seeds from that position
        (its ranks' RNG states are not in the checkpoint): repeatable, not identical."""
        offset = step_in_epoch * 15_485_863 if step_in_epoch else 0
        torch.manual_seed(self.cfg.seed * 7919 + epoch * 104_729 + self.dist.rank + offset)

    def _get_rng(self) -> dict[str, str]:
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}

    def _set_rng(self, rng: dict[str, str]) -> None:
        def state(text: str) -> torch.Tensor:
            return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

        torch.set_rng_state(state(rng["cpu"]))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(state(rng["cuda"]), self.device)
