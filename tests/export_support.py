"""What the export test modules share: one torch thread while they run, the tiny run each of them
trains and exports, and which convolutions of an int8 graph read float."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from oecl_train.data import Splits

if TYPE_CHECKING:
    import onnx


@contextmanager
def one_torch_thread() -> Iterator[None]:
    # On a small shared CPU, torch's thread pool spins against other processes and runs these
    # tiny convolutions several times slower than one thread does.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train_tiny_run(root: Path) -> tuple[Path, Splits]:
    """(run_dir, splits) of a tiny OECL run trained for a few dozen steps under `root`."""
    from oecl_train.config import TrainConfig
    from oecl_train.trainer import Trainer

    cfg = TrainConfig(
        name="tiny", out_dir=str(root), data="digits", id_class="0", oe="photos", image_size=16,
        depth="resnet10", width=16, batch_size=32, steps=40, precision="fp32", hflip=False,
        device="cpu", keep_checkpoints=1,
    )
    splits = Splits.from_config(cfg)
    run_dir = root / "tiny"
    Trainer(cfg, splits, run_dir, progress=False).fit()
    return run_dir, splits


def float_input_convs(model: onnx.ModelProto) -> list[bool]:
    """For each Conv in node order: whether its input is float (not dequantised int8)."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return [producers.get(n.input[0]) != "DequantizeLinear"
            for n in model.graph.node if n.op_type == "Conv"]
