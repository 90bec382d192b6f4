"""Evaluation metrics: pooled pixel AUROC / AP / FPR@95, SMIYC component metrics, closed-set mIoU.

All follow one pattern (torchmetrics-like): ``update(...)`` per batch, ``compute()`` -> dict of
Python numbers, ``reset()``, ``merge(other)`` to combine two instances, and ``sync()`` to sum
the state over torch.distributed ranks (a no-op in a single process).
"""
from rpl.metrics.component import ComponentMetrics
from rpl.metrics.miou import MIoU
from rpl.metrics.pixel import PixelMetrics

__all__ = ["PixelMetrics", "ComponentMetrics", "MIoU"]
