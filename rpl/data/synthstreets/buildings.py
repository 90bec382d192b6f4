"""Buildings along both sides of the street (facades with window grids, in perspective) and their cast
shadows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .camera import Camera
from .canvas import Canvas
from .classes import BUILDING
from .ground import Ground, shadow_ground
from .style import Style, jitter, pick


@dataclass
class Building:
    side: int  # -1 left, +1 right
    face: float  # across-road coordinate of the road-facing facade
    z0: float
    z1: float
    height: float
    depth: float
    colour: np.ndarray
    windows: bool


def plan_buildings(rng: np.random.Generator, ground: Ground, style: Style) -> list[Building]:
    buildings = []
    for side, outer in ((-1, ground.outer[0]), (1, ground.outer[1])):
        if style.context == "rural":
            for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
                z0 = rng.uniform(8, 70)
                buildings.append(Building(side, outer + side * rng.uniform(8, 25), z0, z0 + rng.uniform(8, 20),
                                          rng.uniform(4, 9), rng.uniform(8, 14), jitter(rng, pick(rng, style.facades)),
                                          windows=rng.random() < 0.5))
            continue
        if rng.random() < 0.12:  # a park on this side: grass and trees
            continue
        z = rng.uniform(1.0, 10.0)
        while z < 130:
            length = rng.uniform(8, 28)
            if rng.random() < 0.15:
                z += rng.uniform(4, 14)
                continue
            setback = rng.uniform(0, 0.3) if rng.random() < 0.6 else rng.uniform(1.5, 7)
            buildings.append(Building(side, outer + side * setback, z, z + length, rng.uniform(6, 30),
                                      rng.uniform(8, 16), jitter(rng, pick(rng, style.facades)), windows=True))
            z += length
    return buildings


def cast_shadows(canvas: Canvas, ground: Ground, buildings: list[Building], style: Style,
                 rng: np.random.Generator) -> None:
    """Buildings on the side facing away from the sun throw shadows across the street (image only)."""
    shaded_side = 1 if style.sun_left >= 0.95 else -1
    reach, shift = rng.uniform(0.3, 1.1), rng.uniform(-0.3, 0.3)
    for b in buildings:
        if b.side != shaded_side:
            continue
        span = (b.face - reach * b.height, b.face) if b.side > 0 else (b.face, b.face + reach * b.height)
        shadow_ground(canvas, ground, span, (b.z0 + shift * b.height, b.z1 + shift * b.height), style.shadow)


def paint_building(canvas: Canvas, cam: Camera, b: Building, style: Style, rng: np.random.Generator) -> None:
    light = style.sun_left if b.side < 0 else 1.85 - style.sun_left
    zs = np.linspace(b.z0, b.z1, 2 + int((b.z1 - b.z0) // 10))
    bottom, top = cam.project(b.face, 0.0, zs), cam.project(b.face, b.height, zs)
    facade = np.concatenate([bottom, top[::-1]])
    end_l = np.array([b.face, b.face + b.side * b.depth, b.face + b.side * b.depth, b.face])
    near = cam.project(end_l, np.array([0, 0, b.height, b.height]), b.z0)
    colour = b.colour * light
    canvas.paint([near], colour * 0.78, BUILDING)
    canvas.paint([facade], colour, BUILDING)
    cornice = np.concatenate([cam.project(b.face, b.height - 0.5, zs), top[::-1]])
    canvas.paint([cornice], colour * 0.7, None)
    if not b.windows:
        return
    glass = jitter(rng, pick(rng, ((0.16, 0.18, 0.22), (0.3, 0.36, 0.45), (0.45, 0.5, 0.58))), 0.03)
    spacing, floor = rng.uniform(2.4, 4.0), rng.uniform(2.8, 3.4)
    win_w, win_h = spacing * rng.uniform(0.35, 0.6), floor * rng.uniform(0.4, 0.6)
    centres = np.arange(b.z0 + spacing * 0.7, b.z1 - spacing * 0.4, spacing)
    sills = np.arange(floor + 0.9, b.height - 1.2, floor)
    _paint_windows(canvas, cam, lambda a, y: (np.full_like(a, b.face), y, a), centres, sills, win_w, win_h, glass)
    across = np.arange(spacing * 0.7, b.depth - spacing * 0.4, spacing)
    _paint_windows(canvas, cam, lambda a, y: (b.face + b.side * a, y, np.full_like(a, b.z0)), across, sills,
                   win_w, win_h, glass * 0.8)
    if rng.random() < 0.6:  # shop windows at street level
        shop = jitter(rng, (0.2, 0.22, 0.25), 0.05)
        width = spacing * rng.uniform(0.6, 0.85)
        _paint_windows(canvas, cam, lambda a, y: (np.full_like(a, b.face), y, a), centres, np.array([0.5]),
                       width, rng.uniform(1.8, 2.4), shop)


def _paint_windows(canvas: Canvas, cam: Camera, plane, along: np.ndarray, sills: np.ndarray, width: float,
                   height: float, glass: np.ndarray) -> None:
    """A grid of window quads on a facade plane; ``plane(a, y)`` maps (along, up) to (l, y, z)."""
    if along.size == 0 or sills.size == 0:
        return
    a, y = np.meshgrid(along, sills)
    a, y = a.ravel(), y.ravel()
    corners_a = np.stack([a - width / 2, a + width / 2, a + width / 2, a - width / 2], 1)
    corners_y = np.stack([y, y, y + height, y + height], 1)
    quads = cam.project(*plane(corners_a, corners_y))
    size = np.ptp(quads[..., 0], axis=1)
    quads = quads[size >= 1.2]
    if len(quads):
        canvas.paint(quads, glass, None)
