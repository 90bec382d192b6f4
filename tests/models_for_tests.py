"""Small segmenters used across tests (random init, no downloads)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ToySegmenter(nn.Module):
    """backbone (stride 4) -> neck -> head (Sequential) -> upsample; named for head=/feature= tests."""

    def __init__(self, num_classes: int = 5, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.neck = nn.Sequential(nn.Conv2d(2 * width, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Dropout2d(0.1), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.neck(self.stem(x)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class BatchMixingSegmenter(ToySegmenter):
    """Something after the head mixes the images of a batch: RPL must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y - y.mean(dim=0, keepdim=True)


class TwoHeadCallsSegmenter(ToySegmenter):
    """Runs its head twice (multi-scale): RPL must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.neck(self.stem(x))
        return self.head(feat) + self.head(feat.flip(-1)).flip(-1)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model
