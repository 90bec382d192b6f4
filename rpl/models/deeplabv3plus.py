"""DeepLabv3+ (Chen et al. 2018) over a timm ``features_only`` backbone, laid out as RPL expects.

``backbone -> deep_feature (hook point) -> aspp -> bottleneck -> upsample -> concat low-level (48 ch)
-> final (3x3 conv-BN-ReLU x2, 1x1 -> K) -> bilinear upsample``. The named ``deep_feature`` and
``final`` modules are where ``rpl.wrap`` attaches, as in the reference (deepest map read, decoder
concat perturbed). No weights are downloaded: ``pretrained`` backbones need a local timm cache.
"""
from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rpl.blocks import ASPP, default_rates


class DeepLabV3Plus(nn.Module):
    def __init__(self, backbone: str = "resnet18", num_classes: int = 19, output_stride: int = 16,
                 aspp_width: int = 256, low_level_width: int = 48, decoder_width: int = 256,
                 pretrained: bool = False, align_corners: bool = False):
        super().__init__()
        self.config = dict(backbone=backbone, num_classes=num_classes, output_stride=output_stride,
                           aspp_width=aspp_width, low_level_width=low_level_width,
                           decoder_width=decoder_width, align_corners=align_corners)
        try:
            self.backbone = timm.create_model(backbone, features_only=True, pretrained=pretrained,
                                              output_stride=output_stride)
        except TypeError:  # backbones without dilation support keep their native stride
            self.backbone = timm.create_model(backbone, features_only=True, pretrained=pretrained)
        info = self.backbone.feature_info
        reductions, channels = info.reduction(), info.channels()
        # low-level feature: the last map at stride 4 (or the finest one available)
        self.low_index = max((i for i, r in enumerate(reductions) if r <= 4), default=0)
        deep_stride = reductions[-1]
        self.deep_feature = nn.Identity()  # hook point: the map the ASPP (and RPL's block) reads
        self.aspp = ASPP(channels[-1], aspp_width, default_rates(deep_stride))
        self.bottleneck = nn.Conv2d(self.aspp.out_channels, aspp_width, 1, bias=False)
        self.low_level = nn.Sequential(nn.Conv2d(channels[self.low_index], low_level_width, 1, bias=False),
                                       nn.BatchNorm2d(low_level_width), nn.ReLU(inplace=True))
        cat = aspp_width + low_level_width
        self.final = nn.Sequential(
            nn.Conv2d(cat, decoder_width, 3, padding=1, bias=False), nn.BatchNorm2d(decoder_width), nn.ReLU(inplace=True),
            nn.Conv2d(decoder_width, decoder_width, 3, padding=1, bias=False), nn.BatchNorm2d(decoder_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(decoder_width, num_classes, 1),
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        deep = self.deep_feature(feats[-1])
        y = self.bottleneck(self.aspp(deep))
        low = self.low_level(feats[self.low_index])
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        logits = self.final(torch.cat([low, y], dim=1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)


def build_model(name: str = "deeplabv3plus", **kwargs: Any) -> nn.Module:
    """Build a segmenter from a checkpoint's recorded spec (``name`` + constructor arguments)."""
    if name != "deeplabv3plus":
        raise ValueError(f"unknown model {name!r}; known: deeplabv3plus")
    return DeepLabV3Plus(**kwargs)
