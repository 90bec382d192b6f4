"""Tiny on-disk trees in every dataset layout the loaders read, with the labels each should yield.

Each ``make_*`` writes a few small images (16x32 by default) and raw labels that contain every raw
value the layout defines, and returns a ``Layout`` whose ``expected`` maps each sample name to the
0/1/255 (or train-id) label a correct loader must return. The expected maps are written out here
from the datasets' published conventions, independently of the loaders' own tables.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rpl.data.io import write_image, write_label

SIZE = (16, 32)


@dataclass
class Layout:
    root: Path
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # name -> converted label
    images: dict[str, Path] = field(default_factory=dict)  # name -> image file
    labels: dict[str, Path] = field(default_factory=dict)  # name -> label file
    roles: dict[str, str] = field(default_factory=dict)  # name -> split, where a layout has several

    @property
    def names(self) -> list[str]:
        return sorted(self.expected)


def raw_label(values: Sequence[int], seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A label map holding every value of ``values`` at least once, the rest drawn at random."""
    rng = np.random.default_rng(seed)
    label = rng.choice(np.asarray(values, dtype=np.uint8), size=size)
    label.flat[: len(values)] = values
    return label


def random_image(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    return np.random.default_rng(1000 + seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _add(layout: Layout, name: str, image_path: Path, label_path: Path | None, raw: np.ndarray | None,
         mapping: Mapping[int, int] | None, seed: int) -> None:
    write_image(image_path, random_image(seed, raw.shape if raw is not None else SIZE))
    layout.images[name] = image_path
    if raw is not None and label_path is not None:
        write_label(label_path, raw)
        layout.labels[name] = label_path
        layout.expected[name] = np.vectorize(mapping.__getitem__, otypes=[np.uint8])(raw)


IDENTITY_01V = {0: 0, 1: 1, 255: 255}


def make_mask_folder(root: Path, names: Sequence[str] = ("frame_b", "frame_a", "frame_c"), image_dir: str = "images",
                     label_dir: str = "labels_masks", label_tail: str = "", image_ext: str = ".png",
                     values: Sequence[int] = (0, 1, 255)) -> Layout:
    """Fishyscapes repackage / SynthStreets: ``images/<n>.png`` + ``labels_masks/<n><tail>.png`` (0/1/255)."""
    layout = Layout(Path(root))
    for i, name in enumerate(names):
        _add(layout, name, layout.root / image_dir / f"{name}{image_ext}",
             layout.root / label_dir / f"{name}{label_tail}.png", raw_label(values, i), IDENTITY_01V, i)
    return layout


def make_road_anomaly_original(root: Path, names: Sequence[str] = ("cow0001", "animals01_cow", "cones0002"),
                               list_with_extension: bool = True) -> Layout:
    """Original Road Anomaly: frame_list.json, frames/<n>.jpg, frames/<n>.labels/labels_semantic.png (0 / 2)."""
    layout = Layout(Path(root))
    for i, name in enumerate(names):
        _add(layout, name, layout.root / "frames" / f"{name}.jpg",
             layout.root / "frames" / f"{name}.labels" / "labels_semantic.png", raw_label((0, 2), i), {0: 0, 2: 1}, i)
    entries = [f"{n}.jpg" if list_with_extension else n for n in names]
    (layout.root / "frame_list.json").write_text(json.dumps(entries))
    return layout


def make_smiyc(root: Path, track: str = "anomaly") -> Layout:
    """SMIYC track folder: labelled validation frames and unlabelled test frames (their labels are private).

    ``expected`` holds the official validation frames only; ``roles`` gives each frame's split.
    """
    layout = Layout(Path(root))
    ext = ".jpg" if track == "anomaly" else ".webp"
    if track == "anomaly":
        roles = {"validation0001": "validation", "validation0000": "validation", "cow0000": "test",
                 "tractor0001": "test"}
    else:  # validation_19 and validation_21..29 are left out of the official validation split; night is neither
        roles = {"validation_2": "validation", "validation_10": "validation", "validation_19": "other",
                 "gravel_bag_1": "test", "driveway_cone_2": "other"}
    for i, (name, role) in enumerate(roles.items()):
        image = layout.root / "images" / f"{name}{ext}"
        if role == "test" or name.startswith("driveway"):
            write_image(image, random_image(i))
            layout.images[name] = image
            continue
        target = layout if role == "validation" else Layout(layout.root)
        _add(target, name, image, layout.root / "labels_masks" / f"{name}_labels_semantic.png",
             raw_label((0, 1, 255), i), IDENTITY_01V, i)
        layout.images[name] = image
    layout.roles = roles
    return layout


LAF_EXPECTED = {0: 255, 1: 0, 2: 1, 7: 1, 43: 1, 200: 1, 201: 255, 255: 255}  # SMIYC's LostAndFound rule


def make_lost_and_found(root: Path, split: str = "test") -> Layout:
    """LostAndFound: leftImg8bit/{split}/<seq>/<id>_leftImg8bit.png + gtCoarse/{split}/<seq>/<id>_gtCoarse_labelIds.png.

    Two frames lie in NoKnown-excluded sequences (children, bicycles); ``expected`` holds only the others.
    """
    layout = Layout(Path(root))
    frames = [("04_Maurener_Weg_8", "000000_000030"), ("01_Hanns_Klemm_Str_45", "000000_000080"),
              ("01_Hanns_Klemm_Str_45", "000006_000050"), ("15_Rechbergstr_Deckenpfronn", "000000_000010"),
              ("10_Schlossberg_9", "000003_000100")]
    excluded = {"01_Hanns_Klemm_Str_45_000006_000050", "15_Rechbergstr_Deckenpfronn_000000_000010"}
    for i, (seq, frame) in enumerate(frames):
        fid = f"{seq}_{frame}"
        image = layout.root / "leftImg8bit" / split / seq / f"{fid}_leftImg8bit.png"
        label = layout.root / "gtCoarse" / split / seq / f"{fid}_gtCoarse_labelIds.png"
        target = Layout(layout.root) if fid in excluded else layout
        _add(target, f"{seq}/{fid}", image, label, raw_label(tuple(LAF_EXPECTED), i), LAF_EXPECTED, i)
    return layout


STREETHAZARDS_EXPECTED = {0: 255, **{v: 0 for v in range(1, 14)}, 14: 1}  # stored 1..14, 14 = anomaly


def make_streethazards(root: Path) -> Layout:
    """StreetHazards test release: test/images/test/<town>/<n>.png + test/annotations/test/<town>/<n>.png."""
    layout = Layout(Path(root))
    for i, (town, n) in enumerate([("t6", "0002"), ("t5", "0100"), ("t5", "0007")]):
        name = f"test/{town}/{n}"
        _add(layout, name, layout.root / "test" / "images" / "test" / town / f"{n}.png",
             layout.root / "test" / "annotations" / "test" / town / f"{n}.png",
             raw_label(tuple(STREETHAZARDS_EXPECTED), i), STREETHAZARDS_EXPECTED, i)
    return layout


# Cityscapes label id -> train id, written out class by class (cityscapesScripts labels.py).
CITYSCAPES_ID_TO_TRAIN = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3, 13: 4,
    14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18, 255: 255,
}
TRAIN_IDS = {**{i: i for i in range(19)}, 255: 255}


def make_cityscapes(root: Path, split: str = "val", label_kind: str = "labelTrainIds",
                    frames: Sequence[tuple[str, str]] = (("munster", "000001_000019"), ("frankfurt", "000000_000294"),
                                                         ("frankfurt", "000000_000576"))) -> Layout:
    """Cityscapes: leftImg8bit/{split}/<city>/<id>_leftImg8bit.png + gtFine/{split}/<city>/<id>_gtFine_<kind>.png."""
    layout = Layout(Path(root))
    mapping = TRAIN_IDS if label_kind == "labelTrainIds" else CITYSCAPES_ID_TO_TRAIN
    for i, (city, frame) in enumerate(frames):
        fid = f"{city}_{frame}"
        _add(layout, f"{city}/{fid}", layout.root / "leftImg8bit" / split / city / f"{fid}_leftImg8bit.png",
             layout.root / "gtFine" / split / city / f"{fid}_gtFine_{label_kind}.png",
             raw_label(tuple(mapping), i), mapping, i)
        # the release also ships colour/instance files next to the labels: they must be ignored
        write_label(layout.root / "gtFine" / split / city / f"{fid}_gtFine_instanceIds.png", np.zeros(SIZE, np.uint8))
    return layout
