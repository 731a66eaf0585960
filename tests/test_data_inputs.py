"""The training readers on hostile files: every bad file is one DataError line (or one
skipped-file line), nothing hangs on a FIFO, and nothing is inflated or allocated beyond what
the file's own header declares."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import deny_listing
from PIL import Image

from oecl_train.data import DataError, make_reader
from oecl_train.data.readers import NPY_MAX_CLASSES


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + (
        arr.astype(np.uint8).tobytes())


def _mnist(root: Path, labels: np.ndarray | None = None, n: int = 20) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10 if labels is None else labels
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(_idx(np.asarray(labels, np.uint8))))


def _finishes(fn: Callable[[], Any], fifos: list[Path], timeout: float = 30) -> Any:
    """fn's result (or the exception it raised), failing the test if it has not returned within
    `timeout`; a reader left blocked on one of `fifos` is then released."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:  # give the blocked open() a writer, and so an end of file
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(5)
        pytest.fail(f"still reading after {timeout} s (blocked on a FIFO)")
    return out[0]


def test_a_fifo_in_a_training_folder_is_one_skipped_line(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.png")
    fifo = tmp_path / "cat" / "x.png"
    os.mkfifo(fifo)
    got = _finishes(lambda: make_reader("folder", str(tmp_path)).load("train"), [fifo])
    assert not isinstance(got, Exception), got
    assert got.skipped == 1
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "x.png" in line]
    assert skipped == [f"warning: skipped {fifo}: a named pipe (FIFO), not a regular file"]
    got = _finishes(lambda: make_reader("folder", str(tmp_path), strict=True).load("train"),
                    [fifo])
    assert isinstance(got, DataError) and "x.png: a named pipe (FIFO)" in str(got)


def test_a_fifo_in_place_of_a_data_file_is_refused(tmp_path: Path) -> None:
    _mnist(tmp_path / "m")
    lab = tmp_path / "m" / "train-labels-idx1-ubyte.gz"
    lab.unlink()
    os.mkfifo(lab)
    got = _finishes(lambda: make_reader("mnist", str(tmp_path / "m")).load("train"), [lab])
    assert isinstance(got, DataError) and "named pipe (FIFO), not a regular file" in str(got)

    npy = tmp_path / "n"
    npy.mkdir()
    np.save(npy / "train_images.npy", np.zeros((2, 4, 4), np.uint8))
    os.mkfifo(npy / "train_labels.npy")
    got = _finishes(lambda: make_reader("npy", str(npy)).load("train"),
                    [npy / "train_labels.npy"])
    assert isinstance(got, DataError) and "train_labels.npy: a named pipe" in str(got)


@pytest.mark.parametrize(("labels", "message"), [
    (np.array([0, 1, 10**12, 1]), "label 1000000000000 at index 2 is outside the class indices "
                                  f"0..{NPY_MAX_CLASSES - 1}"),
    (np.array([0, -1, 1]), "label -1 at index 1 is outside"),
    (np.array([0.0, 1.0, 0.7]), "label 0.7 at index 2 is not an integer class index"),
    (np.array([0.0, np.nan, 1.0]), "label nan at index 1 is not an integer class index"),
    (np.array([True, False, True]), "labels must be integers, got bool"),
    (np.array(["0", "1", "1"]), "labels must be integers, got <U1"),
])
def test_npy_labels_are_checked_once_with_the_first_bad_index(tmp_path: Path, labels: np.ndarray,
                                                              message: str) -> None:
    np.save(tmp_path / "train_images.npy", np.zeros((len(labels), 4, 4), np.uint8))
    np.save(tmp_path / "train_labels.npy", labels)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            make_reader("npy", str(tmp_path)).load("train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith(f"{tmp_path / 'train_labels.npy'}: {message}")
    assert peak < 1 << 20  # the 10^12 label once built a list of 10^12 class names


def test_npy_whole_float_labels_are_accepted(tmp_path: Path) -> None:
    np.save(tmp_path / "train_images.npy", np.zeros((3, 4, 4), np.uint8))
    np.save(tmp_path / "train_labels.npy", np.array([[0.0], [2.0], [1.0]], np.float32))
    s = make_reader("npy", str(tmp_path)).load("train")
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [0, 2, 1]
    assert s.classes == ["0", "1", "2"]


def test_a_corrupt_npy_file_is_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "train_images.npy", np.zeros((3, 4, 4), np.uint8))
    np.save(tmp_path / "train_labels.npy", np.array([0, 1, 0]))
    data = (tmp_path / "train_labels.npy").read_bytes()
    (tmp_path / "train_labels.npy").write_bytes(data[:-5])
    with pytest.raises(DataError, match=r"train_labels\.npy: cannot read \.npy file"):
        make_reader("npy", str(tmp_path)).load("train")


def test_mnist_labels_outside_0_to_9_are_refused(tmp_path: Path) -> None:
    labels = np.arange(20) % 10
    labels[13] = 200
    _mnist(tmp_path, labels)
    with pytest.raises(DataError) as info:
        make_reader("mnist", str(tmp_path)).load("train")
    assert str(info.value) == (f"{tmp_path / 'train-labels-idx1-ubyte.gz'}: label 200 at index "
                               "13 is outside the class indices 0..9")


def test_cifar_labels_outside_the_class_names_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [3, -1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    names = {"label_names": [f"c{i}" for i in range(10)]}
    (tmp_path / "batches.meta").write_bytes(pickle.dumps(names))
    with pytest.raises(DataError, match=r"test_batch: label -1 at index 1 is outside .*0\.\.9"):
        make_reader("cifar10", str(tmp_path)).load("test")


def test_an_idx_gzip_that_inflates_past_its_header_is_not_inflated_whole(tmp_path: Path) -> None:
    _mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    # The header declares 20 images (15,680 bytes); 64 MiB of zeros follow (a 64 KB gzip).
    body = _idx(np.zeros((20, 28, 28), np.uint8)) + bytes(64 << 20)
    images.write_bytes(gzip.compress(body, compresslevel=1))
    assert images.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"more data than the IDX header declares "
                                            r"\(\(20, 28, 28\) = 15680 bytes\)"):
            make_reader("mnist", str(tmp_path)).load("train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_idx_headers_and_streams_that_do_not_hold_are_one_line(tmp_path: Path) -> None:
    _mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    good = gzip.decompress(images.read_bytes())

    def refused(data: bytes, pattern: str, compress: bool = True) -> None:
        images.write_bytes(gzip.compress(data) if compress else data)
        with pytest.raises(DataError, match=pattern):
            make_reader("mnist", str(tmp_path)).load("train")

    huge = struct.pack(">HBB3I", 0, 8, 3, 60000, 65535, 65535)
    refused(huge, r"declares \(60000, 65535, 65535\) = 257690173500000 bytes, over the limit")
    refused(good[:-10], r"truncated IDX file \(15670 of 15680 bytes\)")
    refused(_idx(np.zeros((20, 784), np.uint8)), "an IDX file of 2 dimensions, expected 3")
    refused(good[:2], "shorter than its 4-byte header")
    # A corrupt deflate stream (zlib.error) and a cut one (EOFError) are DataErrors too.
    packed = bytearray(gzip.compress(good))
    packed[12:40] = b"\xff" * 28
    refused(bytes(packed), "cannot read IDX file", compress=False)
    refused(gzip.compress(good)[:-30], "cannot read IDX file", compress=False)


@pytest.mark.parametrize("source", ["folder", "mnist", "npy"])
def test_a_data_root_that_cannot_be_a_directory_is_one_line(tmp_path: Path, source: str) -> None:
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(DataError, match="loop: Too many levels of symbolic links"):
        make_reader(source, str(tmp_path / "loop"))
    long = str(tmp_path / ("d" * 5000))
    with pytest.raises(DataError, match=r"\(\d+ characters\): File name too long") as info:
        make_reader(source, long)
    assert len(str(info.value)) < 300
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DataError, match="file: not a directory"):
        make_reader(source, str(tmp_path / "file"))


def test_a_symlink_loop_in_a_training_folder_is_one_skipped_line(tmp_path: Path,
                                                                  capsys) -> None:
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "x.png").symlink_to("x.png")
    s = make_reader("folder", str(tmp_path)).load("train")
    assert s.skipped == 1
    line = f"warning: skipped {tmp_path / 'dog' / 'x.png'}: Too many levels of symbolic links"
    assert line in capsys.readouterr().err.splitlines()


def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path: Path, capsys,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for c in ("cat", "dog"):
        for sub in ("", "more"):
            (tmp_path / c / sub).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
                    tmp_path / c / sub / f"{i}.png")
    locked = tmp_path / "dog" / "more"
    deny_listing(monkeypatch, locked)
    train = make_reader("folder", str(tmp_path)).load("train")
    test = make_reader("folder", str(tmp_path)).load("test")
    assert len(train.labels) + len(test.labels) == 6
    line = f"warning: cannot list {locked}: Permission denied; its images are not read"
    assert line in capsys.readouterr().err.splitlines()
    with pytest.raises(DataError, match="cannot list .*more: Permission denied"):
        make_reader("folder", str(tmp_path), strict=True).load("train")


def test_a_cifar_batch_without_its_keys_is_one_line(tmp_path: Path) -> None:
    names = {"label_names": [f"c{i}" for i in range(10)]}
    (tmp_path / "batches.meta").write_bytes(pickle.dumps(names))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR batch \(no labels\)"):
        make_reader("cifar10", str(tmp_path)).load("test")
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({"names": []}))
    with pytest.raises(DataError, match=r"batches\.meta: no label_names"):
        make_reader("cifar10", str(tmp_path)).load("test")
