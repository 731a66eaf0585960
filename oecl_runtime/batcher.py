"""Dynamic batching: requests' images gathered into one batch on one inference thread.

An image that finds the inference thread idle is run at once: a lone request pays no batching
delay. Images that arrive while a batch runs queue up, and the next batch closes when it holds
`max_batch` images or when its oldest image has waited `max_delay_s`, whichever comes first; so
under load the backend sees full batches, and at light load latency is the model's own.
The queue is bounded in images: a request that does not fit is refused at once (`QueueFull`)
instead of growing memory and latency without limit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .serving.config import BatchPolicy

_IDLE, _FILLING = "idle", "filling"


class QueueFull(RuntimeError):
    """The queue has no room for this request's images right now; retry later."""


class Draining(RuntimeError):
    """The batcher is shutting down and takes no new work."""


class TooManyImages(ValueError):
    """A single request holds more images than the queue can ever hold."""


class _Request:
    __slots__ = ("images", "norms", "remaining", "future", "loop", "error")

    def __init__(self, images: np.ndarray, loop: asyncio.AbstractEventLoop) -> None:
        self.images = images
        self.norms = np.empty(len(images), dtype=np.float32)
        self.remaining = len(images)
        self.loop = loop
        self.future: asyncio.Future[np.ndarray] = loop.create_future()
        self.error: BaseException | None = None


def _resolve(done: list[_Request]) -> None:
    """On the event loop: settle every finished request of one batch in a single callback."""
    for req in done:
        if req.future.done():  # cancelled: the client went away
            continue
        if req.error is None:
            req.future.set_result(req.norms)
        else:
            req.future.set_exception(req.error)


def _wake(done: list[_Request]) -> None:
    # One thread-safe wake-up per event loop and batch, not one per request: at thousands of
    # requests a second the per-future hand-off was a large share of the server's own work.
    by_loop: dict[int, list[_Request]] = {}
    for req in done:
        by_loop.setdefault(id(req.loop), []).append(req)
    for reqs in by_loop.values():
        try:
            reqs[0].loop.call_soon_threadsafe(_resolve, reqs)
        except RuntimeError:  # that loop has closed; nobody is waiting any more
            pass


class DynamicBatcher:
    """Run `run(uint8 NCHW) -> float32 norms` on batches assembled from submitted requests,
    as `policy` says (its `max_batch` a number here, not the backend's to pick)."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        item_shape: tuple[int, int, int],
        policy: BatchPolicy,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        max_batch = policy.max_batch
        if max_batch is None or max_batch < 1 or policy.max_queue < 1 or policy.max_delay_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay >= 0")
        self._run = run
        # Plain attributes, read on every submit and batch.
        self.max_batch = max_batch
        self.max_delay_s = policy.max_delay_s
        self.max_queue = policy.max_queue
        self._on_batch = on_batch
        # One (request, index, enqueue time) per image; requests span batches when they must.
        self._queue: deque[tuple[_Request, int, float]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._buf = np.empty((max_batch, *item_shape), dtype=np.uint8)
        self._thread: threading.Thread | None = None
        self.on_depth: Callable[[int], None] | None = None  # e.g. a queue-depth gauge
        self._waiting: str | None = None  # what the inference thread waits for, if anything

    # ---- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="oecl-inference", daemon=True)
            self._thread.start()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with `drain`, finish everything queued first."""
        with self._cond:
            self._stopping = True
            if not drain:
                dropped = {id(r): r for r, _, _ in self._queue}.values()
                self._queue.clear()
                for req in dropped:
                    req.error = Draining("server is shutting down")
                _wake(list(dropped))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ---- producer side (any thread)

    def submit(self, images: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Queue a uint8 (N, C, H, W) request from a coroutine; the returned future (of the
        running event loop) resolves to its N norms in order. Cancel it to drop the work."""
        n = len(images)
        if n > self.max_queue:
            raise TooManyImages(f"request has {n} images, the server queues at most "
                                f"{self.max_queue}")
        req = _Request(images, asyncio.get_running_loop())
        if n == 0:
            req.future.set_result(req.norms)
            return req.future
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise Draining("server is shutting down")
            if len(self._queue) + n > self.max_queue:
                raise QueueFull(f"queue full ({len(self._queue)} of {self.max_queue} images)")
            self._queue.extend((req, i, now) for i in range(n))
            depth = len(self._queue)
            # Wake the inference thread only when it waits for this: idle, or filling a batch
            # that is now full. While it runs a batch it looks at the queue anyway, and each
            # needless wake-up costs a GIL hand-off on the event loop's thread.
            if self._waiting == _IDLE or (self._waiting == _FILLING
                                          and depth >= self.max_batch):
                self._cond.notify()
        if self.on_depth is not None:
            self.on_depth(depth)
        return req.future

    # ---- the inference thread

    def _take(self) -> list[tuple[_Request, int, float]] | None:
        with self._cond:
            idle = not self._queue
            self._waiting = _IDLE
            while not self._queue and not self._stopping:
                self._cond.wait()
            self._waiting = _FILLING
            if not self._queue:
                self._waiting = None
                return None
            # Work that found this thread idle runs now; waiting would only add latency, as
            # nothing else is running that later arrivals could have been batched behind.
            deadline = -1.0 if idle else self._queue[0][2] + self.max_delay_s
            while len(self._queue) < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._waiting = None
            take = []
            while self._queue and len(take) < self.max_batch:
                slot = self._queue.popleft()
                # A request whose client gave up is dropped here rather than computed.
                if not slot[0].future.cancelled():
                    take.append(slot)
            depth = len(self._queue)
        if self.on_depth is not None:
            self.on_depth(depth)
        return take

    def _loop(self) -> None:
        while (take := self._take()) is not None:
            if not take:
                continue
            n = len(take)
            batch = self._buf[:n]
            for j, (req, i, _) in enumerate(take):
                batch[j] = req.images[i]
            t0 = time.perf_counter()
            try:
                norms = self._run(batch)
            except Exception as e:  # a failed batch fails its requests, never the thread
                failed = list({id(r): r for r, _, _ in take}.values())
                for req in failed:
                    req.error = e
                _wake(failed)
                continue
            if self._on_batch is not None:
                self._on_batch(n, time.perf_counter() - t0)
            done = []
            for j, (req, i, _) in enumerate(take):
                req.norms[i] = norms[j]
                req.remaining -= 1
                if req.remaining == 0:
                    done.append(req)
            _wake(done)
