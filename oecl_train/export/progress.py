"""Progress lines of an export and the seconds each stage took.

Every stage says when it starts and how long it took; inside a stage, a count (`counter`) says
how far it is at most every `EVERY_S` seconds, and a stage with no count to give (one call into
the ONNX exporter or the quantiser) says every `EVERY_S` seconds that it is still running."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Log = Callable[[str], None]
EVERY_S = 10.0


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """Announces each stage through `log` and records its duration under a key of `timings`."""

    def __init__(self, log: Log, every_s: float = EVERY_S) -> None:
        self.log = log
        self.every_s = every_s
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()
        self._said = time.perf_counter()  # when the last line inside a stage was logged
        self._counting = False  # a counter speaks for the stage: no heartbeat then
        self._lock = threading.Lock()

    def _say(self, msg: str) -> None:
        with self._lock:
            self._said = time.perf_counter()
            self.log(msg)

    @contextmanager
    def stage(self, label: str, key: str) -> Iterator[None]:
        self.log(f"{label} ...")
        t0 = self._said = time.perf_counter()
        self._counting = False
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.every_s / 4):
                now = time.perf_counter()
                if not self._counting and now - self._said >= self.every_s:
                    self._say(f"{label}: still running, {now - t0:.0f} s")

        beat = threading.Thread(target=heartbeat, name="export-progress", daemon=True)
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join()
        dt = time.perf_counter() - t0
        self.timings[key] = round(dt, 3)
        self.log(f"{label}: {dt:.1f} s")

    def counter(self, name: str, total: int, unit: str) -> Callable[[int], None]:
        """A callback taking how many more `unit` are done; logs `name: done/total unit` when
        `every_s` has passed since the stage last said something."""
        done = 0
        self._counting = True

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if time.perf_counter() - self._said >= self.every_s and done < total:
                self._say(f"{name}: {done}/{total} {unit}")

        return tick

    def finish(self) -> float:
        """Records and returns the seconds since the export began (`timings["total"]`)."""
        self.timings["total"] = round(time.perf_counter() - self._start, 3)
        return self.timings["total"]
