"""Running the app: the listening socket, the connection cap the open-file limit allows,
uvicorn's configuration, one process (`serve`) or several on one port (`serve_workers`, under a
supervisor that keeps /metrics summed across them), and a SIGTERM that drains and exits 0."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Any

import uvicorn

from ..http_timeouts import protocol_name
from ..metrics import MULTIPROC_ENV, forget_process
from ..scorer import Scorer
from .app import ScoringApp, create_app
from .config import ProcessConfig, ServerConfig

# The app's logger: one name for the whole server.
log = logging.getLogger("oecl_runtime.server")


def http_stack() -> dict[str, str]:
    """What uvicorn's "auto" settings will run on: httptools and uvloop when installed (C
    parsing and event loop), else h11 and asyncio (pure Python, slower per request)."""
    # Imported per call: what is installed is looked up then, as the tests stand in for it.
    from importlib.metadata import PackageNotFoundError, version

    def have(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    http, loop = have("httptools"), have("uvloop")
    return {"uvicorn": have("uvicorn") or "missing",
            "http": f"httptools {http}" if http else "h11",
            "loop": f"uvloop {loop}" if loop else "asyncio"}


class PortInUse(OSError):
    """The address to listen on is taken; the message says what to do."""


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here (as uvicorn would) so that a port in use is
    one line before anything starts, for one worker or many, rather than uvicorn's raw error
    after the app has started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(e.errno, f"port {port} on {host} is in use: pick another with "
                                     "--port") from None
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    # Listening at once holds the port for good (two SO_REUSEADDR sockets may both be bound
    # until one listens); connections made while the model loads wait in the backlog.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# Descriptors kept back from the connection cap for the model files, threads, pipes and logs.
_RESERVED_FDS = 128


def connection_cap(wanted: int) -> int:
    """`wanted` open connections, or fewer when the open-file limit cannot hold them (after
    raising the soft limit toward the hard one, as far as that goes)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + _RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    cap = max(16, soft - _RESERVED_FDS)
    log.warning("open-file limit %d holds %d connections, not the %d asked for (raise it with "
                "`ulimit -n`)", soft, cap, wanted)
    return cap


def _uvicorn_config(app: Any, cfg: ServerConfig, process: ProcessConfig, **extra: Any) -> Any:
    # No `limit_concurrency`: uvicorn counts sockets with it, so idle connections locked
    # clients out. Requests are bounded by the app (`max_requests`), connections by the
    # protocol (`max_connections`, oldest idle closed first).
    uv = uvicorn.Config(
        app, host=process.host, port=process.port, log_level=process.log_level, lifespan="on",
        access_log=process.access_log, timeout_graceful_shutdown=cfg.graceful_timeout_s,
        http=protocol_name(), **extra)
    # Read by the protocol (see http_timeouts); on the Config, so worker processes get them.
    uv.header_timeout_s = cfg.header_timeout_s
    uv.retry_after_s = cfg.retry_after_s
    uv.max_connections = connection_cap(cfg.max_connections)
    return uv


def serve(scorer: Scorer, config: ServerConfig | None = None,
          process: ProcessConfig | None = None, sock: socket.socket | None = None) -> None:
    """Run the server in this process until SIGINT/SIGTERM; in-flight requests finish first.

    `sock`: a socket already bound by `listen_socket` (else bound here; PortInUse when the
    port is taken). Access logging is off by default: at thousands of requests a second it
    costs more CPU than the rest of the request path, and /metrics already counts every request.
    """
    cfg, process = config or ServerConfig(), process or ProcessConfig()
    sock = sock or listen_socket(process.host, process.port)
    app = create_app(scorer, cfg)
    uv_config = _uvicorn_config(app, cfg, process)
    stack = http_stack()
    log.info("uvicorn %s, http %s, event loop %s", stack["uvicorn"], stack["http"], stack["loop"])
    log.info("listening on http://%s:%d", process.host, sock.getsockname()[1])
    DrainingServer(uv_config).run(sockets=[sock])


def serving_threads(workers: int = 1, cores: int | None = None) -> int:
    """CPU intra-op threads per worker when none are asked for: the cores shared among the
    workers. Leaving a core to the event loop measured slower on a quiet 2-core machine, for a
    16x16 and a 32x32 ResNet alike (benchmarks/RESULTS.md); it only helped while other jobs
    loaded the cores."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // workers)


# --workers N: uvicorn's supervisor starts N processes on one socket; each imports this module
# and calls `worker_app`, which opens its own scorer from the options in this variable.
_WORKER_ENV = "OECL_SERVE_WORKER"


def serve_workers(
    model_dir: str,
    workers: int,
    backend: str = "auto",
    precision: str | None = None,
    threshold: float | None = None,
    threads: int | None = None,
    config: ServerConfig | None = None,
    process: ProcessConfig | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Run `workers` processes on one port, each with its own backend whose CPU threads share
    the cores (`threads` each; default: `serving_threads`), and /metrics summed across them.
    Workers end with this process, however it ends; a worker that dies is restarted and its
    gauges leave the sums. `config`, `process` and `sock` as for `serve`."""
    cfg, process = config or ServerConfig(), process or ProcessConfig()
    sock = sock or listen_socket(process.host, process.port)
    if threads is None:
        threads = serving_threads(workers)
    metrics_dir = tempfile.mkdtemp(prefix="oecl-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    os.environ[_WORKER_ENV] = json.dumps({
        "model": str(model_dir), "backend": backend, "precision": precision,
        "threshold": threshold, "threads": threads, "config": asdict(cfg),
        "parent": os.getpid()})
    try:
        uv_config = _uvicorn_config(f"{__name__}:worker_app", cfg, process, factory=True,
                                    workers=workers)
        log.info("%d workers, %d CPU threads each; metrics across workers in %s", workers,
                 threads, metrics_dir)
        log.info("listening on http://%s:%d", process.host, sock.getsockname()[1])
        _supervisor()(uv_config, sockets=[sock]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervisor() -> type:
    from uvicorn.supervisors import Multiprocess  # deferred: one process needs no supervisor

    class Supervisor(Multiprocess):
        """uvicorn's supervisor, which also takes a replaced worker's gauges out of /metrics."""

        def keep_subprocess_alive(self) -> None:
            before = [p.pid for p in self.processes]
            super().keep_subprocess_alive()
            for pid, proc in zip(before, self.processes, strict=False):
                if pid is not None and proc.pid != pid:
                    forget_process(pid)

    return Supervisor


def _die_with_parent(parent: int) -> None:
    """In a worker: be sent SIGTERM when the supervisor dies, even by kill -9, so no orphan
    keeps the port. Linux's parent-death signal; elsewhere a thread watching the parent pid."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
        watch = False
    except (OSError, AttributeError):  # not Linux
        watch = True
    if os.getppid() != parent:  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if watch:
        def watch_parent() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch_parent, name="oecl-parent-watch", daemon=True).start()


def worker_app() -> ScoringApp:
    """The app of one `--workers` process (called by uvicorn in that process)."""
    opts = json.loads(os.environ[_WORKER_ENV])
    _die_with_parent(opts["parent"])
    scorer = Scorer.open(opts["model"], backend=opts["backend"], precision=opts["precision"],
                         threshold=opts["threshold"], threads=opts["threads"])
    app = ScoringApp(scorer, ServerConfig.from_dict(opts["config"]), close_scorer=True)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn drains on SIGTERM, then re-raises the signal, which kills the process before
    the caller's cleanup runs and makes a clean stop exit 143. A drained SIGTERM is a
    normal stop here: the process returns and exits 0."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()
