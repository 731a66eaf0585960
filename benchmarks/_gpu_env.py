"""What every GPU result records about the machine it came from, and the live record of
measurements that gpu_check.sh keeps (one JSON line per measurement, appended as it is made,
so a step cut off by its time limit keeps what it finished)."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
from pathlib import Path
from typing import Any


def driver_version() -> str | None:
    """The NVIDIA driver's version ("580.65.06"), from the kernel module, else the CUDA
    version the driver API reports ("CUDA 13.0"); None without a driver."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        text = ""
    if m := re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text):
        return m.group(1)
    from oecl_runtime.backends.base import _load_libcuda

    lib = _load_libcuda()
    version = ctypes.c_int(0)
    if lib is None or lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"CUDA {version.value // 1000}.{version.value % 1000 // 10}"


def gpu_environment() -> dict[str, Any]:
    """GPU name and compute capability, driver, CUDA (torch's build), torch, triton and
    Python versions."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, Any] = {"gpu": None, "compute_capability": None, "driver": None,
                           "cuda": torch.version.cuda, "torch": torch.__version__,
                           "triton": triton_version, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   driver=driver_version())
    return env


def append_jsonl(path: str | os.PathLike | None, record: dict[str, Any]) -> None:
    """One JSON line appended and flushed to disk (nothing when `path` is None)."""
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# Import names of what the GPU machine lacks and .whl/ carries (benchmarks/fetch_wheels.sh).
CARRIED = ("kornia", "kornia_rs", "starlette", "uvicorn", "httptools", "python_multipart")


def preflight(cpu: bool, wheels: Path) -> tuple[list[str], dict[str, Any]]:
    """(what is missing, one line each; the environment) for gpu_check.sh's steps."""
    import importlib.util

    missing = []
    for mod in ("torch", "triton"):
        if importlib.util.find_spec(mod) is None:
            missing.append(f"{mod} is not installed")
    if missing:
        return missing, {"python": platform.python_version()}
    env = gpu_environment()
    if not cpu and env["gpu"] is None:
        missing.append(f"no CUDA device visible to torch {env['torch']} (built for CUDA "
                       f"{env['cuda']})")
    absent = [m for m in CARRIED if importlib.util.find_spec(m) is None]
    if absent:
        where = (f"{wheels}/ lacks their wheels" if any(wheels.glob("*.whl")) else
                 f"no wheel folder {wheels}/: run bash benchmarks/fetch_wheels.sh where there "
                 f"is network and carry {wheels}")
        missing.append(f"{', '.join(absent)} not importable ({where})")
    return missing, env


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="gpu_check.sh's preflight: one line, exit 2 "
                                "when something a step needs is missing")
    p.add_argument("command", choices=("preflight",))
    p.add_argument("--cpu", action="store_true", help="the --smoke run: no GPU needed")
    p.add_argument("--wheels", type=Path, default=Path(".whl"))
    p.add_argument("--jsonl", type=Path, default=None)
    args = p.parse_args(argv)
    missing, env = preflight(args.cpu, args.wheels)
    append_jsonl(args.jsonl, {"kind": "preflight", "ok": not missing, "missing": missing,
                              **env})
    if missing:
        print(f"gpu_check.sh: preflight failed: {'; '.join(missing)}")
        return 2
    gpu = f"{env['gpu']} (sm {env['compute_capability']}), driver {env['driver']}" \
        if env["gpu"] else "no GPU (smoke run)"
    print(f"preflight: Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), "
          f"triton {env['triton']}, {gpu}; {', '.join(CARRIED)} importable")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
