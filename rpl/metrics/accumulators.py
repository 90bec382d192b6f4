"""The three ways PixelMetrics keeps what it has seen: exact, streaming histogram, SMIYC bins.

Each accumulator has ``add(scores, labels)`` (float32 / uint8 maps on one backend, see
``_inputs``), ``merge(other)``, ``gather()`` (replace the local state by the state of all ranks),
``counts()`` -> (n_anomaly, n_inlier), ``metrics(fpr_rule)`` and ``curve()`` (the pooled ROC / PR
points the metrics are read from, see ``curves.pooled_curve``).
"""
from __future__ import annotations

import numpy as np
import torch

from rpl.metrics import curves
from rpl.metrics._dist import all_gather_objects, all_reduce
from rpl.metrics._inputs import Array, frames, to_numpy


class ExactAccumulator:
    """Keeps every valid score as float32, split by class (4 bytes per pixel, labels implicit).

    ``metrics`` sorts each class in place (no index array, no float64 copy) and reads the
    per-distinct-anomaly-value counts with ``searchsorted``: the result equals scikit-learn's.
    """

    def __init__(self) -> None:
        self.pos: list[np.ndarray] = []
        self.neg: list[np.ndarray] = []

    def add(self, scores: Array, labels: Array) -> None:
        self.pos.append(to_numpy(scores[labels == 1]))
        self.neg.append(to_numpy(scores[labels == 0]))

    def merge(self, other: "ExactAccumulator") -> None:
        self.pos += other.pos
        self.neg += other.neg

    def gather(self) -> None:
        parts = all_gather_objects((_concat(self.pos), _concat(self.neg)))
        self.pos = [p for p, _ in parts]
        self.neg = [n for _, n in parts]

    def counts(self) -> tuple[int, int]:
        return sum(a.size for a in self.pos), sum(a.size for a in self.neg)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per distinct anomaly value (ascending): the value, its anomaly count, inliers below and equal."""
        pos, neg = _sorted(self.pos), _sorted(self.neg)
        self.pos, self.neg = [pos], [neg]          # keep the sorted copy: no second copy later
        starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
        values = pos[starts]
        count = np.diff(np.append(starts, pos.size))
        below = np.searchsorted(neg, values, side="left")
        equal = np.searchsorted(neg, values, side="right") - below
        return values, count, below, equal

    def metrics(self, fpr_rule: str) -> dict:
        n_pos, n_neg = self.counts()
        return curves.pooled_metrics(*self.rows(), n_pos, n_neg, fpr_rule)

    def curve(self) -> dict:
        return curves.pooled_curve(*self.rows(), *self.counts())


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate while releasing the chunks, so the peak stays near one copy."""
    out = np.empty(sum(c.size for c in chunks), dtype=np.float32)
    at = 0
    while chunks:
        c = chunks.pop(0)
        out[at:at + c.size] = c
        at += c.size
    return out


def _sorted(chunks: list[np.ndarray]) -> np.ndarray:
    arr = chunks[0] if len(chunks) == 1 else _concat(chunks)
    arr.sort()                                     # in place; already sorted input is cheap
    return arr


class HistogramAccumulator:
    """Counts per class over the top ``bits`` bits of an order-preserving float32 key.

    The key maps a float to the uint32 whose order is the float order (sign bit flipped for
    positives, all bits flipped for negatives, -0.0 merged with +0.0); a bin therefore spans a
    fixed *relative* width, 2**-(bits - 9) of |score|. All scores in a bin act as one tied value,
    so the result is exact whenever no two distinct scores share a bin (e.g. float16 scores for
    bits >= 19), and otherwise off by an amount set by how many anomaly and inlier pixels share
    bins (documented in ``pixel.py`` and tested). Memory: at most 2 * 2**bits int32 counts
    (64 MB at the default 23 bits) whatever the number of pixels, allocated lazily so only the
    span of scores actually seen is resident; int32 widens to int64 only once more than
    2**31 - 1 pixels have been counted. Filled with numpy on CPU and torch.bincount on CUDA.
    """

    CHUNK = 1 << 18                                # CPU pixels per step (temporaries stay in cache)
    INT32_MAX = 2**31 - 1

    def __init__(self, bits: int = 23) -> None:
        self.bits = bits
        self.shift = 32 - bits
        self.size = 2 << bits                      # index 2 * bin + label (0 inlier, 1 anomaly)
        self.n_pos = 0
        self.n_neg = 0
        self.lo, self.hi = self.size, -1           # span of the indices seen so far
        self.hist: np.ndarray | torch.Tensor | None = None  # numpy on CPU, torch on CUDA

    def _codes(self, x: Array) -> Array:
        """2 * bin of the float32 bit patterns ``x`` (int32 view), with int32 arithmetic only."""
        sign = x >> 31                               # -1 for negative floats, else 0
        mag = (x & 0x7FFFFFFF) + (sign & ((1 << self.shift) - 1))  # negatives round up (ceil)
        q = mag >> self.shift
        return (((q ^ sign) - sign) + (1 << (31 - self.shift))) << 1

    def _count(self, n_pos: int, n_neg: int, device: torch.device | None) -> None:
        """Create the counts on first use, widen int32 to int64 before it could overflow."""
        if self.hist is None:
            self.hist = (np.zeros(self.size, np.int32) if device is None or device.type == "cpu"
                         else torch.zeros(self.size, dtype=torch.int32, device=device))
        self.n_pos += n_pos
        self.n_neg += n_neg
        if self.hist.dtype in (np.int32, torch.int32) and self.n_pos + self.n_neg > self.INT32_MAX:
            self.hist = self.hist.astype(np.int64) if isinstance(self.hist, np.ndarray) else self.hist.long()

    def _add_span(self, lo: int, counts: Array) -> None:
        """hist[lo : lo + len(counts)] += counts, whatever the two backends."""
        self._add_at(slice(lo, lo + len(counts)), counts, lo, lo + len(counts) - 1)

    def _add_at(self, where: slice | np.ndarray, counts: Array, lo: int, hi: int) -> None:
        if isinstance(self.hist, np.ndarray):
            self.hist[where] += counts.cpu().numpy() if isinstance(counts, torch.Tensor) else counts
        else:
            self.hist[where] += torch.as_tensor(counts).to(self.hist.device, self.hist.dtype)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def add(self, scores: Array, labels: Array) -> None:
        if isinstance(self.hist, torch.Tensor) and not isinstance(scores, torch.Tensor):
            scores = torch.from_numpy(scores).to(self.hist.device)   # counts live on the GPU
            labels = torch.from_numpy(labels).to(self.hist.device)
        if isinstance(scores, torch.Tensor):        # CUDA
            valid = labels != 255
            codes = (self._codes(scores.view(torch.int32)) | labels.to(torch.int32))[valid]
            n_pos = int((labels == 1).sum())
            self._count(n_pos, int(codes.numel()) - n_pos, scores.device)
            if codes.numel():
                lo, hi = int(codes.min()), int(codes.max())
                self._add_span(lo, torch.bincount((codes - lo).long(), minlength=hi - lo + 1))
            return
        n_pos = int(np.count_nonzero(labels == 1))
        self._count(n_pos, int(np.count_nonzero(labels == 0)), None)
        flat_s, flat_l = scores.reshape(-1), labels.reshape(-1)
        for i in range(0, flat_s.size, self.CHUNK):
            lab = flat_l[i:i + self.CHUNK]
            codes = self._codes(flat_s[i:i + self.CHUNK].view(np.int32)) | lab
            valid = lab != 255
            if not valid.all():
                codes = codes[valid]
            if codes.size == 0:
                continue
            lo, hi = int(codes.min()), int(codes.max())
            if hi - lo <= self.CHUNK:               # scores within a few binades: dense count
                self._add_span(lo, np.bincount(codes - lo, minlength=hi - lo + 1))
            else:                                   # wide span (e.g. near zero): scatter-add
                counts = torch.as_tensor(self.hist)
                counts.index_add_(0, torch.from_numpy(codes), torch.ones(1, dtype=counts.dtype)
                                  .expand(codes.size))
                self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def merge(self, other: "HistogramAccumulator") -> None:
        if other.bits != self.bits:
            raise ValueError(f"cannot merge histograms of {self.bits} and {other.bits} bits")
        if other.hist is None:
            return
        device = other.hist.device if isinstance(other.hist, torch.Tensor) else None
        self._count(other.n_pos, other.n_neg, device)
        if other.hi >= other.lo:
            self._add_span(other.lo, other.hist[other.lo:other.hi + 1])

    def gather(self) -> None:
        """Sum over ranks, in place where the backend allows (no second copy of the counts)."""
        stats = torch.tensor([self.n_pos, self.n_neg, -self.lo, self.hi])
        n_pos, n_neg = all_reduce(stats[:2]).tolist()
        neg_lo, hi = all_reduce(stats[2:], op="max").tolist()
        self._count(n_pos - self.n_pos, n_neg - self.n_neg, None)
        summed = all_reduce(torch.as_tensor(self.hist))
        self.hist = summed.numpy() if summed.device.type == "cpu" else summed
        self.lo, self.hi = -neg_lo, hi

    def counts(self) -> tuple[int, int]:
        return self.n_pos, self.n_neg

    def lower_edges(self, bins: np.ndarray) -> np.ndarray:
        """Smallest float32 of each bin: ``score >= edge`` exactly when the score is in a bin >= it."""
        key = bins.astype(np.int64) << self.shift
        neg_mag = np.clip((1 << 31) - key, 0, 0x7F800000)          # -inf at most
        bits = np.where(key >= 1 << 31, key - (1 << 31), neg_mag | (1 << 31))
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows of the occupied anomaly bins (lower edge, anomaly count, inliers below and in the bin),
        read block by block over the span seen."""
        step = 1 << 21
        parts, neg_before = [], 0
        for start in range(self.lo - self.lo % 2, self.hi + 1, step):
            block = self.hist[start:start + step]
            block = (block.cpu().numpy() if isinstance(block, torch.Tensor) else block).reshape(-1, 2)
            neg, pos = block[:, 0], block[:, 1]
            occupied = np.flatnonzero(pos)
            if occupied.size:
                below = np.cumsum(neg, dtype=np.int64)[occupied] - neg[occupied] + neg_before
                parts.append((occupied + start // 2, pos[occupied], below, neg[occupied]))
            neg_before += int(neg.sum(dtype=np.int64))
        bins, count, below, equal = (np.concatenate(c) for c in zip(*parts))
        return self.lower_edges(bins), count, below, equal

    def metrics(self, fpr_rule: str) -> dict:
        n_pos, n_neg = self.counts()
        return curves.pooled_metrics(*self.rows(), n_pos, n_neg, fpr_rule)

    def curve(self) -> dict:
        return curves.pooled_curve(*self.rows(), *self.counts())


class SmiycAccumulator:
    """Per-frame percentile bins of the SegmentMeIfYouCan evaluator (see ``curves.smiyc_*``).

    Memory grows with the number of frames (about 770 bins each), not with pixels.
    """

    def __init__(self, num_bins: int = 768) -> None:
        self.num_bins = num_bins
        self.edges: list[np.ndarray] = []
        self.tp: list[np.ndarray] = []
        self.fp: list[np.ndarray] = []
        self.n_pos = 0
        self.n_neg = 0

    def add(self, scores: Array, labels: Array) -> None:
        for s, lab in zip(frames(to_numpy(scores)), frames(to_numpy(labels))):
            pos, neg = s[lab == 1], s[lab == 0]
            if pos.size + neg.size == 0:
                continue
            edges, tp, fp = curves.smiyc_frame_bins(pos, neg, self.num_bins)
            self.edges.append(edges)
            self.tp.append(tp)
            self.fp.append(fp)
            self.n_pos += pos.size
            self.n_neg += neg.size

    def merge(self, other: "SmiycAccumulator") -> None:
        self.edges += other.edges
        self.tp += other.tp
        self.fp += other.fp
        self.n_pos += other.n_pos
        self.n_neg += other.n_neg

    def gather(self) -> None:
        parts = all_gather_objects((self.edges, self.tp, self.fp, self.n_pos, self.n_neg))
        self.__init__(self.num_bins)
        for edges, tp, fp, n_pos, n_neg in parts:
            self.edges += edges
            self.tp += tp
            self.fp += fp
            self.n_pos += n_pos
            self.n_neg += n_neg

    def counts(self) -> tuple[int, int]:
        return self.n_pos, self.n_neg

    def metrics(self, fpr_rule: str) -> dict:
        return curves.smiyc_metrics(np.concatenate(self.edges), np.concatenate(self.tp),
                                    np.concatenate(self.fp), self.n_pos, self.n_neg)

    def curve(self) -> dict:
        thresholds, tp, fp = curves.smiyc_points(np.concatenate(self.edges), np.concatenate(self.tp),
                                                 np.concatenate(self.fp))
        return {"thresholds": thresholds, "tp": tp, "fp": fp, "n_pos": self.n_pos, "n_neg": self.n_neg}
