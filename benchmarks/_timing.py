"""Timing shared by the benchmark scripts: rotated rounds of `oecl_runtime.bench`'s backend
timing, and the best of a few repeats of one call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from oecl_runtime import bench as B


def rotated_rounds(runs: dict[str, Callable[[np.ndarray], Any]], chw: tuple[int, int, int],
                   batch: int, rounds: int, iterations: int, warmup: int, max_seconds: float,
                   pause: float, log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """`rounds` rounds of `oecl_runtime.bench.bench_backend` at one batch size; each round times
    every run once, the order rotating so that no run always goes first (or right after
    another's threads) and slow drifts hit all alike; an idle `pause` before each timing."""
    labels = list(runs)
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            time.sleep(pause)
            row = B.bench_backend(runs[label], chw, [batch], iterations=iterations,
                                  warmup=warmup, max_seconds=max_seconds)[0]
            row["round"] = r + 1
            rows[label].append(row)
            log(f"  round {r + 1}: {label}: {row['images_per_s']:.1f} images/s "
                f"({row['count']} calls, p50 {row['latency_ms']['p50']:.1f} ms)")
    return rows


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls after one untimed call: other jobs on the machine
    only ever slow a call down."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
