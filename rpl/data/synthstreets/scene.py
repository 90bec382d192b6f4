"""One street picture: plan the layout and its objects in road coordinates, then paint far to near.

``render_street`` is the single entry point for the training streets and all three anomaly test
sets, so the city test context is exactly the training distribution plus anomalies.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from . import actors, vehicles
from .anomalies import ANOMALY_KINDS, FLAT_KINDS, SPREAD, draw_anomaly
from .buildings import cast_shadows, paint_building, plan_buildings
from .camera import Camera
from .canvas import Canvas, finish
from .classes import ANOMALY, BUILDING, CAR, PERSON, POLE, ROAD, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, VOID
from .ground import Ground, paint_ground, paint_hood, paint_skyline, paint_sky
from .style import Layout, jitter, sample_layout, sample_style

Draw = Callable[[Canvas], None]


def _grain_table(values: dict[int, float]) -> np.ndarray:
    table = np.zeros(256, np.float32)
    for cls, amp in values.items():
        table[cls] = amp
    return table


# Surface texture per class (amplitudes of fine and mid noise): ground classes are textured when
# rendered, in perspective, so they get none here.
GRAIN_FINE = _grain_table({BUILDING: 0.07, POLE: 0.06, TRAFFIC_LIGHT: 0.04, TRAFFIC_SIGN: 0.03, VEGETATION: 0.3,
                           PERSON: 0.08, CAR: 0.04, VOID: 0.02, ANOMALY: 0.03})
GRAIN_MID = _grain_table({BUILDING: 0.06, VEGETATION: 0.15, PERSON: 0.04, CAR: 0.03})


@dataclass
class Scene:
    image: np.ndarray  # uint8 RGB (H, W, 3)
    label: np.ndarray  # uint8: train ids 0..18, VOID (hood), ANOMALY
    visible_fraction: float  # share of the anomaly pixels drawn that stay visible (1.0 without anomalies)

    def anomaly_mask(self) -> np.ndarray:
        """Fishyscapes convention: 0 inlier, 1 anomaly, 255 void (the ego hood)."""
        return np.where(self.label == ANOMALY, 1, np.where(self.label == VOID, 255, 0)).astype(np.uint8)

    def obstacle_mask(self) -> np.ndarray:
        """Obstacle-track convention: the road is the region of interest (0), obstacles on it 1, the rest 255."""
        return np.where(self.label == ANOMALY, 1, np.where(self.label == ROAD, 0, 255)).astype(np.uint8)


class _Occupancy:
    """Footprints (l0, l1, z0, z1) already taken on the ground, so objects do not interpenetrate."""

    def __init__(self):
        self.boxes = np.empty((0, 4))

    def take(self, l0: float, l1: float, z0: float, z1: float) -> bool:
        b = self.boxes
        if ((l0 < b[:, 1]) & (b[:, 0] < l1) & (z0 < b[:, 3]) & (b[:, 2] < z1)).any():
            return False
        self.boxes = np.vstack([b, (l0, l1, z0, z1)])
        return True


def render_street(rng: np.random.Generator, size: tuple[int, int], context: str = "city", anomalies: int = 0,
                  anomaly_area: tuple[float, float] = (0.003, 0.08), on_road_only: bool = False) -> Scene:
    """Render a street of ``context`` ("city" or "rural") with ``anomalies`` test objects.

    ``anomaly_area`` bounds each anomaly's target on-screen area as a fraction of the image;
    ``on_road_only`` keeps them on the carriageway (obstacle track), else road or sidewalk.
    """
    h, w = size
    canvas = Canvas(h, w, rng)
    style, layout = sample_style(rng, context), sample_layout(rng, context)
    lane = layout.road_width / layout.lanes
    if context == "city":
        ego_lane = int(rng.integers(layout.lanes // 2, layout.lanes))
        lateral = -layout.road_width / 2 + (ego_lane + 0.5) * lane + rng.uniform(-0.3, 0.3)
    else:
        lateral = rng.uniform(0.2, 1.2)
    cam = Camera.sample(rng, h, w, lateral, bend_max=0.0012 if context == "city" else 0.0025)
    ground = Ground(cam, layout)
    paint_sky(canvas, cam, style)
    paint_ground(canvas, ground, style, rng)
    buildings = plan_buildings(rng, ground, style)
    cast_shadows(canvas, ground, buildings, style, rng)
    paint_skyline(canvas, cam, style, rng)

    occupied = _Occupancy()
    background: list[tuple[float, Draw]] = [(b.z0, partial(paint_building, cam=cam, b=b, style=style, rng=rng))
                                            for b in buildings]
    background += _background_trees(rng, cam, ground, style, buildings)
    for z, draw in sorted(background, key=lambda item: -item[0]):
        draw(canvas)

    items = [(z, draw, True) for z, draw in
             _plan_anomalies(rng, cam, ground, layout, occupied, anomalies, anomaly_area, on_road_only)]
    items += [(z, draw, False) for z, draw in _plan_actors(rng, cam, ground, layout, style, occupied, context)]
    drawn = 0  # anomaly pixels as painted, before nearer objects cover some of them
    for z, draw, is_anomaly in sorted(items, key=lambda item: -item[0]):
        before = int(np.count_nonzero(canvas.label == ANOMALY)) if is_anomaly else 0
        draw(canvas)
        if is_anomaly:
            drawn += int(np.count_nonzero(canvas.label == ANOMALY)) - before
    paint_hood(canvas, layout.hood, rng)
    canvas.apply_grain(GRAIN_FINE, GRAIN_MID)
    visible = int(np.count_nonzero(canvas.label == ANOMALY))
    image = finish(canvas.image, rng)
    return Scene(image, canvas.label, visible / drawn if drawn else (1.0 if not anomalies else 0.0))


def _background_trees(rng, cam: Camera, ground: Ground, style, buildings) -> list[tuple[float, Draw]]:
    """Trees standing beyond the sidewalks (parks, gaps between buildings, rural tree lines)."""
    out = []
    count = int(rng.integers(2, 9)) if style.context == "city" else int(rng.integers(8, 22))
    walls = np.array([(b.side, b.z0, b.z1, b.face) for b in buildings]).reshape(-1, 4)
    for _ in range(count):
        side = -1 if rng.random() < 0.5 else 1
        edge = ground.outer[0] if side < 0 else ground.outer[1]
        l = edge + side * rng.uniform(1.5, 14 if style.context == "city" else 30)
        z = rng.uniform(6, 90)
        if ((walls[:, 0] == side) & (walls[:, 1] <= z) & (z <= walls[:, 2]) & (side * l >= side * walls[:, 3])).any():
            continue  # hidden behind a building anyway
        conifer = style.context == "rural" and rng.random() < 0.4
        out.append((z, partial(actors.tree, cam=cam, rng=rng, l=l, z=z, colour=style.vegetation, conifer=conifer)))
    return out


def _plan_anomalies(rng, cam: Camera, ground: Ground, layout: Layout, occupied: _Occupancy, count: int,
                    area: tuple[float, float], on_road_only: bool) -> list[tuple[float, Draw]]:
    """Anomalies on the road (70 %, or always with ``on_road_only``) or a sidewalk, sized so that each
    covers about its target share of the picture (log-uniform in ``area``)."""
    out = []
    h, w = cam.height, cam.width
    lowest_row = h * (1 - layout.hood) - 3
    z_min = cam.focal * cam.mount / max(lowest_row - cam.horizon, 1.0)
    half = layout.road_width / 2
    for _ in range(count):
        kind = ANOMALY_KINDS[int(rng.integers(len(ANOMALY_KINDS)))]
        target = np.exp(rng.uniform(np.log(area[0]), np.log(area[1])))
        metres_per_z = np.sqrt(target * h * w) * SPREAD[kind] / cam.focal  # object size / depth for that area
        s_min, s_max = (0.5, 5.0) if kind in FLAT_KINDS else (0.3, 3.0)  # metres
        z_lo = max(z_min / max(1 - 0.5 * metres_per_z, 0.2), s_min / metres_per_z)  # near edge stays in view
        z_hi = min(70.0, s_max / metres_per_z)
        for _attempt in range(8):
            z = float(rng.uniform(z_lo, z_hi)) if z_lo < z_hi else z_lo  # too big to fit: as big as allowed
            size = min(metres_per_z * z, s_max)
            sidewalks = [b for b in (ground.sidewalk_left, ground.sidewalk_right) if b[1] - b[0] > size]
            on_sidewalk = not on_road_only and sidewalks and rng.random() >= 0.7
            band = sidewalks[int(rng.integers(len(sidewalks)))] if on_sidewalk else (-half, half)
            lo, hi = band[0] + size / 2, band[1] - size / 2
            l = rng.uniform(lo, hi) if lo < hi else (band[0] + band[1]) / 2  # wider than the band: centred
            if occupied.take(l - size / 2, l + size / 2, z - size / 2, z + size / 2 + 1.0):
                out.append((z, partial(draw_anomaly, cam=cam, rng=rng, kind=kind, l=l, z=z, size=size)))
                break
    return out


def _plan_actors(rng, cam: Camera, ground: Ground, layout: Layout, style, occupied: _Occupancy,
                 context: str) -> list[tuple[float, Draw]]:
    """Cars in lanes, people on sidewalks (a few crossing), street furniture."""
    out: list[tuple[float, Draw]] = []
    city = context == "city"
    half, lane = layout.road_width / 2, layout.road_width / layout.lanes
    add = lambda z, fn, **kw: out.append((z, partial(fn, cam=cam, rng=rng, z=z, **kw)))

    def sidewalk_spot(margin: float = 0.4) -> float | None:
        bands = [b for b in (ground.sidewalk_left, ground.sidewalk_right) if b[1] - b[0] > 2 * margin]
        if not bands:  # rural: walk on the shoulder
            side = -1 if rng.random() < 0.5 else 1
            return side * (half + rng.uniform(0.5, 1.8))
        a, b = bands[int(rng.integers(len(bands)))]
        return rng.uniform(a + margin, b - margin)

    # cars in lanes: forward lanes show their rear, oncoming lanes (left half) their front
    for _ in range(int(rng.integers(1, 8)) if city else int(rng.integers(0, 3))):
        size = vehicles.sample_size(rng)
        for _ in range(4):
            k = int(rng.integers(layout.lanes))
            l = -half + (k + 0.5) * lane + rng.uniform(-0.3, 0.3)
            z = rng.uniform(4.5, 60)
            if abs(l - cam.lateral) < lane / 2 and z < 9:
                continue  # not right in front of the bonnet
            if occupied.take(l - size.width / 2, l + size.width / 2, z - 1.0, z + size.length + 1.0):
                oncoming = k < layout.lanes // 2 if layout.lanes > 1 else rng.random() < 0.5
                add(z, vehicles.vehicle, l=l, size=size, oncoming=oncoming, shadow=style.shadow * 0.8)
                break

    for _ in range(int(rng.choice([0, 1, 2, 2, 3, 4, 5, 6, 8]) if city else rng.integers(0, 3))):
        l, z = sidewalk_spot(), rng.uniform(3.5, 30)
        if l is not None and occupied.take(l - 0.3, l + 0.3, z - 0.3, z + 0.3):
            add(z, actors.person, l=l)
    if city and rng.random() < 0.2:  # someone crossing the street
        l, z = rng.uniform(-half, half), rng.uniform(7, 25)
        if occupied.take(l - 0.3, l + 0.3, z - 0.3, z + 0.3):
            add(z, actors.person, l=l)

    _plan_furniture(rng, ground, layout, style, occupied, add, city)
    return out


def _plan_furniture(rng, ground: Ground, layout: Layout, style, occupied: _Occupancy, add, city: bool) -> None:
    """Street lamps (city) or utility poles (rural), tree rows, bushes, traffic lights and signs."""
    half = layout.road_width / 2
    curb = {-1: ground.sidewalk_left[1] if city else -half - 1.2, 1: ground.sidewalk_right[0] if city else half + 1.2}
    for side in (-1, 1):
        if rng.random() < (0.6 if city else 0.5):  # street lamps or wooden utility poles
            z = rng.uniform(4, 15)
            spacing = rng.uniform(15, 30) if city else rng.uniform(25, 40)
            while z < 90:
                l = curb[side] + side * 0.4
                if occupied.take(l - 0.2, l + 0.2, z - 0.2, z + 0.2):
                    if city:
                        add(z, actors.street_lamp, l=l, reach=-side * rng.uniform(0.8, 2.0))
                    else:
                        add(z, actors.pole_only, l=l, height=rng.uniform(7, 9),
                            colour=jitter(rng, (0.4, 0.3, 0.2), 0.04))
                z += spacing
        if rng.random() < (0.55 if city else 0.8):  # a row of trees, or bushes
            z, spacing = rng.uniform(3, 10), rng.uniform(7, 14)
            band = ground.sidewalk_left if side < 0 else ground.sidewalk_right
            while z < 80:
                l = (band[0] + 0.6 if side < 0 else band[1] - 0.6) if city else side * (half + rng.uniform(2, 6))
                if occupied.take(l - 0.3, l + 0.3, z - 0.3, z + 0.3):
                    add(z, actors.tree, l=l, colour=style.vegetation, conifer=not city and rng.random() < 0.3)
                z += spacing
        if rng.random() < 0.35:
            for _ in range(int(rng.integers(1, 4))):
                z = rng.uniform(4, 40)
                edge = ground.outer[0] if side < 0 else ground.outer[1]
                l = edge - side * 0.6 if city else edge + side * rng.uniform(2.0, 5.0)
                if occupied.take(l - 1.0, l + 1.0, z - 0.5, z + 0.5):
                    add(z, actors.bush, l=l, colour=style.vegetation)
    lights = int(rng.integers(1, 4)) if city and rng.random() < 0.8 else int(rng.random() < 0.1)
    for _ in range(lights):
        side = -1 if rng.random() < 0.5 else 1
        l, z = curb[side] + side * 0.5, rng.uniform(8, 35)
        if occupied.take(l - 0.3, l + 0.3, z - 0.3, z + 0.3):
            reach = -side * rng.uniform(2.0, 4.5) if rng.random() < 0.35 else 0.0
            add(z, actors.traffic_light, l=l, reach=reach, facing=rng.random() < 0.75)
    for _ in range(int(rng.integers(0, 5)) if city else int(rng.integers(0, 3))):
        side = -1 if rng.random() < 0.5 else 1
        l, z = curb[side] + side * rng.uniform(0.3, 0.8), rng.uniform(4, 35)
        if occupied.take(l - 0.3, l + 0.3, z - 0.3, z + 0.3):
            add(z, actors.traffic_sign, l=l, facing=rng.random() < 0.85)
