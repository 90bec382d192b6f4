"""COCO instance annotations from instance masks: polygons traced with OpenCV, or uncompressed RLE
for crowd regions, with ``bbox`` and ``area`` exactly as ``pycocotools`` expects them."""
from __future__ import annotations

import cv2
import numpy as np


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = np.asarray(mask, bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a mask as COCO polygons ``[x0, y0, x1, y1, ...]`` (at least 3 points each)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def instance_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int, crowd: bool) -> dict | None:
    """One COCO annotation for a non-empty mask (None when the mask is empty)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    polygons = [] if crowd else mask_polygons(mask)
    segmentation = polygons if polygons else rle_uncompressed(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
        "area": float(ys.size), "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
        "iscrowd": int(crowd or not polygons),
    }
