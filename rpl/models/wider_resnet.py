"""The paper's segmenter: DeepLabv3+ on a WiderResNet-38 (A2 variant), as published by NVIDIA.

Meta-OoD, PEBAL and RPL all start from NVIDIA's Cityscapes checkpoint ``cityscapes_best.pth``
(semantic-segmentation, sdcnet branch). :class:`DeepWV3Plus` has exactly that checkpoint's
state-dict keys and shapes, so the file loads with ``load_state_dict(strict=True)``; the
``module.`` prefixes of its DataParallel training and the loss weights it also stores
(``criterion.*``, not part of the network) are removed on load.

Layout (input H x W, channels after each stage)::

    mod1          3x3 conv 3 -> 64                                  stride 1
    pool2, mod2   3x3/2 max-pool, 3 pre-activation blocks -> 128    stride 2  (low-level map m2)
    pool3, mod3   3x3/2 max-pool, 3 blocks -> 256                   stride 4
    mod4          6 blocks -> 512, the first one strided            stride 8
    mod5          3 blocks -> 1024, dilation 2
    mod6          1 bottleneck block -> 2048, dilation 4, dropout 0.3
    mod7          1 bottleneck block -> 4096, dilation 4, dropout 0.5  (deepest map: ASPP and RPL read it)
    aspp          image pooling, 1x1, 3x3 at rates 12/24/36; 256 each, concat 1280
    bot_aspp      1x1 1280 -> 256, bilinearly upsampled to m2's size
    bot_fine      1x1 on m2, 128 -> 48
    final         on cat[bot_fine, bot_aspp] (304 ch): 3x3 conv-BN-ReLU x2, 1x1 -> K (no bias)
    logits        bilinear upsampling to H x W

Every bilinear resize uses ``align_corners=True``, as the published network does. RPL attaches
with ``feature="mod7"`` and ``head="final"`` (see ``rpl.presets``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# (stage, blocks, channels, stride of the first block, dilation, dropout before the last conv)
# Two channel values: two 3x3 convs; three: a 1x1-3x3-1x1 bottleneck.
WRN38_A2_STAGES: tuple[tuple[str, int, tuple[int, ...], int, int, float], ...] = (
    ("mod2", 3, (128, 128), 1, 1, 0.0),
    ("mod3", 3, (256, 256), 1, 1, 0.0),
    ("mod4", 6, (512, 512), 2, 1, 0.0),
    ("mod5", 3, (512, 1024), 1, 2, 0.0),
    ("mod6", 1, (512, 1024, 2048), 1, 4, 0.3),
    ("mod7", 1, (1024, 2048, 4096), 1, 4, 0.5),
)
ASPP_RATES = (12, 24, 36)  # DeepLab's (6, 12, 18) doubled for output stride 8


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PreActivationBlock(nn.Module):
    """Identity-mapping residual block: ``x + convs(relu(bn(x)))``.

    When the width or the stride changes, the shortcut is a 1x1 ``proj_conv`` of the *activated*
    input instead of ``x`` itself. Dropout (``Dropout2d``, off in eval) sits before the last conv.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must hold two (3x3-3x3) or three (bottleneck) widths, got {channels}")
        self.bn1 = _bn_relu(in_channels)
        if len(channels) == 2:
            mid, out = channels
            layers = [("conv1", nn.Conv2d(in_channels, mid, 3, stride, dilation, dilation, bias=False)),
                      ("bn2", _bn_relu(mid)),
                      ("conv2", nn.Conv2d(mid, out, 3, 1, dilation, dilation, bias=False))]
        else:
            reduce, mid, out = channels
            layers = [("conv1", nn.Conv2d(in_channels, reduce, 1, stride, bias=False)),
                      ("bn2", _bn_relu(reduce)),
                      ("conv2", nn.Conv2d(reduce, mid, 3, 1, dilation, dilation, bias=False)),
                      ("bn3", _bn_relu(mid)),
                      ("conv3", nn.Conv2d(mid, out, 1, bias=False))]
        if dropout:
            layers.insert(len(layers) - 1, ("dropout", nn.Dropout2d(dropout)))
        self.convs = nn.Sequential(OrderedDict(layers))
        needs_projection = stride != 1 or in_channels != out
        self.proj_conv = nn.Conv2d(in_channels, out, 1, stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.bn1(x)
        shortcut = x if self.proj_conv is None else self.proj_conv(activated)
        return self.convs(activated) + shortcut


class ImagePoolingASPP(nn.Module):
    """DeepLab ASPP in NVIDIA's layout: ``img_conv`` on the pooled map, then ``features`` (1x1, 3x3 rates).

    Output order: image pooling first, then the 1x1 and the dilated branches.
    """

    def __init__(self, in_channels: int, width: int = 256, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        self.features = nn.ModuleList([_conv_bn_relu(in_channels, width, 1)] +
                                      [_conv_bn_relu(in_channels, width, 3, r) for r in rates])
        self.img_pooling = nn.AdaptiveAvgPool2d(1)
        self.img_conv = _conv_bn_relu(in_channels, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _upsample(self.img_conv(self.img_pooling(x)), x.shape[-2:])
        return torch.cat([pooled] + [branch(x) for branch in self.features], dim=1)


def _drop_published_extras(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-time pre-hook: accept the published file as it is.

    Removes DataParallel ``module.`` prefixes and the training loss's class weights
    (``criterion.nll_loss.weight`` in NVIDIA's file), which are not part of the network.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        while rest.startswith("module."):
            rest = rest[len("module."):]
        value = state_dict.pop(key)
        if not rest.startswith("criterion."):
            state_dict[prefix + rest] = value


class DeepWV3Plus(nn.Module):
    """DeepLabv3+ WiderResNet-38 A2, output stride 8, with the keys of NVIDIA's ``cityscapes_best.pth``."""

    deep_channels = 4096
    decoder_channels = 304  # 48 low-level + 256 ASPP

    def __init__(self, num_classes: int = 19):
        super().__init__()
        self.num_classes = num_classes
        self.mod1 = nn.Sequential(OrderedDict([("conv1", nn.Conv2d(3, 64, 3, padding=1, bias=False))]))
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.pool3 = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for name, count, channels, stride, dilation, dropout in WRN38_A2_STAGES:
            blocks = OrderedDict()
            for index in range(count):
                blocks[f"block{index + 1}"] = PreActivationBlock(in_channels, channels, stride if index == 0 else 1,
                                                                 dilation, dropout)
                in_channels = channels[-1]
            self.add_module(name, nn.Sequential(blocks))
        self.aspp = ImagePoolingASPP(in_channels, 256, ASPP_RATES)
        self.bot_fine = nn.Conv2d(128, 48, 1, bias=False)
        self.bot_aspp = nn.Conv2d(5 * 256, 256, 1, bias=False)
        self.final = nn.Sequential(
            nn.Conv2d(self.decoder_channels, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1, bias=False),
        )
        self.register_load_state_dict_pre_hook(_drop_published_extras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m2 = self.mod2(self.pool2(self.mod1(x)))
        deep = self.mod7(self.mod6(self.mod5(self.mod4(self.mod3(self.pool3(m2))))))
        context = _upsample(self.bot_aspp(self.aspp(deep)), m2.shape[-2:])
        decoder = torch.cat([self.bot_fine(m2), context], dim=1)  # low-level first, as published
        return _upsample(self.final(decoder), x.shape[-2:])


def deepwv3plus(num_classes: int = 19) -> DeepWV3Plus:
    """Factory for configs and checkpoints: ``segmenter.model: "rpl.models.wider_resnet:deepwv3plus"``."""
    return DeepWV3Plus(num_classes=num_classes)
