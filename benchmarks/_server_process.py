"""A server under test in its own process: `oecl serve` (or any uvicorn app) started on a free
127.0.0.1 port, waited for on /healthz, stopped with SIGTERM and watched while it exits; plus
its CPU time and its /metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _harness import REPO

# The runtime's own CLI: the same `serve` as the `oecl` command, always from this repository.
RUNTIME_CLI = (sys.executable, "-m", "oecl_runtime")


@dataclass
class Server:
    """A started server; `shutdown` and `log_text` are filled in when its block ends."""

    url: str
    process: subprocess.Popen
    startup_seconds: float
    shutdown: dict[str, Any] = field(default_factory=dict)
    log_text: str = ""

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> float:
    """Seconds until /healthz answers 200; the server's log tail if it exits first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /healthz within {timeout:.0f} s")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # The whole group: `--workers N` runs N server processes under uvicorn's supervisor.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """SIGTERM, then SIGKILL after `timeout` seconds; how it went."""
    if proc.poll() is not None:
        return {"signal": None, "exited": True, "exit_code": proc.returncode,
                "note": "had already exited"}
    t0 = time.perf_counter()
    _signal_group(proc, signal.SIGTERM)
    try:
        code = proc.wait(timeout)
        return {"signal": "SIGTERM", "exited": True, "exit_code": code,
                "seconds_to_exit": round(time.perf_counter() - t0, 3)}
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        return {"signal": "SIGTERM", "exited": False, "exit_code": None,
                "note": f"still running {timeout:.0f} s after SIGTERM; killed"}


def graceful(stopped: dict[str, Any], log_text: str) -> dict[str, Any]:
    """`stopped` with whether uvicorn logged its lifespan shutdown (at --log-level info)."""
    # uvicorn logs these after the lifespan shutdown (the batcher drained) and as its last
    # words; since 0.29 it then re-raises the signal, so the exit status is -SIGTERM.
    done = "Application shutdown complete" in log_text
    finished = "Finished server process" in log_text
    return {**stopped, "application_shutdown_complete": done, "finished_server_process": finished,
            "graceful": bool(stopped["exited"] and done and finished)}


@contextlib.contextmanager
def serving(command: Callable[[int], Sequence[str]], *, ready_timeout: float = 180.0,
            stop_timeout: float = 60.0) -> Iterator[Server]:
    """Run `command(port)` on a free port in its own process group, its output to a log
    file, until /healthz answers; yield it; stop it on the way out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The repository first: the server runs the code beside this benchmark.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    with tempfile.TemporaryDirectory(prefix="oecl-bench-server.") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(list(command(port)), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = None
        try:
            server = Server(url, proc, wait_healthy(url, proc, log_path, ready_timeout))
            yield server
        finally:
            stopped = stop(proc, stop_timeout)
            if server is not None:
                server.log_text = log_path.read_text(errors="replace")
                server.shutdown = graceful(stopped, server.log_text)


def oecl_serve(model: Path, options: Sequence[str], **kw: float
               ) -> contextlib.AbstractContextManager[Server]:
    """`serving` of `python -m oecl_runtime serve --model MODEL --host 127.0.0.1 --port <free>
    OPTIONS`."""
    return serving(lambda port: [*RUNTIME_CLI, "serve", "--model", str(model),
                                 "--host", "127.0.0.1", "--port", str(port), *options], **kw)


def scrape(url: str) -> dict[str, float]:
    """/metrics as {series with labels: value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def batches_formed(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The server's batch-size histogram between two scrapes (after - before)."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    prefix = 'oecl_batch_size_bucket{le="'
    bounds = sorted((float(k[len(prefix):-2]), v) for k, v in d.items() if k.startswith(prefix))
    dist, prev_bound, prev_cum = [], 0.0, 0.0
    for bound, cum in bounds:
        if cum - prev_cum:
            lo = int(prev_bound) + 1
            hi = "inf" if bound == float("inf") else int(bound)
            dist.append({"sizes": f"{lo}" if lo == hi else f"{lo}-{hi}",
                         "batches": int(cum - prev_cum)})
        prev_bound, prev_cum = bound, cum
    n, images = d.get("oecl_batch_size_count", 0.0), d.get("oecl_batch_size_sum", 0.0)
    busy = d.get("oecl_inference_seconds_sum", 0.0)
    return {"batches": int(n), "images": int(images), "mean": images / n if n else None,
            "distribution": dist, "inference_seconds": busy,
            "images_per_inference_second": images / busy if busy else None}
