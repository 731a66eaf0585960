"""The loss kernels on every GPU target, without a GPU: the launch configuration chosen from
device properties, and offline compiles (Triton down to PTX for sm_80, sm_86, sm_89, sm_90)
that check that configuration's shared memory against each target's per-block limit and that
16-bit inputs run on tensor cores.

The compiles run in a subprocess: this test session runs triton in its interpreter, which
replaces the compiler.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TARGETS = (80, 86, 89, 90)
DIMS = (64, 128, 256, 512)
# fp32 in its GPU-training form (TF32 allowed, the trainer's --tf32 default) and both 16-bit
# types at every width. Exact-fp32 ("ieee", CUDA-core FMA) products take as long to compile
# for one width as a 16-bit type for all four (about 35 CPU-seconds on this project's 2-core
# Xeon), so the suite takes d = 128, the projection width and the configuration that
# overflowed sm_86/89 before launches looked at the device; `python -m kernels.targets`
# compiles every width (its table is in benchmarks/RESULTS.md).
MATRIX = (
    (("fp32-tf32", "bf16", "fp16"), DIMS),
    (("fp32-ieee",), (128,)),
)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


def _targets_cli(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice
    proc = subprocess.run([sys.executable, "-m", "kernels.targets", "--json", *args],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    rows = []
    for precisions, dims in MATRIX:
        rows += _targets_cli("--precisions", *precisions, "--d", *map(str, dims))
    return rows


@needs_triton
def test_every_kernel_compiled_for_every_target(compiled):
    got = {(r["cc"], r["precision"], r["d"], r["kernel"]) for r in compiled}
    want = {(cc, p, d, k) for precisions, dims in MATRIX for p in precisions for d in dims
            for cc in TARGETS for k in ("row_norm", "fwd", "bwd", "oe_grad")}
    assert got == want


@needs_triton
def test_shared_memory_fits_each_target(compiled):
    over = [r for r in compiled if r["shared"] > r["smem_limit"]]
    assert not over, over
    # The estimate the launch configuration is chosen by never undercounts.
    under = [r for r in compiled if r["estimate"] is not None and r["estimate"] < r["shared"]]
    assert not under, under


@needs_triton
def test_16_bit_and_tf32_products_run_on_tensor_cores(compiled):
    for r in compiled:
        if r["kernel"] not in ("fwd", "bwd"):
            continue
        if r["precision"] == "fp32-ieee":
            assert not (r["wgmma"] or r["mma_sync"]), r  # exact fp32: CUDA cores
            continue
        assert r["wgmma"] or r["mma_sync"], r
        if r["cc"] < 90:
            assert not r["wgmma"], r  # wgmma exists from sm_90 on
    # Hopper's warpgroup MMA for the widths projection heads use.
    for r in compiled:
        if r["cc"] == 90 and r["precision"] in ("bf16", "fp16") and r["d"] <= 128 \
                and r["kernel"] in ("fwd", "bwd"):
            assert r["wgmma"], r


@needs_triton
def test_ptx_shortcut_matches_a_full_compile(compiled):
    full = _targets_cli("--cc", "86", "90", "--precisions", "bf16", "--d", "128", "--cubin")
    ptx = {(r["cc"], r["kernel"]): r for r in compiled if r["precision"] == "bf16"
           and r["d"] == 128 and r["cc"] in (86, 90)}
    for r in full:
        p = ptx[(r["cc"], r["kernel"])]
        assert (r["shared"], r["wgmma"], r["mma_sync"]) == (p["shared"], p["wgmma"],
                                                           p["mma_sync"])


# ------------------------------------------------------- launch configuration, in process


@needs_triton
def test_launch_config_follows_shared_memory():
    from kernels.tiles import bwd_smem_bytes, fwd_smem_bytes, launch_config

    # The defect: exact fp32 at d = 128 with 3 stages needs 128 KiB, over sm_86's 99 KB.
    big = launch_config(128, torch.float32, capability=(9, 0), smem_per_block=227 * 1024)
    small = launch_config(128, torch.float32, capability=(8, 6), smem_per_block=99 * 1024)
    assert big.stages_fwd == 3 and small != big
    for cfg, limit in ((big, 227 * 1024), (small, 99 * 1024)):
        assert fwd_smem_bytes(cfg.fwd_m, cfg.fwd_n, 128, 4, cfg.stages_fwd) <= limit
        assert bwd_smem_bytes(cfg.bwd_m, cfg.bwd_n, 128, 4, cfg.stages_bwd) <= limit
    # Below sm_80 there is no asynchronous copy to pipeline: one stage.
    turing = launch_config(128, torch.float16, capability=(7, 5), smem_per_block=64 * 1024)
    assert turing.stages_fwd == turing.stages_bwd == 1
    forced = launch_config(64, torch.bfloat16, capability=(9, 0), smem_per_block=1 << 20,
                           block=32)
    assert (forced.fwd_m, forced.bwd_n, forced.stages_fwd) == (32, 32, 1)


@needs_triton
def test_launch_config_errors_are_one_line():
    from kernels.tiles import launch_config

    with pytest.raises(ValueError, match="no NT-Xent tile fits 16384 bytes"):
        launch_config(512, torch.float32, capability=(8, 0), smem_per_block=16 * 1024)
    with pytest.raises(ValueError, match="d_pad must be a power of two"):
        launch_config(100, torch.float32, capability=(8, 0), smem_per_block=163 * 1024)


@needs_triton
def test_launch_runs_under_the_tensors_device():
    from kernels.ntxent_oe_triton import device_guard

    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.device("cpu")), torch.cuda.device)


@needs_triton
def test_training_launch_configs_compile_without_spills():
    # What training launches: fp32 features with TF32 products (the trainer's default on
    # CUDA) and bf16, at the projection width. ptxas -v of this triton's wheel; a spill is
    # local-memory traffic inside the inner loop of the backward sweep.
    rows = _targets_cli("--registers", "--precisions", "fp32-tf32", "bf16", "--d", "128")
    assert {(r["cc"], r["precision"], r["kernel"]) for r in rows} == {
        (cc, p, k) for cc in TARGETS for p in ("fp32-tf32", "bf16")
        for k in ("row_norm", "fwd", "bwd", "oe_grad")}
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert r["spill_stores"] == r["spill_loads"] == 0, r


def test_ptxas_log_is_read_per_kernel():
    from kernels.targets import parse_ptxas_log

    log = ("ptxas info    : Compiling entry function '_ntxent_bwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _ntxent_bwd_kernel\n"
           "    1152 bytes stack frame, 380 bytes spill stores, 372 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 98560 bytes smem\n")
    assert parse_ptxas_log(log) == (255, 380, 372)
    with pytest.raises(RuntimeError, match="without register or spill figures"):
        parse_ptxas_log("ptxas fatal : unknown option")
