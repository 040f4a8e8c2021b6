"""The classifiers the paper trains: torchvision ResNets (with the 3x3 stem of the CIFAR
papers for 32 x 32 inputs) and the WideResNet of Zagoruyko and Komodakis for CIFAR.

Weights are random: nothing is downloaded.
"""
from __future__ import annotations

import re

import torch
import torchvision
from torch import nn

STEMS = ("imagenet", "cifar")
WIDE_RESNET = re.compile(r"wideresnet(\d+)_(\d+)")


def build_model(cfg) -> nn.Module:
    """``MODEL.ARCH``: a torchvision ResNet (``resnet18`` ... ``resnet152``) or
    ``wideresnet{depth}_{width}`` (``wideresnet28_10``)."""
    arch, classes = cfg.MODEL.ARCH, cfg.MODEL.NUM_CLASSES
    wide = WIDE_RESNET.fullmatch(arch)
    if wide:
        if cfg.MODEL.ZERO_INIT_RESIDUAL:
            raise ValueError(f"MODEL.ZERO_INIT_RESIDUAL applies to torchvision ResNets, not to {arch!r} "
                             "(pre-activation blocks end in a convolution, not a BN)")
        return WideResNet(int(wide[1]), int(wide[2]), classes, cfg.MODEL.DROPOUT)
    if not arch.startswith("resnet") or not hasattr(torchvision.models, arch):
        raise ValueError(f"MODEL.ARCH {arch!r} is neither a torchvision ResNet (resnet18 ... resnet152) "
                         "nor wideresnet{depth}_{width} (wideresnet28_10)")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=classes,
                                              zero_init_residual=cfg.MODEL.ZERO_INIT_RESIDUAL)
    if cfg.MODEL.STEM not in STEMS:
        raise ValueError(f"unknown MODEL.STEM {cfg.MODEL.STEM!r}; choose one of {STEMS}")
    if cfg.MODEL.STEM == "cifar":
        # A 32 x 32 image keeps its resolution into layer1: 3x3 stride-1 convolution, no max pool.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3, plus a shortcut
    (a 1x1 convolution of the activated input when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + (self.shortcut(activated) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-width: a 3x3 stem of 16 channels, then three stages of ``(depth - 4) / 6``
    blocks with 16, 32 and 64 times ``width`` channels (strides 1, 2, 2)."""

    def __init__(self, depth: int, width: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 or depth < 10 or width < 1:
            raise ValueError(f"wideresnet{depth}_{width}: the depth must be 6n + 4 (10, 16, 22, 28, ...) "
                             "and the width at least 1")
        blocks = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        stages = []
        for stage, stride in enumerate((1, 2, 2)):
            stages.append(nn.Sequential(*[
                WideBlock(channels[stage] if index == 0 else channels[stage + 1], channels[stage + 1],
                          stride if index == 0 else 1, dropout) for index in range(blocks)]))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stages(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
