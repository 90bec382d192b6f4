"""Outlier-exposure pictures: object-centric indoor and outdoor shots of everyday things, in the spirit of COCO.

Object kinds (``OE_CATEGORIES``) and surface finishes (``OE_TEXTURES``) are disjoint from the test
anomalies (``anomalies.ANOMALY_KINDS`` / ``ANOMALY_TEXTURES``): the add-on must generalise from
these to unseen shapes and patterns, as with real COCO and real road anomalies. Objects never
overlap (one per grid cell), and each is painted with its own instance value in the label map,
from which the COCO masks are derived.

A few pictures exist only to be excluded by the Meta-OoD rules: a person or a car (official COCO
ids 1 and 3) among the objects, a picture below the 480-pixel minimum, one without annotations.
"""
from __future__ import annotations

import numpy as np

from . import vehicles
from .actors import Frame, person_in
from .camera import Camera
from .canvas import Canvas, ellipse, finish, rect
from .classes import CAR, PERSON
from .style import jitter, pick

OE_CATEGORIES = ("crate", "ball", "lamp", "chair", "bottle", "barrel", "book", "vase")
OE_TEXTURES = ("wood_grain", "matte_paint", "glossy_plastic", "fabric_weave", "brushed_metal")
OE_CATEGORY_IDS = {name: 101 + i for i, name in enumerate(OE_CATEGORIES)}  # clear of the official 1..90
EXCLUDED_DEMO_CATEGORIES = {"person": 1, "car": 3}  # official COCO ids, Meta-OoD excludes both
OE_SIZE = (480, 512)  # (H, W): passes the Meta-OoD rule height, width >= 480
SMALL_SIZES = ((360, 512), (480, 400))  # pictures the size rule must drop
INSTANCE_BASE = 100  # label value of the first object; 0 = background

WOOD = ((0.55, 0.38, 0.22), (0.68, 0.5, 0.3), (0.42, 0.28, 0.18))
PAINT = ((0.75, 0.2, 0.15), (0.2, 0.4, 0.7), (0.2, 0.55, 0.3), (0.85, 0.75, 0.3), (0.9, 0.9, 0.88), (0.3, 0.3, 0.32))


def _gloss(colour, cx: float, cy: float, r: float, sheen: float = 0.35):
    colour = np.asarray(colour, np.float32)

    def shade(yy, xx):
        d = np.hypot(xx - (cx - 0.35 * r), yy - (cy - 0.35 * r)) / max(r, 1.0)
        light = 0.55 + 0.55 * np.clip(1.0 - d / 1.6, 0.0, 1.0)
        return colour[None] * light[:, None] + sheen * np.exp(-np.square(d / 0.25))[:, None]
    return shade


def _matte(colour, y0: float, y1: float):
    colour = np.asarray(colour, np.float32)
    return lambda yy, xx: colour[None] * (1.05 - 0.3 * np.clip((yy - y0) / max(y1 - y0, 1.0), 0, 1))[:, None]


def crate(c: Canvas, rng, x, y, s, label):
    wood = jitter(rng, pick(rng, WOOD))
    w, h, dx, dy = s * rng.uniform(0.7, 1.0), s * rng.uniform(0.55, 0.8), s * 0.25, s * 0.18
    c.paint([rect(x - w / 2, y - h, x + w / 2, y)], wood, label)
    top = np.array([[x - w / 2, y - h], [x + w / 2, y - h], [x + w / 2 + dx, y - h - dy], [x - w / 2 + dx, y - h - dy]])
    c.paint([top], wood * 1.2, label)
    c.paint([np.array([[x + w / 2, y], [x + w / 2, y - h], [x + w / 2 + dx, y - h - dy], [x + w / 2 + dx, y - dy]])],
            wood * 0.75, label)
    for k in range(1, 4):  # plank seams
        yk = y - h * k / 4
        c.paint([rect(x - w / 2, yk - 1, x + w / 2, yk + 1)], wood * 0.6, None)


def ball(c: Canvas, rng, x, y, s, label):
    r = s * rng.uniform(0.3, 0.45)
    c.paint([ellipse(x, y - r, r, r, n=40)], None, label,
            shade=_gloss(jitter(rng, pick(rng, PAINT)), x, y - r, r))


def lamp(c: Canvas, rng, x, y, s, label):
    metal = jitter(rng, (0.6, 0.58, 0.55))
    shade_col = jitter(rng, pick(rng, ((0.95, 0.9, 0.75), (0.85, 0.8, 0.7), (0.7, 0.3, 0.2))))
    c.paint([ellipse(x, y - s * 0.04, s * 0.2, s * 0.05)], metal * 0.8, label)
    c.paint([rect(x - s * 0.025, y - s * 0.75, x + s * 0.025, y - s * 0.04)], metal, label)
    top, bottom = y - s * 0.98, y - s * 0.62
    c.paint([np.array([[x - s * 0.16, top], [x + s * 0.16, top], [x + s * 0.3, bottom], [x - s * 0.3, bottom]])],
            None, label, shade=_matte(shade_col * 1.1, top, bottom))


def chair(c: Canvas, rng, x, y, s, label):
    col = jitter(rng, pick(rng, WOOD + PAINT[:2]))
    w, seat_y, leg = s * 0.55, y - s * 0.45, max(s * 0.045, 2)
    for lx in (x - w / 2, x + w / 2 - leg, x - w / 2 + w * 0.2, x + w / 2 - w * 0.2):
        c.paint([rect(lx, seat_y, lx + leg, y - (s * 0.06 if abs(lx - x) < w * 0.4 else 0))], col * 0.8, label)
    c.paint([np.array([[x - w / 2, seat_y], [x + w / 2, seat_y], [x + w / 2 + s * 0.12, seat_y - s * 0.1],
                       [x - w / 2 + s * 0.12, seat_y - s * 0.1]])], col * 1.1, label)
    c.paint([rect(x - w / 2 + s * 0.12, y - s, x + w / 2 + s * 0.12, y - s * 0.72)], col, label)
    for px in (x - w / 2 + s * 0.12, x + w / 2 + s * 0.12 - leg):
        c.paint([rect(px, y - s * 0.72, px + leg, seat_y - s * 0.1)], col * 0.9, label)


def bottle(c: Canvas, rng, x, y, s, label):
    glass = jitter(rng, pick(rng, ((0.15, 0.4, 0.2), (0.4, 0.25, 0.1), (0.6, 0.75, 0.8))))
    r, body = s * rng.uniform(0.12, 0.18), s * rng.uniform(0.5, 0.6)
    outline = np.concatenate([[[x - r, y], [x + r, y], [x + r, y - body]],
                              ellipse(x, y - body, r, r * 0.9, start=0, stop=-np.pi, n=12),
                              [[x - r, y - body]]])
    c.paint([outline], None, label, shade=_gloss(glass, x, y - body * 0.6, r * 2, sheen=0.25))
    c.paint([rect(x - r * 0.35, y - s * 0.95, x + r * 0.35, y - body - r * 0.6)], glass * 0.9, label)
    c.paint([rect(x - r * 0.4, y - s, x + r * 0.4, y - s * 0.95)], jitter(rng, pick(rng, PAINT)), label)


def barrel(c: Canvas, rng, x, y, s, label):
    col = jitter(rng, pick(rng, ((0.2, 0.35, 0.6), (0.6, 0.15, 0.1), (0.5, 0.35, 0.2), (0.35, 0.4, 0.3))))
    r, h = s * rng.uniform(0.25, 0.33), s * rng.uniform(0.7, 0.9)
    c.paint([np.concatenate([ellipse(x, y - r * 0.3, r, r * 0.3, start=0, stop=np.pi, n=14),
                             ellipse(x, y - h, r, r * 0.3, start=np.pi, stop=2 * np.pi, n=14)])],
            None, label, shade=_gloss(col, x, y - h / 2, r * 1.5, sheen=0.12))
    c.paint([ellipse(x, y - h, r, r * 0.3, n=24)], col * 1.15, label)
    for t in (0.25, 0.7):  # hoops
        c.paint([rect(x - r, y - h * t - 1.5, x + r, y - h * t + 1.5)], col * 0.55, None)


def book(c: Canvas, rng, x, y, s, label):
    cover = jitter(rng, pick(rng, PAINT))
    w, h, tilt = s * rng.uniform(0.45, 0.6), s * rng.uniform(0.6, 0.8), rng.uniform(-0.3, 0.3)
    corners = np.array([[-w / 2, 0], [w / 2, 0], [w / 2, -h], [-w / 2, -h]])
    rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    pts = corners @ rot.T + [x, y - s * 0.1]
    c.paint([pts], cover, label)
    pages = np.array([[w / 2, 0], [w / 2 + s * 0.05, -s * 0.04], [w / 2 + s * 0.05, -h - s * 0.04], [w / 2, -h]])
    c.paint([pages @ rot.T + [x, y - s * 0.1]], (0.92, 0.9, 0.84), label)
    band = np.array([[-w / 2, -h * 0.7], [w / 2, -h * 0.7], [w / 2, -h * 0.6], [-w / 2, -h * 0.6]])
    c.paint([band @ rot.T + [x, y - s * 0.1]], cover * 0.5 + 0.4, None)


def vase(c: Canvas, rng, x, y, s, label):
    col = jitter(rng, pick(rng, ((0.8, 0.78, 0.72), (0.3, 0.45, 0.6), (0.65, 0.35, 0.25), (0.2, 0.2, 0.22))))
    t = np.linspace(0, 1, 16)
    radius = s * (0.12 + 0.16 * np.sin(np.pi * (0.15 + 0.8 * t)) * rng.uniform(0.7, 1.1)) * (1 - 0.3 * t)
    ys = y - t * s * rng.uniform(0.75, 0.95)
    outline = np.concatenate([np.stack([x + radius, ys], 1), np.stack([x - radius, ys], 1)[::-1]])
    c.paint([outline], None, label, shade=_gloss(col, x, ys.mean(), radius.max() * 1.4, sheen=0.2))


DRAWERS = {"crate": crate, "ball": ball, "lamp": lamp, "chair": chair, "bottle": bottle, "barrel": barrel,
           "book": book, "vase": vase}


GROUNDS = ((0.3, 0.48, 0.2), (0.45, 0.55, 0.25), (0.75, 0.68, 0.4), (0.86, 0.78, 0.6), (0.45, 0.33, 0.22),
           (0.9, 0.92, 0.95), (0.55, 0.54, 0.5))  # lawn, meadow, straw, sand, earth, snow, gravel
OUTDOOR_SHARE = 0.5  # COCO is about half indoors, half outdoors
SKIES = ((0.45, 0.62, 0.88), (0.7, 0.78, 0.88), (0.8, 0.8, 0.82), (0.9, 0.75, 0.6))


def _indoor(c: Canvas, rng: np.random.Generator) -> float:
    """A wall and a floor or table top; returns the row where they meet."""
    split = c.h * rng.uniform(0.4, 0.65)
    wall = jitter(rng, pick(rng, ((0.85, 0.82, 0.75), (0.7, 0.75, 0.78), (0.6, 0.55, 0.5), (0.9, 0.88, 0.85))))
    floor = jitter(rng, pick(rng, ((0.55, 0.4, 0.28), (0.45, 0.45, 0.47), (0.7, 0.65, 0.55), (0.35, 0.3, 0.28))))
    light = (1.05 - 0.25 * np.abs(np.arange(c.w, dtype=np.float32)[None] / c.w - rng.uniform(0.2, 0.8)))
    tone = (light * (1 + 0.12 * (c.mid - 0.5) + 0.08 * (c.fine - 0.5)))[..., None]
    row = int(split)
    c.image[:row] = wall * tone[:row]
    c.image[row:] = floor * tone[row:]
    return split


def _outdoor(c: Canvas, rng: np.random.Generator) -> float:
    """Sky over open ground (lawn, meadow, straw, sand, earth, snow or gravel), sometimes in rows
    (ploughed, mown) and under a distant tree line: COCO's outlier pictures are as often outdoors as
    in, and CoroCL's context pool should see that variety of backgrounds. Returns the horizon row."""
    horizon = c.h * rng.uniform(0.3, 0.55)
    rows = np.arange(c.h, dtype=np.float32)[:, None, None]
    sky_top, sky_low = jitter(rng, pick(rng, SKIES)), jitter(rng, (0.88, 0.9, 0.92))
    t = np.clip(rows / max(horizon, 1.0), 0.0, 1.0)
    sky = sky_top * (1 - t) + sky_low * t + 0.08 * (c.coarse[..., None] - 0.5)
    ground, patch = jitter(rng, pick(rng, GROUNDS)), jitter(rng, pick(rng, GROUNDS))
    mix = np.clip((c.coarse - 0.6) * 5, 0, 1)[..., None] * rng.uniform(0.0, 0.8)
    depth = np.clip((rows - horizon) / max(c.h - horizon, 1.0), 0.0, 1.0)  # texture grows towards the camera
    grain = 1 + (0.1 + 0.25 * depth) * (c.fine[..., None] - 0.5) + 0.2 * (c.mid[..., None] - 0.5)
    if rng.random() < 0.5:  # ploughed or mown rows in perspective, towards the camera or across
        below = np.maximum(rows[..., 0] - horizon, 1.0)
        if rng.random() < 0.5:
            phase = (np.arange(c.w, dtype=np.float32)[None] - c.w * rng.uniform(0.2, 0.8)) / below
            period = rng.uniform(0.15, 0.5)
        else:
            phase, period = c.h / below, rng.uniform(0.3, 1.0)
        grain = grain * (1 + rng.uniform(0.08, 0.2) * np.cos(2 * np.pi * phase / period))[..., None]
    earth = (ground * (1 - mix) + patch * mix) * grain * (0.85 + 0.2 * depth)
    row = int(horizon)
    c.image[:row] = sky[:row]
    c.image[row:] = earth[row:]
    if rng.random() < 0.5:  # a dark tree line standing on the horizon
        top = horizon - c.h * rng.uniform(0.03, 0.1) * (0.6 + 0.8 * c.coarse[row, :])
        canopy = (rows[..., 0] >= top[None]) & (rows[..., 0] < horizon)
        leaves = jitter(rng, (0.2, 0.3, 0.15)) * (0.8 + 0.4 * c.mid[..., None])
        c.image[canopy] = leaves[canopy]
    return horizon


def _backdrop(c: Canvas, rng: np.random.Generator) -> float:
    """Indoors (wall and floor) or outdoors (sky and ground, ``OUTDOOR_SHARE``); returns the row where
    the back plane meets the ground. Every backdrop pixel is background (0)."""
    split = _outdoor(c, rng) if rng.random() < OUTDOOR_SHARE else _indoor(c, rng)
    c.label[:] = 0
    return split


Instance = tuple[int, str, bool]  # (label value, category name, is_crowd)


def render_oe_image(rng: np.random.Generator, role: str = "objects") -> tuple[np.ndarray, np.ndarray, list[Instance]]:
    """One picture -> (RGB uint8, instance label map, [(label value, category name, is_crowd)]).

    ``role``: "objects" (1-4 OE objects, sometimes a crowd of balls), "person" / "car" (an excluded
    category among objects), "small" (below the minimum size), "empty" (no annotation).
    """
    h, w = SMALL_SIZES[int(rng.integers(len(SMALL_SIZES)))] if role == "small" else OE_SIZE
    c = Canvas(h, w, rng, fill_label=0)
    floor_row = _backdrop(c, rng)
    instances: list[Instance] = []
    if role == "empty":
        return finish(c.image, rng), c.label, instances
    n = int(rng.integers(1, 5)) if role in ("objects", "small") else int(rng.integers(1, 3))
    cells = n + (role in ("person", "car"))
    cols = cells if cells <= 2 else 2
    rows_n = int(np.ceil(cells / cols))
    slots = [(i % cols, i // cols) for i in range(cells)]
    crowd_slot = int(rng.integers(n)) if role == "objects" and rng.random() < 0.2 else -1
    for k, (ci, ri) in enumerate(slots):
        cw, ch = w / cols, (h - floor_row * 0.6) / rows_n
        x = cw * (ci + 0.5) + rng.uniform(-0.1, 0.1) * cw
        base = floor_row * 0.6 + ch * (ri + 1) - rng.uniform(0.05, 0.15) * ch
        size = min(cw, ch) * rng.uniform(0.55, 0.85)
        if k == n:  # the excluded category, last so it never covers an object
            label = PERSON if role == "person" else CAR
            if role == "person":
                person_in(c, Frame.at(x, base, size / 1.9), rng, PERSON)
            else:
                focal, lateral = w * 0.9, rng.uniform(-2.5, 2.5)
                z = focal * 1.9 / size  # a car about as wide as the cell's object size
                cam = Camera(h, w, focal, mount=1.2, horizon=base - focal * 1.2 / z, centre_x=x + focal * lateral / z,
                             lateral=lateral, bend=0.0)
                vehicles.vehicle(c, cam, rng, 0.0, z, vehicles.sample_size(rng), rng.random() < 0.5, 0.3)
            instances.append((label, "person" if role == "person" else "car", False))
            continue
        label = INSTANCE_BASE + k
        if k == crowd_slot:  # a heap of small balls, annotated as one crowd region (RLE)
            for _ in range(int(rng.integers(4, 9))):
                ball(c, rng, x + rng.uniform(-0.3, 0.3) * size, base - rng.uniform(0, 0.3) * size, size * 0.35, label)
            instances.append((label, "ball", True))
            continue
        kind = OE_CATEGORIES[int(rng.integers(len(OE_CATEGORIES)))]
        DRAWERS[kind](c, rng, x, base, size, label)
        instances.append((label, kind, False))
    return finish(c.image, rng, blur_sigma=(0.3, 0.6)), c.label, instances
