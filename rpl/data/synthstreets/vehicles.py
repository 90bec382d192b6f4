"""Cars, trucks and buses as boxes in perspective: the end facing the camera and, when the vehicle is
off to one side, its visible flank, with glass, lights and wheels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .camera import Camera
from .canvas import Canvas, ellipse
from .classes import BUS, CAR, TRUCK
from .style import CAR_PAINTS, jitter, pick

GLASS = (0.12, 0.14, 0.17)
BUS_PAINTS = ((0.85, 0.7, 0.1), (0.75, 0.12, 0.1), (0.15, 0.3, 0.6), (0.88, 0.88, 0.86), (0.2, 0.45, 0.25))
TRUCK_PAINTS = ((0.9, 0.9, 0.88), (0.6, 0.6, 0.62), (0.2, 0.3, 0.55), (0.7, 0.2, 0.1), (0.85, 0.75, 0.3))


@dataclass(frozen=True)
class VehicleSize:
    width: float
    length: float
    height: float


def sample_size(rng: np.random.Generator, kind: int) -> VehicleSize:
    if kind == CAR:
        return VehicleSize(rng.uniform(1.7, 1.95), rng.uniform(3.8, 4.9), rng.uniform(1.38, 1.65))
    if kind == TRUCK:
        return VehicleSize(rng.uniform(2.3, 2.55), rng.uniform(6.5, 9.5), rng.uniform(3.1, 3.8))
    return VehicleSize(2.55, rng.uniform(10.5, 13.0), rng.uniform(2.95, 3.3))


def vehicle(canvas: Canvas, cam: Camera, rng: np.random.Generator, kind: int, l: float, z: float,
            size: VehicleSize, oncoming: bool, shadow: float = 0.5) -> None:
    """Draw a vehicle whose near end is at depth ``z``, centred at ``l`` across the road."""
    w, length, h = size.width, size.length, size.height
    z1 = z + length
    foot = cam.project(np.array([l - w / 2 - 0.1, l + w / 2 + 0.1, l + w / 2 + 0.1, l - w / 2 - 0.1]), 0.0,
                       np.array([z - 0.15, z - 0.15, z1, z1]))
    canvas.paint([foot], (0, 0, 0), None, blend=1 - shadow)
    if kind == BUS:
        paint = jitter(rng, pick(rng, BUS_PAINTS))
    elif kind == TRUCK:
        paint = jitter(rng, pick(rng, TRUCK_PAINTS))
    else:
        paint = jitter(rng, pick(rng, CAR_PAINTS), 0.03)
    x_world = float(cam.world_x(l, z + length / 2))
    flank = l + w / 2 if x_world < -w / 2 else (l - w / 2 if x_world > w / 2 else None)
    belt = 0.9 if kind == CAR else 1.1
    if flank is not None:
        _flank(canvas, cam, kind, flank, z, z1, h, belt, paint, oncoming)
    _end(canvas, cam, rng, kind, l, z, w, h, belt, paint, oncoming)


def _quad_along(cam: Camera, l: float, y0: float, y1: float, za: float, zb: float,
                za_top: float | None = None, zb_top: float | None = None) -> np.ndarray:
    """A quad in the vertical plane ``l`` from height y0 to y1; its top edge may span other depths."""
    za_top = za if za_top is None else za_top
    zb_top = zb if zb_top is None else zb_top
    return cam.project(np.full(4, l), np.array([y0, y0, y1, y1]), np.array([za, zb, zb_top, za_top]))


def _flank(canvas: Canvas, cam: Camera, kind: int, l: float, z0: float, z1: float, h: float, belt: float,
           paint: np.ndarray, oncoming: bool) -> None:
    side = paint * 0.82
    length = z1 - z0
    if kind == CAR:
        canvas.paint([_quad_along(cam, l, 0.22, belt, z0, z1)], side, CAR)
        # the glasshouse sits nearer the rear: its slope is steeper at the bonnet end
        a, b = (z0 + 0.9, z1 - 1.2) if oncoming else (z0 + 1.2, z1 - 0.9)
        ta, tb = (z0 + 1.6, z1 - 1.0) if oncoming else (z0 + 1.0, z1 - 1.6)
        canvas.paint([_quad_along(cam, l, belt, h, a, b, ta, tb)], side, CAR)
        canvas.paint([_quad_along(cam, l, belt + 0.05, h - 0.06, a + 0.15, b - 0.15, ta + 0.1, tb - 0.1)], GLASS, None)
        label = CAR
    else:
        label = kind
        canvas.paint([_quad_along(cam, l, 0.35, h, z0, z1)], side, label)
        if kind == BUS:
            canvas.paint([_quad_along(cam, l, 1.15, h - 0.35, z0 + 0.3, z1 - 0.3)], GLASS, None)
        else:
            cab = (z0, z0 + 2.0) if oncoming else (z1 - 2.0, z1)
            canvas.paint([_quad_along(cam, l, 1.3, h * 0.78, cab[0] + 0.3, cab[1] - 0.3)], GLASS, None)
    for zc in (z0 + 0.8, z1 - 0.8) if length < 6 else (z0 + 1.3, z0 + 2.6, z1 - 1.3):
        u, v = cam.project(l, 0.34, zc)
        half = abs(cam.project(l, 0.34, zc - 0.34)[0] - cam.project(l, 0.34, zc + 0.34)[0]) / 2
        canvas.paint([ellipse(u, v, max(half, 0.8), max(0.34 * float(cam.px_per_m(zc)), 0.8), n=16)],
                     (0.05, 0.05, 0.05), label)


def _end(canvas: Canvas, cam: Camera, rng: np.random.Generator, kind: int, l: float, z: float, w: float, h: float,
         belt: float, paint: np.ndarray, oncoming: bool) -> None:
    def box(x0, x1, y0, y1):
        return cam.project(np.array([l + x0, l + x1, l + x1, l + x0]), np.array([y0, y0, y1, y1]), z)

    label = kind
    for sgn in (-1, 1):  # wheels peeking out below the body
        canvas.paint([box(sgn * w / 2 - 0.13 * sgn - 0.13, sgn * w / 2 - 0.13 * sgn + 0.13, 0.0, 0.35)],
                     (0.05, 0.05, 0.05), label)
    canvas.paint([box(-w / 2, w / 2, 0.22 if kind == CAR else 0.35, belt)], paint, label)
    bumper = (0.22, 0.4) if kind == CAR else (0.35, 0.55)
    canvas.paint([box(-w / 2, w / 2, *bumper)], (0.1, 0.1, 0.11), None)
    if kind == CAR:
        top_w = w * 0.36
        cabin = cam.project(l + np.array([-w * 0.46, w * 0.46, top_w, -top_w]), np.array([belt, belt, h, h]), z)
        canvas.paint([cabin], paint * 0.95, label)
        glass = cam.project(np.array([l - w * 0.4, l + w * 0.4, l + top_w * 0.88, l - top_w * 0.88]),
                            np.array([belt + 0.05, belt + 0.05, h - 0.06, h - 0.06]), z)
        canvas.paint([glass], GLASS, None)
    else:
        canvas.paint([box(-w / 2, w / 2, belt, h)], paint, label)
        if kind == BUS or oncoming:
            canvas.paint([box(-w * 0.44, w * 0.44, belt + 0.25 if oncoming else 1.7, h - 0.3)], GLASS, None)
        else:  # cargo doors
            canvas.paint([box(-0.02, 0.02, 0.6, h - 0.1)], paint * 0.6, None)
    lamp = (0.95, 0.92, 0.8) if oncoming else (0.85, 0.08, 0.06)
    ly = belt - 0.2 if kind == CAR else 0.75
    for sgn in (-1, 1):
        canvas.paint([box(sgn * w * 0.42 - 0.12, sgn * w * 0.42 + 0.12, ly - 0.07, ly + 0.07)], lamp, None)
    if rng.random() < 0.8:
        canvas.paint([box(-0.24, 0.24, 0.42, 0.54)], (0.9, 0.9, 0.88), None)
