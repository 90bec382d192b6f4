"""Anomaly test sets on their real on-disk layouts, converted on load to 0 inlier / 1 anomaly / 255 void.

Every loader lists its files and checks the layout in its constructor, so a wrong folder fails
before any model runs; item access checks what can only be seen in the files (decodable image,
label of the image's size, label values of the layout's convention). Items are dicts
``{"image": RGB uint8 (H, W, 3), "label": uint8 (H, W) or None, "name": str, "path": str}`` in
sorted ``name`` order; images stay raw uint8, normalisation is the model's business.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, TypedDict

import numpy as np
from torch.utils.data import Dataset

from rpl.data.io import read_image, read_label
from rpl.errors import RPLInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
INVALID = 256  # marks raw values a layout does not define in a lookup table
ANOMALY_CONVENTION = "0 inlier, 1 anomaly, 255 void"


class Sample(TypedDict):
    image: np.ndarray
    label: np.ndarray | None
    name: str
    path: str


@dataclass(frozen=True)
class SampleFiles:
    name: str
    image: Path
    label: Path | None


def value_table(mapping: Mapping[int, int] | Iterable[tuple[int | Iterable[int], int]],
                default: int = INVALID) -> np.ndarray:
    """A 256-entry lookup table raw label value -> converted value (``INVALID`` where undefined)."""
    table = np.full(256, default, dtype=np.uint16)
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    for raw, new in items:
        table[raw if isinstance(raw, int) else list(raw)] = new
    return table


def convert_label(raw: np.ndarray, table: np.ndarray, path: Path, convention: str) -> np.ndarray:
    """Map a raw label through ``table``; values the layout does not define are an error naming the file."""
    counts = np.bincount(raw.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & (table == INVALID))
    if bad.size:
        raise RPLInputError(
            f"Label file {path} holds values {bad.tolist()[:12]} outside this layout's convention; "
            f"expected only {convention}."
        )
    return table.astype(np.uint8)[raw]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _require_dir(path: Path, kind: str, expected: str) -> Path:
    if not path.is_dir():
        raise RPLInputError(f"{kind}: folder {path} does not exist; expected {expected}.")
    return path


def _first(paths: Sequence[Path | str], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in list(paths)[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


class LabelledImageDataset(Dataset):
    """Files listed up front, decoded and converted per item; subclasses build ``files`` and ``table``."""

    kind = "dataset"
    convention = ANOMALY_CONVENTION

    def __init__(self, root: str | Path, files: list[SampleFiles], table: np.ndarray):
        self.root = Path(root)
        self.files = sorted(files, key=lambda f: f.name)
        self.table = table
        if not self.files:
            raise RPLInputError(f"{self.kind} at {self.root} holds no images; expected at least one image "
                                "(with its label).")

    def __len__(self) -> int:
        return len(self.files)

    def convert(self, raw: np.ndarray, files: SampleFiles) -> np.ndarray:
        return convert_label(raw, self.table, files.label, self.convention)

    def __getitem__(self, index: int) -> Sample:
        files = self.files[index]
        image = read_image(files.image)
        label = None
        if files.label is not None:
            raw = read_label(files.label)
            if raw.shape != image.shape[:2]:
                raise RPLInputError(
                    f"Label file {files.label} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                    f"{files.image} is {image.shape[1]}x{image.shape[0]}; expected the same size."
                )
            label = self.convert(raw, files)
        return {"image": image, "label": label, "name": files.name, "path": str(files.image)}


# --- images/ + labels_masks/ folders (Fishyscapes repackage, SMIYC, SynthStreets, Road Anomaly 0/1) ---
IMAGE_DIRS = ("images", "original")
LABEL_DIRS = ("labels_masks", "labels")
_IMAGE_TAILS = ("_leftImg8bit", "_rgb", "_image")
_LABEL_TAILS = ("_labels_semantic", "_labels", "_label", "_mask", "_gt")


def _key(stem: str, tails: Sequence[str]) -> str:
    for tail in tails:
        if stem.endswith(tail):
            return stem[: -len(tail)]
    return stem


def find_mask_dirs(root: Path) -> tuple[Path | None, Path | None]:
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    label_dir = next((root / d for d in LABEL_DIRS if (root / d).is_dir()), None)
    return image_dir, label_dir


def pair_by_stem(images: list[Path], label_dir: Path | None, kind: str, require_labels: bool = True,
                 unused_labels_ok: bool = False, hint: str = "") -> list[SampleFiles]:
    """Match images to labels by stem, ignoring suffixes such as ``_labels_semantic`` and extensions."""
    by_key: dict[str, Path] = {}
    for image in images:
        key = _key(image.stem, _IMAGE_TAILS)
        if key in by_key:
            raise RPLInputError(f"{kind}: images {by_key[key]} and {image} share the name {key!r}; "
                                "expected one image per name.")
        by_key[key] = image
    labels: dict[str, Path] = {}
    for label in [] if label_dir is None else list_images(label_dir):
        key = _key(label.stem, _LABEL_TAILS)
        if label.stem.endswith("_color"):  # colour previews shipped next to some label masks
            continue
        if key in labels:
            raise RPLInputError(f"{kind}: labels {labels[key]} and {label} both match the name {key!r}; "
                                "expected one label per image.")
        labels[key] = label
    if require_labels:
        missing = [str(p) for k, p in by_key.items() if k not in labels]
        if missing:
            raise RPLInputError(
                f"{kind}: {len(missing)} image(s) have no label in {label_dir}: {_first(missing)}; "
                f"expected one label PNG per image with the same name (optionally ending in _labels_semantic){hint}."
            )
    unused = [str(p) for k, p in labels.items() if k not in by_key]
    if unused and not unused_labels_ok:
        raise RPLInputError(f"{kind}: {len(unused)} label(s) have no image: {_first(unused)}; "
                            "expected an image for every label.")
    return [SampleFiles(image.stem, image, labels.get(key)) for key, image in by_key.items()]


class MaskFolderDataset(LabelledImageDataset):
    """``images/`` (or ``original/``) + ``labels_masks/`` (or ``labels/``) holding 0/1/255 masks.

    The layout of the Fishyscapes L&F and Static val repackages (Synboost/PEBAL/RPL) and of the
    project's SynthStreets test sets. ``require_labels=False`` lists images alone (labels None).
    """

    def __init__(self, root: str | Path, kind: str = "Fishyscapes-layout dataset",
                 require_labels: bool = True):
        self.kind = kind
        root = Path(root)
        expected = "a folder with images/ (or original/) and labels_masks/ (or labels/) holding 0/1/255 masks"
        image_dir, label_dir = find_mask_dirs(_require_dir(root, kind, expected))
        if image_dir is None or (label_dir is None and require_labels):
            missing = "images/" if image_dir is None else "labels_masks/"
            raise RPLInputError(f"{kind}: {root} has no {missing} folder; expected {expected}.")
        files = pair_by_stem(list_images(image_dir), label_dir, kind, require_labels)
        super().__init__(root, files, value_table({0: 0, 1: 1, 255: 255}))


class RoadAnomaly(LabelledImageDataset):
    """Road Anomaly (Lis et al. 2019): the original release or a 0/1 repackage, detected automatically.

    Original: ``frame_list.json`` (image file names), ``frames/<name>.<ext>`` and
    ``frames/<name>.labels/labels_semantic.png`` with 0 background and 2 anomaly (no void).
    Repackaged: ``images/`` + ``labels_masks/`` (or ``original/`` + ``labels/``) with 0/1 (255 void tolerated).
    """

    kind = "Road Anomaly"

    def __init__(self, root: str | Path):
        root = Path(root)
        expected = ("either the original release (frame_list.json, frames/<name>.jpg, "
                    "frames/<name>.labels/labels_semantic.png with 0/2) or the repackaged layout "
                    "(images/ + labels_masks/ with 0/1)")
        _require_dir(root, self.kind, expected)
        image_dir, label_dir = find_mask_dirs(root)
        if (root / "frame_list.json").is_file():
            self.layout, self.convention = "original", "0 background, 2 anomaly"
            super().__init__(root, self._list_original(root), value_table({0: 0, 2: 1}))
        elif image_dir is not None and label_dir is not None:
            self.layout, self.convention = "repackaged", "0 inlier, 1 anomaly (255 void)"
            super().__init__(root, pair_by_stem(list_images(image_dir), label_dir, self.kind),
                             value_table({0: 0, 1: 1, 255: 255}))
        else:
            raise RPLInputError(f"Road Anomaly root {root} has no frame_list.json and no images/+labels_masks/; "
                                f"expected {expected}.")

    def _list_original(self, root: Path) -> list[SampleFiles]:
        frames = _require_dir(root / "frames", self.kind, "frames/ next to frame_list.json")
        listing = root / "frame_list.json"
        try:
            names = json.loads(listing.read_text())
        except (OSError, ValueError):
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RPLInputError(f"Road Anomaly list {listing} is not a readable JSON list of image file names.")
        files, missing = [], []
        for entry in names:
            image = frames / entry
            if not image.is_file():  # entries may omit the extension
                found = [frames / f"{entry}{s}" for s in IMAGE_SUFFIXES if (frames / f"{entry}{s}").is_file()]
                image = found[0] if found else image
            stem = Path(entry).stem if image.name == entry else entry
            label = frames / f"{stem}.labels" / "labels_semantic.png"
            missing += [str(p) for p in (image, label) if not p.is_file()]
            files.append(SampleFiles(stem, image, label))
        if missing:
            raise RPLInputError(f"Road Anomaly: {len(missing)} file(s) listed in frame_list.json are missing: "
                                f"{_first(missing)}.")
        return files


# --- SegmentMeIfYouCan ---
SMIYC_OBSTACLE_TEST_SCENES = frozenset({"curvy-street", "one-way-street", "gravel", "greyasphalt", "motorway",
                                        "paving", "darkasphalt", "darkasphalt2"})
SMIYC_OBSTACLE_VAL_EXCLUDED = ("validation_19",) + tuple(f"validation_{i}" for i in range(21, 30))


def smiyc_split_of(track: str, fid: str) -> str:
    """The official SMIYC split of a frame id, after road-anomaly-benchmark (datasets/tracks.py).

    AnomalyTrack: ``validation*`` frames are validation (10), the others test (100).
    ObstacleTrack: scene ``validation`` minus prefixes validation_19 and validation_21..29 is
    validation (30); the day-time scenes are test (327); snowstorm/night frames only belong to "all".
    """
    if track == "anomaly":
        return "validation" if fid.startswith("validation") else "test"
    scene = fid.split("_")[0]
    if scene == "validation":
        return "other" if fid.startswith(SMIYC_OBSTACLE_VAL_EXCLUDED) else "validation"
    return "test" if scene in SMIYC_OBSTACLE_TEST_SCENES else "other"


class SMIYC(LabelledImageDataset):
    """SegmentMeIfYouCan ``dataset_AnomalyTrack`` / ``dataset_ObstacleTrack``: ``images/*.jpg|webp``,
    ``labels_masks/<id>_labels_semantic.png`` with 0/1/255 (the obstacle track labels only the road).

    ``split``: "validation" (labels public), "test" (labels are not public: pass
    ``require_labels=False`` to list images only) or "all".
    """

    def __init__(self, root: str | Path, track: str = "anomaly", split: str = "validation",
                 require_labels: bool = True):
        if track not in ("anomaly", "obstacle") or split not in ("validation", "test", "all"):
            raise RPLInputError(f"SMIYC track {track!r} / split {split!r}: expected track anomaly or obstacle "
                                "and split validation, test or all.")
        self.kind = f"SMIYC {track.capitalize()}Track {split}"
        root = Path(root)
        expected = f"dataset_{track.capitalize()}Track with images/ and labels_masks/<id>_labels_semantic.png"
        images = list_images(_require_dir(root / "images", self.kind, expected))
        images = [p for p in images if split == "all" or smiyc_split_of(track, p.stem) == split]
        if not images:
            raise RPLInputError(f"{self.kind}: {root / 'images'} holds no images of split {split!r}; "
                                f"expected {expected}.")
        label_dir = root / "labels_masks" if (root / "labels_masks").is_dir() else None
        if require_labels and label_dir is None:
            raise RPLInputError(
                f"{self.kind}: {root} has no labels_masks/ folder. The SMIYC test labels are not public: evaluate "
                "split 'validation' (labels shipped with the release) or list images only with require_labels=False."
            )
        hint = "" if split == "validation" else " (the SMIYC test labels are not public: evaluate 'validation')"
        files = pair_by_stem(images, label_dir, self.kind, require_labels, unused_labels_ok=True, hint=hint)
        super().__init__(root, files, value_table({0: 0, 1: 1, 255: 255}))


# --- LostAndFound ---
# Frame exclusions of "LostAndFound-testNoKnown" in road-anomaly-benchmark (SMIYC, datasets/tracks.py):
# sequences whose obstacles are known Cityscapes classes (children, bicycles).
LAF_NOKNOWN_EXCLUDED_PREFIXES = ("15_Rechbergstr_Deckenpfronn", "01_Hanns_Klemm_Str_45_000006",
                                 "01_Hanns_Klemm_Str_45_000007", "10_Schlossberg_9_000004")
# Indices (in sorted frame-id order of the complete release) of frames whose label map is all 0.
LAF_EMPTY_LABEL_FRAMES = {
    "test": (1203, (17, 37, 55, 72, 91, 110, 129, 153, 174, 197, 218, 353, 490, 618, 686, 792, 793)),
    "train": (1036, (44, 67, 88, 109, 131, 614)),
}


class LostAndFound(LabelledImageDataset):
    """LostAndFound: ``leftImg8bit/{split}/{seq}/<id>_leftImg8bit.png`` and
    ``gtCoarse/{split}/{seq}/<id>_gtCoarse_labelIds.png``.

    Labels as in SMIYC: id 1 (free space) -> 0, ids 2..200 (obstacles) -> 1, id 0 and ids above 200 -> 255;
    the road is the region of interest (an obstacle-track set).
    Default = SMIYC's "LostAndFound-testNoKnown" (1043 frames): the frames whose label map is all 0
    are dropped by the official index list when the split is complete (1203 test frames; on a
    partial copy they are kept, and being all void they add no pixel to any metric), then every
    frame id starting with one of ``exclude_prefixes`` (default: children and bicycles,
    ``LAF_NOKNOWN_EXCLUDED_PREFIXES``); ``exclude_prefixes=()`` keeps the whole split.
    """

    kind = "LostAndFound"
    convention = "LostAndFound label ids 0..255"

    def __init__(self, root: str | Path, split: str = "test",
                 exclude_prefixes: Sequence[str] = LAF_NOKNOWN_EXCLUDED_PREFIXES):
        root = Path(root)
        expected = (f"leftImg8bit/{split}/<sequence>/<id>_leftImg8bit.png and "
                    f"gtCoarse/{split}/<sequence>/<id>_gtCoarse_labelIds.png")
        image_root = _require_dir(root / "leftImg8bit" / split, self.kind, expected)
        label_root = _require_dir(root / "gtCoarse" / split, self.kind, expected)
        frames = []
        for image in sorted(p for p in image_root.glob("*/*_leftImg8bit.*") if p.suffix.lower() in IMAGE_SUFFIXES):
            fid = image.stem[: -len("_leftImg8bit")]
            label = label_root / image.parent.name / f"{fid}_gtCoarse_labelIds.png"
            frames.append((fid, SampleFiles(f"{image.parent.name}/{fid}", image, label)))
        frames.sort(key=lambda f: f[0])
        complete, empty = LAF_EMPTY_LABEL_FRAMES.get(split, (-1, ()))
        if len(frames) == complete:
            frames = [f for i, f in enumerate(frames) if i not in set(empty)]
        files = [f for fid, f in frames if not fid.startswith(tuple(exclude_prefixes))]
        missing = [str(f.label) for f in files if not f.label.is_file()]
        if missing:
            raise RPLInputError(f"{self.kind}: {len(missing)} image(s) have no label: {_first(missing)}; "
                                f"expected {expected}.")
        super().__init__(root, files, value_table([(range(0, 256), 255), (range(2, 201), 1), (1, 0)]))


class StreetHazards(LabelledImageDataset):
    """StreetHazards (Hendrycks et al.): ``{split}/images/**.png`` + ``{split}/annotations/**.png``, same paths.

    Stored ids are 1..14 (the reference code subtracts 1: 0 unlabeled ... 12 traffic sign, 13 anomaly),
    so stored 14 -> 1 and 1..13 -> 0 (the official evaluation scores every pixel, "unlabeled" included);
    a stored 0 (-1 = ignore after that shift) -> 255.
    """

    kind = "StreetHazards"
    convention = "StreetHazards ids 1..14 (14 = anomaly)"

    def __init__(self, root: str | Path, split: str = "test"):
        root = Path(root)
        base = root / split if (root / split / "images").is_dir() else root
        expected = f"{split}/images/**/*.png and {split}/annotations/**/*.png with the same relative paths"
        images_dir = _require_dir(base / "images", self.kind, expected)
        labels_dir = _require_dir(base / "annotations", self.kind, expected)
        images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files = [SampleFiles(p.relative_to(images_dir).with_suffix("").as_posix(), p,
                             labels_dir / p.relative_to(images_dir).with_suffix(".png")) for p in images]
        missing = [str(f.label) for f in files if not f.label.is_file()]
        if missing:
            raise RPLInputError(f"{self.kind}: {len(missing)} image(s) have no annotation: {_first(missing)}; "
                                f"expected {expected}.")
        super().__init__(root, files, value_table([(0, 255), (range(1, 14), 0), (14, 1)]))
