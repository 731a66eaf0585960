"""ResNet encoders with a SimCLR projection head, and the uint8 → norm scoring wrapper.

The architecture is described by a plain dict (`Architecture.to_json()`), stored in every
checkpoint and artifact, so `build_model(**arch)` rebuilds the exact network anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Blocks per stage. "resnet10" is the shallow variant for CPU-sized runs.
DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet10": (1, 1, 1, 1)}


@dataclass
class Architecture:
    depth: str = "resnet18"
    width: int = 64  # channels of the first stage; 64 is the standard ResNet-18
    stem: str = "cifar"  # "cifar": 3x3 stride-1 conv, no max-pool; "imagenet": 7x7/2 + max-pool
    in_channels: int = 3
    proj_dim: int = 128
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def to_json(self) -> dict:
        return asdict(self)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, depth: str, width: int, stem: str, in_channels: int):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"unknown depth {depth!r}; choose from {sorted(DEPTHS)}")
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            raise ValueError(f"unknown stem {stem!r}; choose 'cifar' or 'imagenet'")
        layers, cin = [], width
        for i, n in enumerate(DEPTHS[depth]):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class OECLNet(nn.Module):
    """Normalisation → ResNet → projection head (Linear–BN–ReLU–Linear). Input: float in [0, 1]."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        c = arch.in_channels
        if len(arch.mean) != c or len(arch.std) != c:
            raise ValueError(f"mean/std need {c} values for {c} input channels")
        self.register_buffer("mean", torch.tensor(arch.mean).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(arch.std).view(1, c, 1, 1))
        self.backbone = ResNet(arch.depth, arch.width, arch.stem, c)
        d = self.backbone.out_dim
        self.head = nn.Sequential(
            nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, arch.proj_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((x - self.mean) / self.std))


def build_model(**arch) -> OECLNet:
    return OECLNet(Architecture(**arch))


class ScoreModel(nn.Module):
    """What is exported and served: uint8 NCHW in, (norm, embedding) out, normalisation inside."""

    def __init__(self, net: OECLNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net(images.float() / 255.0).float()
        return torch.linalg.vector_norm(z, dim=1), z
