"""SynthStreets: deterministic, label conventions, real layouts read by the real loaders, COCO format."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from rpl.data.anomaly import MaskFolderDataset
from rpl.data.cityscapes import CityscapesSegmentation, list_cityscapes
from rpl.data.io import read_image, read_label
from rpl.data.synthstreets import (ANOMALY_KINDS, ANOMALY_TEXTURES, CLASS_NAMES, GENERATED_CLASSES, OE_CATEGORIES,
                                   OE_TEXTURES, generate, image_counts, is_generated, read_manifest,
                                   regenerate_if_outdated, render_street)
from rpl.data.synthstreets import oe
from rpl.data.synthstreets.classes import ANOMALY, ROAD, VOID
from rpl.data.synthstreets.coco_format import rle_uncompressed
from rpl.data.synthstreets.generate import ANOMALY_SETS, _street
from rpl.errors import RPLInputError

SCALE = 0.03
SIZE = (192, 384)
REQUIRED = ("road", "sidewalk", "building", "pole", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
            "person", "car")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "seed0"
    generate(root, seed=0, scale=SCALE, workers=1)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_worker_count(world, tmp_path):
    again = tmp_path / "again"
    summary = generate(again, seed=0, scale=SCALE, workers=2)
    assert summary.counts == image_counts(SCALE)
    first, second = _files(world), _files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_other_seed_other_pictures(world, tmp_path):
    other = tmp_path / "seed1"
    generate(other, seed=1, scale=SCALE, workers=1)
    first, second = _files(world), _files(other)
    pictures = [n for n in first if n.endswith((".png", ".jpg"))]
    assert first.keys() == second.keys() and pictures
    assert all(first[n] != second[n] for n in pictures if "leftImg8bit" in n or "/images/" in n or n.endswith(".jpg"))


def test_layouts_are_read_by_the_real_loaders(world):
    counts = image_counts(SCALE)
    city = world / "cityscapes"
    for split in ("train", "val"):
        pairs = list_cityscapes(city, split)
        assert len(pairs) == counts[split]
        for image, label in pairs:
            assert re.fullmatch(r"[a-z]+_\d{6}_000019_leftImg8bit\.png", image.name)
            assert label.name == image.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
            assert image.parent.name == label.parent.name == image.name.split("_")[0]
    val = CityscapesSegmentation(city, "val")
    assert val[0]["image"].shape == (*SIZE, 3) and val[0]["label"].shape == SIZE
    for folder, spec in ANOMALY_SETS.items():
        ds = MaskFolderDataset(world / folder)
        assert len(ds) == counts[spec[0]]
        assert ds[0]["image"].shape == (*SIZE, 3)
    names = sorted(p.name for p in (world / "coco" / "train2017").iterdir())
    assert len(names) == counts["coco"] and all(re.fullmatch(r"\d{12}\.jpg", n) for n in names)


def test_cityscapes_labels_follow_train_ids(world):
    seen = set()
    for _, label_path in list_cityscapes(world / "cityscapes", "train") + list_cityscapes(world / "cityscapes", "val"):
        label = read_label(label_path)
        values = set(np.unique(label).tolist())
        assert values <= {CLASS_NAMES.index(c) for c in GENERATED_CLASSES} | {VOID}, label_path
        void = label == VOID
        assert void.mean() < 0.1
        assert not void[: SIZE[0] // 2].any()  # void is only the ego hood at the bottom
        seen |= values
    assert {CLASS_NAMES.index(c) for c in REQUIRED} <= seen


def test_every_generated_class_occurs_in_a_sample_of_streets():
    seen = set()
    for i in range(40):
        seen |= set(np.unique(render_street(np.random.default_rng([7, i]), SIZE).label).tolist())
    assert {CLASS_NAMES.index(c) for c in GENERATED_CLASSES} <= seen
    assert ANOMALY not in seen


def test_anomaly_masks_follow_the_convention(world):
    for folder, (_, _, _, area, road_only, min_area) in ANOMALY_SETS.items():
        for label_path in sorted((world / folder / "labels_masks").glob("*.png")):
            mask = read_label(label_path)
            assert set(np.unique(mask).tolist()) <= {0, 1, 255}, label_path
            anomaly = (mask == 1).mean()
            assert min_area <= anomaly <= 4 * area[1], (label_path, anomaly)
            assert (mask == 0).any()
            if not road_only:
                assert not (mask[: SIZE[0] // 2] == 255).any()  # void is only the ego hood


def test_obstacle_set_is_void_exactly_off_road(world):
    stream, context, anomalies, area, road_only, min_area = ANOMALY_SETS["synthstreets-obstacle"]
    for i, label_path in enumerate(sorted((world / "synthstreets-obstacle" / "labels_masks").glob("*.png"))):
        scene = _street(0, stream, i, SIZE, context, anomalies, area, road_only, min_area)
        written = read_label(label_path)
        off_road = (scene.label != ROAD) & (scene.label != ANOMALY)
        assert np.array_equal(written == 255, off_road)
        assert np.array_equal(written == 1, scene.label == ANOMALY)
        assert (written[0] == 255).all()  # the sky is never road
        assert np.array_equal(read_image(world / "synthstreets-obstacle" / "images" / label_path.name), scene.image)


def test_coco_json_loads_with_pycocotools(world):
    coco_api = pytest.importorskip("pycocotools.coco")
    coco = coco_api.COCO(str(world / "coco" / "annotations" / "instances_train2017.json"))
    assert len(coco.imgs) == image_counts(SCALE)["coco"]
    names = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    assert names["person"] == 1 and names["car"] == 3
    assert set(names) - {"person", "car"} == set(OE_CATEGORIES)
    for ann in coco.anns.values():
        info = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann)
        assert mask.shape == (info["height"], info["width"]) and mask.any()
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"]
        ys, xs = np.nonzero(mask)
        assert x - 1 <= xs.min() and xs.max() <= x + w and y - 1 <= ys.min() and ys.max() <= y + h
        assert abs(int(mask.sum()) - ann["area"]) <= 0.25 * ann["area"] + 10
        assert (world / "coco" / "train2017" / info["file_name"]).is_file()
    assert any(isinstance(a["segmentation"], list) for a in coco.anns.values())


def test_uncompressed_rle_matches_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(3)
    for first in (0, 1):
        mask = rng.random((37, 23)) < 0.3
        mask[0, 0] = bool(first)
        rle = rle_uncompressed(mask)
        decoded = mask_api.decode(mask_api.frPyObjects(rle, *rle["size"]))
        assert np.array_equal(decoded.astype(bool), mask)


def test_coco_holds_pictures_the_meta_ood_rules_must_drop(world, tmp_path):
    pytest.importorskip("pycocotools")
    from rpl.data.coco import prepare_coco_ood

    data = json.loads((world / "coco" / "annotations" / "instances_train2017.json").read_text())
    excluded = read_manifest(world)["outlier_exposure"]["excluded_by_meta_ood_rules"]
    with_category = {a["image_id"] for a in data["annotations"] if a["category_id"] in (1, 3)}
    small = {i["id"] for i in data["images"] if min(i["height"], i["width"]) < 480}
    assert with_category == set(excluded["person"] + excluded["car"]) and excluded["person"] and excluded["car"]
    assert small == set(excluded["small"]) and small
    assert all(i["height"] >= 480 and i["width"] >= 480 for i in data["images"] if i["id"] not in small)
    prepare_coco_ood(world / "coco", tmp_path / "cache")
    counts = json.loads((tmp_path / "cache" / "manifest.json").read_text())["counts"]
    assert counts["excluded_category"] == len(with_category) and counts["too_small"] == len(small)
    assert counts["kept"] == len(data["images"]) - len(with_category) - len(small) - len(excluded["empty"])


def test_outlier_exposure_and_test_anomalies_are_disjoint():
    assert not set(OE_CATEGORIES) & set(ANOMALY_KINDS)
    assert not set(OE_TEXTURES) & set(ANOMALY_TEXTURES)


def test_manifest_describes_the_generation(world):
    manifest = read_manifest(world)
    assert manifest["seed"] == 0 and manifest["size"] == list(SIZE) and manifest["counts"] == image_counts(SCALE)
    assert manifest["classes"] == list(CLASS_NAMES)
    assert is_generated(world, seed=0, scale=SCALE)
    assert not is_generated(world, seed=1, scale=SCALE) and not is_generated(world, seed=0, scale=1.0)


def test_regenerating_replaces_the_previous_world(tmp_path):
    out = tmp_path / "w"
    generate(out, seed=2, size=(64, 128), scale=0.02, workers=1)
    generate(out, seed=2, size=(64, 128), scale=0.005, workers=1)
    assert len(list((out / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))) == image_counts(0.005)["train"]
    assert read_image(next((out / "synthstreets-rural" / "images").glob("*.png"))).shape == (64, 128, 3)


def test_an_older_generator_version_is_regenerated_with_its_own_parameters(tmp_path):
    out = tmp_path / "w"
    generate(out, seed=3, size=(64, 128), scale=0.005, workers=1)
    assert not regenerate_if_outdated(out)  # current: untouched
    manifest_path = out / "synthstreets.json"
    manifest = json.loads(manifest_path.read_text())
    first = _files(out)
    manifest_path.write_text(json.dumps({**manifest, "version": "0"}))
    (out / "coco" / "train2017" / "000000000001.jpg").write_bytes(b"an older picture")
    assert regenerate_if_outdated(out)
    assert _files(out) == first and is_generated(out, seed=3, size=(64, 128), scale=0.005)
    assert not regenerate_if_outdated(tmp_path / "nothing here")
    manifest_path.write_text(json.dumps({**manifest, "version": "0", "seed": "three"}))
    with pytest.raises(RPLInputError, match="synthstreets.json records parameters"):
        regenerate_if_outdated(out)
    assert _files(out).keys() - {"synthstreets.json"} == first.keys() - {"synthstreets.json"}  # nothing deleted


def test_outlier_pictures_are_indoor_and_outdoor(monkeypatch):
    """COCO-like variety of backgrounds for CoroCL's context pool: both backdrops occur, all background 0."""
    calls = {"indoor": 0, "outdoor": 0}
    for name in calls:
        original = getattr(oe, f"_{name}")

        def counted(c, rng, name=name, original=original):
            calls[name] += 1
            return original(c, rng)
        monkeypatch.setattr(oe, f"_{name}", counted)
    for i in range(24):
        image, label, instances = oe.render_oe_image(np.random.default_rng(i))
        assert image.dtype == np.uint8 and label[0].max() == 0  # the top row is backdrop, label 0
        assert set(np.unique(label)) <= {0} | {v for v, _, _ in instances}
    assert calls["indoor"] >= 6 and calls["outdoor"] >= 6


@pytest.mark.parametrize("kwargs, option", [
    ({"size": (10, 10)}, "--size"), ({"size": "big"}, "--size"), ({"scale": 0}, "--scale"),
    ({"scale": float("nan")}, "--scale"), ({"seed": -1}, "--seed"), ({"workers": 0}, "workers"),
])
def test_bad_arguments_are_input_errors(tmp_path, kwargs, option):
    with pytest.raises(RPLInputError, match=option):
        generate(tmp_path / "w", **kwargs)


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "cityscapes").mkdir()
    with pytest.raises(RPLInputError, match="cityscapes"):
        generate(tmp_path, scale=0.005)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RPLInputError, match="file"):
        generate(tmp_path / "file", scale=0.005)


def test_cli_generates_and_rejects_bad_size(tmp_path, capsys):
    from rpl.cli.data import main

    args = ["synthstreets", "--out", str(tmp_path / "w"), "--seed", "3", "--size", "64x128", "--scale", "0.005"]
    assert main(args) == 0
    assert read_manifest(tmp_path / "w")["size"] == [64, 128]
    assert main(["synthstreets", "--out", str(tmp_path / "x"), "--size", "12"]) == 2
    assert "--size" in capsys.readouterr().err


# ---------------------------------------------------------------- interrupted generation

TINY = {"seed": 4, "size": (64, 128), "scale": 0.005}


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("tiny") / "w"
    generate(root, workers=1, **TINY)
    return _files(root)


def test_an_interrupted_generation_leaves_no_half_world_and_is_redone(tmp_path, monkeypatch, tiny_reference):
    from rpl.data.synthstreets import ensure_generated, staging_folder

    generate_module = sys.modules["rpl.data.synthstreets.generate"]
    out = tmp_path / "w"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C (or SIGKILL) after every picture but before the COCO json

    monkeypatch.setattr(generate_module, "_write_coco_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(out, workers=1, **TINY)
    assert not out.exists()  # nothing half-written where the loaders look
    assert any(staging_folder(out).rglob("*.png"))
    monkeypatch.undo()
    ensure_generated(out, **TINY)
    assert _files(out) == tiny_reference and not staging_folder(out).exists()


def test_a_move_cut_short_is_finished_by_the_next_run(tmp_path, tiny_reference):
    """An older world is being replaced and the run dies between two folder swaps."""
    from rpl.data.synthstreets import ensure_generated, staging_folder

    out, staging = tmp_path / "w", staging_folder(tmp_path / "w")
    generate(out, workers=1, **TINY)
    (out / "coco_ood").mkdir()  # a cache beside the world must survive the swap
    generate(staging, workers=1, **TINY)  # a finished generation waiting in the staging folder
    (out / "synthstreets.json").unlink()
    shutil.rmtree(out / "cityscapes")
    os.replace(staging / "cityscapes", out / "cityscapes")  # the first folder was moved, then the run died
    ensure_generated(out, **TINY)
    assert _files(out) == tiny_reference and (out / "coco_ood").is_dir() and not staging.exists()


def test_an_unfinished_world_of_an_older_release_is_regenerated(tmp_path, tiny_reference):
    """Older releases wrote in place: a killed run left folders without synthstreets.json (and
    without the COCO json, written after the pictures). That is detected and generated again."""
    from rpl.data.synthstreets import ensure_generated

    out = tmp_path / "w"
    generate(out, workers=1, **TINY)
    (out / "synthstreets.json").unlink()
    (out / "coco" / "annotations" / "instances_train2017.json").unlink()
    shutil.rmtree(out / "synthstreets-obstacle")
    ensure_generated(out, **TINY)
    assert _files(out) == tiny_reference


def test_a_complete_world_is_left_alone_and_foreign_data_is_not_touched(tmp_path, tiny_reference):
    from rpl.data.synthstreets import ensure_generated

    out = tmp_path / "w"
    generate(out, workers=1, **TINY)
    stamp = (out / "synthstreets.json").stat().st_mtime_ns
    ensure_generated(out, **TINY)
    assert (out / "synthstreets.json").stat().st_mtime_ns == stamp and _files(out) == tiny_reference
    own = tmp_path / "mine"
    (own / "cityscapes" / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    ensure_generated(own, **TINY)  # the user's own Cityscapes: the loaders will check it, nothing is written
    assert sorted(p.name for p in own.iterdir()) == ["cityscapes"]
    with pytest.raises(RPLInputError, match="delete .*cityscapes"):
        generate(own, workers=1, **TINY)
