"""Dataset names accepted by ``rpl-eval --datasets`` and where each is looked for under ``--data-root``.

=====================  ===========================  ========  =========================================================
name                   default folder (data root/)  track     layout
=====================  ===========================  ========  =========================================================
fs-laf                 fishyscapes/LostAndFound     anomaly   Fishyscapes L&F val repackage: images/ + labels_masks/
fs-static              fishyscapes/Static           anomaly   Fishyscapes Static val repackage, same layout
road-anomaly           road_anomaly                 anomaly   frame_list.json + frames/ (0/2), or images/+labels_masks/
smiyc-anomaly          dataset_AnomalyTrack         anomaly   SMIYC AnomalyTrack validation (test labels: private)
smiyc-obstacle         dataset_ObstacleTrack        obstacle  SMIYC ObstacleTrack, validation frames
laf                    lost_and_found               obstacle  LostAndFound test NoKnown: leftImg8bit/ + gtCoarse/
streethazards          streethazards                anomaly   test/images/ + test/annotations/ (14 = anomaly)
synthstreets-anomaly   synthstreets-anomaly         anomaly   generated, Fishyscapes layout (city context)
synthstreets-rural     synthstreets-rural           anomaly   generated, Fishyscapes layout (shifted context)
synthstreets-obstacle  synthstreets-obstacle        obstacle  generated, Fishyscapes layout (ROI = road)
cityscapes-val         cityscapes                   -         leftImg8bit/val + gtFine/val, class labels (mIoU)
=====================  ===========================  ========  =========================================================

``track`` chooses the SMIYC component-metric rules (size filters) for anomaly sets; ``class_labels``
marks a closed-set set whose labels are train ids rather than 0/1/255.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rpl.errors import RPLInputError

if TYPE_CHECKING:
    from torch.utils.data import Dataset


def _loader(name: str, **kwargs: Any) -> Callable[[Path], "Dataset"]:
    """``root -> Dataset`` of class ``name`` from rpl.data.anomaly / rpl.data.cityscapes, imported on first
    use: the names and folders here are read by ``rpl-eval --help``, which must not wait for torch."""
    module = "rpl.data.cityscapes" if name == "CityscapesSegmentation" else "rpl.data.anomaly"
    return lambda root: getattr(importlib.import_module(module), name)(root, **kwargs)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    folder: str  # default sub-folder under the data root
    description: str
    track: str | None  # "anomaly" / "obstacle" (component metrics), None for closed-set data
    open: Callable[[Path], "Dataset"]
    class_labels: bool = False  # labels are class ids (mIoU), not 0/1/255


def _masks(kind: str) -> Callable[[Path], "Dataset"]:
    return _loader("MaskFolderDataset", kind=kind)


_DATASETS = [
    DatasetInfo("fs-laf", "fishyscapes/LostAndFound", "Fishyscapes Lost & Found val", "anomaly",
                _masks("Fishyscapes Lost & Found val")),
    DatasetInfo("fs-static", "fishyscapes/Static", "Fishyscapes Static val", "anomaly",
                _masks("Fishyscapes Static val")),
    DatasetInfo("road-anomaly", "road_anomaly", "Road Anomaly", "anomaly", _loader("RoadAnomaly")),
    DatasetInfo("smiyc-anomaly", "dataset_AnomalyTrack", "SMIYC AnomalyTrack validation", "anomaly",
                _loader("SMIYC", track="anomaly", split="validation")),
    DatasetInfo("smiyc-obstacle", "dataset_ObstacleTrack", "SMIYC ObstacleTrack validation", "obstacle",
                _loader("SMIYC", track="obstacle", split="validation")),
    DatasetInfo("laf", "lost_and_found", "LostAndFound test NoKnown", "obstacle", _loader("LostAndFound")),
    DatasetInfo("streethazards", "streethazards", "StreetHazards test", "anomaly", _loader("StreetHazards")),
    DatasetInfo("synthstreets-anomaly", "synthstreets-anomaly", "SynthStreets anomalies, city context", "anomaly",
                _masks("SynthStreets anomaly test set")),
    DatasetInfo("synthstreets-rural", "synthstreets-rural", "SynthStreets anomalies, rural context", "anomaly",
                _masks("SynthStreets rural test set")),
    DatasetInfo("synthstreets-obstacle", "synthstreets-obstacle", "SynthStreets road obstacles", "obstacle",
                _masks("SynthStreets obstacle test set")),
    DatasetInfo("cityscapes-val", "cityscapes", "Cityscapes val (closed-set mIoU)", None,
                _loader("CityscapesSegmentation", split="val"), class_labels=True),
]
_BY_NAME = {info.name: info for info in _DATASETS}


def dataset_names() -> list[str]:
    return [info.name for info in _DATASETS]


def dataset_info(name: str) -> DatasetInfo:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise RPLInputError(f"Unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}.") from None


def dataset_path(name: str, data_root: str | Path | None, path: str | Path | None = None) -> Path:
    """``path`` when given, else the dataset's default folder under ``data_root``."""
    info = dataset_info(name)
    if path is not None:
        return Path(path)
    if data_root is None:
        raise RPLInputError(f"Dataset {name!r} needs --data-root (it is looked for at DATA_ROOT/{info.folder}).")
    return Path(data_root) / info.folder


def open_dataset(name: str, data_root: str | Path | None, path: str | Path | None = None) -> "Dataset":
    """Open a dataset by name; its layout is checked now, so a wrong folder fails before any model runs."""
    info = dataset_info(name)
    root = dataset_path(name, data_root, path)
    if not root.is_dir():
        raise RPLInputError(
            f"Dataset {name!r} ({info.description}): folder {root} does not exist; expected it at "
            f"DATA_ROOT/{info.folder} (see rpl.data.registry for the layout of each dataset)."
        )
    return info.open(root)
