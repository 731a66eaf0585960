"""Files a user may have received or damaged: checkpoints, CIFAR batches, `export --out`."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from oecl_runtime.atomic import atomic_dir
from oecl_train import checkpoint
from oecl_train.data.readers import DataError, make_reader


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))


def _two_checkpoints(d: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    a, b = _net(1), _net(2)
    checkpoint.save(d, 1, a, None, {"note": "first"})
    checkpoint.save(d, 2, b, None, {"note": "second"})
    return a, b


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_caught_and_resume_falls_back(tmp_path: Path, capsys) -> None:
    first, _ = _two_checkpoints(tmp_path)
    newest = tmp_path / "epoch-00002.safetensors"
    _flip(newest, newest.stat().st_size - 7)  # tensor data, not the header: loads "fine"
    with pytest.raises(checkpoint.CheckpointError, match="does not match") as info:
        checkpoint.load(tmp_path / "epoch-00002.json", _net(0))
    assert "\n" not in str(info.value)
    path = checkpoint.latest(tmp_path)
    assert path.name == "epoch-00001.json"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: skipping damaged checkpoint")
    net = _net(0)
    assert checkpoint.load(path, net)["note"] == "first"
    for p, q in zip(net.parameters(), first.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_truncated_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    _two_checkpoints(tmp_path)
    newest = tmp_path / "epoch-00002.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(tmp_path / "epoch-00002.json", _net(0))
    assert "\n" not in str(info.value)
    assert checkpoint.latest(tmp_path).name == "epoch-00001.json"
    (tmp_path / "epoch-00001.safetensors").write_bytes(b"junk")
    with pytest.raises(checkpoint.CheckpointError, match="all 2 checkpoints are damaged"):
        checkpoint.latest(tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "c10"
    root.mkdir()
    batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": _Payload()}
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"] * 10}))
    with pytest.raises(DataError, match="refusing posix.system|refusing os.system"):
        make_reader("cifar10", str(root)).load("train")
    assert not (tmp_path / "pwned").exists()
    # Old-protocol pickles (as CIFAR's own files are) still read.
    batch.pop("x")
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    assert make_reader("cifar10", str(root)).load("train").images.shape == (10, 3, 32, 32)


def test_atomic_dir_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    with atomic_dir(real) as d:
        (d / "v").write_text("1")
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    with atomic_dir(link) as d:  # what `oecl export --out LINK` does
        (d / "v").write_text("2")
    assert link.is_symlink() and (link / "v").read_text() == "2"
    assert (real / "v").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["out", "real"]  # no stale .out.old / .real.old
