"""The founding notebook's networks, in torch only.

ResNet-50 without BatchNorm, with the notebook's module names, parameter shapes and forward
maths, so a state_dict saved from the notebook's ``CustomResNet50`` loads with strict=True.
Skip connections are a constructor switch: with ``skip=False`` each block is a plain stack
of three convs, which is the network whose early gradients vanish.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convs, ReLU after each; the residual add (if any) before the last ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, skip: bool = False):
        super().__init__()
        out_planes = planes * self.expansion
        self.skip = skip
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        # Not in-place: an in-place ReLU would overwrite a probed conv's output and break
        # the gradient hooks (and the notebook used inplace=False).
        self.relu = nn.ReLU(inplace=False)
        # Created whenever the shape changes, even with skip off, exactly as the notebook
        # does: the parameter set (and the RNG draws at init) must match its class.
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        if self.skip:
            identity = x if self.downsample is None else self.downsample(x)
            out = out + identity
        return self.relu(out)


def make_blocks(block: type[Bottleneck], in_planes: int, planes: int, depth: int,
                stride: int, skip: bool) -> tuple[nn.Sequential, int]:
    """One stage: the first block changes stride/width, the rest keep it."""
    blocks = [block(in_planes, planes, stride, skip)]
    in_planes = planes * block.expansion
    blocks += [block(in_planes, planes, 1, skip) for _ in range(1, depth)]
    return nn.Sequential(*blocks), in_planes


class ResNet(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max-pool), four stages, global average pool, linear head."""

    def __init__(self, block: type[Bottleneck], depths: list[int], skip: bool = False,
                 num_classes: int = 10):
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        width = 64
        self.layer1, width = make_blocks(block, width, 64, depths[0], 1, skip)
        self.layer2, width = make_blocks(block, width, 128, depths[1], 2, skip)
        self.layer3, width = make_blocks(block, width, 256, depths[2], 2, skip)
        self.layer4, width = make_blocks(block, width, 512, depths[3], 2, skip)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))  # no ReLU after the stem conv: the notebook has none
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(skip: bool = False, num_classes: int = 10) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], skip=skip, num_classes=num_classes)


# The registry; config.MODELS lists the same names for torch-free validation.
MODELS: dict[str, Callable[..., nn.Module]] = {"resnet50": resnet50}


def build_model(name: str, skip: bool = False, num_classes: int = 10) -> nn.Module:
    """``build_model("resnet50", skip=False)`` is the notebook's network, freshly initialised."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"model: {name!r} is not allowed; allowed: {', '.join(MODELS)}") from None
    return factory(skip=skip, num_classes=num_classes)
