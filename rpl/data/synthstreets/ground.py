"""Sky, ground plane (road, markings, sidewalks, grass, fields), the far skyline and the ego hood.

The ground is rendered per pixel from its road-relative coordinates (``Camera.ground_maps``), so
road grain, paving joints, lane markings and crop rows are all in true perspective.
"""
from __future__ import annotations

import cv2
import numpy as np

from .camera import Camera
from .canvas import Canvas, rect
from .classes import BUILDING, ROAD, SIDEWALK, SKY, TERRAIN, VEGETATION, VOID
from .style import Layout, Style, jitter

_TILE = 64


def wrap(x: np.ndarray, period: float) -> np.ndarray:
    """``x mod period`` for float arrays (several times faster than ``np.mod``)."""
    return x - np.floor(x * (1.0 / period)) * period


class Ground:
    """Depth and across-road maps of the ground rows, with band edges of the road layout."""

    def __init__(self, cam: Camera, layout: Layout):
        self.row0 = cam.ground_row0()
        self.z, self.l = cam.ground_maps()
        self.cam, self.layout = cam, layout
        self.footprint = np.square(self.z) / (cam.focal * cam.mount)  # metres of depth one row spans
        half = layout.road_width / 2
        lawn_l, lawn_r = layout.lawn
        side_l, side_r = layout.sidewalk
        # band edges across the road: road | lawn | sidewalk | beyond (terrain / buildings)
        self.road = (-half, half)
        self.sidewalk_left = (-half - lawn_l - side_l, -half - lawn_l)
        self.sidewalk_right = (half + lawn_r, half + lawn_r + side_r)
        self.outer = (self.sidewalk_left[0], self.sidewalk_right[1])

    def surface(self, mask: np.ndarray) -> "Surface":
        """The ground pixels under ``mask`` (a boolean map of the ground rows), flattened."""
        return Surface(self.l[mask], self.z[mask], self.footprint[mask])


class Surface:
    """Road-relative coordinates of some ground pixels, with perspective-correct noise over them."""

    def __init__(self, l: np.ndarray, z: np.ndarray, footprint: np.ndarray):
        self.l, self.z, self.footprint = l, z, footprint

    def noise(self, rng: np.random.Generator, metres: float) -> np.ndarray:
        """Value noise in [-0.5, 0.5] fixed to the ground (cell size in metres), faded where it would alias."""
        tile = rng.random((_TILE, _TILE), dtype=np.float32)
        if self.l.size == 0:
            return np.zeros_like(self.l)
        n = self.l.size
        cols = min(n, 1024)  # remap wants 2-D maps under 32767 pixels a side
        pad = -n % cols
        mx = np.pad(wrap(self.l * (1.0 / metres), _TILE), (0, pad)).reshape(-1, cols)
        my = np.pad(wrap(self.z * (1.0 / metres), _TILE), (0, pad)).reshape(-1, cols)
        values = cv2.remap(tile, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP).ravel()[:n]
        return (values - 0.5) * self.fade(metres)

    def fade(self, metres: float) -> np.ndarray:
        """1 where a pattern of this period is resolved along the depth axis, towards 0 where it aliases."""
        return np.clip(metres / np.maximum(self.footprint, 1e-6) - 0.5, 0.0, 1.0)


def paint_sky(canvas: Canvas, cam: Camera, style: Style) -> None:
    """Gradient sky with noise clouds over the rows above the ground (the ground covers the rest)."""
    rows = cam.ground_row0()
    t = np.clip(np.arange(rows, dtype=np.float32) / max(cam.horizon, 1.0), 0.0, 1.0)[:, None, None]
    sky = style.sky_top[None, None] * (1.0 - t) + style.sky_horizon[None, None] * t
    if style.clouds > 0:
        mid = canvas.mid[:rows]
        cover = np.clip((canvas.coarse[:rows] * 0.7 + mid * 0.3 - (1.0 - style.clouds)) / 0.12, 0.0, 1.0)[..., None]
        sky = sky * (1 - cover) + (0.82 + 0.16 * mid)[..., None] * cover
    canvas.image[:rows] = sky
    canvas.label[:] = SKY


def paint_ground(canvas: Canvas, ground: Ground, style: Style, rng: np.random.Generator) -> None:
    g, lay = ground, ground.layout
    img = canvas.image[g.row0:]
    lab = canvas.label[g.row0:]
    half = lay.road_width / 2
    road_m = np.abs(g.l) <= half
    side_ms = [((g.l >= a) & (g.l < b), edge) for (a, b), edge in
               ((g.sidewalk_left, g.sidewalk_left[1]), (g.sidewalk_right, g.sidewalk_right[0])) if b > a]
    terrain_m = ~road_m
    for m, _ in side_ms:
        terrain_m &= ~m

    # beyond the sidewalks: grass with dry patches (city) or fields with crop rows (rural)
    s = g.surface(terrain_m)
    patches = np.clip((s.noise(rng, 5.0) + 0.5 - 0.55) * 6, 0, 1)[..., None]
    grain = 1 + 0.5 * s.noise(rng, 0.12) + 0.3 * s.noise(rng, 0.6)
    if style.context == "rural":
        spacing = rng.uniform(0.5, 1.2)
        grain += 0.12 * np.cos(2 * np.pi * s.l / spacing) * s.fade(spacing * 4) * (np.abs(s.l) > half + 2.5)
    img[terrain_m] = (style.terrain * (1 - patches) + style.terrain_alt * patches) * grain[..., None]
    lab[terrain_m] = TERRAIN

    for m, curb_at in side_ms:
        s = g.surface(m)
        tile = rng.uniform(0.4, 0.9)
        joints = ((wrap(s.l, tile) < 0.06) | (wrap(s.z, tile) < 0.06)) * s.fade(tile)
        colour = style.sidewalk * ((1 + 0.35 * s.noise(rng, 0.08)) * (1 - 0.18 * joints))[..., None]
        curb = (np.abs(s.l - curb_at) < 0.22)[..., None]
        colour = np.where(curb, style.curb * (1 + 0.2 * s.noise(rng, 0.1))[..., None], colour)
        img[m] = colour
        lab[m] = SIDEWALK

    s = g.surface(road_m)
    tone = 1 + style.road_grain * 2 * s.noise(rng, 0.1) + 0.15 * s.noise(rng, 2.5) + 0.1 * s.noise(rng, 0.4)
    tone *= np.where(s.noise(rng, 7.0) > 0.3, 0.86, 1.0)  # repaired patches
    lane = lay.road_width / lay.lanes
    ruts = np.zeros_like(s.l)
    for k in range(lay.lanes):  # darker wheel tracks along each lane
        ruts += np.exp(-np.square((np.abs(s.l - (-half + (k + 0.5) * lane)) - 0.85) / 0.3))
    tone *= 1 - 0.08 * np.minimum(ruts, 1.0)
    road = style.road * tone[..., None]
    img[road_m] = _markings(road, s, lay, style, rng)
    lab[road_m] = ROAD


def _markings(road: np.ndarray, s: Surface, lay: Layout, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Lane lines painted into the road's pixels (they are road in the labels)."""
    if lay.markings == "none":
        return road
    l = s.l
    half, lane = lay.road_width / 2, lay.road_width / lay.lanes
    width = rng.uniform(0.1, 0.16)
    period, duty, phase = rng.uniform(6, 12), rng.uniform(0.3, 0.5), rng.uniform(0, 12)
    dashes = wrap(s.z + phase, period) < duty * period
    centre = -half + (lay.lanes // 2) * lane if lay.lanes % 2 == 0 else 0.0
    lines = (np.abs(l - centre) < width / 2) & (dashes | (lay.markings == "full" and rng.random() < 0.4))
    if lay.markings == "full":
        for k in range(1, lay.lanes):
            boundary = -half + k * lane
            if abs(boundary - centre) > 0.1:
                lines |= (np.abs(l - boundary) < width / 2) & dashes
        lines |= np.abs(np.abs(l) - (half - 0.3)) < width / 2
    strength = (0.9 if lay.markings != "faded" else 0.35) * np.clip(s.fade(width * 6) + 0.4, 0, 1)
    paint = style.marking * (1 + 0.15 * s.noise(rng, 0.3))[..., None]
    alpha = (lines * strength)[..., None]
    return road * (1 - alpha) + paint * alpha


def shadow_ground(canvas: Canvas, ground: Ground, l_range: tuple[float, float], z_range: tuple[float, float],
                  factor: float) -> None:
    """Darken the ground (image only) inside an across/along-road box: cast shadows of buildings."""
    cam = ground.cam
    top = int(cam.horizon + cam.focal * cam.mount / max(z_range[1], 1e-3)) - ground.row0  # rows of that depth range
    bottom = int(cam.horizon + cam.focal * cam.mount / max(z_range[0], 1e-3)) + 2 - ground.row0
    rows = slice(max(top, 0), max(min(bottom, ground.z.shape[0]), 0))
    l, z = ground.l[rows], ground.z[rows]
    m = (l >= l_range[0]) & (l <= l_range[1]) & (z >= z_range[0]) & (z <= z_range[1])
    canvas.image[ground.row0 + rows.start:ground.row0 + rows.stop][m] *= factor


def paint_skyline(canvas: Canvas, cam: Camera, style: Style, rng: np.random.Generator) -> None:
    """Distant buildings (city) or a forest line (rural) standing on the horizon."""
    s = canvas.h / 192.0
    base = cam.horizon + 2.0 * s
    x = -rng.uniform(0, 10) * s
    while x < canvas.w:
        wide = rng.uniform(5, 22) * s
        if style.context == "city" and rng.random() < 0.8:
            tall = rng.uniform(3, 24) * s
            colour = 0.5 * jitter(rng, style.facades[int(rng.integers(len(style.facades)))]) + 0.5 * style.haze
            canvas.paint([rect(x, base - tall, x + wide, base)], colour, BUILDING)
        else:
            tall = rng.uniform(3, 12) * s
            xs = np.linspace(x, x + wide, 8)
            top = base - tall * (0.6 + 0.4 * rng.random(8))
            poly = np.concatenate([np.stack([xs, top], 1), [[x + wide, base], [x, base]]])
            colour = 0.65 * style.vegetation + 0.35 * style.haze
            canvas.paint([poly], colour, VEGETATION)
        x += wide * rng.uniform(0.7, 1.0)


def paint_hood(canvas: Canvas, fraction: float, rng: np.random.Generator) -> None:
    """The ego vehicle's bonnet along the bottom edge: void (255) in every label, as in Cityscapes."""
    if fraction <= 0:
        return
    h, w = canvas.h, canvas.w
    xs = np.linspace(-1, w + 1, 24)
    top = h - fraction * h * (1 - 0.45 * np.square((xs - w / 2) / (w / 2)))
    poly = np.concatenate([np.stack([xs, top], 1), [[w + 1, h + 1], [-1, h + 1]]])
    paint = jitter(rng, ((0.1, 0.1, 0.12), (0.5, 0.52, 0.55), (0.75, 0.75, 0.78))[int(rng.integers(3))], 0.03)

    def gloss(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        t = (yy - top.min()) / max(fraction * h, 1.0)
        return paint[None] * (0.7 + 0.5 * (1 - t))[:, None] + 0.04

    canvas.paint([poly], None, VOID, shade=gloss)
