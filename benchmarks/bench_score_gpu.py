"""Scoring throughput on a GPU: torch eager fp32 vs bf16 replayed from CUDA graphs, against
the compute ceiling, with onnxruntime on the machine's CPU cores beside them.

    python benchmarks/bench_score_gpu.py                 # ResNet-18, CIFAR stem, 32x32
    python benchmarks/bench_score_gpu.py --smoke         # tiny sizes on the CPU (CI)

Each image goes in as uint8 NCHW (the artifact's contract) and the timing includes the copy to
the device. The network has random weights: the arithmetic does not depend on them. The
ceiling is the GPU's dense bf16 matmul rate (measured on these machines: ~790 TFLOP/s on an
H100/H200) over the model's FLOPs per image. The JSON is rewritten after each scorer (and its
rows appended to --jsonl), so a run cut short keeps the scorers it finished.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _gpu_env import append_jsonl, gpu_environment
from _harness import RESULTS, device_name, log, md_table

from oecl_model.model import Architecture, OECLNet, ScoreModel
from oecl_runtime import bench as B
from oecl_runtime.atomic import write_json

# Measured dense bf16 matmul rate of an H100 / H200 (ENVIRONMENT of this project).
H100_BF16_FLOPS = 790e12
# ResNet-18, CIFAR stem, 32x32, 3 channels: 0.555 G multiply-adds per image.
RESNET18_CIFAR_FLOP = 1.11e9


def markdown_table(results: dict[str, list[dict]]) -> str:
    rows = [[name, r["batch_size"], f"{r['images_per_s']:.0f}",
             f"{r['share_of_ceiling']:.1%}" if r.get("share_of_ceiling") else "-"]
            for name, rs in results.items() for r in rs]
    return "\n".join(md_table(["scorer", "batch", "images/s", "share of ceiling"], rows))


class GraphScorer:
    """bf16 (or fp32) forward replayed from one CUDA graph per batch size."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.graphs: dict[tuple[int, ...], tuple] = {}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # No autocast weight cache: a graph must not capture casts made outside it.
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            return self.model(x)[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        key = batch.shape
        if key not in self.graphs:
            static_in = torch.empty(key, dtype=torch.uint8, device=self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):  # warm-up on a side stream, as capture requires
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = self._forward(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(torch.from_numpy(batch), non_blocking=False)
        graph.replay()
        return static_out.float().cpu().numpy()


def eager_scorer(model: torch.nn.Module, device: torch.device):
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(device))[0].float().cpu().numpy()

    return run


def ort_scorer(model: torch.nn.Module, chw: tuple[int, int, int], threads: int, scratch: Path):
    """onnxruntime CPU session on an export of the same network (the runtime's own options)."""
    import onnxruntime as ort

    from oecl_runtime.backends.ort import session_options
    from oecl_train.export import export_onnx

    path = scratch / "score.onnx"
    export_onnx(model.cpu().eval(), path, chw, embedding=False)
    sess = ort.InferenceSession(str(path), sess_options=session_options("cpu", threads),
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: batch})[0]

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny network and batches on the CPU; checks the script, times nothing")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    p.add_argument("--depth", default="resnet18", choices=("resnet18", "resnet10"))
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--max-seconds", type=float, default=5.0)
    p.add_argument("--ort-threads", type=int, default=16)
    p.add_argument("--ort-batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--jsonl", type=Path, default=None,
                   help="also append each scorer's rows to this file as they are measured")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.ort_batches = [1, 4], [1, 4]
        args.depth, args.width, args.size = "resnet10", 4, 16
        args.iterations, args.max_seconds, args.ort_threads = 2, 1.0, 1
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        log("bench_score_gpu.py: no CUDA device (use --smoke on a CPU)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    net = OECLNet(Architecture(depth=args.depth, width=args.width, stem="cifar",
                               in_channels=3, proj_dim=128, mean=[0.5] * 3, std=[0.5] * 3))
    model = ScoreModel(net).eval().to(device, memory_format=torch.channels_last)
    chw = (3, args.size, args.size)

    flop = RESNET18_CIFAR_FLOP * (args.size / 32) ** 2 if args.depth == "resnet18" \
        and args.width == 64 else None
    ceiling = H100_BF16_FLOPS / flop if flop and cuda else None
    results: dict[str, list[dict]] = {}
    record = {
        "benchmark": "score-throughput", "date": date.today().isoformat(),
        "device": device_name(str(device)), "cpu": device_name("cpu"),
        "environment": gpu_environment() if cuda else None,
        "torch": torch.__version__, "smoke": args.smoke,
        "model": {"depth": args.depth, "width": args.width, "size": args.size,
                  "flop_per_image": flop},
        "ceiling_images_per_s": ceiling, "complete": False, "results": results,
    }
    path = args.out / ("score-smoke.json" if args.smoke else "score-gpu.json")

    def measured(name: str, run, batches: list[int], warmup: int) -> None:
        rows = B.bench_backend(run, chw, batches, iterations=args.iterations, warmup=warmup,
                               max_seconds=args.max_seconds)
        for r in rows:
            r["share_of_ceiling"] = r["images_per_s"] / ceiling if ceiling else None
            append_jsonl(args.jsonl, {"bench": "score", "device": record["device"],
                                      "scorer": name, **r})
        results[name] = rows
        write_json(path, record)
        log(f"{name}: " + ", ".join(f"b{r['batch_size']} {r['images_per_s']:.0f} img/s"
                                    for r in rows))

    measured("torch-eager-fp32", eager_scorer(model, device), args.batches, 3)
    if cuda:
        measured("torch-bf16-cudagraph", GraphScorer(model, device, torch.bfloat16),
                 args.batches, 3)
    with tempfile.TemporaryDirectory() as scratch:
        ort_run = ort_scorer(ScoreModel(net).eval(), chw, args.ort_threads, Path(scratch))
        measured(f"onnxruntime-cpu-{args.ort_threads}t", ort_run, args.ort_batches, 2)
    record["complete"] = True
    write_json(path, record)
    print(markdown_table(results))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
