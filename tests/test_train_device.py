"""Device-dependent choices of the trainer: "auto" precision and compile resolved and recorded,
explicit TF32, cuDNN autotuning, and (on CUDA) no host-device sync per step."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import splits_for, tiny_config

from oecl_train.config import TrainConfig
from oecl_train.execution import configure_cuda, recorded_config, resolve_execution
from oecl_train.trainer import Trainer


def _as_recorded(cfg: TrainConfig, device: str) -> TrainConfig:
    """The config as config.json records it once resolved for `device`."""
    return TrainConfig.from_dict(recorded_config(cfg, resolve_execution(cfg, torch.device(device))))


@pytest.mark.parametrize(
    ("device", "precision", "compile_", "tf32"),
    [("cpu", "fp32", "off", False), ("cuda", "bf16", "on", True)],
)
def test_auto_resolves_per_device(device, precision, compile_, tf32):
    cfg = TrainConfig()
    assert (cfg.precision, cfg.compile, cfg.tf32) == ("auto", "auto", True)
    ran = _as_recorded(cfg, device)
    assert (ran.precision, ran.compile, ran.tf32) == (precision, compile_, tf32)


def test_explicit_choices_are_kept():
    cfg = TrainConfig(precision="fp16", compile="off", tf32=False)
    ran = _as_recorded(cfg, "cuda")
    assert (ran.precision, ran.compile, ran.tf32) == ("fp16", "off", False)


def test_config_json_records_what_ran(tmp_path):
    cfg = tiny_config(tmp_path, steps=1, precision="auto", compile="auto", oe="none")
    Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False).fit()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["precision"], saved["compile"], saved["tf32"]) == ("fp32", "off", False)
    # And a saved config reads back as the same configuration.
    assert json.loads(json.dumps(TrainConfig.from_dict(saved).to_json())) == saved


def test_older_configs_with_a_compile_flag_still_load():
    assert TrainConfig.from_dict({"compile": True}).compile == "on"
    assert TrainConfig.from_dict({"compile": False}).compile == "off"
    with pytest.raises(ValueError, match="--compile must be one of auto, on, off"):
        TrainConfig(compile="yes").validate()


@pytest.mark.parametrize("tf32", [True, False])
def test_configure_cuda_sets_tf32_and_cudnn_benchmark(tf32):
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    try:
        configure_cuda(resolve_execution(TrainConfig(tf32=tf32), torch.device("cuda")))
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
        assert torch.backends.cudnn.allow_tf32 is tf32
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


def test_epoch_orders_live_on_the_training_device(tmp_path):
    cfg = tiny_config(tmp_path, oe="self")
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    id_order, oe_order = tr._orders(0)
    assert id_order.device == oe_order.device == tr.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_batches_need_no_host_sync(tmp_path):
    cfg = tiny_config(tmp_path, device="cuda", oe="self")
    tr = Trainer(cfg, splits_for(cfg), tmp_path / "run", progress=False)
    id_order, oe_order = tr._orders(0)
    assert id_order.is_cuda and oe_order.is_cuda
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        for s in range(3):
            tr._batch(s, id_order, oe_order)
    finally:
        torch.cuda.set_sync_debug_mode("default")
