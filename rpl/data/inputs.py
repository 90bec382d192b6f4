"""Unlabelled inputs for prediction: image files, folders, globs and videos, read as a stream of frames.

    sources = discover(["shots/", "cam0/*.jpg", "drive.mp4"])   # checked now, nothing decoded yet
    for frame in iter_frames(sources):                            # RGB uint8, one at a time
        frame.image, frame.name, frame.error

Folders are searched recursively and sorted; a glob is expanded with ``**`` support and sorted; a
file's suffix decides whether it is a video (read frame by frame through ``cv2.VideoCapture``, never
whole into memory) or an image. Each frame has a ``name`` that is unique within the run and safe
as a relative output path: the path below the folder or the glob's fixed part (without suffix) for
images, ``<video stem>/<frame index, 6 digits>`` for videos. An unreadable image or video becomes a
frame with ``error`` set (the caller reports and skips it); a path or glob that yields nothing is an
``RPLInputError`` before anything runs.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from rpl.data.io import read_image
from rpl.errors import RPLInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One image or video file to read; ``name`` is its output name (a video's frames go below it)."""

    path: Path
    name: str
    kind: str  # "image" | "video"


@dataclass
class Frame:
    source: Source
    name: str
    index: int | None  # frame index within a video, None for images
    image: np.ndarray | None  # RGB uint8 (H, W, 3); None when unreadable
    error: str | None = None
    fps: float | None = None  # videos: the container's frame rate


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def _known(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES


def _relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _glob_root(pattern: str) -> Path:
    """The part of ``pattern`` before its first wildcard component (names below it are relative to it)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def expand(item: str) -> list[Source]:
    """The sources one INPUT argument names (a file, a folder searched recursively, or a glob)."""
    path = Path(item)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _known(p))
        if not files:
            raise RPLInputError(f"INPUT folder {path} holds no image or video file (searched recursively for "
                                f"{', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)}).")
        return [Source(p, _relative_name(p, path), _kind(p)) for p in files]
    if path.is_file():  # an explicitly named file is read whatever its suffix; a bad one is reported later
        return [Source(path, path.stem, _kind(path))]
    if GLOB_CHARS & set(item):
        root = _glob_root(item)
        files = sorted(Path(p) for p in glob.glob(item, recursive=True) if _known(Path(p)))
        if not files:
            raise RPLInputError(f"INPUT pattern {item!r} matches no image or video file.")
        return [Source(p, _relative_name(p, root) if p.is_relative_to(root) else p.stem, _kind(p)) for p in files]
    raise RPLInputError(f"INPUT {item} does not exist; expected an image or video file, a folder or a glob "
                        "pattern such as 'shots/*.jpg' (quoted so that the shell leaves it alone).")


def discover(inputs: Sequence[str | os.PathLike]) -> list[Source]:
    """Every source the INPUT arguments name, in argument order; names must not collide."""
    if not inputs:
        raise RPLInputError("no INPUT given; expected image files, folders, globs or video files.")
    sources: list[Source] = []
    for item in inputs:
        sources += expand(str(item))
    seen: dict[str, Path] = {}
    for s in sources:
        key = s.name.lower()  # case-insensitive file systems would merge these outputs too
        if key in seen and seen[key] != s.path:
            raise RPLInputError(f"inputs {seen[key]} and {s.path} would both write outputs named {s.name!r}; "
                                "rename one, or run them separately with different --out folders.")
        seen[key] = s.path
    return list(dict.fromkeys(sources))  # the same file named twice is read once


def video_frame_count(path: Path) -> int | None:
    """The frame count a container declares (may be approximate; None when unknown)."""
    cap = cv2.VideoCapture(str(path))
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    finally:
        cap.release()
    return n if n > 0 else None


def _video_frames(source: Source) -> Iterator[Frame]:
    cap = cv2.VideoCapture(str(source.path))
    try:
        if not cap.isOpened():
            yield Frame(source, source.name, None, None,
                        f"Video file {source.path} could not be opened (corrupt or an unsupported codec); expected "
                        "a video OpenCV can read (mp4, avi, mov, mkv, webm).")
            return
        fps = cap.get(cv2.CAP_PROP_FPS) or None
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            yield Frame(source, f"{source.name}/{index:06d}", index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), fps=fps)
            index += 1
        if index == 0:
            yield Frame(source, source.name, None, None,
                        f"Video file {source.path} holds no readable frame (corrupt or an unsupported codec).")
    finally:
        cap.release()


def iter_frames(sources: Sequence[Source]) -> Iterator[Frame]:
    """Frames of every source in order, decoded one at a time; unreadable files give a frame with ``error``."""
    for source in sources:
        if source.kind == "video":
            yield from _video_frames(source)
            continue
        try:
            yield Frame(source, source.name, None, read_image(source.path))
        except RPLInputError as err:
            yield Frame(source, source.name, None, None, str(err))
