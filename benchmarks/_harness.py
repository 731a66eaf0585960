"""What every benchmark script shares: where results go, logging, the device description, the
recorded command and markdown tables (results are written with `oecl_runtime.atomic.write_json`).

The scripts run as `python benchmarks/<script>.py`, which puts this folder on sys.path but not
the repository: the packages measured are the installed ones, which are the checkout itself
once it is installed in editable mode (`pip install -e .`, as scripts/bootstrap.sh does).
Where it is not installed, the repository goes on PYTHONPATH (gpu_check.sh does that).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the tables."""
    print(msg, file=sys.stderr, flush=True)


@functools.cache
def _cpu() -> str:
    from oecl_runtime.bench import device_info

    info = device_info()
    return f"{info['cpu_count']}-core {info['cpu']}"


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device ("auto": CUDA when present), else "<n>-core <CPU model>"
    as `oecl_runtime.bench.device_info` reads it."""
    if device.startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return _cpu()


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as RESULTS.md records it: `python benchmarks/<script> <arguments>`."""
    return " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def shown(path: Path) -> Path:
    """`path` relative to the repository when it lies inside it (results carry no machine
    paths)."""
    resolved = path.resolve()
    return resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else path


def _md_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(head: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """The lines of a markdown table; `align` has a letter per column, "r" right-aligns it
    (numbers), any other letter or none leaves it left-aligned."""
    marks = ["---:" if a == "r" else "---" for a in align.ljust(len(head))]
    return [_md_row(head), "|" + "|".join(marks) + "|", *(_md_row(r) for r in rows)]
