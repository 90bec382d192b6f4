"""Will an image fit? A per-image peak-memory estimate, checked before each new image size is run.

A segmenter's memory grows with the pixels it sees, and the largest tensors come last: the logits
upsampled to the input size, for both passes of a wrapped model (batch 2B), plus the score maps
computed from them. A very large image (4000x8000) used to run for minutes and then die with a raw
allocator error; ``MemoryGuard`` refuses it before its first forward with the ``--resize`` /
``--batch-size`` advice instead. The estimate:

    pixels x batch x (classes x passes x 4 bytes x 2 + BACKBONE_BYTES_PER_PIXEL)

``x 2``: the upsampled logits and one working copy (softmax / log-sum-exp of a score);
``BACKBONE_BYTES_PER_PIXEL`` covers the backbone's and decoder's activations per input pixel
(fp32; half under autocast is not assumed, so the estimate errs high). On the shipped SynthStreets
segmenter (19 classes, wrapped) it gives 560 bytes per pixel; the measured peak-RSS growth of a
forward plus every score on CPU was 505 at 512x1024 and 417 at 1024x2048 bytes per pixel.
The budget is the free device memory (CUDA) or ``MemAvailable`` (CPU) unless a smaller one is given
(``rpl-eval --memory-budget GB``; tests use it to exercise the refusal without a real OOM).
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from rpl.errors import RPLInputError

BACKBONE_BYTES_PER_PIXEL = 256
GB = 1024 ** 3


def estimate_peak_bytes(height: int, width: int, batch: int, num_classes: int, passes: int = 2) -> int:
    """Bytes one forward (and its scores) of ``batch`` images of ``height`` x ``width`` needs at its peak."""
    per_pixel = num_classes * passes * 4 * 2 + BACKBONE_BYTES_PER_PIXEL
    return int(height * width * batch * per_pixel)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now (None when it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def fitting_size(height: int, width: int, need: int, budget: int) -> tuple[int, int]:
    """A smaller size of the same aspect ratio (multiples of 32) whose estimate fits ``budget``."""
    scale = math.sqrt(0.8 * budget / need)
    return max(32, int(height * scale) // 32 * 32), max(32, int(width * scale) // 32 * 32)


class MemoryGuard:
    """Checks each new (batch, height, width) against the budget before the model sees it."""

    def __init__(self, model: nn.Module, device: torch.device, budget_gb: float | None = None,
                 wrapped: bool = True):
        self.model, self.device, self.passes = model, device, 2 if wrapped else 1
        self.budget_gb = budget_gb
        self.num_classes: int | None = None
        self.checked: set[tuple[int, int, int]] = set()

    def _classes(self, x: torch.Tensor) -> int:
        """The number of classes, read without a forward: the output channels of the head's (or the model's)
        last convolution, the classifier in every family we know; 19 (Cityscapes) when there is none."""
        if self.num_classes is None:
            from rpl.wrapping import HookedSegmenter

            modules = ([m for block in self.model._chain for m in block.modules()]
                       if isinstance(self.model, HookedSegmenter) else list(self.model.modules()))
            convs = [m for m in modules if isinstance(m, nn.Conv2d)]
            self.num_classes = int(convs[-1].out_channels) if convs else 19
        return self.num_classes

    def check(self, x: torch.Tensor, dataset: str, first_path: Any) -> None:
        batch, _, height, width = x.shape
        if (batch, height, width) in self.checked:
            return
        budget = int(self.budget_gb * GB) if self.budget_gb is not None else available_bytes(self.device)
        if budget is None:
            return
        need = estimate_peak_bytes(height, width, batch, self._classes(x), self.passes)
        if need > budget:
            source = "--memory-budget" if self.budget_gb is not None else f"free memory on {self.device}"
            h, w = fitting_size(height, width, need, budget)
            batch_hint = " or --batch-size 1" if batch > 1 else ""
            raise RPLInputError(
                f"Dataset {dataset!r}: image {first_path} is {width}x{height} (WxH) at the network; one forward of "
                f"{batch} such image(s) needs about {need / GB:.1f} GB ({self.num_classes} classes x {self.passes} "
                f"pass(es) at full resolution plus the backbone), more than the {budget / GB:.1f} GB available "
                f"({source}). Pass --resize {h}x{w} (or smaller){batch_hint}; nothing was run on it.")
        self.checked.add((batch, height, width))
