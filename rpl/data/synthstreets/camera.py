"""A pinhole camera over a flat ground plane with a gently bending road.

World coordinates are road-relative: ``l`` metres across the road (0 = road centre, positive to
the right), ``y`` metres up, ``z`` metres ahead. The road centre drifts sideways as ``bend * z^2``
(a curve), and the camera sits ``lateral`` metres right of the centre at height ``mount``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEAREST_Z = 1.0  # no geometry is projected nearer than this (keeps pixel coordinates bounded)
FAR_Z = 600.0


@dataclass(frozen=True)
class Camera:
    height: int
    width: int
    focal: float  # pixels
    mount: float  # camera height above ground, metres
    horizon: float  # image row of the vanishing point
    centre_x: float  # image column of the vanishing point
    lateral: float  # camera offset right of the road centre, metres
    bend: float  # road curvature coefficient

    @classmethod
    def sample(cls, rng: np.random.Generator, h: int, w: int, lateral: float, bend_max: float) -> "Camera":
        return cls(h, w, focal=w * rng.uniform(0.72, 0.95), mount=rng.uniform(1.3, 1.75),
                   horizon=h * rng.uniform(0.36, 0.5), centre_x=w * (0.5 + rng.uniform(-0.1, 0.1)),
                   lateral=lateral, bend=rng.uniform(-bend_max, bend_max))

    def world_x(self, l, z):
        """Metres right of the camera of the point ``l`` across the road at depth ``z``."""
        return self.bend * np.square(z) + np.asarray(l) - self.lateral

    def project(self, l, y, z) -> np.ndarray:
        """(..., 2) pixel coordinates (x, y) of road-relative points; broadcasts its arguments."""
        z = np.maximum(np.asarray(z, np.float64), NEAREST_Z)
        u = self.centre_x + self.focal * (self.bend * z * z + np.asarray(l, np.float64) - self.lateral) / z
        v = self.horizon + self.focal * (self.mount - np.asarray(y, np.float64)) / z
        out = np.empty(np.broadcast_shapes(np.shape(u), np.shape(v)) + (2,))
        out[..., 0], out[..., 1] = u, v
        return out

    def px_per_m(self, z) -> np.ndarray:
        return self.focal / np.maximum(np.asarray(z, np.float64), NEAREST_Z)

    def ground_row0(self) -> int:
        """First image row that shows ground (below the horizon)."""
        return min(int(np.floor(self.horizon)) + 1, self.height)

    def ground_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel depth ``z`` and road-relative ``l`` of the ground rows (from ``ground_row0``)."""
        rows = np.arange(self.ground_row0(), self.height, dtype=np.float32) + 0.5
        z = self.focal * self.mount / np.maximum(rows - self.horizon, 1e-3)
        z = np.minimum(z, FAR_Z)[:, None]
        cols = np.arange(self.width, dtype=np.float32)[None, :] + 0.5
        world_x = (cols - self.centre_x) * z / self.focal
        l = world_x - (self.bend * z * z - self.lateral)
        return np.broadcast_to(z, l.shape).astype(np.float32), l.astype(np.float32)

    def depth_at_row(self, row: float) -> float:
        return float(min(self.focal * self.mount / max(row - self.horizon, 1e-3), FAR_Z))
