"""The drawing surface every SynthStreets renderer paints on.

An RGB float image and a label map are painted through the same rasterised polygons (no
anti-aliasing), so every label sits exactly on the pixels that show it; softness comes later from
a blur of the image alone. Flat fills go straight to OpenCV and surface texture is applied once per
picture, per class, which keeps a scene of a few hundred shapes at a few tens of milliseconds.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import cv2
import numpy as np

# (ys, xs) pixel coordinates of a shape's pixels -> (n, 3) RGB colours in [0, 1]
Shade = Callable[[np.ndarray, np.ndarray], np.ndarray]
Polygon = np.ndarray  # (n, 2) float pixel coordinates (x, y)

_COORD_LIMIT = 1.0e6


def _to_int(points) -> np.ndarray:
    """Round pixel coordinates for OpenCV, bounded so that int32 cannot overflow."""
    return np.rint(np.minimum(np.maximum(points, -_COORD_LIMIT), _COORD_LIMIT)).astype(np.int32)


def value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in about [0, 1]: random values on a grid of ``cell``-pixel spacing, bicubic-upsampled."""
    gh, gw = max(2, int(round(h / cell)) + 1), max(2, int(round(w / cell)) + 1)
    grid = rng.random((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)  # may overshoot [0, 1] slightly: harmless


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 28,
            start: float = 0.0, stop: float = 2 * np.pi) -> Polygon:
    """Points on an ellipse (or on an arc from ``start`` to ``stop`` radians, both ends included)."""
    t = np.linspace(start, stop, n, endpoint=False if stop - start >= 2 * np.pi else True)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)


def segment(p0: Sequence[float], p1: Sequence[float], width: float) -> Polygon:
    """A quad of ``width`` pixels around the segment p0-p1 (limbs, poles, bicycle frames)."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-6) * (width / 2)
    return np.stack([p0 + n, p1 + n, p1 - n, p0 - n])


def rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


class Canvas:
    """An image (float RGB) and a label map (uint8) of one picture, plus per-picture noise fields."""

    def __init__(self, h: int, w: int, rng: np.random.Generator, fill_label: int = 255):
        self.h, self.w = h, w
        self.image = np.zeros((h, w, 3), np.float32)
        self.label = np.full((h, w), fill_label, np.uint8)
        scale = max(h, w) / 384.0
        self.fine = value_noise(rng, h, w, 1.5 * scale)
        self.mid = value_noise(rng, h, w, 6.0 * scale)
        self.coarse = value_noise(rng, h, w, 24.0 * scale)
        self._scratch = np.zeros((h, w), np.uint8)

    @staticmethod
    def _contours(polys: Sequence[Polygon] | np.ndarray) -> list[np.ndarray] | np.ndarray:
        """Integer contours for OpenCV from a list of (n, 2) arrays or one (m, n, 2) array."""
        if isinstance(polys, np.ndarray):
            return _to_int(polys) if polys.size else []
        polys = [p for p in polys if len(p) >= 2]
        if len(polys) == 1:
            return [_to_int(polys[0])]
        if not polys:
            return []
        pts = _to_int(np.concatenate(polys))
        return np.split(pts, np.cumsum([len(p) for p in polys[:-1]]))

    def region(self, polys: Sequence[Polygon] | np.ndarray) -> tuple[slice, slice, np.ndarray] | None:
        """Rasterise polygons (several contours: even-odd, so holes work) -> bbox slices and mask."""
        contours = self._contours(polys)
        if len(contours) == 0:
            return None
        pts = contours.reshape(-1, 2) if isinstance(contours, np.ndarray) else np.concatenate(contours)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
        x1, y1 = min(int(hi[0]) + 1, self.w), min(int(hi[1]) + 1, self.h)
        if x0 >= x1 or y0 >= y1:
            return None
        ys, xs = slice(y0, y1), slice(x0, x1)
        self._scratch[ys, xs] = 0
        cv2.fillPoly(self._scratch, contours, 1)
        mask = self._scratch[ys, xs].view(bool)
        return (ys, xs, mask.copy()) if mask.any() else None

    def paint(self, polys: Sequence[Polygon] | np.ndarray, color: Sequence[float] | None, label: int | None = None,
              *, shade: Shade | None = None, blend: float = 1.0) -> None:
        """Fill polygons with a flat colour or a per-pixel ``shade``, and write ``label`` there.

        ``blend`` < 1 mixes with what is already there (see-through fences, bicycle wheels, shadows).
        Flat opaque fills go straight to OpenCV; texture comes later, per class (``apply_grain``).
        """
        if shade is None and blend >= 1.0:
            contours = self._contours(polys)
            if len(contours):
                cv2.fillPoly(self.image, contours, tuple(float(c) for c in color))
                if label is not None:
                    cv2.fillPoly(self.label, contours, int(label))
            return
        region = self.region(polys)
        if region is None:
            return
        ys, xs, mask = region
        if shade is not None:
            yy, xx = np.nonzero(mask)
            colours = shade(yy + ys.start, xx + xs.start).astype(np.float32)
        else:
            colours = np.asarray(color, np.float32)[None, :]
        patch = self.image[ys, xs]
        if blend < 1.0:
            colours = blend * colours + (1.0 - blend) * patch[mask]
        patch[mask] = colours
        if label is not None:
            self.label[ys, xs][mask] = label

    def apply_grain(self, fine: np.ndarray, mid: np.ndarray) -> None:
        """Per-class surface texture: amplitudes (indexed by label value) of the fine and mid noise."""
        lab = self.label
        mod = 1.0 + fine[lab] * (2.0 * self.fine - 1.0) + mid[lab] * (2.0 * self.mid - 1.0)
        self.image *= mod[..., None]

    def paint_mask(self, mask: np.ndarray, colours: np.ndarray, label: int | None = None,
                   offset: tuple[int, int] = (0, 0)) -> None:
        """Paint a boolean mask whose top-left corner is at ``offset`` (y, x), inside the canvas, with
        per-pixel colours (one row per True pixel)."""
        ys, xs = slice(offset[0], offset[0] + mask.shape[0]), slice(offset[1], offset[1] + mask.shape[1])
        self.image[ys, xs][mask] = colours
        if label is not None:
            self.label[ys, xs][mask] = label


_NOISE_BANK_SIDE = 1024


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Unit Gaussian sensor noise, drawn once from a fixed seed; pictures take seeded random windows
    of it (as deterministic as fresh draws, and much cheaper)."""
    return np.random.default_rng(20230901).standard_normal((_NOISE_BANK_SIDE, _NOISE_BANK_SIDE), dtype=np.float32)


def finish(image: np.ndarray, rng: np.random.Generator, blur_sigma: tuple[float, float] = (0.35, 0.75),
           noise_std: tuple[float, float] = (0.004, 0.02)) -> np.ndarray:
    """Camera look: exposure, contrast, white balance, gamma, slight blur, sensor noise -> uint8 RGB."""
    h, w = image.shape[:2]
    gain = rng.uniform(0.82, 1.18) * (1.0 + rng.uniform(-0.06, 0.06, size=3))
    contrast = rng.uniform(0.85, 1.15)
    mean = float(image.mean()) * gain.mean()
    offset = mean * (1.0 - contrast) * 255.0 + 0.5  # + 0.5: round, not truncate, when cast to uint8
    affine = np.hstack([np.diag(gain * contrast * 255.0), np.full((3, 1), offset)])
    img = cv2.transform(image, affine.astype(np.float32))
    np.clip(img, 0, 255, out=img)
    gamma = rng.uniform(0.85, 1.15)
    lut = np.clip((np.arange(256) / 255.0) ** gamma * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img8 = cv2.GaussianBlur(cv2.LUT(img.astype(np.uint8), lut), (0, 0), rng.uniform(*blur_sigma))
    bank = _noise_bank()
    if h > bank.shape[0] or w > bank.shape[1]:
        bank = np.tile(bank, (-(-h // bank.shape[0]), -(-w // bank.shape[1])))
    oy, ox = int(rng.integers(0, bank.shape[0] - h + 1)), int(rng.integers(0, bank.shape[1] - w + 1))
    noise = bank[oy:oy + h, ox:ox + w]
    out = img8.astype(np.float32)
    out += (noise * (255.0 * rng.uniform(*noise_std)) + 0.5)[..., None]
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)
