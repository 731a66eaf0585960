"""The one OECL training loop: SimCLR (oe=none), self-OECL (oe=self) and OECL (external OE,
optionally mixed with overlays, jigsaws and CutPastes of ID images).

Per step: draw ID (and OE) images from uint8 tensors kept on the device, make two SimCLR views
of each on the device, run ID and OE views through ONE forward pass (BatchNorm sees both), and
minimise NT-Xent over the normalised ID features + α·mean‖z_oe‖ through `kernels.ntxent_oe`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn
from tqdm import tqdm

from kernels import NTXentOEOutput, ntxent_oe
from oecl_model.model import Architecture, OECLNet
from oecl_runtime.atomic import write_json, write_text
from oecl_train import checkpoint
from oecl_train.augment import AugmentConfig, SimCLRAugment, cutpaste, jigsaw, overlay, rotate
from oecl_train.config import DEFAULT_STEPS, TrainConfig
from oecl_train.data import Splits
from oecl_train.devices import resolve_device
from oecl_train.distributed import Dist
from oecl_train.optim import build_optimizer, cosine_lr
from oecl_train.plots import plot_training
from oecl_train.rundir import require_run_dir
from oecl_train.train_progress import TrainingProgress, cpu_sized


class TrainingDiverged(RuntimeError):
    pass


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training after a step and a checkpoint; exit with `exit_code`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signum`; the loop stops after the step in
    flight, so the checkpoint it writes is consistent. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # Handlers can only be installed from the main thread (a caller in another thread
        # keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
            "(send it again to stop at once, losing the steps since the last checkpoint)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU and GPU, fp16 on GPU, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):  # "auto" is resolved per device before this
        raise ValueError(f"precision must be fp32, bf16 or fp16 here, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def resolve_execution(cfg: TrainConfig, device: torch.device) -> None:
    """Replace the config's "auto" choices by what runs on ``device``, in place, so that
    config.json (and every reader of cfg after this) sees what actually ran."""
    cuda = device.type == "cuda"
    if cfg.precision == "auto":
        cfg.precision = "bf16" if cuda else "fp32"
    if cfg.compile == "auto":
        cfg.compile = "on" if cuda else "off"
    if not cuda:
        cfg.tf32 = False  # no TF32 on a CPU: record that none was used


def configure_cuda(cfg: TrainConfig) -> None:
    """Process-wide CUDA settings of a training run."""
    # Every step has the same input shapes, so cuDNN's one-off search for the fastest
    # convolution algorithms pays back from the second step.
    torch.backends.cudnn.benchmark = True
    # TF32 is an explicit choice (cfg.tf32), never left to library defaults that differ
    # between matmuls (off) and convolutions (on); the loss kernel follows the matmul one.
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.tf32


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
        # Under torchrun the launcher has bound this rank to its GPU (cuda:LOCAL_RANK).
        self.device = self.dist.device or resolve_device(cfg.device)
        resolve_execution(cfg, self.device)
        if self.device.type == "cuda":
            configure_cuda(cfg)
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
        if cfg.compile == "on":
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
        # A checkpoint written inside an epoch: its position there and the epoch's metric sums.
        self.start_step_in_epoch = 0
        self._partial: dict | None = None

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
        out = self.loss_on_views(views, len(x_id), alpha)
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

    def gathered_features(self, z: torch.Tensor, n_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's features [id view 1 (n_id), id view 2 (n_id), OE views] → the global
        (z_id, z_oe): z_id = cat[view 1 of all ranks, view 2 of all ranks], so rows i and
        i + N/2 stay the two views of one image, and z_oe holds every rank's OE views.
        One all-gather (with gradients) for all three parts."""
        if self.dist.world == 1:
            return z[: 2 * n_id], z[2 * n_id :]
        g = self.dist.gather(z).view(self.dist.world, len(z), z.shape[1])
        z_id = torch.cat([g[:, :n_id], g[:, n_id : 2 * n_id]]).flatten(0, 1)
        return z_id, g[:, 2 * n_id :].flatten(0, 1)

    def loss_on_views(self, views: torch.Tensor, n_id: int, alpha: float) -> NTXentOEOutput:
        """The global OECL loss of one step from this rank's views [id₁, id₂, oe₁, oe₂].

        Identical on every rank (all features are gathered); with DDP's gradient averaging the
        parameter gradient is that of one process on the concatenated global batch.
        """
        cfg = self.cfg
        with autocast(self.device, cfg.precision):
            z = self.model(views)
        z_id, z_oe = self.gathered_features(z.float(), n_id)
        return ntxent_oe(z_id, z_oe, cfg.temperature, alpha, backend=cfg.loss_backend)

    # -- run ----------------------------------------------------------------------------------
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
            self._truncate_metrics(self.start_epoch)
        return self.start_epoch

    def _truncate_metrics(self, epoch: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["epoch"] <= epoch]
            write_text(path, "".join(ln + "\n" for ln in keep))

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

    def fit(self) -> dict:
        """Train to the run's length. On SIGINT/SIGTERM: finish the step, checkpoint, and raise
        TrainingInterrupted. Checkpoints also every `checkpoint_every` epochs and, inside an
        epoch, once `checkpoint_minutes` have passed since the last one."""
        with StopSignals() as stop:
            return self._fit(stop)

    def _fit(self, stop: StopSignals) -> dict:
        cfg = self.cfg
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", cfg.to_json())
        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
            desc=self.run_dir.name,
        )
        lines = self._progress_lines(bar)
        last: dict = {}
        self.net.train()
        self._last_save = time.monotonic()
        interval = cfg.checkpoint_minutes * 60.0
        for epoch in range(self.start_epoch, self.epochs):
            first = self.start_step_in_epoch if epoch == self.start_epoch else 0
            partial = self._partial if epoch == self.start_epoch else None
            if partial and partial.get("rng") and self.dist.world == 1:
                self._set_rng(partial["rng"])  # the draws continue where they stopped
            else:
                self._seed_augmentation(epoch, first)
            id_order, oe_order = self._orders(epoch)
            sums: dict[str, torch.Tensor | float] = dict(partial["sums"]) if partial else {}
            n_steps = partial["n_steps"] if partial else 0
            n_images = partial["n_images"] if partial else 0
            t0 = time.perf_counter() - (partial["seconds"] if partial else 0.0)
            m: dict = dict(partial["last"]) if partial else {}
            for s in range(first, self.steps_per_epoch):
                step = epoch * self.steps_per_epoch + s
                if step >= self.total_steps:
                    break
                x_id, x_oe = self._batch(s, id_order, oe_order)
                m = self._step(step, x_id, x_oe)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_steps += 1
                seen = (len(x_id) + (0 if x_oe is None else len(x_oe))) * self.dist.world
                n_images += seen
                bar.update(1)
                if lines is not None:
                    lines.step(step + 1, seen, lambda m=m: float(m["loss"]))
                if step % 10 == 0 or self.device.type == "cpu":
                    loss = float(m["loss"])
                    self._check_finite(loss, step)
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        id=f"{float(m['id_norm']):.2f}",
                        oe=f"{float(m['oe_norm']):.2f}",
                        img_s=f"{n_images / (time.perf_counter() - t0):.0f}",
                    )
                stopping = self._agree_to_stop(stop.signum, step)
                due = (
                    self.dist.rank == 0
                    and interval > 0
                    and time.monotonic() - self._last_save >= interval
                )
                if stopping or (due and s + 1 < self.steps_per_epoch):
                    self._check_finite(float(m["loss"]), step)
                    state = {
                        "sums": {k: float(v) for k, v in sums.items()},
                        "n_steps": n_steps,
                        "n_images": n_images,
                        "seconds": time.perf_counter() - t0,
                        "last": {"lr": m["lr"], "alpha": m["alpha"]},
                        # One process: its RNG, so a resumed run draws exactly the views this
                        # one would have (ranks of a job re-seed, see _seed_augmentation).
                        "rng": self._get_rng() if self.dist.world == 1 else None,
                    }
                    path = self._save(epoch, last, step_in_epoch=s + 1, partial=state)
                if stopping:
                    bar.close()
                    raise self._interrupted(stop.signum or signal.SIGTERM, step + 1, path)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # kernels still queued count to the epoch
            if n_steps == 0:
                continue  # resumed at the end of a complete run: nothing left to do
            elapsed = time.perf_counter() - t0
            last = {k: float(v) / n_steps for k, v in sums.items()}
            self._check_finite(last["loss"], epoch * self.steps_per_epoch + n_steps - 1)
            last.update(
                epoch=epoch + 1,
                step=min((epoch + 1) * self.steps_per_epoch, self.total_steps),
                lr=m["lr"],
                alpha=m["alpha"],
                images_per_s=n_images / elapsed,
                epoch_s=elapsed,
            )
            if self.dist.rank == 0:
                self._log(last)
            if (epoch + 1) % self.ckpt_every == 0 or epoch + 1 == self.epochs:
                self._save(epoch + 1, last)
        bar.close()
        if self.dist.rank == 0:
            plot_training(self.run_dir)
        return last

    def _progress_lines(self, bar: tqdm) -> TrainingProgress | None:
        """Rank 0's duration estimate and, without a bar, its plain progress lines."""
        if self.dist.rank != 0:
            return None
        spec = self.splits.spec

        def log(msg: str) -> None:
            if self.progress:
                bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr, flush=True)

        side = max(spec.height, spec.width)
        return TrainingProgress(
            total_steps=self.total_steps,
            start_step=self.start_step,
            log=log,
            plain_lines=not self.progress,
            cpu_hint=self.device.type == "cpu" and not cpu_sized(self.cfg.depth, self.cfg.width,
                                                                 side),
        )

    def _agree_to_stop(self, signum: int | None, step: int) -> bool:
        """Whether to stop after this step. Every rank must stop at the same step (a rank
        that stops alone leaves the others waiting in their next collective), so with several
        ranks the flag is combined every 10 steps, where the loss is read anyway."""
        if self.dist.world == 1:
            return signum is not None
        if step % 10:
            return False
        flag = torch.tensor([0 if signum is None else 1], device=self.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())

    def _interrupted(self, signum: int, step: int, path: Path | None) -> TrainingInterrupted:
        where = f"checkpoint {path}" if path else "a checkpoint (written by rank 0)"
        name = signal.Signals(signum).name
        return TrainingInterrupted(
            f"{name}: stopped after step {step} of {self.total_steps} and wrote {where}; "
            f"continue with: oecl train --resume {self.run_dir}",
            signum,
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
    run_dir = require_run_dir(run_dir)
    cfg_path = run_dir / "config.json"
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    path = checkpoint.latest(run_dir / "checkpoints")
    meta = json.loads(path.read_text())
    net = OECLNet(Architecture(**meta["architecture"]))
    checkpoint.load(path, net, None, device)
    return cfg, net.to(device).eval(), meta
