"""SegmentMeIfYouCan submission files, as the benchmark's ``Evaluation.save_output`` writes them.

    write_frame(submission_dir, "RPL", "AnomalyTrack-all", "validation0000", score)
    # -> submission_dir/anomaly_p/RPL/AnomalyTrack-all/validation0000.hdf5

One HDF5 file per frame, path ``anomaly_p/<method>/<dataset>/<frame id>.hdf5``, holding one
dataset ``value``: the heat map at the full image resolution as float16, higher = more anomalous,
gzip level 9. The frame id is the image file's stem (a trailing ``_leftImg8bit`` dropped, as the
benchmark names LostAndFound frames). The benchmark's splits to run are ``AnomalyTrack-all``,
``ObstacleTrack-all`` and ``LostAndFound-test``; :func:`dataset_of` recognises their folders.
Needs h5py (``pip install rpl[smiyc]``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from rpl.errors import RPLInputError

VALUE = "value"
GZIP_LEVEL = 9
SPLITS = {"dataset_AnomalyTrack": "AnomalyTrack-all", "dataset_ObstacleTrack": "ObstacleTrack-all",
          "dataset_LostAndFound": "LostAndFound-test"}
_SAFE = re.compile(r"^[A-Za-z0-9._+-]+$")


def h5py_module() -> Any:
    try:
        import h5py
    except ImportError:
        raise RPLInputError("--smiyc-layout writes HDF5 files and needs h5py, which is not installed; "
                            "pip install 'rpl[smiyc]' (or pip install h5py).") from None
    return h5py


def frame_id(image_path: str | os.PathLike) -> str:
    stem = Path(image_path).stem
    return stem[: -len("_leftImg8bit")] if stem.endswith("_leftImg8bit") else stem


def dataset_of(image_path: str | os.PathLike) -> str | None:
    """The benchmark split of an image inside one of its dataset folders (``dataset_AnomalyTrack/...``)."""
    for part in Path(image_path).resolve().parts:
        if part in SPLITS:
            return SPLITS[part]
    return None


def check_name(value: str, option: str) -> str:
    if not _SAFE.match(value or ""):
        raise RPLInputError(f"{option} {value!r} must be a plain folder name (letters, digits, . _ + -).")
    return value


def frame_path(root: str | os.PathLike, method: str, dataset: str, fid: str) -> Path:
    return Path(root) / "anomaly_p" / method / dataset / f"{fid}.hdf5"


def write_frame(root: str | os.PathLike, method: str, dataset: str, fid: str, score: np.ndarray) -> Path:
    """Write one frame's heat map (``(H, W)``, the image's full size); returns the file written.

    Written to a temporary name and renamed, so an interrupted run never leaves a truncated file.
    """
    h5py = h5py_module()
    score = np.asarray(score)
    if score.ndim != 2:
        raise ValueError(f"a SMIYC heat map is (H, W), got shape {score.shape}")
    path = frame_path(root, method, dataset, fid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset(VALUE, data=score.astype(np.float16), compression="gzip", compression_opts=GZIP_LEVEL)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_frame(path: str | os.PathLike) -> np.ndarray:
    h5py = h5py_module()
    with h5py.File(path, "r") as fh:
        return fh[VALUE][:]
