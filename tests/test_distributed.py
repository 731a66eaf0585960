"""Data-parallel training on torch.distributed (gloo on the CPU, two ranks on one machine).

The central claim: with features all-gathered (with gradients) into one global loss on every
rank and DDP averaging the parameter gradients, a 2-rank step computes exactly the loss and
gradient of one process on the concatenated batch. Also: global negatives, disjoint
epoch-dependent shards, rank-0-only writes, resuming with another world size, and a failing
or hanging rank ending the job under torchrun instead of hanging it.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kernels import ntxent_oe
from oecl_runtime.preprocess import InputSpec
from oecl_train.config import TrainConfig
from oecl_train.data import Splits
from oecl_train.distributed import (
    FUNCTIONAL_GATHERS,
    Dist,
    autograd_all_gather,
    distributed_context,
    torchrun_environment,
)
from oecl_train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
WORLD, B, M = 2, 4, 3  # ranks, ID images per rank, OE images per rank (M != B on purpose)
N_ID, N_OE = 32, 100  # N_ID = one epoch of 4 steps x 2 ranks x 4 images: a single permutation
ALPHA = 0.7
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(
        depth="resnet10",
        width=8,
        proj_dim=16,
        batch_size=B,
        oe_batch_size=M,
        steps=8,
        precision="fp32",
        device="cpu",
        loss_backend="torch",
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


def tiny_splits() -> Splits:
    rng = np.random.default_rng(0)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)

    return Splits(
        spec=InputSpec(height=8, width=8, channels=1),
        id_train=images(N_ID),
        id_val=images(2),
        test_images=images(4),
        test_is_id=np.array([True, False, True, False]),
        test_labels=np.arange(4),
        test_paths=None,
        oe=images(N_OE),
        oe_mode="external",
        classes=["0", "1"],
        id_classes=[0],
    )


def rank_views() -> list[torch.Tensor]:
    """Fixed float views per rank, laid out as the trainer builds them: [id₁, id₂, oe₁, oe₂]."""
    g = torch.Generator().manual_seed(11)
    return [torch.rand(2 * B + 2 * M, 1, 8, 8, generator=g) for _ in range(WORLD)]


def global_batch(views: list[torch.Tensor]) -> torch.Tensor:
    """The same images as one process's batch: [id₁ of all ranks, id₂ of all, oe₁ ..., oe₂ ...]."""
    parts = [(0, B), (B, 2 * B), (2 * B, 2 * B + M), (2 * B + M, 2 * B + 2 * M)]
    return torch.cat([v[lo:hi] for lo, hi in parts for v in views])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_torchrun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


# -- two spawned ranks, one step each ------------------------------------------------------------
# Which all-gather each torch release offers: the newest name, the one torch 2.4-2.12 (the GPU
# machines' 2.11) has, and torch.distributed.nn's when neither functional one exists.
GATHER_CASES = {
    "all_gather_single_autograd": (),
    "all_gather_tensor_autograd": ("all_gather_single_autograd",),
    "<lambda>": FUNCTIONAL_GATHERS,
}


def _gather_grads(d: Dist) -> dict:
    """Per gather variant: the name picked, the gathered rows and the gradient of this rank's
    rows under a loss every rank computes alike from the gathered rows."""
    import torch.distributed._functional_collectives as fc

    out = {}
    w = torch.arange(WORLD * 3 * 4, dtype=torch.float32).view(WORLD * 3, 4) / 7
    for expect, hide in GATHER_CASES.items():
        # This torch's module as an older one shows it (its own functions keep calling the
        # newer names internally, so the module itself is left alone).
        older = SimpleNamespace(**{n: getattr(fc, n) for n in FUNCTIONAL_GATHERS
                                   if n not in hide})
        fn = autograd_all_gather(older)
        x = (torch.arange(12, dtype=torch.float32).view(3, 4) + 100 * d.rank)
        x.requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # 2.13 deprecates the older name
            g = fn(x)
        loss = (g * w).sum() + 0.5 * (g * g).sum()
        loss.backward()
        picked = getattr(fn, "func", fn).__name__
        out[expect] = {"picked": picked, "gathered": g.detach().clone(), "grad": x.grad}
    return out


def _rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    res: dict = {}
    with distributed_context("cpu", timeout_s=60) as d:
        res["dist"] = (d.rank, d.world, torch.distributed.get_backend())
        res["gathers"] = _gather_grads(d)
        try:
            Trainer(tiny_cfg(sync_bn=True), tiny_splits(), Path(out) / "sync", dist=d)
        except ValueError as e:
            res["sync_bn_error"] = str(e)
        tr = Trainer(tiny_cfg(), tiny_splits(), Path(out) / "run", dist=d, progress=False)
        views = rank_views()[d.rank]
        tr.net.eval()
        with torch.no_grad():
            res["z_id"], res["z_oe"] = tr.gathered_features(tr.model(views), B)
        # Eval-mode BatchNorm first: it leaves the running statistics as they are, so the
        # train-mode step below starts from the same state as the one-process reference.
        for mode in ("eval", "train"):
            tr.net.train(mode == "train")
            tr.optimizer.zero_grad(set_to_none=True)
            loss = tr.loss_on_views(views, B, ALPHA).loss
            loss.backward()
            grads = {k: p.grad.clone() for k, p in tr.net.named_parameters()}
            res[mode] = {"loss": loss.detach(), "grads": grads}
        res["shards"] = {}
        for epoch in (0, 1, 2):
            id_order, oe_order = tr._orders(epoch)
            res["shards"][epoch] = [
                tr._indices(s, id_order, oe_order) for s in range(tr.steps_per_epoch)
            ]
        tr._seed_augmentation(1)
        res["aug"] = tr.augment(tr.id_data[:8])
        tr._seed_augmentation(1)
        res["aug_again"] = tr.augment(tr.id_data[:8])
    torch.save(res, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(
        _rank_worker, args=(free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture
def reference(tmp_path) -> Trainer:
    """One process, same config and seed: the same initial weights (and BatchNorm running
    statistics) as the ranks had before their first forward pass."""
    return Trainer(tiny_cfg(), tiny_splits(), tmp_path / "run", progress=False)


def assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    # fp32 round-off (summation order differs), measured against the largest gradient: some
    # entries are zero in exact arithmetic (biases feeding BatchNorm) and only noise in fp32,
    # and train-mode BatchNorm's backward amplifies round-off to a few 1e-6.
    scale = max(g.abs().max().item() for g in want.values())
    for k in want:
        err = (got[k] - want[k]).abs().max().item()
        assert err <= 2e-5 * scale, f"{k}: max error {err:.3g} vs largest gradient {scale:.3g}"
        rel = ((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)).item()
        assert rel <= 2e-5 or err <= 1e-6 * scale, f"{k}: relative error {rel:.3g}"


def test_ranks_join_a_gloo_group(ranks):
    assert [r["dist"] for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]


def test_every_gather_variant_gives_the_same_rows_and_gradients(ranks):
    # The fallbacks are what torch 2.4-2.12 and older releases run: hiding the newer names
    # here makes this torch take those paths under gloo.
    w = torch.arange(WORLD * 3 * 4, dtype=torch.float32).view(WORLD * 3, 4) / 7
    rows = torch.cat([torch.arange(12, dtype=torch.float32).view(3, 4) + 100 * r
                      for r in range(WORLD)])
    for r, got in enumerate(ranks):
        assert {k: v["picked"] for k, v in got["gathers"].items()} == {k: k for k in
                                                                        GATHER_CASES}
        for case in got["gathers"].values():
            assert torch.equal(case["gathered"], rows)
            # d/dx_r of the same loss on every rank, summed over the ranks by the backward.
            want = WORLD * (w[3 * r : 3 * r + 3] + rows[3 * r : 3 * r + 3])
            torch.testing.assert_close(case["grad"], want, rtol=1e-6, atol=1e-5)


def test_ranks_agree_on_loss_and_gradients(ranks):
    # Every rank computes the full global loss; DDP leaves identical gradients everywhere.
    for mode in ("eval", "train"):
        a, b = ranks[0][mode], ranks[1][mode]
        assert torch.equal(a["loss"], b["loss"])
        assert all(torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"])


def test_step_equals_one_process_on_the_concatenated_batch(ranks, reference):
    # Eval-mode BatchNorm normalises each sample alike however the batch is split, so the
    # reference is literally one forward pass over the concatenated global batch.
    reference.net.eval()
    reference.optimizer.zero_grad(set_to_none=True)
    loss = reference.loss_on_views(global_batch(rank_views()), WORLD * B, ALPHA).loss
    loss.backward()
    want = {k: p.grad.clone() for k, p in reference.net.named_parameters()}
    for r in ranks:
        torch.testing.assert_close(r["eval"]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        assert_grads_equal(r["eval"]["grads"], want)


def test_train_mode_step_equals_one_process_with_per_rank_batchnorm(ranks, reference):
    # Without --sync-bn each rank's BatchNorm sees its own views; with that, the loss over
    # the concatenated features and its gradient are again those of one process.
    net = reference.net.train()
    net.zero_grad(set_to_none=True)
    z = [net(v) for v in rank_views()]
    z_id = torch.cat([zr[:B] for zr in z] + [zr[B : 2 * B] for zr in z])
    z_oe = torch.cat([zr[2 * B :] for zr in z])
    loss = ntxent_oe(z_id, z_oe, 0.5, ALPHA, backend="torch").loss
    loss.backward()
    want = {k: p.grad.clone() for k, p in net.named_parameters()}
    for r in ranks:
        torch.testing.assert_close(r["train"]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        assert_grads_equal(r["train"]["grads"], want)


def test_contrastive_loss_sees_global_negatives(ranks, reference):
    reference.net.eval()
    with torch.no_grad():
        z = [reference.net(v) for v in rank_views()]
    want_id = torch.cat([zr[:B] for zr in z] + [zr[B : 2 * B] for zr in z])
    want_oe = torch.cat([zr[2 * B :] for zr in z])
    for r in ranks:
        # 2 views x world x local batch: each anchor has 2·W·B − 2 negatives.
        assert r["z_id"].shape == (2 * WORLD * B, 16)
        assert r["z_oe"].shape == (2 * WORLD * M, 16)
        # Rows i and i + N/2 are the two views of one image, whichever rank drew it.
        torch.testing.assert_close(r["z_id"], want_id, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["z_oe"], want_oe, rtol=1e-5, atol=1e-5)


def test_shards_are_disjoint_and_change_with_the_epoch(ranks):
    def drawn(rank: int, epoch: int, which: int) -> list[int]:
        return [i for step in ranks[rank]["shards"][epoch] for i in step[which].tolist()]

    for epoch in (0, 1, 2):
        id0, id1 = drawn(0, epoch, 0), drawn(1, epoch, 0)
        # One epoch is exactly one permutation of the ID set, split between the ranks.
        assert len(set(id0)) == len(id0) == N_ID // 2
        assert not set(id0) & set(id1) and set(id0) | set(id1) == set(range(N_ID))
        oe0, oe1 = drawn(0, epoch, 1), drawn(1, epoch, 1)
        assert len(oe0) == len(oe1) == 4 * M and not set(oe0) & set(oe1)
    # A new epoch, a new order and a new OE subset (24 of 100 images per epoch).
    assert drawn(0, 0, 0) != drawn(0, 1, 0)
    assert set(drawn(0, 0, 1)) | set(drawn(1, 0, 1)) != set(drawn(0, 1, 1)) | set(drawn(1, 1, 1))


def test_augmentation_differs_per_rank_and_is_reproducible(ranks):
    for r in ranks:
        torch.testing.assert_close(r["aug"], r["aug_again"], rtol=0, atol=0)
    assert not torch.allclose(ranks[0]["aug"], ranks[1]["aug"])


def test_sync_bn_refused_on_cpu_ranks(ranks):
    assert "--sync-bn needs CUDA" in ranks[0]["sync_bn_error"]


# -- the environment -------------------------------------------------------------------------------
def test_plain_process_is_rank_zero_of_one(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    assert torchrun_environment() is None
    with distributed_context("cpu") as d:
        assert d == Dist() and not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="dist-timeout"), distributed_context("cpu", 0):
        pass


def test_partial_torchrun_environment_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE unset"):
        torchrun_environment()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        torchrun_environment()


def test_dist_timeout_is_validated():
    with pytest.raises(ValueError, match="dist-timeout"):
        tiny_cfg(dist_timeout=0.0).validate()


# -- whole jobs under torchrun ---------------------------------------------------------------------
def run_job(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A whole job in its own process, from the repository, outside any torchrun."""
    return subprocess.run(cmd, cwd=ROOT, env=without_torchrun_env(), capture_output=True,
                          text=True, timeout=timeout)


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def torchrun(args: list[str], timeout: float = 150) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    t0 = time.monotonic()
    proc = run_job(cmd + args, timeout)
    return proc, time.monotonic() - t0


def test_two_rank_run_resumes_as_one_rank(tmp_path):
    train = [
        "-m", "oecl_train.cli", "train", "--data", "digits", "--oe", "self",
        "--depth", "resnet10", "--width", "8", "--proj-dim", "16", "--batch-size", "16",
        "--steps", "6", "--checkpoint-every", "1", "--precision", "fp32", "--device", "cpu",
        "--out-dir", str(tmp_path), "--name", "run", "--no-progress",
    ]  # fmt: skip
    proc, _ = torchrun(train)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports for the job
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    two = json.loads((ckpts / "epoch-00002.json").read_text())
    spe2 = two["steps_per_epoch"]
    assert two["world_size"] == 2 and two["complete"] and two["total_steps"] == 6
    # Only rank 0 writes: one metrics row per epoch, not one per rank.
    assert [r["epoch"] for r in metrics_rows(run)] == [1, 2]

    # Interrupted after epoch 1: resume that checkpoint with a single process.
    for suffix in (".json", ".safetensors"):
        (ckpts / f"epoch-00002{suffix}").unlink()
    proc = run_job([sys.executable, "-m", "oecl_train.cli", "train", "--resume", str(run),
                    "--no-progress"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((ckpts / "epoch-00002.json").read_text())
    spe1, total = final["steps_per_epoch"], final["total_steps"]
    assert final["world_size"] == 1 and final["complete"]
    assert spe1 in (2 * spe2 - 1, 2 * spe2)  # half the global batch
    # The run keeps its length in epochs; the step schedule is recomputed for the new batch.
    assert abs(total / spe1 - 6 / spe2) <= 0.5 / spe1
    assert f"resuming {run} at epoch 1 of {math.ceil(total / spe1)}" in proc.stderr
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["step"] == spe2 and rows[1]["step"] == total
    assert "AUROC" in proc.stdout


FAILING_JOB = """
import sys, time
import torch.distributed as dist
from oecl_train.training import run_training
from oecl_train.config import TrainConfig
from oecl_train.trainer import Trainer

how, timeout, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
original = Trainer._step

def step(self, s, x_id, x_oe):
    if dist.get_rank() == 1 and s == 2:
        if how == "raise":
            raise RuntimeError("rank 1 failed on purpose")
        time.sleep(600)  # a rank that hangs instead of failing
    return original(self, s, x_id, x_oe)

Trainer._step = step
cfg = TrainConfig(
    data="digits", oe="self", depth="resnet10", width=8, proj_dim=16, batch_size=16, steps=20,
    precision="fp32", device="cpu", out_dir=out, dist_timeout=timeout,
)
run_training(cfg, progress=False, quick_eval=False)
"""


@pytest.mark.parametrize(
    "how, timeout, culprit, expect",
    [("raise", 300, 1, "RuntimeError: rank 1 failed on purpose"), ("hang", 4, 0, r"timed? ?out")],
)
def test_failing_rank_ends_the_job(tmp_path, how, timeout, culprit, expect):
    # "raise": torchrun's agent stops rank 0, which would otherwise wait in its next
    # collective for the 300 s timeout. "hang": rank 0's collective times out after 4 s.
    script = tmp_path / "job.py"
    script.write_text(FAILING_JOB)
    proc, elapsed = torchrun([str(script), how, str(timeout), str(tmp_path)], timeout=120)
    assert proc.returncode != 0
    assert elapsed < 90
    # torchrun's summary names the first failure, from the error file `record` wrote.
    root_cause = (proc.stdout + proc.stderr).partition("Root Cause (first observed failure)")[2]
    assert re.search(rf"\brank\s*:\s*{culprit}\b", root_cause), root_cause[-2000:]
    assert re.search(expect, root_cause, re.IGNORECASE), root_cause[-2000:]
