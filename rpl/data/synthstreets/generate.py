"""Write a SynthStreets world to disk in the real layouts, deterministically from a seed.

Every picture draws its randomness from ``numpy.random.default_rng([seed, set code, index, attempt])``
alone, so the same seed gives byte-identical files whatever was generated before, and a set's
pictures do not change when another set's size does.
"""
from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rpl.data.io import write_image, write_label
from rpl.errors import RPLInputError

from .anomalies import ANOMALY_KINDS, ANOMALY_TEXTURES
from .classes import ANOMALY, CLASS_NAMES, GENERATED_CLASSES
from .coco_format import instance_annotation
from .oe import EXCLUDED_DEMO_CATEGORIES, OE_CATEGORIES, OE_CATEGORY_IDS, OE_TEXTURES, render_oe_image
from .scene import Scene, render_street

GENERATOR_VERSION = "2"
MANIFEST = "synthstreets.json"
DEFAULT_SIZE = (192, 384)  # (H, W)
DEFAULT_COUNTS = {"train": 1000, "val": 60, "coco": 300, "anomaly": 60, "rural": 60, "obstacle": 60}
CITIES = {"train": ("arborvale", "brickport", "cobbleton", "dunmere"), "val": ("elmsford", "fernhollow")}
CITYSCAPES_FRAME = 19  # Cityscapes' annotated frame of each snippet is the 20th (000019)
ANOMALY_SETS = {  # folder: (set, context, anomalies per picture, on-screen area range, road only, min area)
    "synthstreets-anomaly": ("anomaly", "city", (1, 3), (0.003, 0.08), False, 0.002),
    "synthstreets-rural": ("rural", "rural", (1, 3), (0.003, 0.08), False, 0.002),
    "synthstreets-obstacle": ("obstacle", "city", (1, 3), (0.0015, 0.025), True, 0.001),
}
STREAMS = {"train": 1, "val": 2, "coco": 3, "anomaly": 4, "rural": 5, "obstacle": 6}
OUTPUT_FOLDERS = ("cityscapes", "coco", *ANOMALY_SETS)
MAX_ATTEMPTS = 25
STAGING_SUFFIX = ".partial"  # DIR.partial/ holds a generation in progress; DIR only ever gets finished ones
STAGING_MARK = ".rpl-synthstreets-in-progress"


@dataclass(frozen=True)
class GenerationSummary:
    root: Path
    counts: dict[str, int]
    seconds: float
    excluded_coco_images: dict[str, list[int]] = field(default_factory=dict)


def _rng(seed: int, stream: str, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream], index, attempt])


def _check_args(seed, size, scale) -> tuple[int, tuple[int, int], float]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise RPLInputError(f"SynthStreets --seed {seed!r} is not valid; expected a non-negative integer.")
    size = DEFAULT_SIZE if size is None else size
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise RPLInputError(f"SynthStreets --size {size!r} is not valid; expected HxW, for example 192x384.") from None
    if not (64 <= h <= 4096 and 64 <= w <= 4096):
        raise RPLInputError(f"SynthStreets --size {h}x{w} is out of range; "
                            "expected height and width between 64 and 4096.")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise RPLInputError(f"SynthStreets --scale {scale!r} is not a number; "
                            "expected a positive factor such as 0.1.") from None
    if not math.isfinite(scale) or not 0 < scale <= 1000:
        raise RPLInputError(f"SynthStreets --scale {scale} is out of range; expected a positive factor up to 1000.")
    return int(seed), (h, w), scale


def image_counts(scale: float = 1.0) -> dict[str, int]:
    """Pictures per set for a ``scale`` (every set keeps at least one)."""
    return {name: max(1, round(n * scale)) for name, n in DEFAULT_COUNTS.items()}


def _manifest(seed: int, size: tuple[int, int], scale: float, counts: dict[str, int], excluded: dict) -> dict:
    return {
        "generator": "rpl.data.synthstreets", "version": GENERATOR_VERSION, "seed": seed, "size": list(size),
        "scale": scale, "counts": counts, "classes": list(CLASS_NAMES), "generated_classes": list(GENERATED_CLASSES),
        "layouts": {"cityscapes": "cityscapes (leftImg8bit/, gtFine/ *_gtFine_labelTrainIds.png, void 255)",
                    "coco": "coco (train2017/*.jpg, annotations/instances_train2017.json)",
                    **{name: "images/ + labels_masks/ (0 inlier, 1 anomaly, 255 void)" for name in ANOMALY_SETS}},
        "outlier_exposure": {"categories": list(OE_CATEGORIES), "textures": list(OE_TEXTURES),
                             "excluded_by_meta_ood_rules": excluded},
        "test_anomalies": {"kinds": list(ANOMALY_KINDS), "textures": list(ANOMALY_TEXTURES)},
    }


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of a finished generation in ``out`` (None if absent or unreadable)."""
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_generated(out: str | Path, seed: int = 0, size: tuple[int, int] | None = None, scale: float = 1.0) -> bool:
    """True when ``out`` holds a finished generation with these parameters and this generator version."""
    seed, size, scale = _check_args(seed, size, scale)
    m = read_manifest(out)
    return bool(m) and m.get("version") == GENERATOR_VERSION and m.get("seed") == seed and \
        m.get("size") == list(size) and m.get("scale") == scale and \
        all((Path(out) / folder).is_dir() for folder in OUTPUT_FOLDERS)


def regenerate_if_outdated(out: str | Path) -> bool:
    """Regenerate ``out`` with its own seed, size and scale when an older generator version wrote it.

    Returns True if it regenerated. A folder without a manifest (not ours, or empty) is left alone.
    """
    manifest = read_manifest(out)
    if manifest is None or manifest.get("version") == GENERATOR_VERSION:
        return False
    print(f"SynthStreets under {out} was written by generator version {manifest.get('version')}; "
          f"regenerating it with version {GENERATOR_VERSION} (once).", file=sys.stderr)
    _regenerate_with_own_parameters(Path(out), manifest)
    return True


def _regenerate_with_own_parameters(out: Path, manifest: dict) -> None:
    try:
        _check_args(manifest.get("seed", 0), manifest.get("size"), manifest.get("scale", 1.0))
    except RPLInputError as err:
        raise RPLInputError(f"{out / MANIFEST} records parameters that cannot be regenerated ({err}); "
                            "delete the folder and run again to generate SynthStreets afresh.") from None
    generate(out, seed=manifest.get("seed", 0), size=manifest.get("size"), scale=manifest.get("scale", 1.0))


def ensure_generated(out: str | Path, seed: int = 0, size: tuple[int, int] | None = None, scale: float = 1.0,
                     hint: str = "") -> None:
    """Make ``out`` hold a finished, current SynthStreets world (what rpl-train and rpl-eval call).

    - an interrupted final move of an earlier generation (see ``generate``) is completed;
    - no generator output there: generate it with ``seed``, ``size``, ``scale``;
    - a finished generation: regenerated (own parameters) when an older version wrote it or one of
      its folders was deleted;
    - an unfinished one (generator output without ``synthstreets.json``, as an interrupted run of
      an older release left it): regenerated;
    - anything else (the user's own data in these layouts) is left for the loaders to check.

    ``hint`` ends the message that announces a generation (the caller's option to put it elsewhere).
    """
    out = Path(out)
    _finish_interrupted_move(out)
    manifest = read_manifest(out)
    if manifest is not None:
        missing = [f for f in OUTPUT_FOLDERS if not (out / f).is_dir()]
        if missing:
            print(f"SynthStreets under {out} lacks {', '.join(missing)}; regenerating it (once).", file=sys.stderr)
            _regenerate_with_own_parameters(out, manifest)
        else:
            regenerate_if_outdated(out)
        return
    if _unfinished_generation(out):
        print(f"SynthStreets under {out} is unfinished (no {MANIFEST}: an earlier generation was interrupted); "
              f"generating it again{hint}.", file=sys.stderr)
        generate(out, seed=seed, size=size, scale=scale)
    elif not any((out / f).exists() for f in OUTPUT_FOLDERS):
        print(f"SynthStreets not found under {out}: generating it (once) into {out.absolute()}{hint}.",
              file=sys.stderr)
        generate(out, seed=seed, size=size, scale=scale)


def staging_folder(out: str | Path) -> Path:
    """Where ``generate`` writes before moving the finished world to ``out`` (a sibling of it)."""
    out = Path(out)
    return out.with_name(out.name + STAGING_SUFFIX)


def _unfinished_generation(out: Path) -> bool:
    """Generator output without a manifest: the first training city's folder is the generator's mark."""
    return read_manifest(out) is None and (out / "cityscapes" / "leftImg8bit" / "train" / CITIES["train"][0]).is_dir()


def _check_target(out: Path) -> None:
    """Refuse a file, or folders that the generator did not write (nothing is deleted here)."""
    if out.exists() and not out.is_dir():
        raise RPLInputError(f"SynthStreets --out {out} is a file; expected a folder (it is created if missing).")
    if read_manifest(out) is not None or _unfinished_generation(out):
        return
    present = [out / f for f in OUTPUT_FOLDERS if (out / f).exists()]
    if present:
        raise RPLInputError(
            f"SynthStreets --out {out} already holds {', '.join(str(p) for p in present)} but no {MANIFEST}, "
            "so they were not written by this generator; expected an empty or new folder "
            f"(or one from an earlier generation). If they are left from an interrupted generation, delete "
            f"{', '.join(str(p) for p in present)} and run again."
        )


def _clear_staging(staging: Path) -> None:
    """Delete a staging folder left by an interrupted generation (only if the generator made it)."""
    if not staging.exists():
        return
    if not (staging / STAGING_MARK).is_file() and not (staging / MANIFEST).is_file():
        raise RPLInputError(f"SynthStreets needs {staging} as its temporary folder, but it exists and was not made "
                            "by the generator; move or delete it and run again.")
    shutil.rmtree(staging)


def _move_into_place(staging: Path, out: Path) -> None:
    """Move a finished generation from ``staging`` to ``out``, the manifest last.

    ``out`` absent: one rename. ``out`` present (an older generation, maybe with caches such as the
    outlier-mask cache beside it): the manifest goes first, each generator folder is swapped, the
    manifest comes back last. Every step can be repeated, so a move cut short is finished by the next
    call (``_finish_interrupted_move``).
    """
    (staging / STAGING_MARK).unlink(missing_ok=True)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
        return
    (out / MANIFEST).unlink(missing_ok=True)  # unfinished from here until the new manifest lands
    for folder in OUTPUT_FOLDERS:
        if (staging / folder).exists():
            if (out / folder).exists():
                shutil.rmtree(out / folder)
            os.replace(staging / folder, out / folder)
    os.replace(staging / MANIFEST, out / MANIFEST)
    shutil.rmtree(staging)


def _finish_interrupted_move(out: Path) -> None:
    staging = staging_folder(out)
    if (staging / MANIFEST).is_file():
        _move_into_place(staging, out)


def _street(seed: int, stream: str, index: int, size, context: str = "city", anomalies=(0, 0), area=(0.003, 0.08),
            road_only: bool = False, min_area: float = 0.0) -> Scene:
    """Render a street; anomaly pictures are redrawn (next attempt seed) until their anomalies show."""
    for attempt in range(MAX_ATTEMPTS):
        rng = _rng(seed, stream, index, attempt)
        count = int(rng.integers(anomalies[0], anomalies[1] + 1)) if anomalies[1] else 0
        scene = render_street(rng, size, context, count, area, road_only)
        shown = np.count_nonzero(scene.label == ANOMALY) / scene.label.size
        if not count or (scene.visible_fraction >= 0.6 and shown >= min_area):
            return scene
    raise RuntimeError(f"SynthStreets: no visible anomaly after {MAX_ATTEMPTS} attempts ({stream} #{index})")


def _write_cityscapes(root: Path, split: str, index: int, scene: Scene) -> None:
    cities = CITIES[split]
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_{CITYSCAPES_FRAME:06d}"
    write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", scene.image)
    write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", scene.label)


def _coco_roles(n: int) -> list[str]:
    """Which pictures exist to be excluded by the Meta-OoD rules, spread evenly over the set."""
    special = ["person", "car", "small"] * max(1, n // 100) + ["person", "car"] * (n // 300)
    special += ["empty"] if n >= 20 else []
    special = special[: max(0, n - 1)]  # keep at least one usable picture
    roles = ["objects"] * n
    for k, role in enumerate(special):
        roles[int((k + 0.5) * n / len(special))] = role
    return roles


def _categories() -> list[dict]:
    cats = [{"id": cid, "name": name, "supercategory": "person" if name == "person" else "vehicle"}
            for name, cid in EXCLUDED_DEMO_CATEGORIES.items()]
    return cats + [{"id": OE_CATEGORY_IDS[name], "name": name, "supercategory": "object"} for name in OE_CATEGORIES]


@dataclass(frozen=True)
class _Job:
    """One picture to render and write; results come back in job order, so any worker count gives
    the same files."""
    out: Path
    seed: int
    size: tuple[int, int]
    stream: str
    index: int
    role: str = ""


def _run(job: _Job):
    """Render and write one picture; COCO pictures return (image entry, annotations without ids)."""
    if job.stream in CITIES:
        scene = _street(job.seed, job.stream, job.index, job.size)
        _write_cityscapes(job.out / "cityscapes", job.stream, job.index, scene)
        return None
    if job.stream == "coco":
        return _coco_picture(job)
    folder = next(f for f, spec in ANOMALY_SETS.items() if spec[0] == job.stream)
    _, context, anomalies, area, road_only, min_area = ANOMALY_SETS[folder]
    scene = _street(job.seed, job.stream, job.index, job.size, context, anomalies, area, road_only, min_area)
    write_image(job.out / folder / "images" / f"{job.index:04d}.png", scene.image)
    write_label(job.out / folder / "labels_masks" / f"{job.index:04d}.png",
                scene.obstacle_mask() if road_only else scene.anomaly_mask())
    return None


def _coco_picture(job: _Job) -> tuple[dict, list[dict]]:
    image_id = job.index + 1
    image, label, instances = render_oe_image(_rng(job.seed, "coco", job.index), job.role)
    name = f"{image_id:012d}.jpg"
    write_image(job.out / "coco" / "train2017" / name, image)
    entry = {"id": image_id, "file_name": name, "height": int(image.shape[0]), "width": int(image.shape[1])}
    annotations = []
    for value, category, crowd in instances:
        cat_id = EXCLUDED_DEMO_CATEGORIES.get(category) or OE_CATEGORY_IDS[category]
        ann = instance_annotation(label == value, 0, image_id, cat_id, crowd)
        if ann is not None:
            annotations.append(ann)
    return entry, annotations


def _jobs(out: Path, seed: int, size: tuple[int, int], counts: dict[str, int]) -> list[_Job]:
    jobs = [_Job(out, seed, size, split, i) for split in CITIES for i in range(counts[split])]
    jobs += [_Job(out, seed, size, "coco", i, role) for i, role in enumerate(_coco_roles(counts["coco"]))]
    jobs += [_Job(out, seed, size, spec[0], i) for spec in ANOMALY_SETS.values() for i in range(counts[spec[0]])]
    return jobs


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _pool(workers: int):
    """A process pool, or None to work in this process. Workers are forked (Linux) so they need not
    re-import the package (importing ``rpl`` loads torch), and freeze what they inherit out of garbage
    collection; elsewhere the work stays in one process."""
    if workers < 2 or sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork").Pool(workers, initializer=gc.freeze)


def generate(out: str | Path, seed: int = 0, size: tuple[int, int] | None = None, scale: float = 1.0, *,
             workers: int | None = None) -> GenerationSummary:
    """Generate SynthStreets under ``out``: Cityscapes-layout train/val, a COCO-layout outlier set and
    three Fishyscapes-layout anomaly sets, plus ``synthstreets.json`` (written last).

    Everything is written into the sibling folder ``out.partial`` first and moved to ``out`` when
    finished, so an interrupted run never leaves a half-written ``out`` (the next run clears the
    partial folder). ``synthstreets.json`` is the mark of a finished generation.

    ``size`` is (H, W) of the street pictures (default 192x384); ``scale`` multiplies every set's
    picture count; ``workers`` processes render in parallel (default: up to 2), with identical output.
    """
    seed, size, scale = _check_args(seed, size, scale)
    workers = _default_workers() if workers is None else int(workers)
    if workers < 1:
        raise RPLInputError(f"SynthStreets workers={workers}; expected at least 1 process.")
    out = Path(out)
    _finish_interrupted_move(out)
    _check_target(out)
    staging = staging_folder(out)
    _clear_staging(staging)
    staging.mkdir(parents=True)
    (staging / STAGING_MARK).write_text(f"SynthStreets generation in progress into {out}; safe to delete\n")
    counts = image_counts(scale)
    jobs = _jobs(staging, seed, size, counts)
    start = time.perf_counter()
    images, annotations, excluded = [], [], {"person": [], "car": [], "small": [], "empty": []}
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    names = {"train": "cityscapes/train", "val": "cityscapes/val", "coco": "coco/train2017",
             **{spec[0]: folder for folder, spec in ANOMALY_SETS.items()}}
    pool = _pool(workers)
    gc.freeze()  # the collector would rescan every object already alive (torch's too) every few pictures
    try:
        with Progress(*columns) as progress:
            tasks: dict[str, int] = {}
            results = pool.imap(_run, jobs, chunksize=4) if pool else map(_run, jobs)
            for job, result in zip(jobs, results):
                if job.stream not in tasks:
                    tasks[job.stream] = progress.add_task(names[job.stream], total=counts[job.stream])
                if job.stream == "coco":
                    entry, anns = result
                    images.append(entry)
                    annotations += [{**ann, "id": len(annotations) + k + 1} for k, ann in enumerate(anns)]
                    if job.role in excluded:
                        excluded[job.role].append(entry["id"])
                progress.advance(tasks[job.stream])
    finally:
        gc.unfreeze()
        if pool is not None:
            pool.terminate()
    _write_coco_json(staging / "coco", images, annotations)
    manifest = _manifest(seed, size, scale, counts, excluded)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    _move_into_place(staging, out)
    seconds = time.perf_counter() - start
    Console().print(f"SynthStreets (seed {seed}, {size[0]}x{size[1]}): {len(jobs)} pictures in {seconds:.1f} s "
                    f"-> {out}")
    return GenerationSummary(out, counts, seconds, excluded)


def _write_coco_json(root: Path, images: list[dict], annotations: list[dict]) -> None:
    coco = {"info": {"description": "SynthStreets outlier-exposure set (COCO layout)", "version": GENERATOR_VERSION},
            "licenses": [], "images": images, "annotations": annotations, "categories": _categories()}
    path = root / "annotations" / "instances_train2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco, separators=(",", ":")), encoding="utf-8")
