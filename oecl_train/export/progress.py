"""Progress lines of an export and the seconds each stage took."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Log = Callable[[str], None]


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """Announces each stage through `log` and records its duration under a key of `timings`."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, label: str, key: str) -> Iterator[None]:
        self.log(f"{label} ...")
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[key] = round(dt, 3)
        self.log(f"{label}: {dt:.1f} s")

    def finish(self) -> float:
        """Records and returns the seconds since the export began (`timings["total"]`)."""
        self.timings["total"] = round(time.perf_counter() - self._start, 3)
        return self.timings["total"]
