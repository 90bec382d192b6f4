"""Pixel anomaly scores from logits, one convention: ``(B, K, H, W) -> (B, H, W)``, higher = more anomalous.

Everything is computed in float32 whatever the logits' dtype (bf16/fp16 logits under autocast
would otherwise lose the small differences that separate anomalies).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Free energy ``-logsumexp_c z_c`` (RPL's and PEBAL's anomaly score)."""
    return -torch.logsumexp(logits.float(), dim=1)


def msp(logits: torch.Tensor) -> torch.Tensor:
    """``1 - max softmax`` (Hendrycks & Gimpel)."""
    return 1.0 - torch.softmax(logits.float(), dim=1).amax(dim=1)


def maxlogit(logits: torch.Tensor) -> torch.Tensor:
    """``-max_c z_c`` (Hendrycks et al., MaxLogit)."""
    return -logits.float().amax(dim=1)


def entropy(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Softmax entropy ``-sum p log p`` (natural log, not normalised), probabilities clamped at ``eps``."""
    p = torch.softmax(logits.float(), dim=1).clamp_min(eps)
    return -(p * p.log()).sum(dim=1)


def smooth(score: torch.Tensor, kernel_size: int = 7, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur of a ``(B, H, W)`` score map (kernel 7, sigma 1 as in RPL; reflect padding)."""
    return TF.gaussian_blur(score.float().unsqueeze(1), [kernel_size, kernel_size], [sigma, sigma]).squeeze(1)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """The ``(1, 1, size, size)`` kernel of :func:`smooth` (torchvision's Gaussian blur)."""
    half = (size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, size) / sigma) ** 2)
    k1 = pdf / pdf.sum()
    return (k1[:, None] * k1[None, :]).view(1, 1, size, size)


def exportable_smooth(smoothing: tuple[int, float] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`smooth` with ``smoothing = (kernel_size, sigma)`` (None: no blur) as a reflect-padded
    convolution with a kernel built once, here: the same map, in a form the ONNX tracer exports with
    dynamic sizes (torchvision's blur builds its kernel from the input's shape, which it cannot)."""
    if not smoothing:
        return lambda score: score.float()
    kernel, pad = gaussian_kernel(int(smoothing[0]), float(smoothing[1])), int(smoothing[0]) // 2

    def blur(score: torch.Tensor) -> torch.Tensor:
        s = F.pad(score.float().unsqueeze(1), [pad, pad, pad, pad], mode="reflect")
        return F.conv2d(s, kernel.to(s.device)).squeeze(1)

    return blur


SCORES = {"energy": energy, "msp": msp, "maxlogit": maxlogit, "entropy": entropy}
