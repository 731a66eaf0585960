"""The one training configuration: a dataclass whose fields are also the CLI options.

Defaults follow the paper's reference settings (ResNet-18, SGD lr 0.1, τ = 0.5, α = 1,
α off for the first 5% of training, batch 64 ID + 64 OE); `--config FILE` (TOML or YAML)
overrides them and explicit CLI options override the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Every ID / OE data source by name (the readers in oecl_train.data.readers); kept here, free of
# heavy imports, so `--help` lists exactly the sources the readers accept.
DATA_SOURCES = ("digits", "mnist", "cifar10", "cifar100", "folder", "npy", "photos")
DEFAULT_STEPS = 2000  # a run's length without --steps or --epochs
# The self-made near-OE shares of the external OE batch, in the order the trainer fills them.
NEAR_OE_SHARES = ("oe_overlay", "oe_jigsaw", "oe_cutpaste")


def _opt(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # run
    name: str = _opt("", "Run name; the run directory is OUT_DIR/NAME (default: derived).")
    out_dir: str = _opt("runs", "Directory that holds run directories.")
    seed: int = _opt(0, "Seed for splits, sampling, augmentation and initialisation.")
    # data
    data: str = _opt("digits", f"ID source: {', '.join(DATA_SOURCES)}.")
    data_root: str | None = _opt(
        None, "Directory of the ID data (all sources but digits and photos)."
    )
    id_class: str = _opt(
        "0",
        "The class that is ID (one-vs-rest) or held out (leave-one-out), by name (a folder "
        "name for --data folder, e.g. good). A number is an index into the sorted training "
        "classes only when no class name is itself a number.",
    )
    protocol: str = _opt("one-vs-rest", "one-vs-rest or leave-one-out.")
    oe: str = _opt(
        "photos",
        "OE: none (SimCLR), self (rotations), photos, any source name, or auto (short probes "
        "of candidate mixes judged on validation; only the chosen one trains to full length).",
    )
    oe_root: str | None = _opt(None, "Directory of the OE data, for an on-disk OE source.")
    oe_overlay: float = _opt(
        0.0,
        "Share of each step's OE images made by overlaying two ID images, one shifted (a "
        "self-made near-OE for light-on-dark images); the rest come from --oe.",
    )
    oe_jigsaw: float = _opt(
        0.0,
        "Share of each step's OE images made by putting an ID image's four quadrants in "
        "another order (a self-made near-OE); the rest come from --oe and --oe-overlay.",
    )
    oe_cutpaste: float = _opt(
        0.0,
        "Share of each step's OE images made by CutPaste: a patch (or a thin turned scar) of "
        "an ID image pasted elsewhere in it (a self-made near-OE); the rest come from --oe.",
    )
    oe_far: str = _opt(
        "photos",
        "With --oe auto: the far OE source of the candidates (photos, or any source name with "
        "--oe-root).",
    )
    oe_probe_steps: int | None = _opt(
        None,
        "With --oe auto: steps of each candidate's first probe (default: a twelfth of the "
        "run); the best two are continued to four times that and judged again.",
    )
    val_ood: str | None = _opt(
        None,
        "A folder of known anomalies (one sub-folder per kind) that --oe auto and --select "
        "judge on (default: other classes' training images, else held-out shifts).",
    )
    select: str = _opt(
        "auto",
        "Which checkpoint is the run's model: val = the one whose served score best separates "
        "the ID-validation images from the validation anomalies (--val-ood, else a labelled "
        "source's other classes' training images), judged at every checkpoint; last = the "
        "last; auto = val when such anomalies exist, else last.",
    )
    oe_auto: dict | None = _opt(
        None, "How --oe auto chose this run's OE (written by it, not an option).", cli=False
    )
    image_size: int | None = _opt(
        None, "Resize the shorter side to this and centre-crop (default: the native size)."
    )
    channels: int | None = _opt(None, "Model input channels, 1 or 3 (default: the data's).")
    val_fraction: float = _opt(0.1, "Share of ID training images held out for validation.")
    strict: bool = _opt(False, "Fail on an unreadable image instead of skipping it.")
    # model
    depth: str = _opt("resnet18", "resnet18, or resnet10 (one block per stage) for CPU runs.")
    width: int = _opt(64, "Channels of the first ResNet stage (64 = standard).")
    stem: str = _opt("cifar", "cifar (3x3, no max-pool) or imagenet (7x7/2 + max-pool).")
    proj_dim: int = _opt(128, "Projection output dimension.")
    # objective
    temperature: float = _opt(0.5, "NT-Xent temperature τ.")
    alpha: float = _opt(1.0, "Weight of the OE norm penalty.")
    alpha_warmup: float = _opt(0.05, "Share of training with α = 0 (paper: 50 of 1000 epochs).")
    loss_backend: str = _opt("auto", "Loss kernel: auto (Triton on CUDA), triton or torch.")
    # optimisation
    batch_size: int = _opt(64, "ID images per step (each gives two views).")
    oe_batch_size: int | None = _opt(None, "OE images per step (default: batch size).")
    epochs: int | None = _opt(None, "Passes over the ID training images (default: --steps).")
    steps: int | None = _opt(
        None, "Optimizer steps, the alternative to --epochs (default: 2000 without --epochs)."
    )
    optimizer: str = _opt("sgd", "sgd or lars.")
    lr: float = _opt(0.1, "Base learning rate (cosine-annealed to 0).")
    lr_warmup: float = _opt(0.0, "Share of training with a linear learning-rate warm-up.")
    momentum: float = _opt(0.9, "Momentum.")
    weight_decay: float = _opt(5e-4, "Weight decay (not applied to BatchNorm and biases).")
    lars_eta: float = _opt(0.001, "LARS trust coefficient.")
    # augmentation
    crop_scale: tuple[float, float] = _opt((0.08, 1.0), "RandomResizedCrop scale range, 'lo,hi'.")
    hflip: bool = _opt(True, "Random horizontal flips.")
    jitter: tuple[float, float, float, float] = _opt(
        (0.4, 0.4, 0.4, 0.1), "Colour jitter brightness,contrast,saturation,hue."
    )
    jitter_p: float = _opt(0.8, "Probability of colour jitter.")
    grayscale_p: float = _opt(0.2, "Probability of grayscale (RGB inputs).")
    # execution
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.")
    precision: str = _opt(
        "auto",
        "auto (bf16 on CUDA; fp32 on the CPU, where bf16 convolutions were measured slower), "
        "bf16, fp16 (CUDA, with a grad scaler) or fp32. config.json records what ran.",
    )
    compile: str = _opt(
        "auto", "torch.compile the network: auto (on for CUDA, off on the CPU), on or off."
    )
    tf32: bool = _opt(
        True,
        "On CUDA, let fp32 matmuls, convolutions and the loss kernel use TF32 tensor cores "
        "(10-bit mantissa); --no-tf32 keeps exact fp32. Recorded as false on the CPU.",
    )
    execution: dict | None = _opt(
        None,
        "What the run ran with: its device and the precision, compile and TF32 choices as "
        "resolved there (written by training, not an option).",
        cli=False,
    )
    checkpoint_every: int | None = _opt(None, "Epochs between checkpoints (default: ~10 per run).")
    checkpoint_minutes: float = _opt(
        10.0, "Also checkpoint when this many minutes passed since the last one (0: off)."
    )
    keep_checkpoints: int = _opt(2, "How many interval checkpoints to keep.")
    # distributed (torchrun)
    sync_bn: bool = _opt(False, "SyncBatchNorm across ranks under torchrun (CUDA only).")
    dist_timeout: float = _opt(
        600.0, "Seconds a collective may wait for the other ranks before the job fails."
    )

    def validate(self) -> None:
        choices = {
            "protocol": ("one-vs-rest", "leave-one-out"),
            "depth": ("resnet18", "resnet10"),
            "stem": ("cifar", "imagenet"),
            "optimizer": ("sgd", "lars"),
            "precision": ("auto", "bf16", "fp16", "fp32"),
            "compile": ("auto", "on", "off"),
            "loss_backend": ("auto", "triton", "torch"),
            "select": ("auto", "val", "last"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}")
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give --epochs or --steps, not both")
        for key in ("batch_size", "width", "proj_dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be positive")
        if not 0 < self.temperature:
            raise ValueError("--temperature must be positive")
        if not 0.0 <= self.alpha_warmup < 1.0:
            raise ValueError("--alpha-warmup must be in [0, 1)")
        if self.channels not in (None, 1, 3):
            raise ValueError("--channels must be 1 or 3")
        for key in NEAR_OE_SHARES:
            flag = f"--{key.replace('_', '-')}"
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{flag} must be in [0, 1)")
            if getattr(self, key) > 0 and self.oe in ("none", "self", "auto"):
                raise ValueError(
                    f"{flag} mixes into an external OE source, not --oe none/self/auto"
                )
        if sum(getattr(self, key) for key in NEAR_OE_SHARES) >= 1.0:
            raise ValueError("--oe-overlay, --oe-jigsaw and --oe-cutpaste must leave a share "
                             "for --oe")
        if self.oe_far in ("none", "self", "auto"):
            raise ValueError("--oe-far names an external OE source (photos or a source name)")
        if self.oe_probe_steps is not None and self.oe_probe_steps <= 0:
            raise ValueError("--oe-probe-steps must be positive")
        if not self.checkpoint_minutes >= 0:
            raise ValueError("--checkpoint-minutes must be 0 (off) or positive")
        if not self.dist_timeout > 0:
            raise ValueError("--dist-timeout must be positive")

    def run_name(self) -> str:
        return self.name or f"{self.data}-{self.protocol}-{self.id_class}-oe_{self.oe}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        kw = {}
        for k, v in d.items():
            kw[k] = tuple(v) if isinstance(v, list) else v
        if isinstance(kw.get("compile"), bool):  # config.json of older runs: a flag
            kw["compile"] = "on" if kw["compile"] else "off"
        cfg = cls(**kw)
        cfg.id_class = str(cfg.id_class)
        return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file of TrainConfig keys (dashes or underscores)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such config file")
    text = path.read_text()
    # Parsers are imported for their format only: tomllib needs Python 3.11 and yaml is
    # optional; the ImportError becomes the file's message.
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: config must be .toml, .yaml/.yml or .json")
    except (ValueError, ImportError) as e:
        raise ValueError(f"{path}: cannot parse config: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config must be a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}
