"""Cityscapes on its real layout: listing for training and a val dataset with the 19 train ids.

``leftImg8bit/{split}/{city}/<id>_leftImg8bit.png`` with ``gtFine/{split}/{city}/<id>_gtFine_labelTrainIds.png``
(train ids 0..18, void 255). A copy that only has ``<id>_gtFine_labelIds.png`` (the raw release
before ``createTrainIdLabelImgs``) is read through the official id -> trainId table below, so
either works; ``read_cityscapes_label`` applies the right conversion from the file name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rpl.data.anomaly import IMAGE_SUFFIXES, LabelledImageDataset, SampleFiles, convert_label, value_table
from rpl.data.io import read_label
from rpl.errors import RPLInputError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
IGNORE_INDEX = 255

# cityscapesScripts labels.py: label id -> train id for the 19 evaluated classes; every other id
# (0..6 unlabeled/ego vehicle/border/out of roi/static/dynamic/ground, 9 parking, 10 rail track,
# 14 guard rail, 15 bridge, 16 tunnel, 18 polegroup, 29 caravan, 30 trailer) is void. The
# license plate has id -1, which an 8-bit file stores as 255: void too.
LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
_LABEL_ID_TABLE = value_table([(range(0, 34), IGNORE_INDEX), (255, IGNORE_INDEX), *LABEL_ID_TO_TRAIN_ID.items()])
_TRAIN_ID_TABLE = value_table({**{i: i for i in range(len(CITYSCAPES_CLASSES))}, 255: IGNORE_INDEX})
_TRAIN_SUFFIX = "_gtFine_labelTrainIds.png"
_ID_SUFFIX = "_gtFine_labelIds.png"
_IMAGE_TAIL = "_leftImg8bit"


def _to_train_ids(raw: np.ndarray, path: Path) -> np.ndarray:
    if path.name.endswith(_ID_SUFFIX):
        return convert_label(raw, _LABEL_ID_TABLE, path, "Cityscapes label ids 0..33 (255: license plate)")
    return convert_label(raw, _TRAIN_ID_TABLE, path, "Cityscapes train ids 0..18 and 255 void")


def read_cityscapes_label(path: str | Path) -> np.ndarray:
    """Read a gtFine label as train ids 0..18 / 255: ``*_labelIds.png`` files are converted, others checked."""
    return _to_train_ids(read_label(path), Path(path))


def list_cityscapes(root: str | Path, split: str = "train") -> list[tuple[Path, Path]]:
    """Sorted (image, label) pairs of a Cityscapes split; the label is the labelTrainIds file, else labelIds.

    Raises ``RPLInputError`` naming what is missing: the split folders, any image, or any label.
    """
    root = Path(root)
    image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
    expected = (f"leftImg8bit/{split}/<city>/<id>_leftImg8bit.png and "
                f"gtFine/{split}/<city>/<id>{_TRAIN_SUFFIX} (or <id>{_ID_SUFFIX})")
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise RPLInputError(f"Cityscapes root {root} has no folder {folder}; expected {expected}.")
    images = sorted(p for p in image_root.glob(f"*/*{_IMAGE_TAIL}.*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.endswith(_IMAGE_TAIL))
    if not images:
        raise RPLInputError(f"Cityscapes folder {image_root} holds no images; expected {expected}.")
    pairs, missing, used = [], [], set()
    for image in images:
        frame = image.stem[: -len(_IMAGE_TAIL)]
        candidates = [label_root / image.parent.name / f"{frame}{s}" for s in (_TRAIN_SUFFIX, _ID_SUFFIX)]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            missing.append(str(candidates[0]))
            continue
        used.add(f"{image.parent.name}/{frame}")
        pairs.append((image, label))
    if missing:
        raise RPLInputError(
            f"Cityscapes split {split!r}: {len(missing)} image(s) have no label, e.g. {', '.join(missing[:3])}; "
            f"expected {expected}."
        )
    orphans = sorted(str(p) for s in (_TRAIN_SUFFIX, _ID_SUFFIX) for p in label_root.glob(f"*/*{s}")
                     if f"{p.parent.name}/{p.name[: -len(s)]}" not in used)
    if orphans:
        raise RPLInputError(
            f"Cityscapes split {split!r}: {len(orphans)} label(s) have no image, e.g. {', '.join(orphans[:3])}; "
            f"expected {expected}."
        )
    return pairs


class CityscapesSegmentation(LabelledImageDataset):
    """A Cityscapes split as ``{"image", "label" (train ids 0..18 / 255), "name" (city/id), "path"}``."""

    kind = "Cityscapes"
    convention = "Cityscapes train ids 0..18 and 255 void"

    def __init__(self, root: str | Path, split: str = "val"):
        files = [SampleFiles(f"{image.parent.name}/{image.stem[: -len(_IMAGE_TAIL)]}", image, label)
                 for image, label in list_cityscapes(root, split)]
        super().__init__(root, files, _TRAIN_ID_TABLE)

    def convert(self, raw: np.ndarray, files: SampleFiles) -> np.ndarray:
        return _to_train_ids(raw, files.label)
