"""The trainer's loop: epochs of steps to the run's length, with the per-epoch log, checkpoints
on a schedule, on a time interval and on SIGINT/SIGTERM, and a stop on a non-finite loss."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from tqdm import tqdm

from oecl_runtime.atomic import write_json
from oecl_train import checkpoint
from oecl_train.config import TrainConfig
from oecl_train.data import Splits
from oecl_train.distributed import Dist
from oecl_train.execution import Execution, recorded_config
from oecl_train.plots import plot_training
from oecl_train.selection import Selection
from oecl_train.train_progress import TrainingProgress, append_metrics, bar_progress, cpu_sized


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


class LoopMixin:
    """The loop of `Trainer`, which sets these attributes and provides the batches (`_orders`,
    `_batch`), the step (`_step`) and the checkpoints (`_save`, `_seed_augmentation`, `_get_rng`,
    `_set_rng`)."""

    cfg: TrainConfig
    execution: Execution
    splits: Splits
    run_dir: Path
    dist: Dist
    device: torch.device
    net: torch.nn.Module
    progress: bool
    steps_per_epoch: int
    total_steps: int
    epochs: int
    ckpt_every: int
    start_epoch: int
    start_step: int
    start_step_in_epoch: int
    _partial: dict | None
    _last_save: float
    selection: Selection | None
    stop_at: int | None

    def fit(self) -> dict:
        """Train to the run's length, or to `stop_at` (then checkpoint and return, so that a
        resumed fit continues on the same schedule as if it had never paused). On
        SIGINT/SIGTERM: finish the step, checkpoint, and raise TrainingInterrupted. Checkpoints
        also every `checkpoint_every` epochs and, inside an epoch, once `checkpoint_minutes`
        have passed since the last one."""
        with StopSignals() as stop:
            return self._fit(stop)

    def _fit(self, stop: StopSignals) -> dict:
        cfg = self.cfg
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", recorded_config(cfg, self.execution))
        end = min(self.stop_at or self.total_steps, self.total_steps)  # what this fit trains to
        bar = tqdm(
            total=end,
            initial=self.start_step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
            desc=self.run_dir.name,
        )
        lines = self._progress_lines(bar, end)
        if self.dist.rank == 0:
            self.selection = Selection.for_run(cfg, self.splits, self.run_dir, self.progress)
        if self.selection is not None and self.start_step == 0:
            self.selection.forget()
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
                inside = s + 1 < self.steps_per_epoch  # an epoch's end saves below
                pause = inside and self.stop_at is not None and step + 1 >= self.stop_at
                if stopping or pause or (due and inside):
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
                if pause:
                    bar.close()
                    return last  # the last whole epoch's figures, as a finished fit returns
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
            due = (epoch + 1) % self.ckpt_every == 0 or epoch + 1 == self.epochs
            if due and self.selection is not None:  # rank 0 only
                last["val_auroc"] = self.selection.judge(self.net, self.device)
            if self.dist.rank == 0:
                append_metrics(self.run_dir, last)
            pause = self.stop_at is not None and last["step"] >= self.stop_at
            if due or pause:
                path = self._save(epoch + 1, last)
                if due and path is not None and self.selection is not None:
                    self.selection.offer(path, last["val_auroc"])
            if pause:
                break
        bar.close()
        if self.dist.rank == 0:
            plot_training(self.run_dir)
        return last

    def _progress_lines(self, bar: tqdm, end: int) -> TrainingProgress | None:
        """Rank 0's duration estimate and, without a bar, its plain progress lines."""
        if self.dist.rank != 0:
            return None
        spec = self.splits.spec
        side = max(spec.height, spec.width)
        return bar_progress(
            bar,
            total_steps=end,
            start_step=self.start_step,
            bar_shown=self.progress,
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

    def _check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            found = checkpoint.list_checkpoints(self.run_dir / "checkpoints")
            kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was kept"
            raise TrainingDiverged(
                f"loss became {loss} at step {step}; {kept}. "
                "Try a lower --lr, --precision fp32 or a longer --alpha-warmup"
            )
