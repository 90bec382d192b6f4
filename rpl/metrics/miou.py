"""Closed-set mIoU from one K x K confusion matrix over every pixel with ground truth != ignore.

    m = MIoU(num_classes=19)
    m.update(logits.argmax(1), target)     # (B, H, W) or (H, W) class ids
    m.compute()                            # {"miou", "iou_per_class", "pixel_accuracy", ...}

The matrix is summed over the whole dataset (docs/method.md, section 7), not averaged per image. A class with
no pixel in the ground truth and none predicted has no IoU: it is left out of the mean and
reported as None in ``iou_per_class`` (the cityscapesScripts convention of a NaN-skipping mean).
A class present in either but never right counts as 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rpl.errors import RPLInputError
from rpl.metrics._dist import all_reduce


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.from_numpy(np.ascontiguousarray(x))
    except (TypeError, ValueError) as err:
        raise RPLInputError(f"MIoU.update: {name} must be a tensor or numpy array of class ids "
                            f"({err}).") from err


class MIoU:
    """Mergeable confusion matrix (rows = ground truth, columns = prediction)."""

    def __init__(self, num_classes: int = 19, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise RPLInputError(f"MIoU: num_classes must be >= 1, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._synced = False

    def update(self, pred: Any, target: Any) -> None:
        """Add predicted and ground-truth class-id maps of one shape."""
        if self._synced:
            raise RuntimeError("MIoU.update after sync(): call reset() to start again")
        p, t = _as_tensor(pred, "pred"), _as_tensor(target, "target")
        if p.shape != t.shape:
            raise RPLInputError(f"MIoU.update: pred and target must have the same shape, got "
                                f"{tuple(p.shape)} and {tuple(t.shape)} (pass class ids, not logits).")
        if p.is_floating_point() or t.is_floating_point():
            raise RPLInputError("MIoU.update: pred and target must be integer class ids, got "
                                f"{p.dtype} and {t.dtype}.")
        t = t.to(p.device).long()
        p = p.long()
        k = self.num_classes
        valid = t != self.ignore_index
        t, p = t[valid], p[valid]
        for name, x in (("target", t), ("pred", p)):
            bad = (x < 0) | (x >= k)
            if bool(bad.any()):
                values = sorted(set(x[bad].unique()[:8].tolist()))
                raise RPLInputError(f"MIoU.update: {name} has class ids {values} outside 0..{k - 1} "
                                    f"(ignore index {self.ignore_index}); check num_classes and "
                                    "that labels are train ids.")
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        self.confusion += counts.to(self.confusion.device)

    def merge(self, other: "MIoU") -> "MIoU":
        if other.num_classes != self.num_classes:
            raise RPLInputError(f"MIoU.merge: {self.num_classes} vs {other.num_classes} classes.")
        self.confusion += other.confusion.to(self.confusion.device)
        return self

    def sync(self) -> "MIoU":
        """Sum the confusion matrix over torch.distributed ranks (call once). Returns self."""
        if self._synced:
            raise RuntimeError("MIoU.sync called twice: the state is already global")
        self.confusion = all_reduce(self.confusion)
        self._synced = True
        return self

    def compute(self) -> dict:
        cm = self.confusion.cpu().double()
        total = float(cm.sum())
        if total == 0:
            raise RPLInputError("MIoU: no pixel with a ground-truth class was seen (all ignored?), "
                                "so mIoU is undefined.")
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        present = union > 0
        iou = torch.where(present, inter / union.clamp(min=1), torch.zeros_like(inter))
        return {
            "miou": float(iou[present].mean()),
            "iou_per_class": [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())],
            "pixel_accuracy": float(inter.sum()) / total,
            "n_pixels": int(total),
        }
