"""rpl: Residual Pattern Learning (RPL + CoroCL) anomaly segmentation for any frozen segmenter.

    model = rpl.wrap(segmenter)           # frozen segmenter + trainable residual block
    model = rpl.from_checkpoint(path)     # or: the segmenter and add-on a checkpoint records
    out = model(images)                   # out.logits (unchanged), out.anomaly (B, H, W)

Attributes load lazily, so tools that need no torch (``rpl-data synthstreets``) start fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_ATTRIBUTES = {
    "wrap": "rpl.wrapping", "RPLSegmenter": "rpl.wrapping", "RPLOutput": "rpl.wrapping",
    "BlockConfig": "rpl.blocks", "RPLAddon": "rpl.blocks", "RPLInputError": "rpl.errors",
    "save": "rpl.checkpoint", "load": "rpl.checkpoint", "from_checkpoint": "rpl.checkpoint",
    "pretrained": "rpl.checkpoint",
}
_SUBMODULES = {"scores", "losses", "metrics", "models", "data", "checkpoint", "wrapping", "blocks", "training",
               "evaluation", "config", "methods", "conventions", "prediction", "export", "smiyc"}
__all__ = [*_ATTRIBUTES, *sorted(_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"rpl.{name}")
    raise AttributeError(f"module 'rpl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
