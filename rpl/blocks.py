"""The trainable add-on: residual block R (ASPP -> bottleneck -> upsample -> 1x1) and projection head.

Layout as in the RPL reference (docs/method.md, section 2); every width is configurable so that a small
segmenter gets a small block. The block reads the deep feature ``f`` and returns the residual
``r`` that is added to the frozen head's input ``d``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BlockConfig:
    """Hyper-parameters of the add-on (saved in checkpoints, so it stays plain data)."""

    width: int = 256  # channels of each ASPP branch and of the bottleneck (reference 256)
    rates: Sequence[int] | None = None  # ASPP dilations; None -> (12, 24, 36) at stride <= 8, else (6, 12, 18)
    projection_dim: int | None = None  # CoroCL embedding size; None -> channels of the head input (reference)
    zero_init: bool = False  # zero last 1x1 so that z == z0 at step 0 (reference: Kaiming normal)
    init_from_aspp: bool = True  # copy the segmenter's own ASPP when its shapes match (reference)
    align_corners: bool = True  # bilinear upsampling of the block's output (reference: True)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rates"] = list(self.rates) if self.rates is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "BlockConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown block option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def default_rates(stride: int) -> tuple[int, int, int]:
    """ASPP dilations of DeepLab for a feature at this output stride."""
    return (12, 24, 36) if stride <= 8 else (6, 12, 18)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PooledBatchNorm(nn.BatchNorm2d):
    """BatchNorm of the pooled (1x1) branch that also trains on a batch of one image.

    After global pooling each channel has one value per image, so batch statistics need two images.
    With one, this layer normalises with its running statistics (as in eval) and leaves them
    unchanged; with two or more it is a plain ``BatchNorm2d``. Same parameters and buffers as
    ``BatchNorm2d``, so checkpoints load as before and eval-mode outputs are identical.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ImagePooling(nn.Module):
    """Global-context branch of ASPP: pool, 1x1 conv-BN-ReLU, broadcast back (batch-1 safe, see PooledBatchNorm)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), PooledBatchNorm(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling; concat order (pooling, 1x1, dilated...) as the reference."""

    def __init__(self, cin: int, width: int, rates: Sequence[int]):
        super().__init__()
        self.pooling = ImagePooling(cin, width)
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, width, 1)] + [_conv_bn_relu(cin, width, 3, r) for r in rates]
        )

    @property
    def out_channels(self) -> int:
        return self.pooling.conv[0].out_channels * (1 + len(self.branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pooling(x)] + [b(x) for b in self.branches], dim=1)


class ResidualBlock(nn.Module):
    """``f -> ASPP -> 1x1 bottleneck -> upsample to d -> 1x1 -> r`` (and the hidden map for CoroCL)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int], width: int = 256,
                 zero_init: bool = False, align_corners: bool = True):
        super().__init__()
        self.aspp = ASPP(in_channels, width, rates)
        self.bottleneck = nn.Conv2d(self.aspp.out_channels, width, 1, bias=False)
        self.residual = nn.Conv2d(width, out_channels, 1, bias=False)
        self.align_corners = align_corners
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init:
            nn.init.zeros_(self.residual.weight)

    def forward(self, f: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bottleneck(self.aspp(f))
        if tuple(hidden.shape[-2:]) != tuple(size):
            hidden = F.interpolate(hidden, size=tuple(size), mode="bilinear", align_corners=self.align_corners)
        return self.residual(hidden), hidden


class ProjectionHead(nn.Module):
    """1x1 conv to the CoroCL embedding space, L2-normalised over channels."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 1, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(hidden).float(), dim=1)


class RPLAddon(nn.Module):
    """Everything that trains: the residual block and the projection head.

    Kept as one module so that a trainer can put exactly this (and nothing frozen) inside DDP.
    """

    def __init__(self, feature_channels: int, head_channels: int, stride: int, config: BlockConfig | None = None):
        super().__init__()
        self.config = config or BlockConfig()
        rates = tuple(self.config.rates) if self.config.rates is not None else default_rates(stride)
        self.feature_channels, self.head_channels, self.stride = feature_channels, head_channels, stride
        self.block = ResidualBlock(feature_channels, head_channels, rates, self.config.width,
                                   self.config.zero_init, self.config.align_corners)
        self.projection = ProjectionHead(self.config.width, self.config.projection_dim or head_channels)

    def forward(self, f: torch.Tensor, size: Sequence[int], with_embedding: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r, hidden = self.block(f, size)
        return r, (self.projection(hidden) if with_embedding else None)

    def init_from_aspp(self, aspp: nn.Module, bottleneck: nn.Module | None = None) -> bool:
        """Copy a pretrained ASPP (+ 1x1 bottleneck) into the block when every shape matches.

        Understands this package's ``ASPP``, torchvision's DeepLabV3 ASPP and NVIDIA's layout
        (``img_conv`` + ``features``, as in the paper's DeepLabv3+ WideResNet38). Returns whether it copied.
        """
        ours = self.block
        if isinstance(aspp, ASPP):
            src = {"aspp." + k: v for k, v in aspp.state_dict().items()}
            if bottleneck is not None:
                src.update({"bottleneck." + k: v for k, v in bottleneck.state_dict().items()})
        else:
            src = _torchvision_aspp_state(aspp) or _image_pooling_aspp_state(aspp, bottleneck)
            if src is None:
                return False
        target = ours.state_dict()
        if any(k not in target or target[k].shape != v.shape for k, v in src.items()):
            return False
        ours.load_state_dict(src, strict=False)
        return True


def _torchvision_aspp_state(aspp: nn.Module) -> dict[str, torch.Tensor] | None:
    """Map torchvision's ``ASPP`` (branches 1x1, dilated..., pooling; then ``project``) to our keys."""
    convs = getattr(aspp, "convs", None)
    project = getattr(aspp, "project", None)
    if convs is None or project is None or len(convs) < 3:
        return None
    state: dict[str, torch.Tensor] = {}

    def take(prefix: str, conv: nn.Module, bn: nn.Module) -> None:
        state[prefix + ".0.weight"] = conv.weight
        for name, t in bn.state_dict().items():
            state[f"{prefix}.1.{name}"] = t

    take("aspp.branches.0", convs[0][0], convs[0][1])
    for i, branch in enumerate(convs[1:-1], start=1):
        take(f"aspp.branches.{i}", branch[0], branch[1])
    pool = convs[-1]  # ASPPPooling: (AdaptiveAvgPool2d, conv, BN, ReLU)
    take("aspp.pooling.conv", pool[1], pool[2])
    # torchvision concatenates (1x1, dilated..., pooling); ours puts pooling first: rotate the input blocks.
    w = project[0].weight
    width = w.shape[1] // len(convs)
    state["bottleneck.weight"] = torch.cat([w[:, -width:], w[:, :-width]], dim=1)
    return {k: v.detach().clone() for k, v in state.items()}


def _image_pooling_aspp_state(aspp: nn.Module, bottleneck: nn.Module | None) -> dict[str, torch.Tensor] | None:
    """Map NVIDIA's ASPP (``img_conv``, ``features[i]``; same concat order as ours) + ``bot_aspp`` to our keys."""
    img_conv, features = getattr(aspp, "img_conv", None), getattr(aspp, "features", None)
    if img_conv is None or features is None:
        return None
    state = {f"aspp.pooling.conv.{k}": v for k, v in img_conv.state_dict().items()}
    for i, branch in enumerate(features):
        state.update({f"aspp.branches.{i}.{k}": v for k, v in branch.state_dict().items()})
    if bottleneck is not None:
        state.update({f"bottleneck.{k}": v for k, v in bottleneck.state_dict().items()})
    return {k: v.detach().clone() for k, v in state.items()}
