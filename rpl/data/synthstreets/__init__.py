"""SynthStreets: the procedural street world the project trains and evaluates on out of the box.

No dataset can be downloaded here, so this generator stands in for Cityscapes, COCO and the
anomaly benchmarks, writing each in its real on-disk layout so the real loaders run end to end::

    DIR/cityscapes/leftImg8bit/{train,val}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png
    DIR/cityscapes/gtFine/{train,val}/{city}/{city}_{seq:06d}_000019_gtFine_labelTrainIds.png
    DIR/coco/train2017/{id:012d}.jpg, DIR/coco/annotations/instances_train2017.json
    DIR/synthstreets-{anomaly,rural,obstacle}/images/NNNN.png + labels_masks/NNNN.png
    DIR/synthstreets.json   (seed, size, counts, version, classes; written last: the mark of a finished world)

Streets are rendered in perspective (bending road, lane markings, sidewalks, facades with windows,
trees, poles, traffic lights and signs, cars, people) with Cityscapes train ids (the eleven classes
in ``GENERATED_CLASSES``; the ego-vehicle hood is void 255), random light,
palette, texture, blur and sensor noise. The outlier-exposure set shows everyday objects (crate,
ball, lamp, ...) indoors or outdoors (lawn, field, sand, snow), as COCO does, and, on purpose, a
few pictures the Meta-OoD rules must drop (a person or a car, official ids 1 and 3; pictures under
480 pixels; one without annotations). The test sets hold
anomalies whose shapes and textures occur nowhere else: ``synthstreets-anomaly`` in the training
context, ``synthstreets-rural`` in a shifted one (dirt road, fields, farms, other light) and
``synthstreets-obstacle`` with the road as region of interest (off-road pixels 255).

Same seed, same bytes: every picture is drawn from its own ``(seed, set, index)`` generator.
"""
from .anomalies import ANOMALY_KINDS, ANOMALY_TEXTURES
from .classes import CLASS_NAMES, GENERATED_CLASSES
from .generate import (DEFAULT_COUNTS, DEFAULT_SIZE, GENERATOR_VERSION, MANIFEST, GenerationSummary, ensure_generated,
                       generate, image_counts, is_generated, read_manifest, regenerate_if_outdated, staging_folder)
from .oe import OE_CATEGORIES, OE_TEXTURES
from .scene import Scene, render_street

__all__ = [
    "generate", "ensure_generated", "staging_folder", "GenerationSummary", "is_generated", "read_manifest", "regenerate_if_outdated", "image_counts",
    "render_street", "Scene",
    "DEFAULT_SIZE", "DEFAULT_COUNTS", "GENERATOR_VERSION", "MANIFEST", "CLASS_NAMES", "GENERATED_CLASSES",
    "OE_CATEGORIES", "OE_TEXTURES", "ANOMALY_KINDS", "ANOMALY_TEXTURES",
]
