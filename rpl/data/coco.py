"""COCO outlier-exposure preparation: Meta-OoD image selection and union masks, cached once.

The cache folder holds one PNG mask per kept image (named by the image's file stem; 254 = object,
0 = background) and a ``manifest.json`` written last. Selection rules (Meta-OoD, docs/method.md section 4),
applied in this order and counted separately:

1. ``excluded_category``: the image has an annotation of person, bicycle, car, motorcycle, bus,
   truck, traffic light or stop sign. Categories are matched by *name* in the json's
   ``categories`` list (official COCO ids 1, 2, 3, 4, 6, 8, 10, 13), so re-indexed or synthetic
   COCO-layout sets work too; names the json does not define simply exclude nothing.
2. ``too_small``: the json's height or width is below ``min_size``.
3. ``no_annotations``: the image has no instance annotation (crowd annotations count).
4. ``empty_mask``: its annotations rasterise to no pixel at all.
5. ``missing_file``: the image is listed in the json but not present on disk (warned).

An image record whose height or width is not a positive whole number is skipped and counted
(``bad_image_size``, warned) unless rule 1 already excluded it.

Masks are the union of all instance masks, crowd regions included (polygons, compressed and
uncompressed RLE all go through ``pycocotools.mask``). Annotations need no ``id`` field: they are
grouped by ``image_id`` here rather than indexed by ``pycocotools.coco.COCO``. An annotation that
cannot be rasterised (no segmentation, wrong RLE size, non-numeric polygon values or RLE fields) is
skipped and counted.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rpl.conventions import OUTLIER
from rpl.data.io import write_label
from rpl.errors import RPLInputError

OOD_LABEL = OUTLIER
BACKGROUND_LABEL = 0
EXCLUDED_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "bus", "truck", "traffic light", "stop sign",
)
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "rpl-coco-ood/2"  # 2: records the annotation file's digest
_TMP_SUFFIX = ".rpltmp"


def _layout_hint(split: str) -> str:
    return f"a COCO layout with {split}/*.jpg and annotations/instances_{split}.json"


def _check_layout(coco_root: Path, split: str) -> tuple[Path, Path]:
    """Return (image folder, annotation json) or say exactly what is missing."""
    if not coco_root.is_dir():
        raise RPLInputError(f"COCO folder {coco_root} does not exist; expected {_layout_hint(split)}.")
    image_dir = coco_root / split
    ann_file = coco_root / "annotations" / f"instances_{split}.json"
    if not image_dir.is_dir():
        raise RPLInputError(
            f"COCO image folder {image_dir} does not exist; expected {_layout_hint(split)} under {coco_root}."
        )
    if not ann_file.is_file():
        raise RPLInputError(
            f"COCO annotation file {ann_file} does not exist; expected {_layout_hint(split)} under {coco_root}."
        )
    return image_dir, ann_file


def _load_annotations(ann_file: Path) -> dict[str, Any]:
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RPLInputError(
            f"COCO annotation file {ann_file} could not be read as JSON ({err}); "
            "expected a COCO instances json with 'images', 'annotations' and 'categories'."
        ) from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)] \
        if isinstance(data, dict) else ["images", "annotations", "categories"]
    if missing:
        raise RPLInputError(
            f"COCO annotation file {ann_file} lacks the list(s) {', '.join(missing)}; "
            "expected a COCO instances json with 'images', 'annotations' and 'categories'."
        )
    return data


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks (about a second for COCO's 450 MB annotation file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_params(coco_root: Path, split: str, min_size: int, ann_file: Path) -> dict[str, Any]:
    """The parameters a cache must match to be reused as is."""
    return {
        "format": MANIFEST_FORMAT,
        "source_root": str(coco_root.resolve()),
        "split": split,
        "annotations_sha256": file_digest(ann_file),
        "rules": {
            "excluded_categories": list(EXCLUDED_CATEGORIES),
            "min_size": int(min_size),
            "require_annotations": True,
            "object_value": OOD_LABEL,
            "background_value": BACKGROUND_LABEL,
        },
    }


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _manifest_matches(manifest: dict[str, Any] | None, params: dict[str, Any], out_dir: Path) -> bool:
    if manifest is None or any(manifest.get(k) != v for k, v in params.items()):
        return False
    images = manifest.get("images")
    return isinstance(images, list) and all(
        isinstance(e, dict) and (out_dir / str(e.get("mask", ""))).is_file() for e in images
    )


def _annotation_rles(ann: dict[str, Any], height: int, width: int, mask_api: Any) -> list[dict] | None:
    """RLEs for one annotation at the image's size, or None when it cannot be rasterised."""
    try:
        return _rles(ann, height, width, mask_api)
    except (TypeError, ValueError, OverflowError):  # fields of the wrong type: polygon values, RLE size/counts
        return None


def _number(value: Any) -> float:
    """A finite JSON number (not a string or bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def _image_size(img: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) of an image record, or None when they are not positive whole numbers."""
    try:
        height, width = _number(img["height"]), _number(img["width"])
    except ValueError:
        return None
    if height != int(height) or width != int(width) or height < 1 or width < 1:
        return None
    return int(height), int(width)


def _rles(ann: dict[str, Any], height: int, width: int, mask_api: Any) -> list[dict] | None:
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        # Polygons; fewer than 3 points are degenerate (and 4 numbers would be read as a box).
        polygons = [[_number(v) for v in p] for p in segm if isinstance(p, list) and len(p) >= 6]
        return mask_api.frPyObjects(polygons, height, width) if polygons else None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [_number(v) for v in segm["size"]] != [height, width]:
            return None
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed RLE (typical for iscrowd=1)
            if sum(_number(c) for c in counts) != height * width:
                return None
            return [mask_api.frPyObjects(segm, height, width)]
        if isinstance(counts, (str, bytes)):  # compressed RLE
            return [{"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}]
    return None


def _union_mask(anns: list[dict[str, Any]], height: int, width: int, mask_api: Any) -> tuple[np.ndarray, int]:
    """Union of all instance masks as 0/254 uint8, plus the number of annotations skipped."""
    rles: list[dict] = []
    skipped = 0
    for ann in anns:
        ann_rles = _annotation_rles(ann, height, width, mask_api)
        if ann_rles is None:
            skipped += 1
        else:
            rles.extend(ann_rles)
    if not rles:
        return np.zeros((height, width), np.uint8), skipped
    with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's copy=False deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        union = mask_api.decode(mask_api.merge(rles, intersect=0)).astype(bool)
    return np.where(union, OOD_LABEL, BACKGROUND_LABEL).astype(np.uint8), skipped


def _write_atomic_label(path: Path, mask: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}.png")
    write_label(tmp, mask)
    os.replace(tmp, path)


def _write_atomic_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]COCO outlier masks"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)


def prepare_coco_ood(coco_root: str | os.PathLike, out_dir: str | os.PathLike, split: str = "train2017",
                     min_size: int = 480) -> Path:
    """Select Meta-OoD outlier images from a COCO layout and cache their union masks; return ``out_dir``.

    Resumable: masks are written atomically, so a re-run after an interruption keeps every mask
    already on disk and writes only the rest; the manifest is written last. If the manifest already
    matches these parameters (including the annotation file's digest), nothing is read or written.
    When the annotation file changed (for example a regenerated SynthStreets), the masks of the old
    one are deleted first, so no stale mask survives; a pending manifest written before the first
    mask records the digest an interrupted run was building for.
    """
    coco_root, out_dir = Path(coco_root), Path(out_dir)
    if min_size < 1:
        raise RPLInputError(f"min_size {min_size} is not a positive number of pixels.")
    image_dir, ann_file = _check_layout(coco_root, split)
    params = _manifest_params(coco_root, split, min_size, ann_file)
    old = _read_manifest(out_dir)
    if _manifest_matches(old, params, out_dir):
        return out_dir
    if old is not None and (old.get("source_root"), old.get("split")) != (params["source_root"], split):
        raise RPLInputError(
            f"Cache folder {out_dir} already holds masks of {old.get('source_root')} split {old.get('split')}; "
            f"expected a fresh folder (or that cache's own source) for {coco_root} split {split}."
        )
    try:
        from pycocotools import mask as mask_api
    except ImportError:
        raise RPLInputError(
            "Preparing COCO outlier masks needs pycocotools, one of rpl's install requirements, which is "
            "not installed in this Python; run `pip install pycocotools` (or reinstall rpl with "
            "`pip install -c constraints.txt -e .`)."
        ) from None

    data = _load_annotations(ann_file)
    excluded_ids = {c["id"] for c in data["categories"]
                    if isinstance(c, dict) and c.get("name") in EXCLUDED_CATEGORIES and "id" in c}
    anns_by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann:
            anns_by_image[ann["image_id"]].append(ann)

    counts = {"listed": len(data["images"]), "excluded_category": 0, "too_small": 0, "no_annotations": 0,
              "empty_mask": 0, "missing_file": 0, "bad_image_size": 0, "kept": 0, "skipped_annotations": 0}
    candidates = []
    for img in data["images"]:
        if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= img.keys():
            raise RPLInputError(
                f"COCO annotation file {ann_file} has an image entry without id/file_name/height/width: "
                f"{str(img)[:200]}; expected COCO 'images' records."
            )
        anns = anns_by_image.get(img["id"], [])
        size = _image_size(img)
        if any(a.get("category_id") in excluded_ids for a in anns):
            counts["excluded_category"] += 1
        elif size is None:
            counts["bad_image_size"] += 1
        elif size[0] < min_size or size[1] < min_size:
            counts["too_small"] += 1
        elif not anns:
            counts["no_annotations"] += 1
        else:
            candidates.append((img, anns))

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".*{_TMP_SUFFIX}*"):  # leftovers of an interrupted run
        stale.unlink(missing_ok=True)
    if old is not None and old.get("annotations_sha256") != params["annotations_sha256"]:
        for stale in out_dir.glob("*.png"):  # our cache (it has our manifest), built from other annotations
            stale.unlink()
    pending = False

    kept: list[dict[str, str]] = []
    missing: list[str] = []
    mask_owner: dict[str, str] = {}
    with _progress() as progress:
        task = progress.add_task("masks", total=len(candidates))
        for img, anns in candidates:
            progress.advance(task)
            file_name = str(img["file_name"])
            if not (image_dir / file_name).is_file():
                counts["missing_file"] += 1
                missing.append(file_name)
                continue
            mask_name = Path(file_name).stem + ".png"
            if mask_name in mask_owner:
                raise RPLInputError(
                    f"COCO annotation file {ann_file} lists {mask_owner[mask_name]} and {file_name}, whose masks "
                    f"would share the name {mask_name}; expected unique image file stems."
                )
            mask_owner[mask_name] = file_name
            mask_path = out_dir / mask_name
            if not mask_path.is_file():
                height, width = _image_size(img)
                mask, skipped = _union_mask(anns, height, width, mask_api)
                counts["skipped_annotations"] += skipped
                if not mask.any():
                    counts["empty_mask"] += 1
                    continue
                if not pending:  # record the digest the masks belong to; no "images", so it never matches
                    _write_atomic_json(out_dir / MANIFEST_NAME, {**params, "pending": True})
                    pending = True
                _write_atomic_label(mask_path, mask)
            kept.append({"image": file_name, "mask": mask_name})

    counts["kept"] = len(kept)
    if missing:
        if not kept:
            raise RPLInputError(
                f"None of the {len(missing)} selected images of {ann_file} exist in {image_dir} "
                f"(first missing: {missing[0]}); expected {_layout_hint(split)}."
            )
        warnings.warn(f"{len(missing)} images listed in {ann_file} are missing from {image_dir} "
                      f"(for example {missing[0]}); they were skipped.", stacklevel=2)
    if not kept:
        raise RPLInputError(
            f"No image of {ann_file} passes the outlier-exposure rules (exclusion counts: {counts}); "
            f"expected images of at least {min_size}x{min_size} with annotations and none of "
            f"{', '.join(EXCLUDED_CATEGORIES)}."
        )
    if counts["skipped_annotations"]:
        warnings.warn(f"{counts['skipped_annotations']} annotations in {ann_file} had no usable segmentation "
                      "(missing, degenerate polygon, non-numeric values, or an RLE of the wrong size or type) and were "
                      "ignored.", stacklevel=2)
    if counts["bad_image_size"]:
        warnings.warn(f"{counts['bad_image_size']} image records in {ann_file} have a height or width that is not a "
                      "positive whole number; they were skipped.", stacklevel=2)
    manifest = {**params, "annotation_file": str(ann_file.resolve()), "counts": counts, "images": kept}
    _write_atomic_json(out_dir / MANIFEST_NAME, manifest)
    return out_dir


def load_ood_manifest(out_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """The cached outlier-exposure set as ``(image_path, mask_path)`` pairs, checked to exist."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    hint = "run `rpl-data coco-ood --coco-root COCO --out DIR` to build it"
    if not path.is_file():
        raise RPLInputError(f"Outlier-exposure cache {out_dir} has no {MANIFEST_NAME}; {hint}.")
    manifest = _read_manifest(out_dir)
    images = manifest.get("images") if manifest else None
    if (manifest is None or manifest.get("format") != MANIFEST_FORMAT or not isinstance(images, list)
            or not all(isinstance(e, dict) and {"image", "mask"} <= e.keys() for e in images)
            or not isinstance(manifest.get("source_root"), str) or not isinstance(manifest.get("split"), str)):
        raise RPLInputError(
            f"Outlier-exposure manifest {path} is corrupt or of another format (expected {MANIFEST_FORMAT} "
            f"with source_root, split and images); delete it and {hint}."
        )
    image_dir = Path(manifest["source_root"]) / manifest["split"]
    pairs = [(image_dir / e["image"], out_dir / e["mask"]) for e in images]
    if not pairs:
        raise RPLInputError(f"Outlier-exposure manifest {path} lists no images; {hint}.")
    for image_path, mask_path in pairs:
        if not mask_path.is_file():
            raise RPLInputError(
                f"Outlier mask {mask_path} listed in {path} is missing; re-run the preparation ({hint})."
            )
        if not image_path.is_file():
            raise RPLInputError(
                f"Outlier image {image_path} listed in {path} is missing; expected the COCO folder the cache "
                f"was built from ({manifest['source_root']}) to be still in place."
            )
    return pairs
