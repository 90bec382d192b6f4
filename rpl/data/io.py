"""Image and label file I/O with errors that name the file (OpenCV decode: fast, no PIL needed)."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from rpl.errors import RPLInputError

cv2.setNumThreads(1)  # data-loader workers parallelise; nested OpenCV threads only contend


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 ``(H, W, 3)``; gray and RGBA files are converted."""
    path = Path(path)
    if not path.is_file():
        raise RPLInputError(f"Image file {path} does not exist; expected a readable PNG/JPEG/WebP image.")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise RPLInputError(
            f"Image file {path} could not be decoded (corrupt or not an image); "
            "expected a PNG, JPEG or WebP file."
        )
    if img.dtype != np.uint8:
        raise RPLInputError(f"Image file {path} has pixel type {img.dtype}; expected 8-bit images.")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label map as uint8 ``(H, W)`` with its stored values unchanged."""
    path = Path(path)
    if not path.is_file():
        raise RPLInputError(f"Label file {path} does not exist; expected a single-channel PNG label map.")
    data = np.fromfile(str(path), dtype=np.uint8)
    lab = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if lab is None:
        raise RPLInputError(f"Label file {path} could not be decoded (corrupt or not an image); expected a PNG label map.")
    if lab.ndim == 3:
        # Some releases store labels as RGB/RGBA with equal channels; accept only that case.
        if not (lab[..., 0] == lab[..., 1]).all() or not (lab[..., 0] == lab[..., 2]).all():
            raise RPLInputError(
                f"Label file {path} has {lab.shape[2]} differing channels; expected a single-channel label map."
            )
        lab = lab[..., 0]
    if lab.dtype != np.uint8:
        if lab.max(initial=0) > 255:
            raise RPLInputError(f"Label file {path} holds values above 255; expected 8-bit label ids.")
        lab = lab.astype(np.uint8)
    return lab


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image (format from the suffix), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(path.suffix or ".png", arr)
    if not ok:
        raise RPLInputError(f"Could not encode image for {path}; expected a .png, .jpg or .webp suffix.")
    buf.tofile(str(path))


def write_label(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write a uint8 label map as a lossless single-channel PNG."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"labels must be 2-D uint8, got {label.dtype} {label.shape}")
    write_image(Path(path).with_suffix(".png") if Path(path).suffix != ".png" else path, label)
