"""What a training run says about its own progress: the expected duration of the whole run once
the first steps are timed, a hint toward the CPU-sized settings when a big model trains on a
CPU, and, when no progress bar is drawn (stderr is not a terminal), a plain line every
`EVERY_S` seconds or `EVERY_SHARE` of the run with step, images/s, loss and ETA; and the
per-epoch log, metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from oecl_runtime.atomic import write_text

if TYPE_CHECKING:
    from tqdm import tqdm

# The steps timed before the run's duration is announced. The first step is left out of the
# timing: it pays for warm-up (allocations, cuDNN's search, torch.compile).
TIMED_STEPS = 5
EVERY_S = 30.0
EVERY_SHARE = 0.05

# The settings README's "Training on a CPU" measures; a run at most this large is CPU-sized.
CPU_SETTINGS = "--depth resnet10 --width 16 --image-size 16 --precision fp32"
CPU_MAX_WIDTH = 32
CPU_MAX_SIDE = 32


def format_duration(seconds: float) -> str:
    """3 s, 4.2 min, 3.5 h: one unit, the largest that keeps the number above 1."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cpu_sized(depth: str, width: int, side: int) -> bool:
    return depth == "resnet10" and width <= CPU_MAX_WIDTH and side <= CPU_MAX_SIDE


class TrainingProgress:
    """Call `step(done, images, loss)` after each optimizer step; `loss()` is read only when a
    line is printed (on a GPU that read waits for the queued steps to finish)."""

    def __init__(
        self,
        *,
        total_steps: int,
        start_step: int,
        log: Callable[[str], None],
        plain_lines: bool,
        cpu_hint: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.log, self.plain, self.clock = total_steps, log, plain_lines, clock
        self.cpu_hint = cpu_hint
        self._t_first: float | None = None  # end of the first step of this process
        self._first_step = start_step
        self._images_since_first = 0
        self._announced = False
        self._last_line_t: float | None = None
        self._last_line_step = start_step
        self._every_steps = max(1, round(EVERY_SHARE * total_steps))

    def _rate(self, done: int, now: float) -> tuple[float, float]:
        """Seconds per step and images per second since the end of the first step."""
        steps = done - self._first_step - 1
        seconds = now - self._t_first
        return seconds / max(steps, 1), self._images_since_first / max(seconds, 1e-9)

    def step(self, done: int, images: int, loss: Callable[[], float]) -> None:
        """`done` steps of the run are complete; the last one saw `images` images."""
        now = self.clock()
        if self._t_first is None:
            self._t_first, self._last_line_t = now, now
            return
        self._images_since_first += images
        timed = done - self._first_step - 1
        if not self._announced and (timed >= TIMED_STEPS or done >= self.total):
            self._announced = True
            loss()  # on a GPU: waits for the queued steps, so they count to the timing
            now = self.clock()
            per_step, _ = self._rate(done, now)
            left = self.total - done
            self.log(
                f"expected duration: {format_duration(per_step * self.total)} for "
                f"{self.total} steps ({per_step:.3g} s per step over {timed} steps; "
                f"{format_duration(per_step * left)} left)"
            )
            if self.cpu_hint:
                self.log(
                    "hint: this model is large for a CPU; the CPU-sized settings of README's "
                    f"\"Training on a CPU\" ({CPU_SETTINGS}) train far faster"
                )
        if not self.plain:
            return
        if (
            now - self._last_line_t >= EVERY_S
            or done - self._last_line_step >= self._every_steps
            or done >= self.total
        ):
            per_step, img_s = self._rate(done, now)
            self._last_line_t, self._last_line_step = now, done
            self.log(
                f"step {done}/{self.total} ({done / self.total:.0%})  {img_s:.0f} images/s  "
                f"loss {loss():.4f}  ETA {format_duration(per_step * (self.total - done))}"
            )


def bar_progress(
    bar: tqdm, *, total_steps: int, start_step: int, bar_shown: bool, cpu_hint: bool
) -> TrainingProgress:
    """The progress of a run with the tqdm `bar`: its lines above a shown bar, else plain lines
    on stderr."""

    def log(msg: str) -> None:
        if bar_shown:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    return TrainingProgress(total_steps=total_steps, start_step=start_step, log=log,
                            plain_lines=not bar_shown, cpu_hint=cpu_hint)


def append_metrics(run_dir: Path, row: dict) -> None:
    """One epoch's row of metrics.jsonl, on disk before training goes on."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Drop the rows after `epoch` (a resumed run writes them again)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["epoch"] <= epoch]
        write_text(path, "".join(ln + "\n" for ln in keep))
