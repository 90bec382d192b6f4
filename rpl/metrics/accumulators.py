"""The three ways PixelMetrics keeps what it has seen: exact, streaming histogram, SMIYC bins.

Each accumulator has ``add(scores, labels)`` (float32 / uint8 maps on one backend, see
``_inputs``), ``merge(other)``, ``gather()`` (replace the local state by the state of all ranks),
``counts()`` -> (n_anomaly, n_inlier), ``metrics(fpr_rule)`` and ``curve()`` (the pooled ROC / PR
points the metrics are read from, see ``curves.pooled_curve``).
"""
from __future__ import annotations

import numpy as np
import torch

from rpl.metrics import _kernels, curves
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
    2**31 - 1 pixels have been counted. Filled on CUDA with torch.bincount; on CPU by one
    compiled pass (numba, the ``rpl[fast]`` extra) for updates of a megapixel or more, else by
    vectorised numpy bucketing (``_add_block``). The three give identical counts.
    """

    BLOCK = 1 << 21          # CPU pixels per bincount (one 1024 x 2048 image)
    SUB = 1 << 15            # CPU pixels per elementwise step (temporaries stay in L2)
    WINDOW = 1 << 18         # magnitude bins counted densely per block (16 binades at 23 bits)
    SAMPLE = 4096            # pixels per block that choose the window
    COMPILED_MIN = 1 << 20   # updates this large use the numba loop when installed (its start-up pays off)
    INT32_MAX = 2**31 - 1

    def __init__(self, bits: int = 23, compiled: bool = True) -> None:
        self.bits = bits
        self.compiled = compiled                   # the numba loop when installed (rpl[fast])
        self.shift = 32 - bits
        self.size = 2 << bits                      # index 2 * bin + label (0 inlier, 1 anomaly)
        self.n_pos = 0
        self.n_neg = 0
        self.lo, self.hi = self.size, -1           # span of the indices seen so far
        self.top = 0x7F800000 >> self.shift         # magnitude bin of infinity
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
        flat_s, flat_l = scores.reshape(-1).view(np.int32), labels.reshape(-1)
        n_pos = int(np.count_nonzero(flat_l == 1))
        self._count(n_pos, flat_l.size - n_pos - int(np.count_nonzero(flat_l == 255)), None)
        big = flat_s.size >= self.COMPILED_MIN or _kernels.loaded()
        kernel = _kernels.count_bins() if self.compiled and big else None
        if kernel is not None:                      # one pass over the data, see _kernels
            lo, hi = kernel(flat_s, flat_l, self.hist, self.shift, 1 << (self.bits - 1))
            self.lo, self.hi = min(self.lo, int(lo)), max(self.hi, int(hi))
            return
        for start in range(0, flat_s.size, self.BLOCK):
            self._add_block(flat_s[start:start + self.BLOCK], flat_l[start:start + self.BLOCK])

    def _magnitude_bins(self, bits: np.ndarray) -> np.ndarray:
        """|bin - 2**(bits-1)| of float32 bit patterns: floor of |x| for positives, ceil for negatives."""
        return ((bits & 0x7FFFFFFF) + ((bits >> 31) & ((1 << self.shift) - 1))) >> self.shift

    def _window(self, bits: np.ndarray, width: int) -> int:
        """First magnitude bin of the ``width`` bins that hold most of a sample of the block."""
        q = np.sort(self._magnitude_bins(bits[::max(1, bits.size // self.SAMPLE)]))
        covered = np.searchsorted(q, q + width) - np.arange(q.size)
        return max(0, min(int(q[int(np.argmax(covered))]), self.top - width + 1))

    def _add_block(self, bits: np.ndarray, labels: np.ndarray) -> None:
        """Count one block of pixels (CPU): one bincount over a window of magnitude bins.

        Each pixel's row is its magnitude bin minus the window start, and its slot is
        2 * (negative) + label, so positive and negative scores share the rows and the empty
        stretch of tiny magnitudes between them costs nothing. The elementwise steps run in
        L2-sized pieces into one int64 index buffer of the block's size (no full-data
        temporary). Rows 0 and width + 1 are discards: void pixels (label 255 sets the sign bit
        of the row) and the rare pixels outside the window, which are counted exactly from
        their own codes instead. The counts are then folded back onto the signed bins.
        """
        n = bits.size
        width = max(1 << 12, min(self.WINDOW, n // 8))
        wlo = self._window(bits, width)
        idx = np.empty(n, np.int64)
        sign, row, tmp = (np.empty(min(n, self.SUB), np.int32) for _ in range(3))
        ceil = (1 << self.shift) - 1
        sparse = []
        for i in range(0, n, self.SUB):
            b, lab = bits[i:i + self.SUB], labels[i:i + self.SUB]
            k = b.size
            s, r, t = sign[:k], row[:k], tmp[:k]
            np.right_shift(b, 31, out=s)                    # -1 for negative floats, else 0
            np.bitwise_and(b, 0x7FFFFFFF, out=r)
            np.bitwise_and(s, ceil, out=t)
            np.add(r, t, out=r)                             # negatives round up (as _codes)
            np.right_shift(r, self.shift, out=r)
            np.subtract(r, wlo - 1, out=r)                  # 1 .. width inside the window
            if r.min() < 1 or r.max() > width:
                outside = (r < 1) | (r > width)
                outside &= lab != 255
                where = np.flatnonzero(outside)
                if where.size:
                    sparse.append(self._codes(b[where]) | lab[where])
            if lab.max() == 255:
                np.left_shift(lab & 0x80, 24, out=t, dtype=np.int32)
                np.bitwise_or(r, t, out=r)                  # void: negative row
            np.clip(r, 0, width + 1, out=r)
            np.left_shift(r, 2, out=r)
            np.bitwise_and(s, 2, out=t)
            np.bitwise_or(r, t, out=r)
            np.bitwise_or(r, lab & 1, out=r)
            idx[i:i + k] = r
        counts = np.bincount(idx, minlength=4 * (width + 2))
        del idx
        self._fold(counts, wlo, width)
        if sparse:
            codes, count = np.unique(np.concatenate(sparse), return_counts=True)
            self.hist[codes] += count
            self.lo, self.hi = min(self.lo, int(codes[0])), max(self.hi, int(codes[-1]))

    def _fold(self, counts: np.ndarray, wlo: int, width: int) -> None:
        """Add the window's (row, sign, label) counts to the signed bins they stand for."""
        occupied = np.flatnonzero(counts[4:4 * (width + 1)])
        if occupied.size == 0:
            return
        rows = counts[4:4 * (width + 1)].reshape(-1, 4)
        hist2, off = self.hist.reshape(-1, 2), 1 << (self.bits - 1)
        for side, negative in ((rows[:, 0:2], False), (rows[:, 2:4], True)):
            used = occupied[((occupied & 2) != 0) == negative] >> 2
            if used.size == 0:
                continue
            a, z = int(used[0]), int(used[-1])                    # magnitude bins wlo + a .. wlo + z
            if negative:
                lo_bin, hi_bin = off - wlo - z, off - wlo - a
                hist2[lo_bin:hi_bin + 1] += side[a:z + 1][::-1]
            else:
                lo_bin, hi_bin = off + wlo + a, off + wlo + z
                hist2[lo_bin:hi_bin + 1] += side[a:z + 1]
            self.lo, self.hi = min(self.lo, 2 * lo_bin), max(self.hi, 2 * hi_bin + 1)

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
