"""Pooled ROC / precision-recall summaries from counts, shared by the exact and streaming modes.

Everything the pixel metrics need can be read off one row per *distinct anomaly score* v
(ascending): how many anomaly pixels score exactly v, and how many inlier pixels score below v
and exactly v. The exact mode gets these rows from sorted scores, the streaming mode from
histogram bins (a bin then plays the role of one tied value). From them:

- AUROC = P(s_anomaly > s_inlier) + 0.5 P(tie) (Mann-Whitney), which is exactly the trapezoidal
  area under sklearn's ROC curve, ties included.
- AP = sum over distinct thresholds v of (R(v) - R(v')) * Prec(v), recall only moving at anomaly
  values: sklearn's ``average_precision_score`` (step rule, not trapezoidal).
- FPR@95: "first" = FPR at the highest threshold whose TPR >= 0.95 (the official evaluators and
  sklearn's ``roc_curve``); "closest" = the rule of RPL/PEBAL's code (Hendrycks' outlier-exposure
  ``fpr_and_fdr_at_recall``): the recall closest to 0.95 among thresholds down to full recall,
  ties going to the lower threshold.
- best F1 over all thresholds, with its threshold (predict anomaly where score >= threshold).

The SMIYC mode has its own rules (per-frame percentile bins, trapezoidal areas): ``smiyc_*``.
"""
from __future__ import annotations

import numpy as np

FPR_RULES = ("first", "closest")
TPR_LEVEL = 0.95


def pooled_metrics(values: np.ndarray, pos_count: np.ndarray, neg_below: np.ndarray,
                   neg_equal: np.ndarray, n_pos: int, n_neg: int, fpr_rule: str = "first") -> dict:
    """AUROC, AP, FPR@95 and best F1 from per-distinct-anomaly-value counts (see module doc)."""
    count = pos_count.astype(np.int64)
    below = neg_below.astype(np.int64)
    tp = n_pos - (np.cumsum(count) - count)          # anomaly pixels scoring >= v
    fp = n_neg - below                               # inlier pixels scoring >= v
    auroc = float(np.dot(count.astype(np.float64), 2.0 * below + neg_equal)) / (2.0 * n_pos * n_neg)
    ap = float(np.sum(count / n_pos * (tp / (tp + fp))))
    tpr = tp / n_pos
    if fpr_rule == "first":
        k = int(np.count_nonzero(tpr >= TPR_LEVEL)) - 1   # tpr falls with i; row 0 has tpr = 1
        fpr_fp, fpr_threshold = int(fp[k]), float(values[k])
    else:
        # the lowest threshold with recall level tp[i] lies just above the next lower anomaly value
        lowest_fp = fp.copy()
        lowest_fp[1:] = n_neg - below[:-1] - neg_equal[:-1]
        k = int(np.argmin(np.abs(tpr - TPR_LEVEL)))       # first = lowest threshold among ties
        fpr_fp, fpr_threshold = int(lowest_fp[k]), float(values[k])
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))       # the highest threshold among equal F1
    return {
        "auroc": auroc,
        "ap": ap,
        "fpr95": fpr_fp / n_neg,
        "fpr95_threshold": fpr_threshold,
        "best_f1": float(f1[best]),
        "best_f1_threshold": float(values[best]),
    }


def smiyc_frame_bins(pos: np.ndarray, neg: np.ndarray, num_bins: int = 768):
    """One frame of the SegmentMeIfYouCan pixel evaluator ("PixBinaryClass", percentile bins).

    Bin edges are the union of {0, 1}, ``num_bins // 2`` evenly spaced quantiles (numpy's
    linear rule) of the frame's anomaly scores and as many of its inlier scores (at most one per
    pixel); a bin counts scores in [edge_i, edge_i+1), the last one closed. Returns the lower edge
    of each bin (the threshold at which it switches on) and its anomaly and inlier counts.
    """
    edges = [np.array([0.0, 1.0])]
    for scores in (pos, neg):
        if scores.size:
            edges.append(np.quantile(scores, np.linspace(0, 1, min(num_bins // 2, scores.size))))
    edges = np.unique(np.concatenate(edges))
    tp_rel, _ = np.histogram(pos, bins=edges)
    fp_rel, _ = np.histogram(neg, bins=edges)
    return edges[:-1].astype(np.float64), tp_rel.astype(np.int64), fp_rel.astype(np.int64)


def smiyc_points(lower_edges: np.ndarray, tp_rel: np.ndarray,
                 fp_rel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SMIYC evaluator's curve points (see ``smiyc_metrics``): thresholds descending, with the
    anomaly and inlier counts at or above each; leading points with no prediction dropped."""
    thresholds, slot = np.unique(lower_edges, return_inverse=True)
    thresholds = thresholds[::-1]
    tp = np.cumsum(np.bincount(slot, weights=tp_rel)[::-1])
    fp = np.cumsum(np.bincount(slot, weights=fp_rel)[::-1])
    start = int(np.argmax(tp + fp > 0.01))
    return thresholds[start:], tp[start:], fp[start:]


def pooled_curve(values: np.ndarray, pos_count: np.ndarray, neg_below: np.ndarray,
                 neg_equal: np.ndarray, n_pos: int, n_neg: int) -> dict:
    """The pooled ROC / precision-recall points behind ``pooled_metrics`` (same rows, same counts).

    Thresholds descend; at each distinct anomaly value v two points: just above v (the anomaly
    pixels at v not yet counted, the inliers above v counted) and at v (both counted), so the
    trapezoidal area of (fp, tp) is exactly the AUROC, ties included. ``tp`` / ``fp`` are pixels
    scoring >= the threshold (the upper points count > v, flagged ``upper``).
    """
    count = pos_count.astype(np.int64)[::-1]
    below = neg_below.astype(np.int64)[::-1]
    equal = neg_equal.astype(np.int64)[::-1]
    tp_at = n_pos - (np.cumsum(pos_count.astype(np.int64)) - pos_count.astype(np.int64))[::-1]
    fp_at = n_neg - below
    tp = np.empty(2 * len(count), np.int64)
    fp = np.empty_like(tp)
    tp[0::2], fp[0::2] = tp_at - count, fp_at - equal     # just above v
    tp[1::2], fp[1::2] = tp_at, fp_at                     # at v
    thresholds = np.repeat(np.asarray(values, np.float64)[::-1], 2)
    upper = np.tile([True, False], len(count))
    return {"thresholds": thresholds, "tp": tp, "fp": fp, "upper": upper, "n_pos": int(n_pos), "n_neg": int(n_neg)}


def smiyc_metrics(lower_edges: np.ndarray, tp_rel: np.ndarray, fp_rel: np.ndarray,
                  n_pos: int, n_neg: int) -> dict:
    """Aggregate per-frame bins the way the SMIYC evaluator does.

    All frames' bins are sorted by threshold (descending) and accumulated; bins of different
    frames with the same threshold are summed into one point (the official code leaves their
    order to an unstable sort, which moves the areas slightly; summing makes the result
    independent of frame order, so merging is exact); leading points with no prediction are
    dropped; AUROC and AP are trapezoidal areas over these points (so the ROC does not start at
    (0, 0) and the PR curve not at recall 0); FPR@95 is the FPR at the first point with
    TPR >= 0.95 (1.0 if never reached); best F1 is the maximum over the points.
    """
    thresholds, tp, fp = smiyc_points(lower_edges, tp_rel, fp_rel)
    tpr, fpr, precision = tp / n_pos, fp / n_neg, tp / (tp + fp)
    k = int(np.searchsorted(tpr, TPR_LEVEL))
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.nanargmax(f1))
    return {
        "auroc": float(np.trapezoid(tpr, fpr)),
        "ap": float(np.trapezoid(precision, tpr)),
        "fpr95": float(fpr[k]) if k < len(tpr) else 1.0,
        "fpr95_threshold": float(thresholds[k]) if k < len(tpr) else float("nan"),
        "best_f1": float(f1[best]),
        "best_f1_threshold": float(thresholds[best]),
    }
