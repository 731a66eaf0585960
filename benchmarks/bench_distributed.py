"""Data-parallel scaling of OECL training on the CPU: 1 process vs 2 processes under torchrun.

    python benchmarks/bench_distributed.py

trains the quickstart configuration (digits at 16x16, ResNet-10 of width 32, natural-photo
OE, bf16) at one global batch (64 ID + 64 OE images per step) three ways, each in a fresh
process tree:

- 1 process x 1 thread (the single-core baseline),
- 1 process x 2 threads (one process using both cores through intra-op parallelism),
- 2 processes x 1 thread under `torchrun --nproc-per-node 2` (gloo, 32 + 32 per rank, the
  ID features all-gathered into the global loss, DDP gradient all-reduce).

Each arm runs `--warmup` steps untimed, then times `--steps` optimizer steps (augmentation,
forward, loss, backward, all collectives and the optimizer step) between barriers; the arms
are repeated `--repeats` times in turn and the median is reported. Throughput is training
images (ID + OE) per second of the whole job. Results go to
benchmarks/results/distributed-cpu.json and a markdown table is printed.

Multi-GPU scaling cannot be measured on a CPU-only machine; this measures the same code path
(process group, gather, DDP) with gloo instead of NCCL.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import REPO, RESULTS, command_line, device_name, md_table

from oecl_runtime.atomic import write_json

GLOBAL_BATCH = 64
ARMS = (
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("2 processes x 1 thread", 2, 1),
)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def worker(args: argparse.Namespace) -> None:
    """One arm: train `warmup + steps` steps and (on rank 0) write the timing as JSON."""
    import torch

    from oecl_train.config import TrainConfig
    from oecl_train.data import Splits
    from oecl_train.distributed import distributed_context
    from oecl_train.quickstart import QUICKSTART
    from oecl_train.trainer import Trainer

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = TrainConfig.from_dict(
        {
            **QUICKSTART,
            "batch_size": GLOBAL_BATCH // world,
            "steps": args.warmup + args.steps,
            "device": "cpu",
            "seed": 0,
        }
    )
    splits = Splits.from_config(cfg, data_root=None)
    with distributed_context("cpu", cfg.dist_timeout) as d:
        tr = Trainer(cfg, splits, Path(args.scratch) / "run", dist=d, progress=False)
        tr.net.train()
        tr._seed_augmentation(0)
        id_order, oe_order = tr._orders(0)
        images = 0
        for s in range(args.warmup + args.steps):
            if s == args.warmup:
                d.barrier()
                t0 = time.perf_counter()
            x_id, x_oe = tr._batch(s % tr.steps_per_epoch, id_order, oe_order)
            float(tr._step(s, x_id, x_oe)["loss"])  # wait for the step to finish
            if s >= args.warmup:
                images += (len(x_id) + len(x_oe)) * d.world
        d.barrier()
        elapsed = time.perf_counter() - t0
    if d.rank == 0:
        Path(args.result).write_text(
            json.dumps(
                {
                    "images_per_s": images / elapsed,
                    "step_ms": 1000 * elapsed / args.steps,
                    "images_per_step": images // args.steps,
                    "per_rank_batch": cfg.batch_size,
                    "world": d.world,
                }
            )
        )


def run_arm(procs: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        me = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads)]
        me += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        me += ["--result", str(result), "--scratch", tmp]
        if procs == 1:
            cmd = [sys.executable, *me]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += ["--nproc-per-node", str(procs), *me]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def markdown(record: dict[str, Any]) -> str:
    rows = [[r["arm"], r["per_rank_batch"], f"{r['images_per_s_median']:.0f}",
             f"{r['step_ms_median']:.1f}", f"{r['speedup_vs_1x1']:.2f}x"]
            for r in record["results"]]
    return "\n".join(md_table(["arm", "per-rank batch", "images/s (median)", "step ms",
                               "vs 1x1"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="Timed steps per arm.")
    ap.add_argument("--warmup", type=int, default=5, help="Untimed steps before timing.")
    ap.add_argument("--repeats", type=int, default=3, help="Runs of each arm (median).")
    ap.add_argument("--out", default=str(RESULTS / "distributed-cpu.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    load_start = list(os.getloadavg())
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in ARMS}
    for _ in range(args.repeats):
        for name, procs, threads in ARMS:  # interleaved, so drifting load hits every arm
            runs[name].append(run_arm(procs, threads, args))
    rows = []
    for name, procs, threads in ARMS:
        ips = [r["images_per_s"] for r in runs[name]]
        rows.append(
            {
                "arm": name,
                "processes": procs,
                "threads_per_process": threads,
                "per_rank_batch": runs[name][0]["per_rank_batch"],
                "images_per_step": runs[name][0]["images_per_step"],
                "images_per_s_median": statistics.median(ips),
                "images_per_s_runs": ips,
                "step_ms_median": statistics.median(r["step_ms"] for r in runs[name]),
            }
        )
    base = rows[0]["images_per_s_median"]
    for r in rows:
        r["speedup_vs_1x1"] = r["images_per_s_median"] / base
    out = {
        "meta": {
            "device": f"{device_name('cpu')}, no GPU",
            "date": dt.date.today().isoformat(),
            "command": command_line("bench_distributed.py", None),
            "torch": torch.__version__,
            "backend": "gloo",
            "config": "quickstart: digits 16x16, resnet10 width 32, photos OE, bf16",
            "global_batch": f"{GLOBAL_BATCH} ID + {GLOBAL_BATCH} OE images per step",
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "repeats": args.repeats,
            "load_average_at_start": load_start,
            "load_average_at_end": list(os.getloadavg()),
        },
        "results": rows,
    }
    write_json(args.out, out)
    print(markdown(out))
    print(f"load average at start {load_start}, at end {out['meta']['load_average_at_end']}")


if __name__ == "__main__":
    main()
