"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts
this directory on sys.path)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oecl_runtime import bench as B


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device ("auto": CUDA when present), else "<n>-core <CPU model>"
    from /proc/cpuinfo."""
    if device.startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model}"


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
