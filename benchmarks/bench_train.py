"""Training throughput: a reference-style pipeline vs ours, same model, data and batch, one run.

(a) reference: what the authors' code does — per-image augmentation of PIL images on the CPU in
    DataLoader workers, eager fp32, NCHW, the dense loss.
(b) ours: uint8 data on the device, per-sample batched augmentation there (kornia),
    channels_last, bf16 autocast, torch.compile — the product's `Trainer` step itself.
Also timed: ours in fp32 eager and fp32 compiled, so the contribution of each trick shows, and
ours in bf16 eager (`ours-bf16`, what `--precision bf16` runs on a CPU).
Every variant, the reference included, runs under the CUDA settings a training run uses
(cuDNN autotuning on, TF32 as --tf32 says), set once before the first variant; each result
records the settings it ran under. The JSON is rewritten after every variant (and each
appended to --jsonl), so a run cut short keeps the variants it finished.

    python benchmarks/bench_train.py                 # CPU-sized model on MNIST + photo OE
    python benchmarks/bench_train.py --depth resnet18 --width 64 --steps 30   # on a GPU

Images/s counts source images (ID + OE) per second; each gives two augmented views.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _gpu_env import append_jsonl, gpu_environment
from _harness import REPO, RESULTS, device_name, log, md_table
from PIL import Image, ImageEnhance

from kernels import ntxent_oe_dense
from oecl_model.model import OECLNet
from oecl_runtime.atomic import write_json
from oecl_train.config import TrainConfig
from oecl_train.data import Splits
from oecl_train.execution import configure_cuda, resolve_execution
from oecl_train.trainer import Trainer, architecture_for


class PerImageViews(torch.utils.data.Dataset):
    """torchvision-style per-image SimCLR augmentation on PIL images (the reference pipeline)."""

    def __init__(self, images: np.ndarray, size: int, seed: int):
        self.images, self.size, self.seed = images, size, seed

    def __len__(self) -> int:
        return len(self.images)

    def _view(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        w, h = img.size
        box = (0, 0, w, h)
        for _ in range(10):  # RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3)
            area = w * h * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
                box = (x, y, x + cw, y + ch)
                break
        img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.8:  # ColorJitter(0.4, 0.4, 0.4, 0.1)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
            if img.mode == "RGB":
                img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
                hsv = np.asarray(img.convert("HSV")).copy()
                hsv[..., 0] = (
                    hsv[..., 0].astype(np.int16) + int(rng.uniform(-0.1, 0.1) * 255)
                ) % 256
                img = Image.fromarray(hsv, "HSV").convert("RGB")
        if img.mode == "RGB" and rng.random() < 0.2:
            img = img.convert("L").convert("RGB")
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, i, time.perf_counter_ns()))
        a = self.images[i]
        img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        return self._view(img, rng), self._view(img, rng)


def time_reference(cfg: TrainConfig, splits, steps: int, warmup: int, workers: int) -> dict:
    torch.manual_seed(0)
    device = torch.device(cfg.device)
    # The reference trains on the same device as ours; only its input pipeline (PIL views in
    # CPU workers, copied over each step) and its eager fp32 NCHW execution differ.
    net = OECLNet(architecture_for(cfg, splits.spec.channels)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    size = splits.spec.height

    def loader(images, seed):
        ds = PerImageViews(images, size, seed)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
        return iter(
            torch.utils.data.DataLoader(
                ds,
                cfg.batch_size,
                sampler=sampler,
                num_workers=workers,
                drop_last=True,
                persistent_workers=workers > 0,
                pin_memory=device.type == "cuda",
            )
        )

    id_it, oe_it = loader(splits.id_train, 1), loader(splits.oe, 2)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        (a1, a2), (o1, o2) = next(id_it), next(oe_it)
        z = net(torch.cat([a1, a2, o1, o2]).to(device, non_blocking=True))
        n = 2 * len(a1)
        loss = ntxent_oe_dense(z[:n], z[n:], cfg.temperature, cfg.alpha).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        float(loss)  # wait for the device
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return _summary(times, 2 * cfg.batch_size)


def time_ours(cfg: TrainConfig, splits, steps: int, warmup: int) -> dict:
    tr = Trainer(cfg, splits, "/nonexistent-bench-run", progress=False)
    id_order, oe_order = tr._orders(0)
    times = []
    t_compile = time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x_id, x_oe = tr._batch(i % tr.steps_per_epoch, id_order, oe_order)
        m = tr._step(i, x_id, x_oe)
        float(m["loss"])  # wait for the device
        if i == warmup - 1:
            t_compile = time.perf_counter() - t_compile
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = _summary(times, 2 * cfg.batch_size)
    out["warmup_s"] = round(t_compile, 2)
    return out


def backend_settings() -> dict:
    """The process-wide settings that change what a step costs, as they are now."""
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def _summary(times: list[float], images_per_step: int) -> dict:
    med = statistics.median(times)
    return {"steps": len(times), "median_step_s": med, "images_per_s": images_per_step / med}


def markdown(record: dict) -> str:
    rows = [[name, f"{r['images_per_s']:.1f}", f"{r['median_step_s'] * 1e3:.0f}",
             "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}x"]
            if r["images_per_s"] else [name, "failed", "-", r["error"]]
            for name, r in record["results"].items()]
    return "\n".join(md_table(["pipeline", "images/s", "median step ms", "vs reference"], rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "mnist"))
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the images to this (default: native; 16 for digits)")
    p.add_argument("--depth", default="resnet10")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (reference).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="reference,ours-fp32,ours,ours-fp32-compiled",
                   help="comma-separated, timed in this order (cold compiles last)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 for fp32 products on CUDA, for every variant (the trainer's "
                   "default)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--jsonl", default=None,
                   help="also append each variant's result to this file as it finishes")
    args = p.parse_args()

    base = dict(
        data=args.data,
        data_root=args.data_root,
        id_class="8",
        oe="photos",
        depth=args.depth,
        width=args.width,
        batch_size=args.batch_size,
        device=args.device,
        hflip=True,
        tf32=args.tf32 and args.device.startswith("cuda"),
    )
    if args.data == "digits":
        base.update(data_root=None, image_size=args.image_size or 16)
    elif args.image_size:
        base["image_size"] = args.image_size
    splits = Splits.from_config(TrainConfig.from_dict(base))
    variants = {
        "reference": dict(precision="fp32"),
        "ours-fp32": dict(precision="fp32", compile="off"),
        "ours-fp32-compiled": dict(precision="fp32", compile="on"),
        # eager bf16: what a CPU run with --precision bf16 does (torch.compile is off there)
        "ours-bf16": dict(precision="bf16", compile="off"),
        "ours": dict(precision="bf16", compile="on"),
    }
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in variants]:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose among {', '.join(variants)}")
    cuda = args.device.startswith("cuda")
    if cuda:
        # The trainer's own settings, before the first variant: the reference runs under
        # them too, so the speed-ups measure pipelines, not library defaults.
        configure_cuda(resolve_execution(TrainConfig.from_dict(base), torch.device(args.device)))
    dev = device_name(args.device)
    record = {
        "benchmark": "train-throughput",
        "date": date.today().isoformat(),
        "device": dev,
        "environment": gpu_environment() if cuda else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {
            **base,
            "image_size": splits.spec.height,
            "channels": splits.spec.channels,
            "steps": args.steps,
            "warmup": args.warmup,
            "workers": args.workers,
        },
        "complete": False,
        "results": {},
    }
    results = record["results"]
    path = Path(args.out) / f"train-{'gpu' if cuda else 'cpu'}.json"
    for name in names:
        cfg = TrainConfig.from_dict({**base, **variants[name]})
        log(f"timing {name} ...")
        try:
            if name == "reference":
                results[name] = time_reference(cfg, splits, args.steps, args.warmup,
                                               args.workers)
            else:
                results[name] = time_ours(cfg, splits, args.steps, args.warmup)
        except Exception as exc:  # recorded; the other variants still run
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                             "images_per_s": None}
            log(f"  {name} failed: {results[name]['error']}")
        compiled = "off" if name == "reference" else cfg.compile
        results[name]["settings"] = {"precision": cfg.precision, "compile": compiled,
                                     **backend_settings()}
        ref = results.get("reference", {}).get("images_per_s")
        for r in results.values():
            r["speedup_vs_reference"] = r["images_per_s"] / ref if ref and \
                r["images_per_s"] else None
        write_json(path, record)
        append_jsonl(args.jsonl, {"bench": "train", "device": dev, "variant": name,
                                  **results[name]})
        if results[name]["images_per_s"]:
            log(f"  {results[name]['images_per_s']:.1f} images/s")
    record["complete"] = True
    write_json(path, record)
    print(
        f"\n{dev}, {args.depth} width {args.width}, batch {args.batch_size} ID + "
        f"{args.batch_size} OE, {splits.spec.height}x{splits.spec.width}x{splits.spec.channels}"
    )
    print(markdown(record))
    return 1 if any(r["images_per_s"] is None for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
