"""Plain helpers shared by test modules: the tiny artifact, its images, the golden set and a tiny
training configuration. The fixtures built from them live in conftest.py."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from oecl_runtime import golden
from oecl_runtime.artifact import SCHEMA_VERSION, file_entry, update_files, write_metadata
from oecl_runtime.preprocess import InputSpec, load
from oecl_train.config import TrainConfig
from oecl_train.data import Splits
from oecl_train.export.metadata import norm_stats
from oecl_train.metrics import threshold_at_tpr

REPO = Path(__file__).resolve().parents[1]


def deny_listing(monkeypatch: pytest.MonkeyPatch, locked: Path) -> None:
    """Listing `locked` fails as a chmod-000 directory does for anyone but root (tests may run
    as root, which lists it all the same)."""
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def import_benchmark(name: str):
    """A module of benchmarks/ (scripts that import their siblings by bare name)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


# -- the tiny artifact -------------------------------------------------------------------------

SIZE = 32
MAX_BATCH = 32
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
SPEC = InputSpec(height=SIZE, width=SIZE, channels=3, resize=SIZE)

# The eager net the artifact was exported from: torch_norms compares against it.
_built: dict[str, object] = {}


def _tiny_net():
    import torch
    from torch import nn

    class TinyOECL(nn.Module):
        """uint8 NCHW → normalise → two convs → 128-d projection → (norm, projection)."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.proj = nn.Linear(8 * 8 * 8, 128)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (images.float() / 255.0 - self.mean) / self.std
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            z = self.proj(torch.flatten(x, 1))
            return torch.linalg.vector_norm(z, dim=1), z

    torch.manual_seed(0)
    return TinyOECL().eval()


def build_tiny_artifact(directory: Path) -> Path:
    """Export the tiny net to ONNX (dynamo, dynamic batch) and write a valid oecl.json."""
    import onnx
    import onnxruntime
    import torch

    net = _tiny_net()
    directory.mkdir(parents=True, exist_ok=True)
    example = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        net, (example,), str(directory / "model.onnx"), input_names=["images"],
        output_names=["norm", "embedding"], dynamo=True, opset_version=18,
        dynamic_shapes={"images": {0: batch}}, external_data=False, verbose=False,
    )
    rng = np.random.default_rng(1)
    val = rng.integers(0, 256, (64, 3, SIZE, SIZE), dtype=np.uint8)
    with torch.no_grad():
        id_norms = net(torch.from_numpy(val))[0].numpy()
    meta = {
        "schema_version": SCHEMA_VERSION,
        "producer": {"name": "oecl", "version": "0.1.0", "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", **SPEC.to_json(),
                  "normalization": {"in_graph": True, "mean": MEAN, "std": STD}},
        "outputs": {"norm": {"dtype": "float32", "shape": ["batch"]},
                    "embedding": {"dtype": "float32", "shape": ["batch", 128]}},
        "score": {"name": "norm", "direction": "higher_is_normal",
                  "threshold": threshold_at_tpr(id_norms, 0.95),
                  "threshold_rule": {"method": "id_validation_tpr", "tpr": 0.95,
                                     "n_images": len(id_norms)},
                  "id_norm": norm_stats(id_norms), "oe_norm": None},
        "max_batch": MAX_BATCH,
        "architecture": {"name": "tiny-test-net"},
        "files": [file_entry(directory / "model.onnx", "onnx", "fp32")],
        "verification": {"note": "test fixture"},
    }
    write_metadata(directory, meta)
    _built["net"] = net
    return directory


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def torch_norms(batch: np.ndarray) -> np.ndarray:
    """The eager torch model's norms for a uint8 NCHW batch (the reference). Needs the tiny
    artifact built first (the `artifact_dir` fixture)."""
    import torch

    with torch.no_grad():
        return _built["net"](torch.from_numpy(batch))[0].numpy()  # type: ignore[operator]


def torch_artifact(tmp_path: Path, artifact_dir: Path, width: int):
    """An artifact holding only `model.safetensors` of a seeded resnet10 of `width`, and that
    network (eval mode) to compare the torch backends against."""
    import torch
    from safetensors.torch import save_file

    from oecl_model import model

    arch = {"depth": "resnet10", "width": width, "stem": "cifar", "in_channels": 3,
            "proj_dim": 128, "mean": MEAN, "std": STD}
    torch.manual_seed(0)
    net = model.build_model(**arch).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    meta = json.loads((artifact_dir / "oecl.json").read_text())
    meta["architecture"] = arch
    meta["files"] = [file_entry(tmp_path / "model.safetensors", "safetensors", "fp32")]
    write_metadata(tmp_path, meta)
    return model.ScoreModel(net).eval()


# -- images ------------------------------------------------------------------------------------


def random_images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """n distinct uint8 HWC images, each with its own brightness so their norms differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    scale = rng.uniform(0.2, 1.0, (n, 1, 1, 1))
    return (base * scale).astype(np.uint8)


def gray_pngs(folder: Path, n: int, value: int, seed: int, size: int, spread: int) -> None:
    """`n` gray PNGs of `size` x `size` around `value` (+-`spread` noise): one class folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.clip(value + rng.integers(-spread, spread, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "L").save(folder / f"{i:03d}.png")


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def nchw_images(n: int, seed: int) -> np.ndarray:
    """`random_images` loaded as the tiny artifact's uint8 NCHW batch."""
    return np.stack([load(im, SPEC) for im in random_images(n, seed=seed)])


# -- the golden set ----------------------------------------------------------------------------


def golden_images() -> np.ndarray:
    """24 ID-like images, then 24 darker "OOD" ones."""
    return np.concatenate([nchw_images(24, seed=5), nchw_images(24, seed=6) // 4])


def with_golden(art: Path, reference: np.ndarray | None = None) -> Path:
    """Give the artifact at `art` the golden set of `golden_images`."""
    images = golden_images()
    is_id = np.r_[np.ones(24, bool), np.zeros(24, bool)]
    ref = torch_norms(images) if reference is None else reference
    entries, section = golden.write(art, images, is_id, ref)
    meta = update_files(art, add=entries)
    meta["golden"] = section
    (art / "oecl.json").write_text(json.dumps(meta))
    return art


# -- training ----------------------------------------------------------------------------------

TINY_TRAIN = dict(
    data="digits",
    id_class="1",
    image_size=16,
    depth="resnet10",
    width=8,
    batch_size=16,
    precision="fp32",
    hflip=False,
    seed=0,
    # Judging every checkpoint on validation is test_selection's subject; elsewhere it would
    # only add its seconds to every tiny run.
    select="last",
)


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    cfg = TrainConfig.from_dict({**TINY_TRAIN, "out_dir": str(tmp_path), "name": "run", **kw})
    cfg.validate()
    return cfg


def splits_for(cfg: TrainConfig) -> Splits:
    return Splits.from_config(cfg)


def worker_pids(url: str, want: int, deadline_s: float = 60,
                exclude: frozenset[int] = frozenset()) -> set[int]:
    """The pids of `want` workers of `oecl serve --workers` at `url` (http://host:port), once
    each has answered; `exclude`: pids that do not count (workers already replaced)."""
    deadline = time.monotonic() + deadline_s
    pids: set[int] = set()
    while len(pids) < want:  # each worker answers with its own pid
        assert time.monotonic() < deadline, f"workers did not come up: {pids}"
        try:
            with urllib.request.urlopen(url + "/v1/model", timeout=2) as r:
                pid = json.loads(r.read())["runtime"]["pid"]
            if pid not in exclude:
                pids.add(pid)
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    return pids

