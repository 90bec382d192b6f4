"""Test anomalies: object shapes and surface textures that appear nowhere in the training streets nor
in the outlier-exposure set (``oe.OE_CATEGORIES`` / ``oe.OE_TEXTURES`` are disjoint by construction,
checked by the tests). Each is drawn at a ground point ``(l, z)`` with a real size in metres, label
``ANOMALY``; upright kinds stand in a plane facing the camera, flat kinds lie on the ground."""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from .actors import Frame
from .camera import Camera
from .canvas import Canvas, Shade
from .classes import ANOMALY

ANOMALY_KINDS = ("striped_beast", "spotted_blob", "faceted_polyhedron", "flat_ring", "checkered_debris", "spiky_star")
ANOMALY_TEXTURES = ("zebra_stripes", "polka_spots", "flat_facets", "rainbow_hue", "checkerboard", "neon_gradient")
FLAT_KINDS = ("flat_ring", "checkered_debris")  # lying on the ground; the others stand upright
# Bounding diameter / sqrt(covered area) of each kind on screen, measured: turns a target area into a size.
SPREAD = {"striped_beast": 1.31, "spotted_blob": 1.58, "faceted_polyhedron": 1.54, "flat_ring": 2.25,
          "checkered_debris": 2.85, "spiky_star": 1.6}
NEON = np.array([(0.95, 0.1, 0.8), (0.1, 0.95, 0.95), (0.6, 1.0, 0.1), (1.0, 0.5, 0.0), (0.55, 0.1, 0.95),
                 (1.0, 0.3, 0.6), (1.0, 0.95, 0.1), (0.03, 0.03, 0.03), (0.97, 0.97, 0.97)], np.float32)


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    i, j = rng.choice(len(NEON), size=2, replace=False)
    return NEON[i], NEON[j]


def _hsv(h: np.ndarray, s: float = 0.9, v: float = 1.0) -> np.ndarray:
    """Vectorised HSV -> RGB for hue in [0, 1)."""
    k = np.mod(np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0, 6.0)
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def texture(name: str, rng: np.random.Generator, centre: np.ndarray, size_px: float) -> Shade:
    """A pixel-space pattern scaled to the object's on-screen size."""
    c1, c2 = _two_colours(rng)
    angle = rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    cx, cy = centre

    unit = 1.0 / max(size_px, 1.0)

    def along(yy, xx):  # rotated object-relative coordinates, in object sizes
        return ((xx - cx) * ca + (yy - cy) * sa) * unit, ((yy - cy) * ca - (xx - cx) * sa) * unit

    if name == "zebra_stripes":
        freq, wob = rng.uniform(3.0, 6.0), rng.uniform(0.05, 0.2)

        def stripes(yy, xx):
            a, b = along(yy, xx)
            return np.where((np.mod(freq * (a + wob * np.sin(9 * b)), 1.0) < 0.5)[:, None], c1, c2)
        return stripes
    if name == "polka_spots":
        spots = rng.uniform(-0.6, 0.6, size=(14, 2))
        radius = rng.uniform(0.07, 0.13)

        def polka(yy, xx):
            a, b = along(yy, xx)
            d = np.min(np.hypot(a[:, None] - spots[None, :, 0], b[:, None] - spots[None, :, 1]), axis=1)
            return np.where((d < radius)[:, None], c2, c1)
        return polka
    if name == "rainbow_hue":
        turns = rng.integers(1, 4)
        return lambda yy, xx: _hsv(np.mod(turns * (np.arctan2(yy - cy, xx - cx) / (2 * np.pi) + 0.5), 1.0))
    if name == "checkerboard":
        cells = rng.uniform(3.0, 6.0)

        def checker(yy, xx):
            a, b = along(yy, xx)
            odd = (np.floor(a * cells) + np.floor(b * cells)).astype(np.int64) % 2 == 1
            return np.where(odd[:, None], c1, c2)
        return checker
    if name == "neon_gradient":
        return lambda yy, xx: c1[None] + (c2 - c1)[None] * np.clip(along(yy, xx)[0] + 0.5, 0, 1)[:, None]
    raise ValueError(f"unknown anomaly texture {name!r}")


def _radial_polygon(rng: np.random.Generator, n: int, jag: float) -> np.ndarray:
    """A closed irregular outline (unit radius): random harmonics plus per-vertex jitter."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (2, 3, 5):
        r += rng.uniform(0, jag) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    r *= 1 + rng.uniform(-jag, jag, n) * 0.5
    r = np.clip(r, 0.35, None)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1) / r.max()


def _shadow(canvas: Canvas, cam: Camera, l: float, z: float, radius: float) -> None:
    t = np.linspace(0, 2 * np.pi, 18, endpoint=False)
    ring = cam.project(l + radius * np.cos(t), 0.0, z + radius * (0.25 + 0.5 * np.sin(t)))
    canvas.paint([ring], (0, 0, 0), None, blend=0.4)


def striped_beast(canvas, cam, rng, l, z, size):
    f = Frame(cam, l, z)
    d = 1.0 if rng.random() < 0.5 else -1.0
    body_y, leg = size * 0.55, size * 0.08
    polys = [f.oval(0, body_y, size * 0.5, size * 0.2)]
    polys += [f.seg((x * size, body_y), (x * size + rng.uniform(-0.08, 0.08) * size, 0.0), leg)
              for x in (-0.35, -0.2, 0.2, 0.35)]
    polys += [f.seg((0.4 * d * size, body_y + 0.1 * size), (0.6 * d * size, body_y + 0.35 * size), leg * 1.6),
              f.oval(0.66 * d * size, body_y + 0.38 * size, size * 0.14, size * 0.08),
              f.seg((-0.5 * d * size, body_y), (-0.62 * d * size, body_y - 0.2 * size), leg * 0.5)]
    return polys, "zebra_stripes", f([(0, body_y)])[0], size * f.k


def spotted_blob(canvas, cam, rng, l, z, size):
    f = Frame(cam, l, z)
    outline = _radial_polygon(rng, 40, 0.25) * (size / 2)
    outline[:, 1] *= rng.uniform(0.6, 1.0)
    outline[:, 1] -= outline[:, 1].min()  # resting on the ground
    return [f(outline)], "polka_spots", f([(0, size * 0.4)])[0], size * f.k


def spiky_star(canvas, cam, rng, l, z, size):
    f = Frame(cam, l, z)
    spikes = int(rng.integers(6, 12))
    t = np.linspace(0, 2 * np.pi, 2 * spikes, endpoint=False) + rng.uniform(0, np.pi)
    r = np.where(np.arange(2 * spikes) % 2 == 0, 1.0, rng.uniform(0.35, 0.55)) * size / 2
    pts = np.stack([r * np.cos(t), r * np.sin(t) + size / 2], 1)
    return [f(pts)], "neon_gradient", f([(0, size / 2)])[0], size * f.k


def faceted_polyhedron(canvas, cam, rng, l, z, size):
    """Flat-shaded facets of a random convex solid: each facet its own saturated colour."""
    f = Frame(cam, l, z)
    pts = rng.uniform(-0.5, 0.5, size=(int(rng.integers(7, 12)), 2)) * size
    pts[:, 1] -= pts[:, 1].min()  # resting on the ground
    hull = cv2.convexHull(f(pts).astype(np.float32)).reshape(-1, 2).astype(np.float64)
    apex = hull.mean(axis=0) + rng.uniform(-0.2, 0.2, 2) * size * f.k
    base = NEON[rng.integers(len(NEON) - 2)]
    for i in range(len(hull)):
        tri = np.stack([apex, hull[i], hull[(i + 1) % len(hull)]])
        tone = 0.45 + 0.55 * ((i * 0.37 + rng.uniform(0, 0.3)) % 1.0)
        colour = base * tone if i % 2 == 0 else _hsv(np.array([rng.random()]))[0] * tone
        canvas.paint([tri], colour, ANOMALY)
    return [], "flat_facets", apex, size * f.k


def flat_ring(canvas, cam, rng, l, z, size):
    r_out, r_in = size / 2, size / 2 * rng.uniform(0.45, 0.7)
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    thick = size * rng.uniform(0.06, 0.15)
    polys = []
    for y in (0.02, thick):
        polys.append([cam.project(l + r * np.cos(t), y, z + r * np.sin(t)) for r in (r_out, r_in)])
    centre = cam.project(l, thick, z)
    for pair in polys:  # bottom then top rim; each is an outer contour with a hole
        canvas.paint(pair, None, ANOMALY, shade=texture("rainbow_hue", rng, centre, size * float(cam.px_per_m(z))))
    return [], "rainbow_hue", centre, size * float(cam.px_per_m(z))


def checkered_debris(canvas, cam, rng, l, z, size):
    outline = _radial_polygon(rng, 14, 0.35) * (size / 2)
    thick = size * rng.uniform(0.05, 0.12)
    bottom = cam.project(l + outline[:, 0], 0.0, z + outline[:, 1])
    top = cam.project(l + outline[:, 0], thick, z + outline[:, 1])
    centre = cam.project(l, thick, z)
    canvas.paint([bottom], (0.1, 0.1, 0.1), ANOMALY)
    return [top], "checkerboard", centre, size * float(cam.px_per_m(z))


DRAWERS: dict[str, Callable] = {
    "striped_beast": striped_beast, "spotted_blob": spotted_blob, "faceted_polyhedron": faceted_polyhedron,
    "flat_ring": flat_ring, "checkered_debris": checkered_debris, "spiky_star": spiky_star,
}


def draw_anomaly(canvas: Canvas, cam: Camera, rng: np.random.Generator, kind: str, l: float, z: float,
                 size: float) -> None:
    """Draw one anomaly of ``kind`` with its shadow; ``size`` is its largest extent in metres."""
    _shadow(canvas, cam, l, z, size * 0.55)
    polys, tex, centre, size_px = DRAWERS[kind](canvas, cam, rng, l, z, size)
    if polys:
        shade = texture(tex, rng, np.asarray(centre), size_px)
        for poly in polys:  # one at a time: overlapping parts must not cancel (even-odd fill)
            canvas.paint([poly], None, ANOMALY, shade=shade)
