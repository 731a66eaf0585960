"""Counters, gauges and histograms rendered in the Prometheus text exposition format (0.0.4).

Small on purpose: the server needs a handful of series, and an edge box should not need another
package for them. Every update takes one lock, which is negligible next to an inference.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelKey = tuple[tuple[str, str], ...]


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = key + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(k)} {_fmt(v)}" for k, v in items] or [f"{self.name} 0"]


class Gauge(_Metric):
    """A gauge read at scrape time from `source` (e.g. the live queue depth), or set directly."""

    kind = "gauge"

    def __init__(self, name: str, help: str, source: Callable[[], float] | None = None,
                 labels: dict[str, str] | None = None) -> None:
        super().__init__(name, help)
        self._source = source
        self._value = 0.0
        self._key: LabelKey = tuple(sorted((labels or {}).items()))

    def set(self, value: float) -> None:
        self._value = float(value)

    def render(self) -> list[str]:
        value = self._source() if self._source is not None else self._value
        return [f"{self.name}{_labels(self._key)} {_fmt(value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help)
        self.buckets = sorted(float(b) for b in buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # last slot: above every bound
        self._sum = 0.0
        self._n = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.buckets) and value > self.buckets[i]:
            i += 1
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._n += 1

    @property
    def count(self) -> int:
        return self._n

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._n
        lines, running = [], 0
        for bound, c in zip([*self.buckets, math.inf], counts, strict=True):
            running += c
            lines.append(f"{self.name}_bucket{_labels((), (('le', _fmt(bound)),))} {running}")
        lines += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {n}"]
        return lines


M = TypeVar("M", bound=_Metric)


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.header() + m.render()
        return "\n".join(lines) + "\n"


def powers_of_two(limit: int) -> Iterable[float]:
    """1, 2, 4, ... up to and including `limit` (batch-size buckets)."""
    b = 1
    while b < limit:
        yield float(b)
        b *= 2
    yield float(limit)


class ServerMetrics:
    """The series `oecl serve` exposes on /metrics."""

    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, max_batch: int, queue_depth: Callable[[], float],
                 model_labels: dict[str, str]) -> None:
        r = self.registry = Registry()
        self.requests = r.add(Counter("oecl_requests_total", "HTTP requests by path and status"))
        self.images = r.add(Counter("oecl_images_total", "Images scored"))
        self.errors = r.add(Counter("oecl_errors_total", "Failed score requests by reason"))
        self.batch_size = r.add(Histogram("oecl_batch_size", "Images per inference batch",
                                          list(powers_of_two(max_batch))))
        self.queue_depth = r.add(Gauge("oecl_queue_depth", "Images waiting for inference",
                                       source=queue_depth))
        self.latency = r.add(Histogram("oecl_request_latency_seconds",
                                       "Time from request arrival to response, /v1/score",
                                       self.LATENCY_BUCKETS))
        self.inference = r.add(Histogram("oecl_inference_seconds",
                                         "Backend time per batch", self.LATENCY_BUCKETS))
        r.add(Gauge("oecl_model_info", "Backend serving the model (value is always 1)",
                    labels=model_labels)).set(1)

    def render(self) -> str:
        return self.registry.render()
