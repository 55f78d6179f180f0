"""The founding notebook's networks, and their relatives, in torch only (docs:
guide/parameters.md, "More on some parameters").

ResNet-50 without BatchNorm with the notebook's module names, shapes and maths (its
``CustomResNet50`` state_dict loads with strict=True); ``skip=False`` makes each block a plain
stack of convs, the network whose early gradients vanish. The relatives (ResNet-18/34/101/152,
VGG-19) show how depth, block type and normalisation change gradient flow. Table-driven:
one row of ``VARIANTS`` per model (family, block, stages, depth), as in timm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import INITS, no_skip_error


def _bn(planes: int, batch_norm: bool) -> nn.BatchNorm2d | None:
    return nn.BatchNorm2d(planes) if batch_norm else None


def _norm(bn: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """An optional BatchNorm: None leaves ``x`` untouched (the notebook's maths)."""
    return x if bn is None else bn(x)


def _downsample(in_planes: int, out_planes: int, stride: int, batch_norm: bool) -> nn.Module:
    # Without BN a bare conv named `downsample`, as in the notebook; with BN torchvision's
    # `downsample.0` (conv) and `downsample.1` (BN).
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_planes)) if batch_norm else conv


class BasicBlock(nn.Module):
    """3x3 -> 3x3 convs (ResNet-18/34), ReLU after the first; the residual add (if any)
    before the last ReLU."""

    expansion = 1
    last_conv = "conv2"  # the block's last conv: where default_layers probes a stage's end

    def __init__(self, in_planes: int, planes: int, stride: int = 1, skip: bool = False,
                 batch_norm: bool = False):
        super().__init__()
        out_planes = planes * self.expansion
        self.skip = skip
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = _bn(planes, batch_norm)
        self.conv2 = nn.Conv2d(planes, out_planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = _bn(out_planes, batch_norm)
        self.relu = nn.ReLU(inplace=False)  # not in-place: see Bottleneck
        # Created whenever the shape changes, even with skip off (unused then), as Bottleneck.
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = _downsample(in_planes, out_planes, stride, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(_norm(self.bn1, self.conv1(x)))
        out = _norm(self.bn2, self.conv2(out))
        if self.skip:
            identity = x if self.downsample is None else self.downsample(x)
            out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convs, ReLU after each; the residual add (if any) before the last ReLU."""

    expansion = 4
    last_conv = "conv3"

    def __init__(self, in_planes: int, planes: int, stride: int = 1, skip: bool = False,
                 batch_norm: bool = False):
        super().__init__()
        out_planes = planes * self.expansion
        self.skip = skip
        # BN modules hold no random draws, so the convs' init RNG order is the notebook's
        # with BN on or off; with it off they are None and not modules at all.
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = _bn(planes, batch_norm)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(planes, batch_norm)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = _bn(out_planes, batch_norm)
        # Not in-place: an in-place ReLU would overwrite a probed conv's output and break
        # the gradient hooks (and the notebook used inplace=False).
        self.relu = nn.ReLU(inplace=False)
        # Created whenever the shape changes, even with skip off, exactly as the notebook
        # does: the parameter set (and the RNG draws at init) must match its class.
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = _downsample(in_planes, out_planes, stride, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(_norm(self.bn1, self.conv1(x)))
        out = self.relu(_norm(self.bn2, self.conv2(out)))
        out = _norm(self.bn3, self.conv3(out))
        if self.skip:
            identity = x if self.downsample is None else self.downsample(x)
            out = out + identity
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]


def make_blocks(block: Block, in_planes: int, planes: int, depth: int,
                stride: int, skip: bool, batch_norm: bool = False) -> tuple[nn.Sequential, int]:
    """One stage: the first block changes stride/width, the rest keep it."""
    blocks = [block(in_planes, planes, stride, skip, batch_norm)]
    in_planes = planes * block.expansion
    blocks += [block(in_planes, planes, 1, skip, batch_norm) for _ in range(1, depth)]
    return nn.Sequential(*blocks), in_planes


class ResNet(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max-pool), four stages, global average pool, linear head."""

    def __init__(self, block: Block, depths: list[int], skip: bool = False,
                 num_classes: int = 10, batch_norm: bool = False):
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(64, batch_norm)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        width = 64
        self.layer1, width = make_blocks(block, width, 64, depths[0], 1, skip, batch_norm)
        self.layer2, width = make_blocks(block, width, 128, depths[1], 2, skip, batch_norm)
        self.layer3, width = make_blocks(block, width, 256, depths[2], 2, skip, batch_norm)
        self.layer4, width = make_blocks(block, width, 512, depths[3], 2, skip, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No ReLU after the stem conv: the notebook has none (kept with BN, see the docstring).
        x = self.maxpool(_norm(self.bn1, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# torchvision's configuration "E": conv widths, "M" = 2x2/2 max-pool.
VGG19_CONFIG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def make_features(cfg: list[int | str], batch_norm: bool) -> nn.Sequential:
    """torchvision's ``features``: conv 3x3 (+ BN) + ReLU per width, max-pool per "M"."""
    layers: list[nn.Module] = []
    in_planes = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_planes, int(v), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU(inplace=False))  # not in-place: see Bottleneck
        in_planes = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision's VGG with ``num_classes`` outputs and no in-place ReLU.

    The 7x7 adaptive pool makes the 4096-wide classifier work at any image size >= 32 px
    (at 32 px the 1x1 map is repeated 49 times). No skip connections to switch.
    """

    def __init__(self, cfg: list[int | str], skip: bool = False, num_classes: int = 10,
                 batch_norm: bool = False, name: str = "vgg"):
        super().__init__()
        if skip:
            raise no_skip_error(name)
        self.skip = False
        self.features = make_features(cfg, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=False), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=False), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --- the variants: one row each --------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One network of the registry: how to build it, and what the sweep plots it at."""

    family: str                  # "resnet" or "vgg"
    block: Block | None          # a ResNet's block; None for VGG
    stages: tuple                # blocks per stage (ResNet), or conv widths and "M"s (VGG)
    depth: int                   # weight layers, as in the name: the sweep's x axis


# config.MODELS lists the same names, for torch-free validation (a test keeps them equal).
VARIANTS: dict[str, Variant] = {
    #              family    block       stages                       depth
    "resnet18":  Variant("resnet", BasicBlock, (2, 2, 2, 2), 18),
    "resnet34":  Variant("resnet", BasicBlock, (3, 4, 6, 3), 34),
    "resnet50":  Variant("resnet", Bottleneck, (3, 4, 6, 3), 50),   # the notebook's
    "resnet101": Variant("resnet", Bottleneck, (3, 4, 23, 3), 101),
    "resnet152": Variant("resnet", Bottleneck, (3, 8, 36, 3), 152),
    "vgg19":     Variant("vgg", None, tuple(VGG19_CONFIG), 19),      # no skip connections
}
MODELS = tuple(VARIANTS)


def _variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"model: {name!r} is not allowed; allowed: {', '.join(VARIANTS)}") from None


def init_weights(model: nn.Module, init: str) -> nn.Module:
    """``pytorch``: leave PyTorch's default init. ``kaiming``: torchvision ResNet's, i.e.
    convs kaiming_normal_(fan_out, relu) (a conv bias, VGG's, zeroed as torchvision's VGG
    does), BN weight 1 and bias 0, linear layers left at PyTorch's default."""
    if init not in INITS:
        raise ValueError(f"init: {init!r} is not allowed; allowed: {', '.join(INITS)}")
    if init == "kaiming":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def build_model(name: str, skip: bool = False, num_classes: int = 10, batch_norm: bool = False,
                init: str = "pytorch") -> nn.Module:
    """``build_model("resnet50", skip=False)`` is the notebook's network, freshly initialised."""
    v = _variant(name)
    if v.family == "vgg":
        model = VGG(list(v.stages), skip=skip, num_classes=num_classes, batch_norm=batch_norm,
                    name=name)
    else:
        model = ResNet(v.block, list(v.stages), skip=skip, num_classes=num_classes,
                       batch_norm=batch_norm)
    return init_weights(model, init)


# --- probe points ------------------------------------------------------------------------------
# VGG-19's defaults as conv ordinals (0-15): conv1_1 (the stem), conv1_2, conv3_1 and conv4_4
# (the last conv of the fourth of five blocks), like resnet50's stem, first block, second
# stage and end of the third stage.
_VGG_DEFAULT_CONVS = (0, 1, 4, 11)


def default_layers(name: str, batch_norm: bool = False) -> tuple[str, ...]:
    """Five probe points from the stem to the head, valid for ``name`` with skip on or off.

    resnet50: the notebook's ``conv1, layer1.0.conv1, layer2.0.conv2, layer3.5.conv3, fc``;
    the other ResNets the same places (the last conv of layer3's last block). VGG's
    ``features`` indices move with ``batch_norm`` (conv, BN, ReLU per width).
    """
    v = _variant(name)
    if v.family == "resnet":
        return ("conv1", "layer1.0.conv1", "layer2.0.conv2",
                f"layer3.{v.stages[2] - 1}.{v.block.last_conv}", "fc")
    per_conv = 3 if batch_norm else 2
    convs, index = [], 0
    for width in v.stages:
        if width != "M":
            convs.append(index)
        index += 1 if width == "M" else per_conv
    return tuple(f"features.{convs[i]}" for i in _VGG_DEFAULT_CONVS) + ("classifier.6",)


def all_layers(model: nn.Module, image_size: int = 32) -> list[str]:
    """Every Conv2d and Linear that the forward pass calls, in call order.

    Modules that never run (the downsample convs with skip off) are left out: they have no
    gradient to probe. The pass runs on the meta device (shapes only, no copy of the weights).
    """
    probed = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    called: dict[str, None] = {}
    handles = [m.register_forward_hook(lambda mod, i, o: called.setdefault(probed[mod]))
               for m in probed]
    meta = {k: torch.empty_like(v, device="meta")
            for k, v in [*model.named_parameters(), *model.named_buffers()]}
    # Eval mode: a training-mode BatchNorm refuses one value per channel (batch 1 at 1x1);
    # eval calls the same modules. Each module's own flag is restored afterwards.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            torch.func.functional_call(
                model, meta, (torch.empty(1, 3, image_size, image_size, device="meta"),))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return list(called)
