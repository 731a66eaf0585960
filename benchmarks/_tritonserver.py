"""tritonserver from the `nvidia-pytriton` wheel, run on 127.0.0.1 with the Python backend, in
the Triton-side environment that scripts/bootstrap.sh builds; for the protocol benchmark and
the tests that call Triton and `oecl serve` with one client."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _harness import REPO
from _server_process import free_port

# Built by scripts/bootstrap.sh (the `triton-test` extra): numpy < 2, which the Python
# backend's stub needs, so it cannot be the project's own environment.
TRITON_VENV = Path(os.environ.get("OECL_TRITON_VENV", REPO / ".venv-triton"))


def wait_ready(url: str, proc: subprocess.Popen, what: str, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: "
                               + log.read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} not ready within {seconds:g} s: "
                       + log.read_text(errors="replace")[-3000:])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def triton_install() -> tuple[Path, Path] | str:
    """(tritonserver binary, Python-backend stub) in the Triton-side environment, or why not."""
    py = TRITON_VENV / "bin" / "python"
    if not py.exists():
        return (f"no Triton-side environment at {TRITON_VENV} (scripts/bootstrap.sh builds it "
                "from the triton-test extra on x86_64 Linux)")
    try:
        out = subprocess.run(
            [str(py), "-c", "import pytriton, os, sys; print(os.path.dirname(pytriton.__file__));"
                            "print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=True, timeout=60).stdout.split()
    except (subprocess.SubprocessError, OSError) as e:
        return f"nvidia-pytriton is not importable in {TRITON_VENV}: {e}"
    root = Path(out[0]) / "tritonserver"
    binary, stub = root / "bin" / "tritonserver", (
        root / "python_backend_stubs" / out[1] / "triton_python_backend_stub")
    if not binary.exists() or not stub.exists():
        return (f"the nvidia-pytriton wheel in {TRITON_VENV} has no tritonserver or stub for "
                f"Python {out[1]}")
    try:
        subprocess.run([str(binary), "--help"], capture_output=True, timeout=60, check=False)
    except OSError as e:
        return f"tritonserver cannot run on this machine: {e}"
    return binary, stub


@contextmanager
def tritonserver(repository: Path, workdir: Path) -> Iterator[dict[str, str]]:
    """tritonserver on 127.0.0.1 (free HTTP, gRPC and metrics ports) with the Python backend;
    the models' Python runs in the Triton-side environment. Yields the three host:ports and the
    server's pid."""
    found = triton_install()
    if isinstance(found, str):
        raise RuntimeError(found)
    binary, stub = found
    # The stub must sit beside the backend library; the wheel keeps it apart, per Python.
    backends = workdir / "backends"
    shutil.copytree(binary.parents[1] / "backends", backends, dirs_exist_ok=True)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [str(binary), f"--model-repository={repository}", f"--backend-directory={backends}",
           "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1",
           f"--grpc-port={grpc}", "--metrics-address=127.0.0.1", f"--metrics-port={metrics}",
           "--allow-cpu-metrics=false", "--allow-gpu-metrics=false", "--log-verbose=0"]
    # The stub imports the model's packages from the environment whose python3 comes first on
    # PATH (PYTHONPATH does not reach it).
    env = {**os.environ, "PATH": f"{TRITON_VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
           # The stub finds the wheel's bundled libraries by a path relative to where the wheel
           # keeps it, which the copy does not share.
           "LD_LIBRARY_PATH": str(binary.parents[3] / "nvidia_pytriton.libs")}
    env.pop("PYTHONPATH", None)
    log = workdir / "tritonserver.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        wait_ready(f"http://127.0.0.1:{http}/v2/health/ready", proc, "tritonserver", 60, log)
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}",
               "metrics": f"127.0.0.1:{metrics}", "pid": str(proc.pid)}
    finally:
        stop(proc)
