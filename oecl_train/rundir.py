"""What a training run directory is, and the one message for a directory that is not one."""

from __future__ import annotations

import json
from pathlib import Path

from oecl_train import checkpoint


class RunDirError(ValueError):
    """A path given as a run directory that is not one; the message says what it is instead."""


def require_run_dir(path: str | Path, checkpoint_needed: bool = True) -> Path:
    """`path` as a run directory (config.json, and a checkpoint when `checkpoint_needed`).

    A model artifact (oecl.json) given instead is named as such, with the commands that take
    it, since the two are easy to mix up: `oecl train` writes runs, `oecl export` artifacts.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such directory")
    if (path / "oecl.json").is_file() and not (path / "config.json").is_file():
        try:
            run = json.loads((path / "oecl.json").read_text()).get("source", {}).get("run")
        except (OSError, ValueError, AttributeError):
            run = None
        origin = f" (exported from the run {run!r})" if run else ""
        raise RunDirError(
            f"{path} is a model artifact{origin}, not a training run directory: score images "
            f"with `oecl score --model {path} IMAGES`; eval, export and --resume take the run "
            "directory that `oecl train` wrote"
        )
    if not (path / "config.json").is_file():
        raise RunDirError(
            f"{path}: not a run directory (no config.json); `oecl train` writes one under "
            "--out-dir (default runs/)"
        )
    if checkpoint_needed and not checkpoint.list_checkpoints(path / "checkpoints"):
        raise RunDirError(f"{path}: no checkpoint yet (train the run first, or resume it)")
    return path
