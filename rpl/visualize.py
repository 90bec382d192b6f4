"""Heat-map overlays of anomaly scores for looking at what a detector does, image by image.

    rgb = overlay(image, score, label)      # uint8 (H, W, 3)

Inside the region of interest (label != 255) a pixel is ``image / 2 + colour(score) / 2``; outside
it the image is shown unchanged, so void regions (ego vehicle, off-road for obstacle sets) are not
mistaken for detections. The ground-truth anomaly (label 1) is outlined. Colours are normalised
per image between the 1st and 99th percentile of the scores inside the region of interest: an
overlay shows where a method ranks pixels high *within* the image, not absolute levels, which is
what differs between methods whose scores live on unrelated scales (energy vs. probabilities).
"""
from __future__ import annotations

import re

import cv2
import numpy as np

IGNORE = 255
CONTOUR_RGB = (0, 255, 0)
# Cityscapes' 19 train-id colours (road, sidewalk, building, wall, fence, pole, traffic light, traffic sign,
# vegetation, terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle), from its label table
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def normalise(score: np.ndarray, roi: np.ndarray | None = None, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """``score`` mapped to [0, 1] between its ``low`` and ``high`` percentiles inside ``roi``."""
    score = np.asarray(score, dtype=np.float32)
    inside = score[roi] if roi is not None and roi.any() else score.reshape(-1)
    inside = inside[np.isfinite(inside)]
    if inside.size == 0:
        return np.zeros(score.shape, np.float32)
    lo, hi = np.percentile(inside, [low, high])
    if not hi > lo:
        return np.where(score > lo, 1.0, 0.0).astype(np.float32)
    return np.clip((np.nan_to_num(score, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo), 0.0, 1.0)


def colour_map(unit: np.ndarray, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """RGB uint8 colours of values in [0, 1] (OpenCV colour map, blue = low, red = high for JET)."""
    bgr = cv2.applyColorMap(np.round(unit * 255).astype(np.uint8), colormap)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, score: np.ndarray, label: np.ndarray | None = None,
            colormap: int = cv2.COLORMAP_JET, contour_rgb: tuple[int, int, int] = CONTOUR_RGB,
            scale: tuple[float, float] | None = None) -> np.ndarray:
    """``image / 2 + colour(score) / 2`` inside the ROI (label != 255), the anomaly outline drawn on top.

    ``image``: RGB uint8 (H, W, 3); ``score``: (H, W), higher = more anomalous; ``label``: uint8
    (H, W) 0 / 1 / 255 or None (everything is the ROI, no outline). ``scale=(low, high)`` fixes the
    colour range (to compare images on one scale) instead of the image's own percentiles.
    """
    if image.shape[:2] != score.shape:
        raise ValueError(f"overlay: image {image.shape[:2]} and score {score.shape} differ in size")
    roi = np.ones(score.shape, bool) if label is None else label != IGNORE
    if scale is None:
        unit = normalise(score, roi)
    else:
        low, high = scale
        unit = np.clip((np.nan_to_num(np.asarray(score, np.float32), nan=low) - low) / max(high - low, 1e-12), 0, 1)
    heat = colour_map(unit, colormap)
    blended = (image.astype(np.uint16) + heat.astype(np.uint16)) // 2
    out = np.where(roi[..., None], blended.astype(np.uint8), image).copy()
    if label is not None:
        contours, _ = cv2.findContours((label == 1).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, round(min(score.shape) / 256))
        cv2.drawContours(out, contours, -1, contour_rgb, thickness)
    return out


def file_stem(name: str) -> str:
    """A sample name (``city/frame``, may hold separators) as a safe file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name).strip("_") or "sample"


def palette_bytes(palette=CITYSCAPES_PALETTE) -> list[int]:
    """A 256-entry flat RGB palette (class colours first, black after) for palette PNGs."""
    flat = [c for rgb in palette for c in rgb]
    return flat + [0] * (768 - len(flat))


def colour_labels(labels: np.ndarray, palette=CITYSCAPES_PALETTE) -> np.ndarray:
    """RGB uint8 picture of class ids (ids beyond the palette are black)."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette
    return table[labels.astype(np.uint8)]
