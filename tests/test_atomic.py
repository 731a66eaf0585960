"""Crash-safe writes: nothing under the real name until complete, ordinary permissions after."""

import os
import stat

import pytest

from oecl_runtime.atomic import atomic_dir, atomic_path, write_json


def test_failed_write_leaves_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "f.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and os.listdir(tmp_path) == ["f.json"]


def test_atomic_dir_swaps_whole_and_permissions_are_ordinary(tmp_path):
    out = tmp_path / "artifact"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("failed check")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert sorted(os.listdir(tmp_path)) == ["artifact"]
    mask = os.umask(0)
    os.umask(mask)
    write_json(tmp_path / "m.json", {})
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
