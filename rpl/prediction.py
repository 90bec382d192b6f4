"""Prediction on unlabelled images: the closed-set labels and every method's anomaly map at the input size.

    predictor = Predictor(model, methods=("rpl", "energy"), preprocess=Preprocess(), device="cpu")
    result = predictor(images)       # images: (B, H, W, 3) uint8 tensor of one size
    result.prediction                # (B, H, W) uint8 argmax of the closed-set logits
    result.scores["rpl"]             # (B, H, W) float32, higher = more anomalous

The path is ``rpl-eval``'s: the same ``Preprocess``, one forward of the model, the same score
functions, and the same bilinear resize of scores and logits to the input size, so a map written
here equals what ``rpl-eval`` scores for that image. ``rpl`` is the wrapped model's blurred energy;
the post-hoc scores (``energy``, ``msp``, ``maxlogit``, ``entropy``) come from the closed-set logits
of the same forward and are not blurred (as in ``rpl-eval`` without ``--smooth-baselines``).

Score maps saved as 16-bit PNG are mapped linearly from a fixed range ``[low, high]`` to
``0..65535`` (values outside clip); the range is fixed for a whole run (see ``ScoreRange``) so that
grey levels of different images compare.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from rpl.errors import RPLInputError
from rpl.evaluation import Preprocess, resize_logits, resize_scores
from rpl.scores import SCORES
from rpl.wrapping import RPLSegmenter, extract_logits

UINT16_MAX = 65535
RANGE_MARGIN = 0.5  # an automatic range extends the first image's span by this fraction on each side


def available_methods(wrapped: bool) -> tuple[str, ...]:
    """Method names a model can score: ``rpl`` with an add-on, the post-hoc scores always."""
    return (("rpl",) if wrapped else ()) + tuple(SCORES)


def check_methods(methods: Sequence[str], wrapped: bool) -> tuple[str, ...]:
    known = available_methods(wrapped)
    out: list[str] = []
    for m in methods:
        if m not in known:
            hint = " (rpl needs a checkpoint with an add-on)" if m == "rpl" else ""
            raise RPLInputError(f"--methods: unknown method {m!r}{hint}; available: {', '.join(known)}.")
        if m not in out:
            out.append(m)
    if not out:
        raise RPLInputError(f"--methods names nothing; available: {', '.join(known)}.")
    return tuple(out)


def method_scores(methods: Sequence[str], logits: torch.Tensor, out: Any) -> dict[str, torch.Tensor]:
    """``(B, h, w)`` score map of each method from one forward (``out`` is the ``RPLOutput`` or None).

    The one place where a method name becomes a score map.
    """
    return {m: (out.anomaly if m == "rpl" else SCORES[m](logits)) for m in methods}


@dataclass
class PredictionBatch:
    prediction: torch.Tensor  # (B, H, W) uint8 closed-set class ids at the input size
    scores: dict[str, torch.Tensor]  # method -> (B, H, W) float32 at the input size
    logits_size: tuple[int, int]  # the network's output size


class Predictor:
    """One model, its preprocessing and methods: uint8 image batches in, labels and score maps out."""

    def __init__(self, model: nn.Module, methods: Sequence[str] = ("rpl",), preprocess: Preprocess | None = None,
                 device: str | torch.device | None = None, amp: bool = False):
        self.wrapped = isinstance(model, RPLSegmenter)
        self.methods = check_methods(methods, self.wrapped)
        self.preprocess = preprocess or Preprocess()
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.amp = amp

    def _amp_dtype(self) -> torch.dtype:
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> PredictionBatch:
        size = tuple(images.shape[1:3])
        x = self.preprocess(images.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=self._amp_dtype(), enabled=self.amp):
            out = self.model(x)
        logits, wrapped_out = (out.logits, out) if self.wrapped else (extract_logits(out), None)
        scores = {m: resize_scores(s, size) for m, s in method_scores(self.methods, logits, wrapped_out).items()}
        prediction = resize_logits(logits, size).argmax(1).to(torch.uint8)
        return PredictionBatch(prediction, scores, tuple(logits.shape[-2:]))


@dataclass
class ScoreRange:
    """The fixed ``[low, high]`` that maps a method's scores to 16-bit grey levels for a whole run.

    Given (``--score-range``) or, when not, taken from the first image scored: its min and max,
    widened by ``RANGE_MARGIN`` of their span on each side so that later images with a wider spread
    still fit (values beyond still clip). Recorded in the run's index so the PNGs can be read back.
    """

    low: float | None = None
    high: float | None = None
    source: str = "given"
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.low is None) != (self.high is None):
            raise RPLInputError("a score range needs both ends, LOW,HIGH.")
        if self.low is not None and not self.high > self.low:
            raise RPLInputError(f"--score-range {self.low},{self.high}: HIGH must be greater than LOW.")
        if self.low is None:
            self.source = "first image"

    def of(self, method: str, score: np.ndarray) -> tuple[float, float]:
        if method not in self.ranges:
            if self.low is not None:
                self.ranges[method] = (float(self.low), float(self.high))
            else:
                finite = score[np.isfinite(score)]
                lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
                span = hi - lo if hi > lo else max(abs(hi), 1.0)
                self.ranges[method] = (lo - RANGE_MARGIN * span, hi + RANGE_MARGIN * span)
        return self.ranges[method]


def to_uint16(score: np.ndarray, low: float, high: float) -> np.ndarray:
    """``round(clip((score - low) / (high - low), 0, 1) * 65535)`` as uint16 (NaN -> 0)."""
    unit = np.clip((np.nan_to_num(score.astype(np.float64), nan=low) - low) / (high - low), 0.0, 1.0)
    return np.round(unit * UINT16_MAX).astype(np.uint16)


def from_uint16(grey: np.ndarray, low: float, high: float) -> np.ndarray:
    """The inverse of :func:`to_uint16` (within one grey level)."""
    return (low + grey.astype(np.float64) / UINT16_MAX * (high - low)).astype(np.float32)
