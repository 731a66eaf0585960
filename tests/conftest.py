"""Test-wide setup. Triton reads TRITON_INTERPRET once, when it is first imported, so it is set
here, before any test module imports triton: without a GPU the kernels run in its interpreter.
Nothing imported here loads triton.

The fixtures shared by test modules live here; the plain helpers behind them in helpers.py."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_artifact, copy_artifact, with_golden

from oecl_runtime import Scorer

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact, exported once per test run (read-only by convention: copy it before
    changing it)."""
    return build_tiny_artifact(tmp_path_factory.mktemp("tiny") / "artifact")


@pytest.fixture(scope="module")
def scorer(artifact_dir: Path) -> Iterator[Scorer]:
    with Scorer.open(artifact_dir, backend="onnxruntime-cpu") as s:
        yield s


@pytest.fixture
def art(artifact_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny artifact with the golden set, free to change."""
    return with_golden(copy_artifact(artifact_dir, tmp_path / "art"))
