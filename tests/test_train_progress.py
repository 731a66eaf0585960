"""What training says about its progress: the expected duration after the first steps, the CPU
hint, and plain progress lines when stderr is not a terminal."""

from __future__ import annotations

import re

from click.testing import CliRunner

from oecl_train import train_progress
from oecl_train.cli import main
from oecl_train.train_progress import TrainingProgress, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _run(total: int, seconds_per_step: float, *, plain: bool = True, hint: bool = False):
    clock, lines = FakeClock(), []
    p = TrainingProgress(total_steps=total, start_step=0, log=lines.append, plain_lines=plain,
                         cpu_hint=hint, clock=clock)
    for done in range(1, total + 1):
        # The first step is slow (warm-up): it must not count to the estimate.
        clock.t += 60.0 if done == 1 else seconds_per_step
        p.step(done, 128, lambda: 1.5)
    return lines


def test_duration_is_announced_once_after_the_first_timed_steps():
    lines = _run(10_000, 1.26, plain=False)
    assert lines == [
        "expected duration: 3.5 h for 10000 steps (1.26 s per step over 5 steps; 3.5 h left)"
    ]


def test_plain_lines_every_30_seconds_on_a_slow_run():
    lines = _run(2000, 6.0)
    steps = [int(m.group(1)) for ln in lines if (m := re.match(r"step (\d+)/2000", ln))]
    # 6 s per step: a line every 5 steps (30 s), long before 5 % (100 steps) would be reached.
    assert steps[:3] == [6, 11, 16] and steps[-1] == 2000
    assert all(b - a <= 5 for a, b in zip(steps, steps[1:], strict=False))
    line = next(ln for ln in lines if ln.startswith("step 6/2000"))
    assert line == "step 6/2000 (0%)  21 images/s  loss 1.5000  ETA 3.3 h"


def test_plain_lines_every_5_percent_on_a_fast_run():
    lines = _run(200, 0.01)
    steps = [int(m.group(1)) for ln in lines if (m := re.match(r"step (\d+)/200 ", ln))]
    assert steps == list(range(10, 201, 10))


def test_no_plain_lines_under_a_progress_bar_and_a_cpu_hint_when_asked():
    lines = _run(50, 0.5, plain=False, hint=True)
    assert len(lines) == 2 and lines[0].startswith("expected duration: 25 s for 50 steps")
    assert train_progress.CPU_SETTINGS in lines[1] and "Training on a CPU" in lines[1]


def test_format_duration():
    assert [format_duration(s) for s in (3, 89, 600, 5400, 12_600)] == [
        "3 s", "89 s", "10.0 min", "1.5 h", "3.5 h"]


def test_train_without_a_terminal_prints_duration_hint_and_progress_lines(tmp_path):
    # CliRunner's stderr is not a terminal: no bar, plain lines instead. 8 steps: 5 % of the
    # run is less than a step, so every step after the first gets a line.
    r = CliRunner().invoke(main, [
        "train", "--data", "digits", "--id-class", "1", "--oe", "photos", "--image-size", "16",
        "--depth", "resnet18", "--width", "8", "--batch-size", "16", "--steps", "8",
        "--precision", "fp32", "--no-hflip", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    err = r.stderr.splitlines()
    assert sum(ln.startswith("expected duration: ") for ln in err) == 1
    assert any(ln.startswith("hint: ") and "--depth resnet10 --width 16" in ln for ln in err)
    steps = [ln for ln in err if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == [f"{k}/8" for k in range(2, 9)]
    assert all(re.fullmatch(r"step \d+/8 \(\d+%\)  \d+ images/s  loss \d+\.\d{4}  ETA \d+ s", ln)
               for ln in steps), steps
