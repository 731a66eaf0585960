"""`Scorer`: an artifact plus a backend, turning images into norms and normal/anomaly decisions."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .artifact import Artifact
from .backends import Backend, open_backend
from .inputs import iter_items, prepare
from .preprocess import ImageError, InputSpec, load


@dataclass(frozen=True)
class ScoreResult:
    """One image's score. `norm`: higher = more normal; anomalous when norm < threshold."""

    norm: float
    is_anomaly: bool
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ScoreError(ValueError):
    """The model gave an image no usable score (NaN or infinite): an error for that image,
    never a decision, since every comparison with NaN says "not below the threshold"."""


def non_finite(norm: float) -> str:
    """The one-line reason for an image whose norm is not a finite number."""
    return (f"the model returned a non-finite norm ({norm}) for this image; the model file is "
            "broken or the image drives it out of range")


def check_threshold(value: float) -> float:
    """`value` as a threshold: a finite number >= 0 (norms are never negative, and against NaN
    no image would ever be anomalous); ValueError otherwise."""
    t = float(value)
    if not (np.isfinite(t) and t >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {value}")
    return t


@dataclass(frozen=True)
class FileResult:
    """One file of `Scorer.score_files`: its norm and decision, or why it could not be read."""

    path: str
    norm: float | None = None
    is_anomaly: bool | None = None
    error: str | None = None


class Scorer:
    """Score images with an OECL artifact.

    >>> scorer = Scorer.open("model_dir")                  # doctest: +SKIP
    >>> scorer.score(["a.png", "b.png"])[0].norm            # doctest: +SKIP

    The threshold used is, in order: the call's `threshold`, the scorer's, the artifact's.
    """

    def __init__(
        self,
        artifact: Artifact,
        backend: Backend,
        threshold: float | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.artifact = artifact
        self.backend = backend
        self.spec: InputSpec = artifact.spec
        self._threshold = None if threshold is None else check_threshold(threshold)
        limit = backend.max_batch
        self.batch_size = limit if batch_size is None else max(1, min(int(batch_size), limit))
        # Backends need not be thread-safe; this keeps concurrent callers of one scorer correct.
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        artifact_dir: str | os.PathLike,
        backend: str = "auto",
        precision: str | None = None,
        threshold: float | None = None,
        batch_size: int | None = None,
        verify: bool = True,
        threads: int | None = None,
    ) -> Scorer:
        """Validate the artifact (hashes included unless verify=False) and open a backend;
        `threads` sizes a CPU backend's intra-op pool (default: one per physical core)."""
        artifact = Artifact.open(artifact_dir, verify=verify)
        backend_ = open_backend(artifact, backend, precision, threads)
        return cls(artifact, backend_, threshold, batch_size)

    @property
    def threshold(self) -> float:
        return self.artifact.threshold if self._threshold is None else self._threshold

    @property
    def meta(self) -> dict[str, Any]:
        return self.artifact.meta

    def score_array(self, batch: np.ndarray) -> np.ndarray:
        """Norms (float32, shape (N,)) of a uint8 NCHW batch already in the model's form.

        Any N: the batch is split into chunks of at most `batch_size`.
        """
        chw = self._chw
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 \
                or batch.shape[1:] != chw:
            got = (batch.dtype, batch.shape) if isinstance(batch, np.ndarray) else type(batch)
            raise ValueError(f"score_array takes uint8 (N, {', '.join(map(str, chw))}), got {got}")
        n = batch.shape[0]
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, self.batch_size):
            chunk = np.ascontiguousarray(batch[start:start + self.batch_size])
            with self._lock:
                norms = self.backend.run(chunk)
            out[start:start + len(chunk)] = norms
        return out

    def decide(self, norms: np.ndarray, threshold: float | None = None) -> list[ScoreResult]:
        """One decision per norm; raises ScoreError naming the first non-finite one."""
        decided = self._decide(norms, threshold)
        for i, r in enumerate(decided):
            if isinstance(r, str):
                raise ScoreError(f"image {i}: {r}")
        return decided  # type: ignore[return-value]

    def _decide(self, norms: np.ndarray, threshold: float | None) -> list[ScoreResult | str]:
        """A ScoreResult per finite norm, the reason (a string) in place of each other one."""
        t = self.threshold if threshold is None else check_threshold(threshold)
        return [ScoreResult(float(x), bool(x < t), t) if np.isfinite(x) else non_finite(float(x))
                for x in np.asarray(norms, np.float32)]

    def score(self, images: Any, threshold: float | None = None) -> list[ScoreResult]:
        """Score one image or many: paths, bytes, PIL images, uint8 arrays (see `inputs`).

        Raises `ImageError` naming the first input that cannot be read, and `ScoreError` the
        first the model gives a non-finite norm.
        """
        buf = np.empty((self.batch_size, *self._chw), dtype=np.uint8)
        norms: list[np.ndarray] = []
        n = 0
        for i, item in enumerate(iter_items(images, self.spec)):
            try:
                buf[n] = prepare(item, self.spec)
            except ImageError as e:
                raise ImageError(f"image {i}: {e}") from e
            n += 1
            if n == self.batch_size:
                norms.append(self.score_array(buf))
                n = 0
        if n:
            norms.append(self.score_array(buf[:n]))
        flat = np.concatenate(norms) if norms else np.empty(0, np.float32)
        return self.decide(flat, threshold)

    def score_files(self, paths: Iterable[str], *, workers: int | None = None,
                    threshold: float | None = None) -> Iterator[FileResult]:
        """One `FileResult` per path, in order; an unreadable file is an error result, not a raise.

        `workers` threads decode (default: one per core, at most 8). The next batch is decoded
        while this one is scored, so at most two batches of decoded images are held.
        """
        spec = self.spec

        def read(path: str) -> np.ndarray | ImageError:
            try:
                return load(path, spec)
            except ImageError as e:
                return e

        files = list(paths)
        bs = self.batch_size
        chunks = [files[i:i + bs] for i in range(0, len(files), bs)]
        pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1))

        def submit(k: int) -> list[Future]:
            return [pool.submit(read, p) for p in chunks[k]] if k < len(chunks) else []

        try:
            pending = submit(0)
            for k, chunk in enumerate(chunks):
                loaded = [f.result() for f in pending]
                pending = submit(k + 1)
                good = [i for i, x in enumerate(loaded) if isinstance(x, np.ndarray)]
                norms = self.score_array(np.stack([loaded[i] for i in good])) if good else []
                decided = dict(zip(good, self._decide(norms, threshold), strict=True))
                for i, path in enumerate(chunk):
                    r = decided.get(i, str(loaded[i]))
                    yield (FileResult(path, error=r) if isinstance(r, str)
                           else FileResult(path, r.norm, r.is_anomaly))
        finally:
            # A caller that stops early leaves no decoding behind.
            pool.shutdown(cancel_futures=True)

    @property
    def _chw(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.height, self.spec.width)

    def describe(self) -> dict[str, Any]:
        """The runtime side of the model: backend, precision, batch limits, threshold."""
        return {**self.backend.describe(), "batch_size": self.batch_size,
                "threshold": self.threshold}

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
