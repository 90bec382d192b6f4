"""Prediction on unlabelled images: the closed-set labels and every method's anomaly map at the input size.

    predictor = Predictor(model, methods=("rpl", "energy"), preprocess=Preprocess(), device="cpu")
    result = predictor(images)       # images: (B, H, W, 3) uint8 tensor of one size
    result.prediction                # (B, H, W) uint8 argmax of the closed-set logits
    result.scores["rpl"]             # (B, H, W) float32, higher = more anomalous

The path is ``rpl-eval``'s: the same ``Preprocess``, one forward of the model, the same scorers of
the method registry (``rpl.methods.get(name).scorer``), and the same bilinear resize of scores and
logits to the input size, so a map written here equals what ``rpl-eval`` scores for that image.

A model scores its own method (``rpl.methods.method_of``: the checkpoint's method, e.g. ``rpl`` or
``pebal``, the default) and every post-hoc score (``energy``, ``msp``, ``maxlogit``, ``entropy``,
and any other registered post-hoc method) of its closed-set logits: ``out.logits`` for a method's
model, the segmenter's output for a bare segmenter; unblurred, as in ``rpl-eval`` without
``--smooth-baselines``. Another method's score is refused (it needs that method's checkpoint), and
so is a method that needs more than the one forward (``Method.one_forward``: MC dropout, which
``rpl-eval`` runs).

Score maps saved as 16-bit PNG are mapped linearly from a fixed range ``[low, high]`` to
``0..65535`` (values outside clip); the range is fixed for a whole run (see ``ScoreRange``) so that
grey levels of different images compare.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from rpl.errors import RPLInputError
from rpl.evaluation import EvalOptions, Preprocess, resize_logits, resize_scores
from rpl.wrapping import extract_logits

UINT16_MAX = 65535
RANGE_MARGIN = 0.5  # an automatic range extends the first image's span by this fraction on each side


def available_methods(own: str | None) -> tuple[str, ...]:
    """Method names a model of method ``own`` (None: a bare segmenter) can score here: its own and
    the registered post-hoc methods that score one forward."""
    from rpl.methods import available, get

    post_hoc = tuple(n for n in available() if get(n).kind == "post-hoc" and get(n).one_forward)
    return ((own,) if own else ()) + tuple(n for n in post_hoc if n != own)


def check_methods(methods: Sequence[str], own: str | None, where: str = "the model",
                  option: str = "--methods") -> tuple[str, ...]:
    """Validated, de-duplicated names for a model whose method is ``own`` (``where`` names it in errors).

    Every name must be registered and score one forward; a method that is not post-hoc must be
    ``own`` (when ``own`` is None, the model's ``check_model`` decides: see :class:`Predictor`).
    """
    from rpl.methods import available, get

    known = available_methods(own)
    gives = f"{where}{f', of method {own!r},' if own else ''} gives {', '.join(known)}"
    out: list[str] = []
    for m in methods:
        if m not in available():
            raise RPLInputError(f"{option}: unknown method {m!r}; {gives}.")
        method = get(m)
        if not method.one_forward:
            raise RPLInputError(f"{option} {m}: {m} scores several forward passes of each image, and rpl-predict / "
                                f"rpl-export score one; evaluate it with rpl-eval --methods {m}; {gives}.")
        if method.kind != "post-hoc" and own is not None and m != own:
            raise RPLInputError(f"{option} {m}: {where} holds method {own!r}, not {m!r}, and gives "
                                f"{', '.join(known)}. Pass a {m} checkpoint, or leave {m} out of {option}.")
        if m not in out:
            out.append(m)
    if not out:
        raise RPLInputError(f"{option} names nothing; {gives}.")
    return tuple(out)


@dataclass
class PredictionBatch:
    prediction: torch.Tensor  # (B, H, W) uint8 closed-set class ids at the input size
    scores: dict[str, torch.Tensor]  # method -> (B, H, W) float32 at the input size
    logits_size: tuple[int, int]  # the network's output size


class Predictor:
    """One model, its preprocessing and methods: uint8 image batches in, labels and score maps out.

    ``methods`` None: the model's own method (``rpl.methods.method_of``); a bare segmenter has none
    and needs post-hoc names.
    """

    def __init__(self, model: nn.Module, methods: Sequence[str] | None = None, preprocess: Preprocess | None = None,
                 device: str | torch.device | None = None, amp: bool = False):
        from rpl.methods import get, method_of

        self.wrapped = hasattr(model, "segmenter")  # a method's model around a segmenter (as rpl-eval decides)
        self.method = method_of(model)
        if methods is None:
            if self.method is None:
                raise RPLInputError(f"the model ({type(model).__name__}) is a bare segmenter with no method of its own; "
                                    f"name the methods to score: {', '.join(available_methods(None))}.")
            methods = (self.method,)
        self.methods = check_methods(methods, self.method)
        for m in self.methods:
            get(m).check_model(model)
        self.preprocess = preprocess or Preprocess()
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.amp = amp
        options = EvalOptions(methods=self.methods, amp=amp, progress=False)  # rpl-eval's defaults
        self.scorers = {m: get(m).scorer(self.model, options) for m in self.methods}

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
        logits, method_out = (out.logits, out) if self.wrapped else (extract_logits(out), None)
        scores = {m: resize_scores(score(x, logits, method_out), size) for m, score in self.scorers.items()}
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
