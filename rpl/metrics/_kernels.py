"""Compiled loops for the streaming histogram (optional: ``pip install rpl[fast]``, i.e. numba).

The vectorised numpy update needs a dozen passes over each piece of data plus a bincount; one
compiled loop reads each score and label once and increments its bin, which brings the update
near the memory-bandwidth floor. Without numba (or with ``RPL_NO_NUMBA=1`` in the environment)
``count_bins()`` is None and the accumulator uses its numpy path; both give the same counts
(tests/test_metrics_pixel.py checks them against a plain reference). numba is imported on the
first streaming update, not with rpl; its on-disk cache saves the compile (a few seconds) in
later processes.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Callable, Optional


@functools.lru_cache(maxsize=None)
def count_bins() -> Optional[Callable]:
    """The compiled counting loop (see ``_numba_loops``), or None without numba."""
    if os.environ.get("RPL_NO_NUMBA", "") not in ("", "0"):
        return None
    try:
        with warnings.catch_warnings():       # e.g. an unwritable cache folder: compile anyway
            warnings.simplefilter("ignore")
            from rpl.metrics._numba_loops import count_bins as loop
    except ImportError:
        return None
    return loop


def loaded() -> bool:
    """Whether this process already paid numba's start-up (then small updates use it too)."""
    return "rpl.metrics._numba_loops" in sys.modules
