"""The one OECL training loop: SimCLR (oe=none), self-OECL (oe=self) and OECL (external OE).

Per step: draw ID (and OE) images from uint8 tensors kept on the device, make two SimCLR views
of each on the device, run ID and OE views through ONE forward pass (BatchNorm sees both), and
minimise NT-Xent over the normalised ID features + α·mean‖z_oe‖ through `kernels.ntxent_oe`.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kernels import ntxent_oe
from oecl_runtime.atomic import write_json
from oecl_train import checkpoint
from oecl_train.augment import AugmentConfig, SimCLRAugment, rotate
from oecl_train.config import TrainConfig
from oecl_train.data import Splits
from oecl_train.model import Architecture, OECLNet
from oecl_train.optim import build_optimizer, cosine_lr


class TrainingDiverged(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU and GPU, fp16 on GPU, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


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


@dataclass
class Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather with gradients, so the loss sees every rank's features (global negatives)."""
        if self.world == 1:
            return x
        import torch.distributed.nn as dnn

        return torch.cat(dnn.all_gather(x), dim=0)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        splits: Splits,
        run_dir: str | Path,
        *,
        dist: Dist | None = None,
        progress: bool = True,
    ):
        cfg.validate()
        self.cfg, self.splits, self.run_dir = cfg, splits, Path(run_dir)
        self.dist = dist or Dist()
        self.progress = progress and self.dist.rank == 0
        self.device = resolve_device(cfg.device)
        spec = splits.spec
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.arch = architecture_for(cfg, spec.channels)
        self.net = OECLNet(self.arch).to(self.device, memory_format=torch.channels_last)
        self.optimizer = build_optimizer(
            cfg.optimizer, self.net, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lars_eta
        )
        self.model: nn.Module = self.net
        if self.dist.world > 1:
            self.model = nn.parallel.DistributedDataParallel(self.net)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
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
        n_id = len(self.id_data)
        if n_id == 0:
            raise ValueError("no ID training images")
        self.steps_per_epoch = max(1, math.ceil(n_id / (self.batch * self.dist.world)))
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        elif cfg.epochs is not None:
            self.total_steps = cfg.epochs * self.steps_per_epoch
        else:
            self.total_steps = 2000
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.alpha_warmup_steps = round(cfg.alpha_warmup * self.total_steps)
        self.lr_warmup_steps = round(cfg.lr_warmup * self.total_steps)
        self.ckpt_every = cfg.checkpoint_every or max(1, self.epochs // 10)
        self.start_epoch = 0

    # -- sampling -----------------------------------------------------------------------------
    def _orders(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This epoch's ID and OE index streams: equal on all ranks, each takes its slice."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        per_step = self.batch * self.dist.world
        id_order = epoch_order(len(self.id_data), self.steps_per_epoch * per_step, g)
        oe_order = None
        if self.splits.oe_mode != "none":
            n_oe = len(self.id_data) if self.oe_data is None else len(self.oe_data)
            oe_per_step = self.oe_batch * self.dist.world
            oe_order = epoch_order(n_oe, self.steps_per_epoch * oe_per_step, g)
        return id_order, oe_order

    def _batch(self, s: int, id_order, oe_order) -> tuple[torch.Tensor, torch.Tensor | None]:
        r, w = self.dist.rank, self.dist.world
        idx = id_order[(s * w + r) * self.batch : (s * w + r + 1) * self.batch].to(self.device)
        x = self.id_data[idx]
        if self.splits.oe_mode == "none":
            return x, None
        oidx = oe_order[(s * w + r) * self.oe_batch : (s * w + r + 1) * self.oe_batch]
        oidx = oidx.to(self.device)
        if self.splits.oe_mode == "self":
            # self-OECL: ID = images at 0° and 90° (separate instances); OE = a separately
            # shuffled draw of the ID images at 180° and 270°.
            xo = self.id_data[oidx]
            return torch.cat([x, rotate(x, 1)]), torch.cat([rotate(xo, 2), rotate(xo, 3)])
        return x, self.oe_data[oidx]

    # -- one step -----------------------------------------------------------------------------
    def _step(self, step: int, x_id: torch.Tensor, x_oe: torch.Tensor | None) -> dict:
        cfg = self.cfg
        alpha = cfg.alpha if step >= self.alpha_warmup_steps else 0.0
        lr = cosine_lr(step, self.total_steps, cfg.lr, self.lr_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        parts = [self.augment(x_id), self.augment(x_id)]
        if x_oe is not None:
            parts += [self.augment(x_oe), self.augment(x_oe)]
        views = torch.cat(parts).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, cfg.precision):
            z = self.model(views)
        z = z.float()
        n = len(x_id)
        z1, z2 = self.dist.gather(z[:n]), self.dist.gather(z[n : 2 * n])
        z_oe = self.dist.gather(z[2 * n :])
        out = ntxent_oe(torch.cat([z1, z2]), z_oe, cfg.temperature, alpha, backend=cfg.loss_backend)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            out.loss.backward()
            self.optimizer.step()
        return {
            "loss": out.loss.detach(),
            "contrastive": out.contrastive,
            "id_norm": out.id_norm,
            "oe_norm": out.oe_norm,
            "alpha": alpha,
            "lr": lr,
        }

    # -- run ----------------------------------------------------------------------------------
    def resume(self) -> int:
        """Restore the latest checkpoint of this run; returns the epoch training continues at."""
        path = checkpoint.latest(self.run_dir / "checkpoints")
        meta = checkpoint.load(path, self.net, self.optimizer, self.device)
        if self.scaler is not None and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.start_epoch = int(meta["epoch"])
        if self.dist.rank == 0:
            self._truncate_metrics(self.start_epoch)
        return self.start_epoch

    def _truncate_metrics(self, epoch: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["epoch"] <= epoch]
            from oecl_runtime.atomic import write_text

            write_text(path, "".join(ln + "\n" for ln in keep))

    def _save(self, epoch: int, last: dict) -> Path | None:
        if self.dist.rank != 0:
            return None
        info = {
            "step": min(epoch * self.steps_per_epoch, self.total_steps),
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "complete": epoch >= self.epochs,
            "architecture": self.arch.to_json(),
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
        )

    def fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", cfg.to_json())
        start_step = self.start_epoch * self.steps_per_epoch
        bar = tqdm(
            total=self.total_steps,
            initial=start_step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
            desc=self.run_dir.name,
        )
        last: dict = {}
        self.net.train()
        for epoch in range(self.start_epoch, self.epochs):
            # Augmentation randomness: distinct per rank and epoch, reproducible from the seed,
            # so a resumed run draws exactly the views an uninterrupted one would.
            torch.manual_seed(cfg.seed * 7919 + epoch * 104_729 + self.dist.rank)
            id_order, oe_order = self._orders(epoch)
            sums: dict[str, torch.Tensor | float] = {}
            t0, n_steps, n_images = time.perf_counter(), 0, 0
            for s in range(self.steps_per_epoch):
                step = epoch * self.steps_per_epoch + s
                if step >= self.total_steps:
                    break
                x_id, x_oe = self._batch(s, id_order, oe_order)
                m = self._step(step, x_id, x_oe)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_steps += 1
                n_images += (len(x_id) + (0 if x_oe is None else len(x_oe))) * self.dist.world
                bar.update(1)
                if step % 10 == 0 or self.device.type == "cpu":
                    loss = float(m["loss"])
                    self._check_finite(loss, step)
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        id=f"{float(m['id_norm']):.2f}",
                        oe=f"{float(m['oe_norm']):.2f}",
                        img_s=f"{n_images / (time.perf_counter() - t0):.0f}",
                    )
            elapsed = time.perf_counter() - t0
            last = {k: float(v) / n_steps for k, v in sums.items()}
            self._check_finite(last["loss"], epoch * self.steps_per_epoch + n_steps - 1)
            last.update(
                epoch=epoch + 1,
                step=epoch * self.steps_per_epoch + n_steps,
                lr=m["lr"],
                alpha=m["alpha"],
                images_per_s=n_images / elapsed,
            )
            if self.dist.rank == 0:
                self._log(last)
            if (epoch + 1) % self.ckpt_every == 0 or epoch + 1 == self.epochs:
                self._save(epoch + 1, last)
        bar.close()
        if self.dist.rank == 0:
            from oecl_train.plots import plot_training

            plot_training(self.run_dir)
        return last

    def _check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            found = checkpoint.list_checkpoints(self.run_dir / "checkpoints")
            kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was kept"
            raise TrainingDiverged(
                f"loss became {loss} at step {step}; {kept}. "
                "Try a lower --lr, --precision fp32 or a longer --alpha-warmup"
            )

    def _log(self, row: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def load_trained(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[TrainConfig, OECLNet, dict]:
    """The config, network (eval mode) and checkpoint metadata of a run's latest checkpoint."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise checkpoint.CheckpointError(f"{run_dir}: not a run directory (no config.json)")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    path = checkpoint.latest(run_dir / "checkpoints")
    meta = json.loads(path.read_text())
    net = OECLNet(Architecture(**meta["architecture"]))
    checkpoint.load(path, net, None, device)
    return cfg, net.to(device).eval(), meta


def as_numpy_norms(z: torch.Tensor) -> np.ndarray:
    return torch.linalg.vector_norm(z.float(), dim=1).cpu().numpy()
