"""What every backend checks of a model's output: one float32 norm per image of the batch.

A `norm` output of any other shape (a batch mean of [1], a pair per image of [N, 2]) is the
model file's fault: read as scores it would give every image the same answer, or the wrong one.
It is refused on every call, and once when a backend opens, with a batch of blank images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..artifact import METADATA_NAME, ArtifactError


def check_norm_shape(shape: tuple[int, ...], n: int, source: str) -> None:
    """Raise ArtifactError unless `shape` is (n,): one norm per image of the batch."""
    if tuple(shape) != (n,):
        raise ArtifactError(f"{source}: the norm output has shape {list(shape)} for a batch of "
                            f"{n} images; {METADATA_NAME} says [batch], one norm per image")


def norms_of(out: Any, n: int, source: str) -> np.ndarray:
    """A model's `norm` output for a batch of `n`, as float32 (n,), its shape checked."""
    check_norm_shape(tuple(getattr(out, "shape", ())), n, source)
    return np.asarray(out).astype(np.float32, copy=False)


def probe(backend: Any, chw: tuple[int, int, int]) -> None:
    """Score a batch of two blank images, so that a model whose output disagrees with
    oecl.json is refused when it is opened rather than at its first request."""
    backend.run(np.zeros((min(2, backend.max_batch), *chw), np.uint8))
