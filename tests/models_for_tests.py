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


def tuned_pebal(segmenter: nn.Module, num_classes: int, seed: int = 1) -> nn.Module:
    """A PEBAL model built on ``segmenter`` (``rpl.methods.get("pebal").build``) with every weight moved
    away from the base, as training would move them; in eval mode."""
    from rpl.config import load_config
    from rpl.methods import get

    model = get("pebal").build(segmenter, load_config(None, ["method=pebal", f"segmenter.num_classes={num_classes}"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_pebal_checkpoint(path, segmenter: nn.Module, num_classes: int, extra: dict) -> "object":
    """Write a PEBAL checkpoint fine-tuned (see :func:`tuned_pebal`) from ``segmenter``, which stays untouched;
    ``extra`` should record the segmenter (``extra.segmenter``) for ``rpl.from_checkpoint``."""
    import copy

    from rpl.checkpoint import fingerprint
    from rpl.methods import get

    base = copy.deepcopy(segmenter)
    base_fingerprint = fingerprint(base)
    return get("pebal").save(path, tuned_pebal(base, num_classes), extra=extra, base_fingerprint=base_fingerprint)
