"""Upright street furniture and people: trees, poles, street lamps, traffic lights, signs, persons,
riders, bicycles and motorcycles. Each stands in a plane facing the camera at depth ``z``, so its
local metric drawing scales exactly with perspective."""
from __future__ import annotations

import numpy as np

from .camera import Camera
from .canvas import Canvas, ellipse, segment
from .classes import PERSON, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION
from .style import CLOTHES, SKIN, jitter, pick

MIN_POLE_PX = 3.0  # thinner poles vanish at the segmenter's stride-4 decoder


class Frame:
    """Local upright coordinates (metres: x right, y up) at ground point (l, z) -> pixels."""

    def __init__(self, cam: Camera, l: float, z: float):
        self.k = float(cam.px_per_m(z))
        self.u0, self.v0 = cam.project(l, 0.0, z)

    @classmethod
    def at(cls, u0: float, v0: float, px_per_m: float) -> "Frame":
        """A frame placed directly in the image (object-centric pictures without a street)."""
        frame = cls.__new__(cls)
        frame.k, frame.u0, frame.v0 = px_per_m, u0, v0
        return frame

    def __call__(self, pts) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        return np.stack([self.u0 + self.k * pts[:, 0], self.v0 - self.k * pts[:, 1]], 1)

    def seg(self, p0, p1, width: float, min_px: float = 1.0) -> np.ndarray:
        a, b = self([p0, p1])
        return segment(a, b, max(width * self.k, min_px))

    def oval(self, cx: float, cy: float, rx: float, ry: float, n: int = 20) -> np.ndarray:
        (u, v), = self([(cx, cy)])
        return ellipse(u, v, max(rx * self.k, 0.6), max(ry * self.k, 0.6), n=n)


def tree(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float, colour: np.ndarray,
         conifer: bool = False) -> None:
    f = Frame(cam, l, z)
    trunk_h, radius = rng.uniform(1.6, 3.2), rng.uniform(1.3, 3.2)
    bark = jitter(rng, (0.3, 0.24, 0.18), 0.04)
    canvas.paint([f.seg((0, 0), (0, trunk_h + radius), rng.uniform(0.2, 0.4), 1.5)], bark, VEGETATION)
    rx, ry = radius, radius * (rng.uniform(1.6, 2.4) if conifer else rng.uniform(0.85, 1.2))
    blob(canvas, f, 0.0, trunk_h + ry * 0.9, rx, ry, jitter(rng, colour, 0.05), VEGETATION, taper=conifer)


def blob(canvas: Canvas, f: Frame, cx: float, cy: float, rx: float, ry: float, colour: np.ndarray, label: int,
         taper: bool = False, roughness: float = 0.35) -> None:
    """A leafy mass: an ellipse whose rim is broken up by the canvas noise (canopies, bushes)."""
    (u, v), = f([(cx, cy)])
    rxp, ryp = max(rx * f.k, 1.0), max(ry * f.k, 1.0)
    y0, x0 = int(np.floor(v - ryp * 1.2)), int(np.floor(u - rxp * 1.2))
    y1, x1 = int(np.ceil(v + ryp * 1.2)) + 1, int(np.ceil(u + rxp * 1.2)) + 1
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, canvas.h), min(x1, canvas.w)
    if cy0 >= cy1 or cx0 >= cx1:
        return
    yy, xx = np.mgrid[cy0:cy1, cx0:cx1].astype(np.float32)
    dy = (yy - v) / ryp
    dx = (xx - u) / rxp
    if taper:  # conifer: narrower towards the top
        dx = dx / np.clip(0.55 + 0.5 * dy, 0.15, 1.2)
    d = np.sqrt(dx * dx + dy * dy)
    n = canvas.mid[cy0:cy1, cx0:cx1]
    inside = d < 0.9 + roughness * (n - 0.5) * 2
    if not inside.any():
        return
    light = 1.0 - 0.25 * dy - 0.15 * dx + 0.9 * (canvas.fine[cy0:cy1, cx0:cx1] - 0.5)
    colours = colour[None] * light[inside][:, None]
    canvas.paint_mask(inside, colours, label, offset=(cy0, cx0))


def pole(canvas: Canvas, cam: Camera, l: float, z: float, height: float, colour: np.ndarray,
         width: float = 0.14, arm: float = 0.0) -> Frame:
    """A vertical pole, optionally with a horizontal arm of ``arm`` metres (sign = direction) at the top."""
    f = Frame(cam, l, z)
    canvas.paint([f.seg((0, 0), (0, height), width, MIN_POLE_PX)], colour, POLE)
    if arm:
        canvas.paint([f.seg((0, height - 0.1), (arm, height - 0.1), width * 0.8, MIN_POLE_PX)], colour, POLE)
    return f


def street_lamp(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float, reach: float) -> None:
    colour = jitter(rng, pick(rng, ((0.35, 0.36, 0.38), (0.55, 0.56, 0.58), (0.2, 0.26, 0.22))), 0.03)
    height = rng.uniform(5.5, 9.0)
    f = pole(canvas, cam, l, z, height, colour, rng.uniform(0.12, 0.2), arm=reach)
    canvas.paint([f.oval(reach, height - 0.25, 0.35, 0.15)], colour * 0.8, POLE)


def traffic_light(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float, reach: float,
                  facing: bool) -> None:
    colour = jitter(rng, (0.3, 0.31, 0.32), 0.03)
    top = rng.uniform(5.0, 6.5) if reach else rng.uniform(2.6, 3.6)
    f = pole(canvas, cam, l, z, top, colour, rng.uniform(0.12, 0.18), arm=reach)
    housings = ((0.08, 0.08, 0.09), (0.08, 0.08, 0.09), (0.75, 0.62, 0.12), (0.15, 0.22, 0.15))
    housing = jitter(rng, pick(rng, housings), 0.02)
    bw, bh = rng.uniform(0.3, 0.4), rng.uniform(0.8, 1.0)
    bx, by = (reach, top - 0.1 - bh) if reach else (0.0, top - bh * 0.55)
    box = f([(bx - bw / 2, by), (bx + bw / 2, by), (bx + bw / 2, by + bh), (bx - bw / 2, by + bh)])
    canvas.paint([box], housing, TRAFFIC_LIGHT)
    if facing:
        lit = int(rng.integers(3))
        for i, on in enumerate(((1.0, 0.15, 0.1), (1.0, 0.72, 0.1), (0.25, 1.0, 0.55))):
            lamp = np.array(on) if i == lit else np.array(on) * 0.18 + 0.05
            canvas.paint([f.oval(bx, by + bh * (0.82 - 0.32 * i), bw * 0.3, bw * 0.3, n=12)], lamp, None)


SIGN_SHAPES = ("round", "triangle", "square", "octagon", "plate", "diamond")


def traffic_sign(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float, facing: bool) -> None:
    colour = jitter(rng, (0.5, 0.51, 0.53), 0.03)
    top = rng.uniform(2.2, 3.0)
    f = pole(canvas, cam, l, z, top, colour, rng.uniform(0.07, 0.11))
    for level in range(1 if rng.random() < 0.7 else 2):
        shape, size = pick(rng, SIGN_SHAPES), rng.uniform(0.55, 0.8)
        cy = top - size * (0.55 + 1.1 * level)
        outline, face, inner = _sign_outline(f, shape, cy, size)
        if not facing:
            canvas.paint([outline], (0.55, 0.56, 0.58), TRAFFIC_SIGN)
            continue
        canvas.paint([outline], face[0], TRAFFIC_SIGN)
        canvas.paint([inner], face[1], None)
        if shape in ("round", "square", "plate"):
            canvas.paint([f.seg((-size * 0.22, cy), (size * 0.22, cy), size * 0.12)], face[2], None)


def _sign_outline(f: Frame, shape: str, cy: float, s: float):
    red, white, blue, yellow = (0.8, 0.1, 0.1), (0.92, 0.92, 0.9), (0.1, 0.3, 0.7), (0.95, 0.8, 0.15)
    if shape == "round":
        return f.oval(0, cy, s / 2, s / 2), (red, white, (0.1, 0.1, 0.1)), f.oval(0, cy, s * 0.36, s * 0.36)
    if shape == "triangle":
        tri = lambda r: f([(-r, cy - r * 0.58), (r, cy - r * 0.58), (0, cy + r * 1.15)])
        return tri(s / 2), (red, white), tri(s * 0.32)
    if shape == "square":
        sq = lambda r: f([(-r, cy - r), (r, cy - r), (r, cy + r), (-r, cy + r)])
        return sq(s / 2), (blue, blue, white), sq(s * 0.4)
    if shape == "octagon":
        t = np.arange(8) * np.pi / 4 + np.pi / 8
        octo = lambda r: f(np.stack([r * np.cos(t), cy + r * np.sin(t)], 1))
        return octo(s / 2), (red, red), octo(s * 0.4)
    if shape == "plate":
        pl = lambda a, b: f([(-a, cy - b), (a, cy - b), (a, cy + b), (-a, cy + b)])
        return pl(s * 0.7, s * 0.25), ((0.1, 0.4, 0.2), white, white), pl(s * 0.62, s * 0.18)
    dia = lambda r: f([(0, cy - r), (r, cy), (0, cy + r), (-r, cy)])
    return dia(s / 2), (white, yellow), dia(s * 0.38)


def person(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float, label: int = PERSON) -> None:
    person_in(canvas, Frame(cam, l, z), rng, label)


def person_in(canvas: Canvas, f: Frame, rng: np.random.Generator, label: int = PERSON) -> None:
    """A pedestrian standing or walking, front/back or side on, with clothes, skin, hair, maybe a bag."""
    s = rng.uniform(1.55, 1.95) / 1.75 if rng.random() > 0.1 else rng.uniform(1.05, 1.4) / 1.75
    top, bottom = jitter(rng, pick(rng, CLOTHES)), jitter(rng, pick(rng, CLOTHES))
    skin, hair = jitter(rng, pick(rng, SKIN), 0.02), jitter(rng, (0.12, 0.09, 0.07), 0.05)
    side = rng.random() < 0.55
    d = 1.0 if rng.random() < 0.5 else -1.0
    parts = []  # (polygon, colour), drawn in order
    if side:
        stride, swing = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.25)
        for sgn in (1, -1):
            parts.append((f.seg((0, 0.92 * s), (sgn * stride * s, 0.03), 0.15 * s), bottom))
        parts.append((f([(-0.13 * s, 0.9 * s), (0.13 * s, 0.9 * s), (0.15 * s, 1.46 * s), (-0.13 * s, 1.46 * s)]), top))
        parts.append((f.seg((0, 1.42 * s), (-d * swing * s, 0.84 * s), 0.09 * s), top * 0.9))
        head_x = 0.03 * d * s
    else:
        spread = rng.uniform(0.0, 0.08)
        for sgn in (1, -1):
            parts.append((f.seg((sgn * 0.09 * s, 0.92 * s), (sgn * (0.1 + spread) * s, 0.03), 0.15 * s), bottom))
        parts.append((f([(-0.18 * s, 0.9 * s), (0.18 * s, 0.9 * s), (0.23 * s, 1.46 * s), (-0.23 * s, 1.46 * s)]), top))
        for sgn in (1, -1):
            parts.append((f.seg((sgn * 0.22 * s, 1.42 * s), (sgn * 0.27 * s, 0.82 * s), 0.09 * s), top * 0.9))
        head_x = 0.0
    parts.append((f.seg((head_x, 1.42 * s), (head_x, 1.56 * s), 0.08 * s), skin))
    parts.append((f.oval(head_x, 1.62 * s, 0.1 * s, 0.12 * s), skin))
    parts.append((f.oval(head_x, 1.68 * s, 0.1 * s, 0.07 * s), hair))
    if rng.random() < 0.25:  # bag
        bag = jitter(rng, pick(rng, CLOTHES))
        bx = -d * 0.2 if side else 0.25
        parts.append((f(np.array([(bx - 0.1, 0.9), (bx + 0.1, 0.9), (bx + 0.1, 1.2), (bx - 0.1, 1.2)]) * s), bag))
    for poly, colour in parts:
        canvas.paint([poly], colour, label)


def pole_only(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float, height: float,
              colour: np.ndarray) -> None:
    """A wooden utility pole with a cross-arm (rural roads)."""
    f = pole(canvas, cam, l, z, height, colour, rng.uniform(0.2, 0.28))
    canvas.paint([f.seg((-0.7, height - 0.5), (0.7, height - 0.5), 0.12, MIN_POLE_PX)], colour * 0.9, POLE)


def bush(canvas: Canvas, cam: Camera, rng: np.random.Generator, l: float, z: float, colour: np.ndarray) -> None:
    f = Frame(cam, l, z)
    rx, ry = rng.uniform(0.6, 1.6), rng.uniform(0.5, 0.9)
    blob(canvas, f, 0.0, ry * 0.8, rx, ry, jitter(rng, colour * 1.1, 0.05), VEGETATION, roughness=0.25)
