"""`--select val`: the run's model is the checkpoint whose served score did best on validation.

On small ID sets the served score can peak early and then fall as training goes on (the
bundled digits, 113 ID images: validation and test AUROC rose and fell together, 0.96 / 0.93
at step 100 of 600 and 0.76 / 0.55 at step 300; benchmarks/RESULTS.md), so the last checkpoint
is not always the best one. Every checkpoint at an epoch's end is judged as `--oe auto` judges
its probes (`oecl_train.validation`), the figure goes into metrics.jsonl and the checkpoint, and
the best so far is copied to checkpoints/best.* (ties go to the later one). `oecl eval`,
`oecl export` and the test AUROC `oecl train` prints use that copy; `--resume` continues from
the latest checkpoint as always.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oecl_runtime.atomic import write_json
from oecl_train.checkpoint import BEST
from oecl_train.config import TrainConfig
from oecl_train.validation import JUDGED_ON, judge, validation_sets

# The anomalies `--select auto` trusts: real ones. Held-out synthetic shifts judge an OE mix
# well enough (each candidate on shifts it never saw), but a run trained on some of those
# shifts would be judged on what it was taught.
TRUSTED = ("val-ood", "other-classes")


class Selection:
    """Judges a run's checkpoints on validation and keeps the best one."""

    def __init__(self, cfg: TrainConfig, splits, run_dir: Path, kind: str,
                 sets: dict[str, np.ndarray]) -> None:
        self.cfg, self.splits, self.kind, self.sets = cfg, splits, kind, sets
        self.directory = Path(run_dir) / "checkpoints"
        self.best = best_figure(self.directory)

    @classmethod
    def for_run(cls, cfg: TrainConfig, splits, run_dir: Path,
                progress: bool | None = None) -> Selection | None:
        """The run's selection, or None when its last checkpoint is its model."""
        if cfg.select == "last" or len(splits.id_val) == 0:
            return None
        kind, sets, _ = validation_sets(cfg, splits, progress)
        if cfg.select == "auto" and kind not in TRUSTED:
            return None
        return cls(cfg, splits, run_dir, kind, sets)

    def forget(self) -> None:
        """A run started afresh: a best checkpoint left by an earlier run under its name is
        not this run's."""
        for suffix in (".json", ".safetensors"):
            (self.directory / f"{BEST}{suffix}").unlink(missing_ok=True)
        self.best = None

    def judge(self, net: torch.nn.Module, device: torch.device) -> float:
        """Mean AUROC of the served score over the validation sets (net left in train mode)."""
        net.eval()
        try:
            per_set = judge(net, self.cfg, self.splits, self.sets, device)
        finally:
            net.train()
        return float(np.mean(list(per_set.values())))

    def offer(self, path: Path, figure: float) -> None:
        """Keep the checkpoint at `path` (judged `figure`) if it is the best so far."""
        if self.best is not None and figure < self.best:
            return
        # Tensors first, JSON last: the copy counts once its JSON is there.
        tmp = self.directory / f".{BEST}.safetensors.tmp"
        shutil.copy2(path.with_suffix(".safetensors"), tmp)
        tmp.replace(self.directory / f"{BEST}.safetensors")
        meta = json.loads(path.read_text())
        meta["selected"] = {"val_auroc": figure, "judged_on": self.kind,
                            "judged_on_text": JUDGED_ON[self.kind], "copied_from": path.name}
        write_json(self.directory / f"{BEST}.json", meta)
        self.best = figure


def best_figure(directory: Path) -> float | None:
    """The validation figure of the run's best checkpoint so far, if it has one."""
    path = Path(directory) / f"{BEST}.json"
    if not path.exists():
        return None
    try:
        return float(json.loads(path.read_text())["selected"]["val_auroc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def selection_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """What `--select val` chose: the step, its figure and what it was judged on, and the
    last checkpoint's figure beside it (from metrics.jsonl)."""
    best = Path(run_dir) / "checkpoints" / f"{BEST}.json"
    if not best.exists():
        return None
    meta = json.loads(best.read_text())
    judged = []
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "val_auroc" in row:
                judged.append((int(row["step"]), float(row["val_auroc"])))
    return {"step": int(meta["step"]), "total_steps": int(meta["total_steps"]),
            **meta["selected"], "checkpoints_judged": len(judged),
            "last": {"step": judged[-1][0], "val_auroc": judged[-1][1]} if judged else None}
