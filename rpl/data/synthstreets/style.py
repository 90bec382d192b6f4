"""Per-scene palette and street layout, drawn for a context: ``city`` (training and the city test set)
or ``rural`` (the shifted test context: dirt road, fields, farm buildings, other light)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CONTEXTS = ("city", "rural")


def jitter(rng: np.random.Generator, rgb, amount: float = 0.04, scale: tuple[float, float] = (0.9, 1.1)) -> np.ndarray:
    """A colour varied in brightness (``scale``) and per channel (``amount``), kept in [0, 1]."""
    colour = np.asarray(rgb, np.float64) * rng.uniform(*scale) + rng.uniform(-amount, amount, 3)
    return np.minimum(np.maximum(colour, 0.0), 1.0).astype(np.float32)


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


CITY_FACADES = ((0.78, 0.72, 0.6), (0.85, 0.82, 0.74), (0.6, 0.32, 0.24), (0.55, 0.55, 0.56), (0.9, 0.9, 0.88),
                (0.85, 0.78, 0.5), (0.62, 0.7, 0.78), (0.5, 0.4, 0.32), (0.7, 0.62, 0.58), (0.42, 0.43, 0.47))
RURAL_FACADES = ((0.62, 0.2, 0.15), (0.55, 0.4, 0.25), (0.88, 0.86, 0.8), (0.7, 0.6, 0.45))
CAR_PAINTS = ((0.85, 0.85, 0.86), (0.08, 0.08, 0.09), (0.45, 0.46, 0.48), (0.65, 0.66, 0.68), (0.6, 0.08, 0.07),
              (0.1, 0.2, 0.5), (0.12, 0.3, 0.2), (0.3, 0.2, 0.15), (0.75, 0.75, 0.7), (0.2, 0.35, 0.6))
CLOTHES = ((0.1, 0.1, 0.12), (0.2, 0.22, 0.35), (0.45, 0.45, 0.47), (0.7, 0.7, 0.68), (0.35, 0.25, 0.2),
           (0.55, 0.15, 0.12), (0.2, 0.3, 0.45), (0.6, 0.55, 0.45), (0.15, 0.3, 0.2), (0.8, 0.78, 0.75))
PAVINGS = ((0.62, 0.62, 0.6), (0.66, 0.6, 0.52), (0.58, 0.42, 0.38), (0.55, 0.56, 0.58))
SKIN = ((0.92, 0.76, 0.64), (0.8, 0.6, 0.45), (0.55, 0.38, 0.26), (0.35, 0.24, 0.17))


@dataclass
class Style:
    context: str
    road: np.ndarray
    road_grain: float
    sidewalk: np.ndarray
    curb: np.ndarray
    terrain: np.ndarray
    terrain_alt: np.ndarray
    vegetation: np.ndarray
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    clouds: float  # fraction of the sky covered
    marking: np.ndarray
    facades: tuple
    sun_left: float  # brightness of left-side facades; right side gets the complement
    shadow: float  # multiplier inside shadows
    haze: np.ndarray


@dataclass
class Layout:
    road_width: float
    lanes: int
    sidewalk: tuple[float, float]  # (left, right) widths; 0 = no sidewalk (rural shoulder is terrain)
    lawn: tuple[float, float]  # grass strip between curb and sidewalk, per side
    markings: str  # "full", "centre", "faded", "none"
    hood: float  # ego-vehicle hood height as a fraction of the image height (0 = none)
    extras: dict = field(default_factory=dict)


def sample_style(rng: np.random.Generator, context: str) -> Style:
    if context == "city":
        g = rng.uniform(0.26, 0.42)
        overcast = rng.random() < 0.35
        sky_top = jitter(rng, (0.62, 0.64, 0.68) if overcast else (0.32, 0.52, 0.85), 0.03)
        sky_hor = jitter(rng, (0.78, 0.8, 0.82) if overcast else (0.72, 0.82, 0.93), 0.03)
        return Style(
            context, road=jitter(rng, (g, g, g * 1.03), 0.015, (1, 1)), road_grain=rng.uniform(0.08, 0.16),
            sidewalk=jitter(rng, pick(rng, PAVINGS)),
            curb=jitter(rng, (0.72, 0.72, 0.7), 0.03), terrain=jitter(rng, (0.4, 0.5, 0.22), 0.05),
            terrain_alt=jitter(rng, (0.52, 0.48, 0.32), 0.04), vegetation=jitter(rng, (0.2, 0.36, 0.14), 0.04),
            sky_top=sky_top, sky_horizon=sky_hor, clouds=rng.uniform(0.0, 0.5) if not overcast else 0.0,
            marking=jitter(rng, (0.88, 0.88, 0.86), 0.03), facades=CITY_FACADES,
            sun_left=rng.uniform(0.7, 1.15), shadow=rng.uniform(0.55, 0.8) if not overcast else 0.9,
            haze=jitter(rng, (0.7, 0.74, 0.8), 0.03))
    if context == "rural":
        dirt = pick(rng, ((0.56, 0.48, 0.38), (0.5, 0.47, 0.42), (0.62, 0.55, 0.45)))
        return Style(
            context, road=jitter(rng, dirt, 0.03), road_grain=rng.uniform(0.25, 0.4),
            sidewalk=jitter(rng, (0.55, 0.5, 0.42)), curb=jitter(rng, (0.55, 0.5, 0.42)),
            terrain=jitter(rng, pick(rng, ((0.62, 0.56, 0.3), (0.42, 0.52, 0.2), (0.5, 0.38, 0.25))), 0.04),
            terrain_alt=jitter(rng, pick(rng, ((0.72, 0.64, 0.35), (0.35, 0.45, 0.18))), 0.04),
            vegetation=jitter(rng, (0.18, 0.3, 0.1), 0.04),
            sky_top=jitter(rng, (0.5, 0.6, 0.78), 0.04), sky_horizon=jitter(rng, (0.92, 0.85, 0.7), 0.04),
            clouds=rng.uniform(0.1, 0.6), marking=jitter(rng, (0.8, 0.8, 0.72), 0.03), facades=RURAL_FACADES,
            sun_left=rng.uniform(0.6, 1.2), shadow=rng.uniform(0.5, 0.75), haze=jitter(rng, (0.8, 0.78, 0.72), 0.03))
    raise ValueError(f"unknown context {context!r}; expected one of {CONTEXTS}")


def sample_layout(rng: np.random.Generator, context: str) -> Layout:
    hood = rng.uniform(0.04, 0.08) if rng.random() < 0.5 else 0.0
    if context == "city":
        lanes = int(rng.choice([2, 2, 3, 4]))
        lawn = tuple(rng.uniform(0.8, 2.0) if rng.random() < 0.3 else 0.0 for _ in range(2))
        return Layout(road_width=lanes * rng.uniform(3.0, 3.6), lanes=lanes,
                      sidewalk=(rng.uniform(2.0, 4.5), rng.uniform(2.0, 4.5)), lawn=lawn,
                      markings=pick(rng, ("full", "full", "centre", "none")), hood=hood)
    return Layout(road_width=rng.uniform(4.0, 6.5), lanes=2, sidewalk=(0.0, 0.0), lawn=(0.0, 0.0),
                  markings=pick(rng, ("faded", "none", "none")), hood=hood)
