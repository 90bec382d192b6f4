"""SegmentMeIfYouCan component-level metrics: sIoU, PPV and mean F1 (docs/method.md, section 7).

Per frame, as the SMIYC evaluator does (rules read off its public code):

1. prediction = score >= threshold, outside void; 8-connected components; predicted components
   smaller than ``min_pred_size`` pixels are dropped (anomaly track 500, obstacle track 50);
2. ground truth = 8-connected components of label 1; those smaller than ``min_gt_size`` pixels
   (100 / 10) become void; the region of interest is every non-void pixel left;
3. sIoU of a ground-truth component G: |G ∩ P| / (|G| + |P ∩ background|), where P is the union
   of the predicted components touching G. (The evaluator writes it as |P ∪ G| minus the pixels
   of P lying on *other* ground-truth components, which is the same number.)
4. PPV of a predicted component: the fraction of its pixels (in the region of interest) on any
   ground-truth component;
5. for tau = 0.25, 0.30, ..., 0.75: TP = ground-truth components with sIoU >= tau, FN = the
   others, FP = predicted components with PPV < tau; F1(tau) = 2TP / (2TP + FN + FP) over the
   dataset; mean F1 = the average over the 11 taus. sIoU and PPV are averaged over all
   components of the dataset (not per frame).

The threshold is the pixel-level best-F1 threshold of the same data. Give it (``threshold=``,
e.g. ``PixelMetrics(...).compute()["best_f1_threshold"]`` from a first pass) and each frame is
scored at ``update`` and forgotten; or leave it out and the frames are kept on disk (float32
scores + uint8 labels, 5 bytes per pixel, in a temporary folder removed with the object) while a
streaming PixelMetrics finds the threshold, and are scored in ``compute``: exact, RAM bounded by one
frame. One deliberate difference: the SMIYC code predicts ``score > threshold``; we use ``>=``,
the convention under which our pixel metrics report the threshold.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from rpl.errors import RPLInputError
from rpl.metrics._dist import all_reduce
from rpl.metrics._inputs import IGNORE, check_scores_labels, frames, to_numpy
from rpl.metrics.pixel import PixelMetrics

TRACKS = {"anomaly": (500, 100), "obstacle": (50, 10)}  # (min predicted size, min GT size)
TAUS = np.linspace(0.25, 0.75, 11)
_NT = len(TAUS)


def frame_components(pred: np.ndarray, labels: np.ndarray, min_pred_size: int,
                     min_gt_size: int) -> tuple[np.ndarray, np.ndarray]:
    """sIoU of each ground-truth component and PPV of each predicted component of one frame.

    ``pred``: bool (H, W) predicted anomaly mask; ``labels``: uint8 (H, W), 0 / 1 / 255.
    """
    valid = labels != IGNORE
    pred_mask = (pred & valid).astype(np.uint8)
    n_pred, pred_cc, pred_stats, _ = cv2.connectedComponentsWithStats(pred_mask, connectivity=8)
    keep = pred_stats[:, cv2.CC_STAT_AREA] >= min_pred_size
    keep[0] = False
    n_gt, gt_cc, gt_stats, _ = cv2.connectedComponentsWithStats((labels == 1).astype(np.uint8),
                                                                connectivity=8)
    voided = gt_stats[:, cv2.CC_STAT_AREA] < min_gt_size
    voided[0] = False
    roi = valid & ~voided[gt_cc]
    g = gt_cc[roi].astype(np.int64)
    p = np.where(keep, np.arange(n_pred), 0)[pred_cc[roi]]

    gt_size = np.bincount(g, minlength=n_gt)
    pred_size = np.bincount(p, minlength=n_pred)
    pairs, overlap = np.unique(g * n_pred + p, return_counts=True)  # sparse contingency table
    pg, pp = pairs // n_pred, pairs % n_pred
    on_background = np.bincount(pp[pg == 0], weights=overlap[pg == 0], minlength=n_pred)
    both = (pg > 0) & (pp > 0)
    inter = np.bincount(pg[both], weights=overlap[both], minlength=n_gt)
    extra = np.bincount(pg[both], weights=on_background[pp[both]], minlength=n_gt)
    gt_ids = np.flatnonzero(gt_size[1:]) + 1
    siou = inter[gt_ids] / (gt_size[gt_ids] + extra[gt_ids])
    on_gt = np.bincount(pp[both], weights=overlap[both], minlength=n_pred)
    pred_ids = np.flatnonzero(pred_size[1:]) + 1
    ppv = on_gt[pred_ids] / pred_size[pred_ids]
    return siou, ppv


def _frame_stats(siou: np.ndarray, ppv: np.ndarray) -> np.ndarray:
    """[sum sIoU, #GT, sum PPV, #pred, TP(tau) x 11, FN(tau) x 11, FP(tau) x 11]."""
    tp = (siou[:, None] >= TAUS).sum(0)
    fp = (ppv[:, None] < TAUS).sum(0)
    head = [siou.sum(), len(siou), ppv.sum(), len(ppv)]
    return np.concatenate([head, tp, len(siou) - tp, fp]).astype(np.float64)


class ComponentMetrics:
    """SMIYC sIoU / PPV / mean F1 over a dataset (see the module doc for the rules)."""

    def __init__(self, track: str = "anomaly", threshold: float | None = None,
                 pixel_mode: str = "streaming", min_pred_size: int | None = None,
                 min_gt_size: int | None = None) -> None:
        if track not in TRACKS:
            raise RPLInputError(f"ComponentMetrics: track must be 'anomaly' or 'obstacle', got {track!r}.")
        self.track = track
        self.min_pred_size = TRACKS[track][0] if min_pred_size is None else int(min_pred_size)
        self.min_gt_size = TRACKS[track][1] if min_gt_size is None else int(min_gt_size)
        self.threshold = None if threshold is None else float(threshold)
        self.pixel_mode = pixel_mode
        self.reset()

    def reset(self) -> None:
        self._stats = np.zeros(4 + 3 * _NT)
        self._pixel = PixelMetrics(mode=self.pixel_mode) if self.threshold is None else None
        self._spill: list[tempfile.TemporaryDirectory] = []
        self._frames: list[Path] = []
        self._synced_threshold: float | None = None

    def update(self, scores: Any, labels: Any) -> None:
        """Add score maps and 0 / 1 / 255 label maps, (H, W) or (B, H, W)."""
        if self._synced_threshold is not None:
            raise RuntimeError("ComponentMetrics.update after sync(): call reset() to start again")
        s, lab = check_scores_labels(scores, labels, "ComponentMetrics.update")
        if self.threshold is not None:
            for fs, fl in zip(frames(to_numpy(s)), frames(to_numpy(lab))):
                self._stats += _frame_stats(*frame_components(
                    fs >= self.threshold, fl, self.min_pred_size, self.min_gt_size))
            return
        self._pixel.update(s, lab)
        if not self._spill:
            self._spill.append(tempfile.TemporaryDirectory(prefix="rpl-components-"))
        folder = Path(self._spill[0].name)
        for fs, fl in zip(frames(to_numpy(s)), frames(to_numpy(lab))):
            path = folder / f"{len(self._frames):07d}"
            np.save(f"{path}_scores.npy", fs)
            np.save(f"{path}_labels.npy", fl)
            self._frames.append(path)

    def _pending_stats(self, threshold: float) -> np.ndarray:
        stats = np.zeros_like(self._stats)
        for path in self._frames:
            scores = np.load(f"{path}_scores.npy", mmap_mode="r")
            labels = np.load(f"{path}_labels.npy")
            stats += _frame_stats(*frame_components(
                scores >= threshold, labels, self.min_pred_size, self.min_gt_size))
        return stats

    def resolved_threshold(self) -> float:
        """The pixel threshold in use: given, or the best-F1 threshold of the data seen."""
        if self.threshold is not None:
            return self.threshold
        if self._synced_threshold is not None:
            return self._synced_threshold
        return self._pixel.compute()["best_f1_threshold"]

    def merge(self, other: "ComponentMetrics") -> "ComponentMetrics":
        """Add ``other``'s frames (same track, sizes and threshold setting); returns self."""
        if ((other.min_pred_size, other.min_gt_size, other.threshold) !=
                (self.min_pred_size, self.min_gt_size, self.threshold)):
            raise RPLInputError("ComponentMetrics.merge: both metrics need the same track sizes and "
                                "the same threshold setting.")
        self._stats += other._stats
        if self._pixel is not None:
            self._pixel.merge(other._pixel)
            self._spill += other._spill               # keeps the other's folder alive
            self._frames += other._frames
        return self

    def sync(self) -> "ComponentMetrics":
        """Under torch.distributed: agree on the threshold, score the local frames with it and
        sum the statistics over ranks (call once, on every rank). Returns self."""
        if self._synced_threshold is not None:
            raise RuntimeError("ComponentMetrics.sync called twice")
        if self._pixel is not None:
            self._pixel.sync()
            self._synced_threshold = self.resolved_threshold()
            self._stats += self._pending_stats(self._synced_threshold)
            self._frames = []
        else:
            self._synced_threshold = self.threshold
        self._stats = all_reduce(torch.from_numpy(self._stats)).numpy()
        return self

    def compute(self) -> dict:
        """{"siou", "ppv", "mean_f1", "f1_25", "f1_50", "f1_75", "threshold", counts}."""
        threshold = self.resolved_threshold()
        stats = self._stats + (self._pending_stats(threshold) if self._frames else 0.0)
        siou_sum, n_gt, ppv_sum, n_pred = stats[:4]
        tp, fn, fp = stats[4:4 + _NT], stats[4 + _NT:4 + 2 * _NT], stats[4 + 2 * _NT:]
        if n_gt == 0:
            raise RPLInputError(
                f"ComponentMetrics: the data has no ground-truth anomaly component of at least "
                f"{self.min_gt_size} pixels, so sIoU and F1 are undefined (they are averaged over "
                "ground-truth components). Check the labels (1 = anomaly) or the track.")
        f1 = 2 * tp / (2 * tp + fn + fp)
        return {
            "siou": float(siou_sum / n_gt),
            "ppv": float(ppv_sum / n_pred) if n_pred else float("nan"),  # nothing predicted
            "mean_f1": float(f1.mean()),
            "f1_25": float(f1[0]), "f1_50": float(f1[5]), "f1_75": float(f1[10]),
            "threshold": float(threshold),
            "n_gt_components": int(n_gt),
            "n_pred_components": int(n_pred),
        }
