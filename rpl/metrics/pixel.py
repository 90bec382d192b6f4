"""Pixel-level anomaly metrics pooled over a dataset: AUROC, AP, FPR@95%TPR.

    m = PixelMetrics()                  # mode="exact", fpr_rule="first"
    for scores, labels in batches:      # (B, H, W) or (H, W); labels 0 / 1 / 255
        m.update(scores, labels)
    m.sync()                            # only under torch.distributed: every rank gets the total
    m.compute()                         # {"auroc", "ap", "fpr95", ...} as fractions in [0, 1]

Pooled means one ranking over every valid pixel of the dataset, never a per-image average
(docs/method.md, section 7). Higher score = more anomalous. Three modes:

- ``"exact"`` (default): equals scikit-learn's ``roc_auc_score`` / ``average_precision_score``
  and the first-threshold FPR rule on any input, ties included. Keeps 4 bytes per valid pixel
  (float32 scores split by class), e.g. 0.4 GB for 1e8 pixels. The default because results are
  compared with published tables, and every benchmark of the field fits in memory.
- ``"streaming"``: a histogram over the float32 bit patterns (``hist_bits``, default 23: at most
  64 MB whatever the number of pixels, only the span of scores seen is resident; mergeable;
  filled on the GPU when the scores are there). Exact when no two distinct scores share a bin,
  e.g. float16 or bfloat16 score maps; otherwise scores closer than about 2**-14 of their
  magnitude count as tied, which biases AP down and FPR@95 up slightly. On smooth energy-like
  score maps (tests/test_metrics_pixel.py) the error is below 1e-4 for AUROC, AP and FPR@95
  (seen: AUROC ~1e-8, AP and FPR@95 1e-6 to 6e-5, the largest for weak detectors whose 95 %
  threshold sits in the dense inlier bulk). It grows for scores whose spread is tiny next to
  their magnitude (e.g. all within 1000 +- 1): use exact mode there, or subtract a typical score.
- ``"smiyc"``: the SegmentMeIfYouCan evaluator's own numbers (per-frame percentile bins,
  trapezoidal AP and AUROC from the first predicted point, see ``curves.smiyc_metrics``). On the
  same maps: AUROC within 1e-4 of exact, FPR@95 within 1e-3, AP within 2e-3 (up to ~5e-3 for a
  weak detector); far more on a handful of pixels, where the trapezoids are coarse.

``fpr_rule="closest"`` gives FPR@95 the way RPL/PEBAL's code computes it (recall closest to
0.95) instead of the official first threshold reaching TPR >= 0.95.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rpl.errors import RPLInputError
from rpl.metrics import accumulators, curves
from rpl.metrics._dist import all_reduce
from rpl.metrics._inputs import IGNORE, check_scores_labels

MODES = ("exact", "streaming", "smiyc")


class PixelMetrics:
    """Accumulate score/label maps, then ``compute()`` pooled AUROC, AP and FPR@95.

    ``compute()`` also returns ``fpr95_threshold``, ``best_f1`` and ``best_f1_threshold`` (the
    pixel threshold the SMIYC component metrics use; anomaly = score >= threshold) and the counts
    ``n_pixels`` (valid), ``n_anomaly``, ``n_inlier``, ``n_ignored``, ``n_images`` and
    ``n_empty_images`` (images without a single valid pixel: counted, not an error).
    """

    def __init__(self, mode: str = "exact", fpr_rule: str = "first", hist_bits: int = 23,
                 smiyc_bins: int = 768) -> None:
        if mode not in MODES:
            raise RPLInputError(f"PixelMetrics: mode must be one of {', '.join(MODES)}, got {mode!r}.")
        if fpr_rule not in curves.FPR_RULES:
            raise RPLInputError(f"PixelMetrics: fpr_rule must be 'first' (official) or 'closest' "
                                f"(RPL/PEBAL code), got {fpr_rule!r}.")
        if mode == "smiyc" and fpr_rule != "first":
            raise RPLInputError("PixelMetrics: mode 'smiyc' reproduces the SMIYC evaluator, whose "
                                "FPR@95 is the first threshold reaching TPR >= 0.95; "
                                "fpr_rule='closest' applies to the exact and streaming modes.")
        if not 12 <= int(hist_bits) <= 24:
            raise RPLInputError(f"PixelMetrics: hist_bits must be within 12..24, got {hist_bits}.")
        if int(smiyc_bins) < 2:
            raise RPLInputError(f"PixelMetrics: smiyc_bins must be >= 2, got {smiyc_bins}.")
        self.mode, self.fpr_rule = mode, fpr_rule
        self.hist_bits, self.smiyc_bins = int(hist_bits), int(smiyc_bins)
        self.reset()

    def reset(self) -> None:
        if self.mode == "exact":
            self._acc: Any = accumulators.ExactAccumulator()
        elif self.mode == "streaming":
            self._acc = accumulators.HistogramAccumulator(self.hist_bits)
        else:
            self._acc = accumulators.SmiycAccumulator(self.smiyc_bins)
        self.n_images = 0
        self.n_empty_images = 0
        self.n_ignored = 0
        self._synced = False

    def update(self, scores: Any, labels: Any) -> None:
        """Add score maps (float, higher = anomalous) and label maps (0 / 1 / 255) of one shape."""
        if self._synced:
            raise RuntimeError("PixelMetrics.update after sync(): call reset() to start again")
        s, lab = check_scores_labels(scores, labels, "PixelMetrics.update")
        frames = lab.reshape(1 if lab.ndim == 2 else lab.shape[0], -1)
        if isinstance(frames, np.ndarray):          # count_nonzero per frame: no bool-array sum
            per_image = frames.shape[1] - np.array([np.count_nonzero(f == IGNORE) for f in frames])
        else:
            per_image = (frames != IGNORE).sum(1)
        self.n_images += int(per_image.shape[0])
        self.n_empty_images += int((per_image == 0).sum())
        self.n_ignored += int(lab.size if isinstance(lab, np.ndarray) else lab.numel()) - int(per_image.sum())
        self._acc.add(s, lab)

    def merge(self, other: "PixelMetrics") -> "PixelMetrics":
        """Add ``other``'s state to this one (same mode and options); returns self."""
        if (other.mode, other.hist_bits, other.smiyc_bins) != (self.mode, self.hist_bits, self.smiyc_bins):
            raise RPLInputError("PixelMetrics.merge: both metrics need the same mode, hist_bits and "
                                f"smiyc_bins, got {self.mode}/{self.hist_bits}/{self.smiyc_bins} and "
                                f"{other.mode}/{other.hist_bits}/{other.smiyc_bins}.")
        self._acc.merge(other._acc)
        self.n_images += other.n_images
        self.n_empty_images += other.n_empty_images
        self.n_ignored += other.n_ignored
        return self

    def sync(self) -> "PixelMetrics":
        """Under torch.distributed, replace the local state by the sum over all ranks (call once,
        on every rank, after the last update). A no-op in a single process. Returns self."""
        if self._synced:
            raise RuntimeError("PixelMetrics.sync called twice: the state is already global")
        self._acc.gather()
        totals = all_reduce(torch.tensor([self.n_images, self.n_empty_images, self.n_ignored]))
        self.n_images, self.n_empty_images, self.n_ignored = (int(v) for v in totals)
        self._synced = True
        return self

    def compute(self) -> dict:
        """The pooled metrics as Python floats; RPLInputError when they are undefined."""
        self._check_defined()
        out = self._acc.metrics(self.fpr_rule)
        n_pos, n_neg = self._acc.counts()
        out.update(n_pixels=n_pos + n_neg, n_anomaly=n_pos, n_inlier=n_neg, n_ignored=self.n_ignored,
                   n_images=self.n_images, n_empty_images=self.n_empty_images)
        return out

    def curve(self, max_points: int = 1000) -> dict:
        """The pooled ROC and precision-recall curves the metrics are read from, for plotting.

        ``{"roc": {"fpr", "tpr"}, "pr": {"recall", "precision"}, "fpr95_point": [fpr, tpr],
        "best_f1_point": [recall, precision]}`` as lists of floats. The ROC runs from (0, 0) to
        (1, 1) through two points per distinct anomaly value (or bin), so its trapezoidal area is
        ``compute()["auroc"]``; the PR points are those AP sums over (recall, precision at each
        distinct anomaly value; the SMIYC mode's own points there). Both are thinned to about
        ``max_points`` points spaced along the curve (at most 1/``max_points`` of the unit square
        between kept points); the marked points come from the full curve and ``compute()``'s
        thresholds (no marker where the threshold is undefined).
        """
        self._check_defined()
        c = self._acc.curve()
        n_pos, n_neg = c["n_pos"], c["n_neg"]
        tp, fp = np.asarray(c["tp"], np.float64), np.asarray(c["fp"], np.float64)
        thresholds = np.asarray(c["thresholds"], np.float64)
        at = ~np.asarray(c["upper"]) if "upper" in c else np.ones(len(tp), bool)
        fpr = np.concatenate(([0.0], fp / n_neg, [1.0]))
        tpr = np.concatenate(([0.0], tp / n_pos, [1.0]))
        keep = at & (tp > 0)
        recall, precision = tp[keep] / n_pos, tp[keep] / (tp[keep] + fp[keep])
        m = self._acc.metrics(self.fpr_rule)

        def point(threshold: float, x: np.ndarray, y: np.ndarray) -> list[float] | None:
            hits = np.flatnonzero(at & (thresholds == threshold)) if np.isfinite(threshold) else []
            return [float(x[hits[0]]), float(y[hits[0]])] if len(hits) else None

        roc_point = point(m["fpr95_threshold"], fp / n_neg, tp / n_pos)
        if roc_point is not None:
            roc_point[0] = float(m["fpr95"])  # the "closest" rule reads the lowest threshold of that recall
        f1_point = point(m["best_f1_threshold"], tp / n_pos, tp / np.maximum(tp + fp, 1))
        fx, fy = _thin(fpr, tpr, max_points)
        rx, ry = _thin(recall, precision, max_points)
        return {"roc": {"fpr": fx, "tpr": fy}, "pr": {"recall": rx, "precision": ry},
                "fpr95_point": roc_point, "best_f1_point": f1_point}

    def _check_defined(self) -> None:
        n_pos, n_neg = self._acc.counts()
        if n_pos == 0 or n_neg == 0:
            missing = "anomaly pixel (label 1)" if n_pos == 0 else "inlier pixel (label 0)"
            raise RPLInputError(
                f"PixelMetrics: the data has no {missing} among its {n_pos + n_neg} valid pixels "
                f"({self.n_images} images, {self.n_ignored} void pixels), so AUROC, AP and FPR@95 "
                "are undefined: they rank anomaly pixels against inlier pixels and need both. "
                "Check that the labels use 0 inlier / 1 anomaly / 255 void, or leave this dataset out.")


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    """Keep the first point of each 1/max_points step of path length along the curve, and the last."""
    if len(x) <= max_points:
        return x.tolist(), y.tolist()
    length = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))))
    _, first = np.unique(np.floor(length / max(length[-1], 1e-12) * max_points), return_index=True)
    idx = np.union1d(first, [len(x) - 1])
    return x[idx].tolist(), y[idx].tolist()
