"""Checkpoints: tensors in safetensors, everything else in JSON; no pickle anywhere.

A checkpoint is `epoch-NNNNN.safetensors` (model + optimizer tensors) and `epoch-NNNNN.json`
(progress, optimizer scalars, architecture, and the tensors file's sha256), after NNNNN
complete epochs; one written inside the next epoch (on a signal or a time interval) is
`epoch-NNNNN_step-SSSSSSSS`, which sorts between the two epochs' names. Each file is written
atomically and the JSON last, so a checkpoint exists only once both of its files are complete.
`load` verifies the checksum (a flipped byte in tensor data otherwise resumes silently with a
wrong weight); `latest` returns the newest intact checkpoint, passing over damaged ones with a
one-line warning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from oecl_runtime.artifact import sha256_file
from oecl_runtime.atomic import atomic_path, write_json
from oecl_runtime.errors import one_line

CHECKSUM_KEY = "tensors_sha256"
BEST = "best"  # checkpoints/best.json + .safetensors (`--select`); never an interval name


class CheckpointError(RuntimeError):
    pass


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, pstate in state["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
        for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save(
    directory: str | Path,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: dict,
    keep: int = 2,
    step_in_epoch: int = 0,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # "_" sorts after ".", so a mid-epoch name follows its epoch's own and precedes the next.
    name = f"epoch-{epoch:05d}" + (f"_step-{step_in_epoch:08d}" if step_in_epoch else "")
    stem = directory / name
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"epoch": epoch, **info}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
        meta[CHECKSUM_KEY] = sha256_file(tmp)
    write_json(stem.with_suffix(".json"), meta)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return stem.with_suffix(".json")


def _position(path: Path) -> tuple[int, str]:
    try:
        step = int(json.loads(path.read_text()).get("step", -1))
    except (OSError, ValueError, TypeError):
        step = -1
    return step, path.name


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (JSON present and its tensors present), oldest first.

    Ordered by training step, then name: a run extended from inside its last epoch writes
    `epoch-NNNNN_step-*` checkpoints that are newer than that epoch's `epoch-(NNNNN+1)` one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p for p in directory.glob("epoch-*.json") if p.with_suffix(".safetensors").exists()
    ]
    return sorted(found, key=_position)


def verify(path: str | Path) -> dict:
    """The metadata of an intact checkpoint (JSON readable, tensors matching its checksum);
    CheckpointError with a one-line reason otherwise."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: unreadable metadata: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path.name}: metadata is not a JSON object")
    tensors = path.with_suffix(".safetensors")
    want = meta.get(CHECKSUM_KEY)
    if want is None:  # written before checksums: at least its header must parse
        try:
            with safe_open(str(tensors), framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError is not an OSError
            raise CheckpointError(f"{tensors.name}: unreadable tensors: {one_line(e)}") from e
        return meta
    try:
        got = sha256_file(tensors)
    except OSError as e:
        raise CheckpointError(f"{tensors.name}: unreadable tensors: {e}") from e
    if got != want:
        raise CheckpointError(f"{tensors.name}: sha256 {got[:12]}... does not match its "
                              f"checkpoint ({str(want)[:12]}...): truncated or corrupted")
    return meta


def latest(directory: str | Path) -> Path:
    """The newest intact checkpoint; damaged newer ones are passed over with a warning."""
    found = list_checkpoints(directory)
    if not found:
        raise CheckpointError(f"{directory}: no checkpoint found")
    for path in reversed(found):
        try:
            verify(path)
        except CheckpointError as e:
            print(f"warning: skipping damaged checkpoint ({e})", file=sys.stderr)
            continue
        return path
    raise CheckpointError(f"{directory}: all {len(found)} checkpoints are damaged")




def load(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Restore model (and optimizer) from a checkpoint JSON path; return its metadata."""
    path = Path(path)
    meta = verify(path)
    try:
        tensors = load_file(str(path.with_suffix(".safetensors")), device=str(device))
    except Exception as e:  # SafetensorError is not an OSError
        raise CheckpointError(f"{path}: unreadable checkpoint: {one_line(e)}") from e
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_sd)
    if optimizer is not None and "optimizer" in meta:
        opt = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer.load_state_dict(_unflatten_optimizer(opt, meta["optimizer"]))
    return meta


def model_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint that is the run's model: the best on validation when the run selected
    one, else the latest."""
    directory = Path(run_dir) / "checkpoints"
    best = directory / f"{BEST}.json"
    if best.exists() and best.with_suffix(".safetensors").exists():
        verify(best)
        return best
    return latest(directory)
