"""Checks shared by the metrics, so every metric says the same thing about the same bad input.

Score and label maps arrive as torch tensors or numpy arrays. CPU data becomes numpy (zero copy
where possible: numpy is the faster CPU path here); CUDA tensors stay on their device so the
streaming histogram can be filled there.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from rpl.errors import RPLInputError

IGNORE = 255
Array = Union[np.ndarray, torch.Tensor]


def _plain(x: Any, name: str, who: str) -> Array:
    """A detached CUDA tensor or a numpy array (CPU tensors become zero-copy numpy views)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type == "cuda":
            return x
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # noqa: BLE001 - anything numpy refuses is bad input
        raise RPLInputError(f"{who}: {name} must be a torch tensor or numpy array, "
                            f"got {type(x).__name__} ({err}).") from err


def _is_float(x: Array) -> bool:
    return x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)


def _is_int(x: Array) -> bool:
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return np.issubdtype(x.dtype, np.integer)


def _is_bool(x: Array) -> bool:
    return x.dtype == (torch.bool if isinstance(x, torch.Tensor) else np.bool_)


def _same_backend(labels: Array, like: Array) -> Array:
    if isinstance(like, torch.Tensor):
        if not isinstance(labels, torch.Tensor):
            labels = torch.from_numpy(np.ascontiguousarray(labels))
        return labels.to(like.device)
    return labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels


def check_scores_labels(scores: Any, labels: Any, who: str) -> tuple[Array, Array]:
    """Return ``(scores float32, labels uint8)`` of shape (H, W) or (B, H, W), on one backend.

    Scores: any real dtype; float64 is rounded to float32 (metrics keep float32 throughout),
    float16/bfloat16 widen exactly; NaN is refused. Labels: 0 inlier, 1 anomaly, 255 void;
    bool is accepted (True = anomaly); any other value is refused with the values found.
    """
    s = _plain(scores, "scores", who)
    lab = _same_backend(_plain(labels, "labels", who), s)
    if tuple(s.shape) != tuple(lab.shape):
        raise RPLInputError(f"{who}: scores and labels must have the same shape, got scores "
                            f"{tuple(s.shape)} and labels {tuple(lab.shape)}.")
    if s.ndim not in (2, 3):
        raise RPLInputError(f"{who}: expected score and label maps of shape (H, W) or (B, H, W), "
                            f"got {tuple(s.shape)}.")
    if _is_bool(s) or not (_is_float(s) or _is_int(s)):
        raise RPLInputError(f"{who}: scores must be real numbers (higher = more anomalous), "
                            f"got dtype {s.dtype}.")
    if isinstance(s, torch.Tensor):
        s = s.float().contiguous()
        has_nan = bool(torch.isnan(s).any())
    else:
        s = np.ascontiguousarray(s, dtype=np.float32)
        has_nan = s.size > 0 and bool(np.isnan(s.min()))     # min propagates NaN: one cheap pass
    if has_nan:
        raise RPLInputError(f"{who}: the scores contain NaN; every valid pixel needs a finite or "
                            "infinite score (check the model output or the score function).")
    return s, check_labels(lab, who)


def check_labels(lab: Array, who: str) -> Array:
    """Labels as uint8 with values in {0, 1, 255}; anything else is an RPLInputError."""
    if _is_bool(lab):
        return lab.to(torch.uint8) if isinstance(lab, torch.Tensor) else lab.view(np.uint8)
    if not _is_int(lab):
        raise RPLInputError(f"{who}: labels must be integers (0 inlier, 1 anomaly, 255 void), "
                            f"got dtype {lab.dtype}.")
    if isinstance(lab, np.ndarray) and lab.dtype == np.uint8 and lab.size:
        # one pass: 0, 1, 255 + 1 wrap to 1, 2, 0, every other uint8 value lands above 2
        if np.add(lab, 1, dtype=np.uint8).max() <= 2:
            return np.ascontiguousarray(lab)
    bad = (lab != 0) & (lab != 1) & (lab != IGNORE)
    if bool(bad.any()):
        values = sorted({int(v) for v in lab[bad].reshape(-1)[:100_000].tolist()})[:8]
        raise RPLInputError(f"{who}: labels must use 0 inlier, 1 anomaly, 255 void; found values "
                            f"{values}. Convert the dataset's labels on load (see rpl.data).")
    if isinstance(lab, torch.Tensor):
        return lab.to(torch.uint8).contiguous()
    return np.ascontiguousarray(lab, dtype=np.uint8)


def to_numpy(x: Array) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


def frames(x: Array) -> list[Array]:
    """The (H, W) maps of a (H, W) or (B, H, W) batch."""
    return [x] if x.ndim == 2 else [x[i] for i in range(x.shape[0])]
