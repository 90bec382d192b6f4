"""Cars as boxes in perspective: the end facing the camera and, when the car is off to one side, its
visible flank, with glass, lights and wheels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .camera import Camera
from .canvas import Canvas, ellipse
from .classes import CAR
from .style import CAR_PAINTS, jitter, pick

GLASS = (0.12, 0.14, 0.17)


@dataclass(frozen=True)
class VehicleSize:
    width: float
    length: float
    height: float


def sample_size(rng: np.random.Generator) -> VehicleSize:
    return VehicleSize(rng.uniform(1.7, 1.95), rng.uniform(3.8, 4.9), rng.uniform(1.38, 1.65))


def vehicle(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float,
            size: VehicleSize, oncoming: bool, shadow: float = 0.5) -> None:
    """Draw a vehicle whose near end is at depth ``z``, centred at ``l`` across the road."""
    w, length, h = size.width, size.length, size.height
    z1 = z + length
    foot = cam.project(np.array([l - w / 2 - 0.1, l + w / 2 + 0.1, l + w / 2 + 0.1, l - w / 2 - 0.1]), 0.0,
                       np.array([z - 0.15, z - 0.15, z1, z1]))
    canvas.paint([foot], (0, 0, 0), None, blend=1 - shadow)
    paint = jitter(rng, pick(rng, CAR_PAINTS), 0.03)
    x_world = float(cam.world_x(l, z + length / 2))
    flank = l + w / 2 if x_world < -w / 2 else (l - w / 2 if x_world > w / 2 else None)
    belt = 0.9
    if flank is not None:
        _flank(canvas, cam, flank, z, z1, h, belt, paint, oncoming)
    _end(canvas, cam, rng, l, z, w, h, belt, paint, oncoming)


def _quad_along(cam: Camera, l: float, y0: float, y1: float, za: float, zb: float,
                za_top: float | None = None, zb_top: float | None = None) -> np.ndarray:
    """A quad in the vertical plane ``l`` from height y0 to y1; its top edge may span other depths."""
    za_top = za if za_top is None else za_top
    zb_top = zb if zb_top is None else zb_top
    return cam.project(np.full(4, l), np.array([y0, y0, y1, y1]), np.array([za, zb, zb_top, za_top]))


def _flank(canvas: Canvas, cam: Camera, l: float, z0: float, z1: float, h: float, belt: float,
           paint: np.ndarray, oncoming: bool) -> None:
    side = paint * 0.82
    canvas.paint([_quad_along(cam, l, 0.22, belt, z0, z1)], side, CAR)
    # the glasshouse sits nearer the rear: its slope is steeper at the bonnet end
    a, b = (z0 + 0.9, z1 - 1.2) if oncoming else (z0 + 1.2, z1 - 0.9)
    ta, tb = (z0 + 1.6, z1 - 1.0) if oncoming else (z0 + 1.0, z1 - 1.6)
    canvas.paint([_quad_along(cam, l, belt, h, a, b, ta, tb)], side, CAR)
    canvas.paint([_quad_along(cam, l, belt + 0.05, h - 0.06, a + 0.15, b - 0.15, ta + 0.1, tb - 0.1)], GLASS, None)
    for zc in (z0 + 0.8, z1 - 0.8):
        u, v = cam.project(l, 0.34, zc)
        half = abs(cam.project(l, 0.34, zc - 0.34)[0] - cam.project(l, 0.34, zc + 0.34)[0]) / 2
        canvas.paint([ellipse(u, v, max(half, 0.8), max(0.34 * float(cam.px_per_m(zc)), 0.8), n=16)],
                     (0.05, 0.05, 0.05), CAR)


def _end(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float, w: float, h: float,
         belt: float, paint: np.ndarray, oncoming: bool) -> None:
    def box(x0, x1, y0, y1):
        return cam.project(np.array([l + x0, l + x1, l + x1, l + x0]), np.array([y0, y0, y1, y1]), z)

    label = CAR
    for sgn in (-1, 1):  # wheels peeking out below the body
        canvas.paint([box(sgn * w / 2 - 0.13 * sgn - 0.13, sgn * w / 2 - 0.13 * sgn + 0.13, 0.0, 0.35)],
                     (0.05, 0.05, 0.05), label)
    canvas.paint([box(-w / 2, w / 2, 0.22, belt)], paint, label)
    canvas.paint([box(-w / 2, w / 2, 0.22, 0.4)], (0.1, 0.1, 0.11), None)
    top_w = w * 0.36
    cabin = cam.project(l + np.array([-w * 0.46, w * 0.46, top_w, -top_w]), np.array([belt, belt, h, h]), z)
    canvas.paint([cabin], paint * 0.95, label)
    glass = cam.project(np.array([l - w * 0.4, l + w * 0.4, l + top_w * 0.88, l - top_w * 0.88]),
                        np.array([belt + 0.05, belt + 0.05, h - 0.06, h - 0.06]), z)
    canvas.paint([glass], GLASS, None)
    lamp = (0.95, 0.92, 0.8) if oncoming else (0.85, 0.08, 0.06)
    ly = belt - 0.2
    for sgn in (-1, 1):
        canvas.paint([box(sgn * w * 0.42 - 0.12, sgn * w * 0.42 + 0.12, ly - 0.07, ly + 0.07)], lamp, None)
    if rng.random() < 0.8:
        canvas.paint([box(-0.24, 0.24, 0.42, 0.54)], (0.9, 0.9, 0.88), None)
