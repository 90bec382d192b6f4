"""rpl: Residual Pattern Learning (RPL + CoroCL) anomaly segmentation for any frozen segmenter.

    model = rpl.wrap(segmenter)           # frozen segmenter + trainable residual block
    out = model(images)                   # out.logits (unchanged), out.anomaly (B, H, W)
"""
from __future__ import annotations

import importlib
from typing import Any

from rpl.blocks import BlockConfig, RPLAddon
from rpl.errors import RPLInputError
from rpl.wrapping import RPLOutput, RPLSegmenter, wrap

__version__ = "0.1.0"
__all__ = ["wrap", "RPLSegmenter", "RPLOutput", "BlockConfig", "RPLAddon", "RPLInputError",
           "save", "load", "scores", "losses", "metrics", "models", "data"]

_LAZY = {"scores", "losses", "metrics", "models", "data", "checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"rpl.{name}")
    if name in ("save", "load"):
        return getattr(importlib.import_module("rpl.checkpoint"), name)
    raise AttributeError(f"module 'rpl' has no attribute {name!r}")
