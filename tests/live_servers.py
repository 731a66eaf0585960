"""Real servers for the protocol tests: `oecl serve` in a subprocess, and tritonserver (the
benchmarks' launcher, `benchmarks/_tritonserver.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import REPO, import_benchmark

_triton = import_benchmark("_tritonserver")
free_port = _triton.free_port
triton_install = _triton.triton_install
tritonserver = _triton.tritonserver


@contextmanager
def oecl_serve(model_dir: Path, log: Path, *args: str) -> Iterator[str]:
    """`oecl serve` on a free port, its stderr to `log`; yields its host:port."""
    port = free_port()
    cmd = [sys.executable, "-m", "oecl_runtime", "serve", "--model", str(model_dir),
           "--port", str(port), "--log-level", "warning", *args]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _triton.wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, "oecl serve", 60, log)
        yield f"127.0.0.1:{port}"
    finally:
        _triton.stop(proc)
