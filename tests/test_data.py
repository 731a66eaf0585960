"""Readers on tiny files written in each real on-disk format, and the protocol splits."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from oecl_runtime.preprocess import InputSpec
from oecl_train.data import DataError, build_splits, make_reader
from oecl_train.data.readers import conform


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + (
        arr.astype(np.uint8).tobytes()
    )


def write_mnist(root, n_train=40, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = _idx(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        out[split] = (imgs, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_raw_and_gz(tmp_path, gz):
    written = write_mnist(tmp_path, gz=gz)
    reader = make_reader("mnist", str(tmp_path))
    train, test = reader.load("train"), reader.load("test")
    assert train.images.shape == (40, 1, 28, 28) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[:, 0], written["train"][0])
    np.testing.assert_array_equal(test.labels, written["t10k"][1])
    assert train.classes == [str(i) for i in range(10)]


def test_mnist_truncated_file_is_a_clear_error(tmp_path):
    write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        make_reader("mnist", str(tmp_path)).load("train")


def test_cifar10_and_cifar100_pickles(tmp_path):
    rng = np.random.default_rng(0)
    c10 = tmp_path / "c10"
    c10.mkdir()
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [i % 10] * 4}
        (c10 / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [1, 2, 3]}
    (c10 / "test_batch").write_bytes(pickle.dumps(test))
    (c10 / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    s = make_reader("cifar10", str(c10)).load("train")
    assert s.images.shape == (20, 3, 32, 32)
    assert s.classes[3] == "c3" and s.labels.tolist()[:5] == [1, 1, 1, 1, 2]
    t = make_reader("cifar10", str(c10)).load("test")
    np.testing.assert_array_equal(t.images.reshape(3, -1), test["data"])

    c100 = tmp_path / "c100"
    c100.mkdir()
    for split in ("train", "test"):
        d = {"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8), "fine_labels": [7] * 5}
        (c100 / split).write_bytes(pickle.dumps(d))
    (c100 / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))
    s = make_reader("cifar100", str(c100)).load("test")
    assert s.images.shape == (5, 3, 32, 32) and len(s.classes) == 100 and set(s.labels) == {7}


def _write_folder(root, sizes=((12, 12),), n=3, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = ("png", "jpg", "bmp")[i % 3]
            Image.fromarray(arr).save(root / c / f"{i}.{ext}")


def test_folder_reader_train_test_layout(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "test", n=2)
    r = make_reader("folder", str(tmp_path))
    tr, te = r.load("train"), r.load("test")
    assert tr.classes == ["cat", "dog"] and tr.images.shape == (6, 3, 12, 12)
    assert te.images.shape == (4, 3, 12, 12) and te.paths[0].endswith("0.png")


def test_folder_corrupt_image_skipped_and_counted_or_strict(tmp_path, capsys):
    _write_folder(tmp_path, n=6)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    r = make_reader("folder", str(tmp_path))
    tr, te = r.load("train"), r.load("test")
    assert len(tr.labels) + len(te.labels) == 12 and tr.skipped == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 of 13" in err
    with pytest.raises(DataError, match="broken.png"):
        make_reader("folder", str(tmp_path), strict=True).load("train")


def test_folder_errors_at_start(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        make_reader("folder", str(tmp_path / "empty")).load("train")
    _write_folder(tmp_path / "mixed", sizes=((12, 12), (20, 16)))
    # The message names two files of different sizes and the option that fixes it.
    with pytest.raises(DataError, match=r"0\.png is 12x12, .*1\.jpg is 20x16.*--image-size"):
        make_reader("folder", str(tmp_path / "mixed")).load("train")
    # With a resize rule the same folder is fine.
    spec = InputSpec(8, 8, 3, resize=8)
    s = make_reader("folder", str(tmp_path / "mixed"), spec=spec).load("train")
    assert s.images.shape[1:] == (3, 8, 8)
    with pytest.raises(DataError, match="no such directory"):
        make_reader("folder", str(tmp_path / "missing"))


def test_npy_reader_layouts(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (5, 10, 10, 3), dtype=np.uint8)
    np.save(tmp_path / "train_images.npy", hwc)
    np.save(tmp_path / "train_labels.npy", np.array([0, 1, 0, 1, 2]))
    np.save(tmp_path / "test_images.npy", hwc[:, :, :, 0])
    np.save(tmp_path / "test_labels.npy", np.array([0, 1, 0, 1, 2]))
    r = make_reader("npy", str(tmp_path))
    tr, te = r.load("train"), r.load("test")
    np.testing.assert_array_equal(tr.images, hwc.transpose(0, 3, 1, 2))
    assert te.images.shape == (5, 1, 10, 10) and tr.classes == ["0", "1", "2"]
    np.save(tmp_path / "train_images.npy", hwc.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        r.load("train")


def test_digits_and_photos():
    r = make_reader("digits", seed=0)
    tr, te = r.load("train"), r.load("test")
    assert tr.images.shape[1:] == (1, 8, 8) and tr.images.max() == 255
    assert len(tr.labels) + len(te.labels) == 1797
    np.testing.assert_array_equal(make_reader("digits", seed=0).load("test").labels, te.labels)
    p = make_reader("photos", spec=InputSpec(16, 16, 3)).load("train")
    assert p.images.shape[1:] == (3, 16, 16) and p.images.std() > 10


def test_unknown_source_and_missing_root():
    with pytest.raises(DataError, match="unknown data source"):
        make_reader("imagenet")
    with pytest.raises(DataError, match="needs a directory"):
        make_reader("mnist")


def test_one_vs_rest_and_leave_one_out_splits(tmp_path):
    write_mnist(tmp_path, n_train=200, n_test=50)
    kw = dict(data="mnist", data_root=str(tmp_path), oe="none", seed=3)
    s = build_splits(id_class="4", protocol="one-vs-rest", **kw)
    assert s.id_classes == [4] and len(s.id_train) + len(s.id_val) == 20
    assert s.test_is_id.sum() == 5 and s.oe_mode == "none" and s.oe is None
    again = build_splits(id_class="4", protocol="one-vs-rest", **kw)
    np.testing.assert_array_equal(s.id_val, again.id_val)  # deterministic by seed
    loo = build_splits(id_class="4", protocol="leave-one-out", **kw)
    assert 4 not in loo.id_classes and len(loo.id_classes) == 9
    assert (~loo.test_is_id).sum() == 5
    with pytest.raises(DataError, match="no class"):
        build_splits(id_class="11", protocol="one-vs-rest", **kw)
    with pytest.raises(DataError, match="no class"):
        build_splits(id_class="horse", protocol="one-vs-rest", **kw)


def test_oe_from_the_id_source_never_contains_id_classes(tmp_path):
    written = write_mnist(tmp_path, n_train=100, n_test=20)
    s = build_splits(data="mnist", data_root=str(tmp_path), id_class="2", protocol="one-vs-rest",
                     oe="mnist", seed=0)
    imgs, labels = written["train"]
    id_imgs = {im.tobytes() for im in imgs[labels == 2]}
    assert s.oe_mode == "external" and len(s.oe) == 90
    assert not any(o[0].tobytes() in id_imgs for o in s.oe)


def test_conform_resizes_and_replicates_channels():
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    assert conform(x, InputSpec(8, 8, 3)).shape == (3, 3, 8, 8)
    assert conform(x, InputSpec(16, 16, 1, resize=16)).shape == (3, 1, 16, 16)
    with pytest.raises(DataError, match="resize"):
        conform(x, InputSpec(16, 16, 1))


# -- folder layouts: classes matched by name, MVTec AD, colour modes -------------------------------
def _images(folder, n, shape=(10, 10), value=None, seed=0, mode="L"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        full = (*shape, 3) if mode == "RGB" else shape
        if value is None:
            arr = rng.integers(0, 256, full, dtype=np.uint8)
        else:
            arr = np.full(full, value, np.uint8)
        Image.fromarray(arr, mode).save(folder / f"{i:03d}.png")


def write_mvtec(root, n_train=12, n_good=3, defects=(("crack", 4), ("scratch", 2))):
    """A tiny MVTec AD category: train/good, test/good, test/<defect>, ground_truth/<defect>."""
    _images(root / "train" / "good", n_train, value=200)
    _images(root / "test" / "good", n_good, value=200)
    for i, (name, n) in enumerate(defects):
        _images(root / "test" / name, n, value=10 + i)
        _images(root / "ground_truth" / name, n, value=255)  # masks: never read
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    return root


def test_mvtec_layout_matches_classes_by_name(tmp_path):
    root = write_mvtec(tmp_path / "bottle")
    s = build_splits(data="folder", data_root=str(root), id_class="good",
                     protocol="one-vs-rest", oe="none")
    # Sorted per split, test class 0 would be "crack": the ID must be the good folder.
    good = np.array(["/good/" in p for p in s.test_paths])
    np.testing.assert_array_equal(s.test_is_id, good)
    assert s.test_is_id.sum() == 3 and (~s.test_is_id).sum() == 6
    assert s.classes == ["good", "crack", "scratch"] and s.id_classes == [0]
    assert [s.classes[c] for c in s.test_labels] == [p.split("/")[-2] for p in s.test_paths]
    assert not any("ground_truth" in p for p in s.test_paths)
    assert len(s.id_train) + len(s.id_val) == 12
    # The one training class may also be given by index (no class name is a number).
    by_index = build_splits(data="folder", data_root=str(root), id_class="0",
                            protocol="one-vs-rest", oe="none")
    np.testing.assert_array_equal(by_index.test_is_id, s.test_is_id)
    # Leave-one-out is about training classes: every test-only class is OOD.
    loo_root = tmp_path / "loo"
    for c in ("a", "b"):
        _images(loo_root / "train" / c, 6, value=50)
        _images(loo_root / "test" / c, 2, value=50)
    _images(loo_root / "test" / "novel", 2, value=1)
    loo = build_splits(data="folder", data_root=str(loo_root), id_class="a",
                       protocol="leave-one-out", oe="none")
    assert [loo.classes[c] for c in loo.id_classes] == ["b"]
    assert sorted(loo.classes[c] for c in loo.test_labels[~loo.test_is_id]) == ["a"] * 2 + [
        "novel"
    ] * 2


def test_id_class_by_name_and_index_only_when_unambiguous(tmp_path):
    root = tmp_path / "numbered"
    for c in ("1", "2", "7"):
        _images(root / "train" / c, 4, value=int(c) * 20)
        _images(root / "test" / c, 2, value=int(c) * 20)
    kw = dict(data="folder", data_root=str(root), protocol="one-vs-rest", oe="none")
    s = build_splits(id_class="2", **kw)
    assert s.classes[s.id_classes[0]] == "2"  # the name, not index 2 ("7")
    with pytest.raises(DataError, match="takes a name: 1, 2, 7"):
        build_splits(id_class="0", **kw)
    with pytest.raises(DataError, match=r"test images only, so it is OOD"):
        build_splits(data="folder", data_root=str(write_mvtec(tmp_path / "mv")),
                     id_class="crack", protocol="one-vs-rest", oe="none")
    with pytest.raises(DataError, match=r"no class 'cat'; classes are 0=good"):
        build_splits(data="folder", data_root=str(tmp_path / "mv"), id_class="cat",
                     protocol="one-vs-rest", oe="none")


def test_splits_are_checked_before_training(tmp_path):
    only_good = write_mvtec(tmp_path / "nodefects", defects=())
    with pytest.raises(DataError, match="test split has no OOD images"):
        build_splits(data="folder", data_root=str(only_good), id_class="good",
                     protocol="one-vs-rest", oe="none")
    one = write_mvtec(tmp_path / "one", n_train=1)
    with pytest.raises(DataError, match="no ID-validation images"):
        build_splits(data="folder", data_root=str(one), id_class="good",
                     protocol="one-vs-rest", oe="none")
    _images(tmp_path / "half" / "train" / "good", 3)
    with pytest.raises(DataError, match="has train/ but no test/"):
        make_reader("folder", str(tmp_path / "half"))


def test_image_size_keeps_the_datas_channels(tmp_path):
    root = write_mvtec(tmp_path / "gray")
    kw = dict(data="folder", data_root=str(root), id_class="good", protocol="one-vs-rest",
              oe="none", image_size=8)
    s = build_splits(**kw)
    assert s.spec.channels == 1 and s.spec.color_mode == "L" and s.id_train.shape[1:] == (1, 8, 8)
    assert build_splits(**kw, channels=3).spec.channels == 3
    # digits (1-channel) through --image-size as well
    d = build_splits(data="digits", data_root=None, id_class="0", protocol="one-vs-rest",
                     oe="none", image_size=16)
    assert d.spec.channels == 1


def test_mixed_gray_and_rgb_are_converted_per_image(tmp_path):
    root = tmp_path / "mixed"
    _images(root / "a", 3, seed=1)
    _images(root / "b", 3, seed=2)
    rgb = np.random.default_rng(3).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(root / "a" / "rgb.png")

    def both_splits(reader):
        tr, te = reader.load("train"), reader.load("test")
        return np.concatenate([tr.images, te.images]), tr.paths + te.paths

    imgs, paths = both_splits(make_reader("folder", str(root)))
    assert imgs.shape[1] == 3  # colour wins; each gray image is replicated as Pillow does
    gray = root / "a" / "000.png"
    np.testing.assert_array_equal(imgs[paths.index(str(gray))],
                                  np.asarray(Image.open(gray).convert("RGB")).transpose(2, 0, 1))
    imgs, paths = both_splits(make_reader("folder", str(root), channels=1))
    assert imgs.shape[1] == 1
    np.testing.assert_array_equal(imgs[paths.index(str(root / "a" / "rgb.png"))][0],
                                  np.asarray(Image.fromarray(rgb).convert("L")))


def test_folder_reading_says_how_many_images(tmp_path, capsys):
    root = write_mvtec(tmp_path / "m")
    make_reader("folder", str(root), progress=False).load("test")
    err = capsys.readouterr().err
    assert f"reading 9 images from {root / 'test'}" in err and "\r" not in err
