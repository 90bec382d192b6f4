"""COCO outlier-exposure preparation on a hand-made instances json with tiny images."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_api

import rpl.data.coco as coco_module
from rpl.cli.data import main as rpl_data_main
from rpl.data.coco import MANIFEST_NAME, load_ood_manifest, prepare_coco_ood
from rpl.data.io import read_label, write_image
from rpl.errors import RPLInputError

H, W = 20, 24  # every "large" image; min_size=16 in these tests
MIN_SIZE = 16


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of zeros (the COCO convention), by hand."""
    counts, current, run = [], 0, 0
    for value in mask.flatten(order="F").astype(bool):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def rect_polygon(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(x0: int, y0: int, x1: int, y1: int, h: int = H, w: int = W) -> np.ndarray:
    """Pixels of the polygon above: columns x0..x1-1, rows y0..y1-1."""
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def coco(tmp_path: Path) -> dict:
    """A COCO layout with one image per rule, and the expected masks of the kept ones."""
    root = tmp_path / "coco"
    crowd_compressed = np.zeros((H, W), bool)
    crowd_compressed[10:15, 1:4] = True
    crowd_compressed[12, 20] = True
    crowd_uncompressed = np.zeros((H, W), bool)
    crowd_uncompressed[0:3, 18:24] = True
    crowd_uncompressed[19, 0] = True
    compressed = mask_api.encode(np.asfortranarray(crowd_compressed.astype(np.uint8)))
    expected = {
        "poly": rect_mask(2, 1, 6, 4) | rect_mask(10, 8, 13, 18),
        "crowd": crowd_compressed | crowd_uncompressed | rect_mask(3, 12, 8, 16),
    }
    images = {  # stem: (height, width, on disk)
        "person": (H, W, True), "car": (H, W, True), "truck": (H, W, True), "small": (10, 30, True),
        "narrow": (30, 12, True), "empty": (H, W, True), "poly": (H, W, True), "crowd": (H, W, True),
        "missing": (H, W, False),
    }
    kite, dog, person, car, truck = 38, 18, 1, 3, 99  # truck re-indexed on purpose: matched by name
    anns = [
        {"id": 1, "image_id": 1, "category_id": person, "iscrowd": 0, "segmentation": [rect_polygon(1, 1, 5, 5)]},
        {"id": 2, "image_id": 1, "category_id": kite, "iscrowd": 0, "segmentation": [rect_polygon(8, 8, 12, 12)]},
        {"id": 3, "image_id": 2, "category_id": car, "iscrowd": 0, "segmentation": [rect_polygon(1, 1, 5, 5)]},
        {"id": 4, "image_id": 3, "category_id": truck, "iscrowd": 0, "segmentation": [rect_polygon(1, 1, 5, 5)]},
        {"id": 5, "image_id": 4, "category_id": kite, "iscrowd": 0, "segmentation": [rect_polygon(1, 1, 5, 5)]},
        {"id": 6, "image_id": 5, "category_id": kite, "iscrowd": 0, "segmentation": [rect_polygon(1, 1, 5, 5)]},
        # image 6 ("empty") has none; the kept images' annotations carry no "id" at all
        {"image_id": 7, "category_id": kite, "iscrowd": 0, "segmentation": [rect_polygon(2, 1, 6, 4)]},
        {"image_id": 7, "category_id": dog, "iscrowd": 0, "segmentation": [rect_polygon(10, 8, 13, 18)]},
        {"image_id": 7, "category_id": dog, "iscrowd": 0, "segmentation": [[1, 1, 3, 3]]},  # degenerate: skipped
        {"image_id": 8, "category_id": kite, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")}},
        {"image_id": 8, "category_id": dog, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": uncompressed_rle(crowd_uncompressed)}},
        {"image_id": 8, "category_id": dog, "iscrowd": 0, "segmentation": [rect_polygon(3, 12, 8, 16)]},
        {"id": 7, "image_id": 9, "category_id": kite, "iscrowd": 0, "segmentation": [rect_polygon(1, 1, 5, 5)]},
    ]
    data = {
        "images": [{"id": i + 1, "file_name": f"{stem}.jpg", "height": h, "width": w}
                   for i, (stem, (h, w, _)) in enumerate(images.items())],
        "annotations": anns,
        "categories": [{"id": person, "name": "person"}, {"id": car, "name": "car"},
                       {"id": truck, "name": "truck"}, {"id": kite, "name": "kite"}, {"id": dog, "name": "dog"}],
    }
    rng = np.random.default_rng(0)
    for stem, (h, w, on_disk) in images.items():
        if on_disk:
            write_image(root / "train2017" / f"{stem}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return {"root": root, "expected": expected}


def prepare(coco: dict, out: Path) -> Path:
    with pytest.warns(UserWarning) as record:
        result = prepare_coco_ood(coco["root"], out, min_size=MIN_SIZE)
    messages = " ".join(str(w.message) for w in record)
    assert "missing" in messages and "1 images" in messages  # missing.jpg
    assert "1 annotations" in messages  # the degenerate polygon
    return result


def test_exclusion_rules_and_union_masks(coco: dict, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    assert prepare(coco, out) == out
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["images"] == [{"image": "poly.jpg", "mask": "poly.png"},
                                  {"image": "crowd.jpg", "mask": "crowd.png"}]
    assert manifest["counts"] == {"listed": 9, "excluded_category": 3, "too_small": 2, "no_annotations": 1,
                                  "empty_mask": 0, "missing_file": 1, "bad_image_size": 0, "kept": 2,
                                  "skipped_annotations": 1}
    assert manifest["split"] == "train2017" and manifest["rules"]["min_size"] == MIN_SIZE
    assert sorted(p.name for p in out.iterdir()) == ["crowd.png", "manifest.json", "poly.png"]
    for stem, expected in coco["expected"].items():
        mask = read_label(out / f"{stem}.png")
        np.testing.assert_array_equal(mask, np.where(expected, 254, 0).astype(np.uint8))

    pairs = load_ood_manifest(out)
    assert pairs == [(coco["root"].resolve() / "train2017" / "poly.jpg", out / "poly.png"),
                     (coco["root"].resolve() / "train2017" / "crowd.jpg", out / "crowd.png")]


def test_min_size_applies_to_height_and_width(coco: dict, tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        prepare_coco_ood(coco["root"], tmp_path / "c", min_size=12)  # "narrow" (30x12) now passes
    manifest = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert [e["image"] for e in manifest["images"]] == ["narrow.jpg", "poly.jpg", "crowd.jpg"]
    assert manifest["counts"]["too_small"] == 1


def test_resume_and_reuse(coco: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cache"
    prepare(coco, out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    kept_mtime = (out / "crowd.png").stat().st_mtime_ns

    # An interrupted run: one mask and the manifest missing, a temp file left behind.
    (out / "poly.png").unlink()
    (out / MANIFEST_NAME).unlink()
    (out / ".poly.png.123.rpltmp.png").write_bytes(b"partial")
    prepare(coco, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert (out / "crowd.png").stat().st_mtime_ns == kept_mtime  # not rewritten

    # A complete cache is returned as is: nothing rewritten, no annotation parsing (no warnings).
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(coco_module, "_load_annotations", lambda path: pytest.fail("annotations parsed again"))
        assert prepare_coco_ood(coco["root"], out, min_size=MIN_SIZE) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_changed_annotations_rebuild_every_mask(coco: dict, tmp_path: Path) -> None:
    """A regenerated annotation file (same source folder, same names) must not reuse old masks."""
    out = tmp_path / "cache"
    prepare(coco, out)
    ann_file = coco["root"] / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    for ann in data["annotations"]:
        if ann["image_id"] == 8:  # "crowd": now a single rectangle
            ann.update(iscrowd=0, segmentation=[rect_polygon(0, 0, 4, 4)])
    ann_file.write_text(json.dumps(data))
    (out / "poly.png").unlink()  # and the previous build was interrupted
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (out / MANIFEST_NAME).write_text(json.dumps({**manifest, "images": []}))
    with pytest.warns(UserWarning):
        prepare_coco_ood(coco["root"], out, min_size=MIN_SIZE)
    np.testing.assert_array_equal(read_label(out / "crowd.png"), np.where(rect_mask(0, 0, 4, 4), 254, 0))
    np.testing.assert_array_equal(read_label(out / "poly.png"), np.where(coco["expected"]["poly"], 254, 0))
    rebuilt = json.loads((out / MANIFEST_NAME).read_text())
    assert rebuilt["annotations_sha256"] != manifest["annotations_sha256"] and "pending" not in rebuilt

    # Interrupted after the digest changed: the pending manifest keeps the masks built so far.
    crowd_mtime = (out / "crowd.png").stat().st_mtime_ns
    (out / "poly.png").unlink()
    (out / MANIFEST_NAME).write_text(json.dumps({k: v for k, v in rebuilt.items() if k not in ("images", "counts")}
                                                | {"pending": True}))
    with pytest.warns(UserWarning):
        prepare_coco_ood(coco["root"], out, min_size=MIN_SIZE)
    assert (out / "crowd.png").stat().st_mtime_ns == crowd_mtime and (out / "poly.png").is_file()


def test_cache_of_another_source_is_refused(coco: dict, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare(coco, out)
    other = tmp_path / "other"
    (other / "train2017").mkdir(parents=True)
    (other / "annotations").mkdir()
    (other / "annotations" / "instances_train2017.json").write_text(
        (coco["root"] / "annotations" / "instances_train2017.json").read_text())
    with pytest.raises(RPLInputError, match="already holds masks"):
        prepare_coco_ood(other, out, min_size=MIN_SIZE)


@pytest.mark.parametrize("remove", ["root", "train2017", "annotations"])
def test_missing_layout_names_path_and_expected_layout(coco: dict, tmp_path: Path, remove: str) -> None:
    root = coco["root"]
    missing = {"root": root.parent / "nowhere", "train2017": root / "train2017",
               "annotations": root / "annotations" / "instances_train2017.json"}[remove]
    if remove == "train2017":
        for p in missing.iterdir():
            p.unlink()
        missing.rmdir()
    elif remove == "annotations":
        missing.unlink()
    coco_root = missing if remove == "root" else root
    with pytest.raises(RPLInputError) as err:
        prepare_coco_ood(coco_root, tmp_path / "cache")
    assert str(missing) in str(err.value)
    assert "train2017/*.jpg" in str(err.value) and "annotations/instances_train2017.json" in str(err.value)


def test_cli_missing_folder_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = rpl_data_main(["coco-ood", "--coco-root", str(tmp_path / "nope"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "nope") in err and "Traceback" not in err and err.count("\n") == 1


def test_all_images_missing_on_disk_is_an_error(coco: dict, tmp_path: Path) -> None:
    for p in (coco["root"] / "train2017").iterdir():
        p.unlink()
    with pytest.raises(RPLInputError, match="exist in"):
        prepare_coco_ood(coco["root"], tmp_path / "cache", min_size=MIN_SIZE)
    assert not (tmp_path / "cache" / MANIFEST_NAME).exists()


def test_corrupt_annotations_and_missing_pycocotools(coco: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ann = coco["root"] / "annotations" / "instances_train2017.json"
    ann.write_text("{ not json")
    with pytest.raises(RPLInputError, match="could not be read as JSON"):
        prepare_coco_ood(coco["root"], tmp_path / "a", min_size=MIN_SIZE)
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(RPLInputError, match="annotations, categories"):
        prepare_coco_ood(coco["root"], tmp_path / "b", min_size=MIN_SIZE)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(RPLInputError, match="pip install pycocotools"):
        prepare_coco_ood(coco["root"], tmp_path / "c", min_size=MIN_SIZE)


def test_load_ood_manifest_errors(coco: dict, tmp_path: Path) -> None:
    with pytest.raises(RPLInputError, match="no manifest.json"):
        load_ood_manifest(tmp_path / "empty")
    out = tmp_path / "cache"
    prepare(coco, out)
    (out / "poly.png").unlink()
    with pytest.raises(RPLInputError, match="poly.png"):
        load_ood_manifest(out)
    (out / MANIFEST_NAME).write_text("[1, 2")
    with pytest.raises(RPLInputError, match="corrupt"):
        load_ood_manifest(out)


def test_fields_of_the_wrong_type_are_skipped_and_counted(coco: dict, tmp_path: Path) -> None:
    """Non-numeric polygon values, RLE size or counts skip their annotation; a non-numeric image size its image."""
    ann_file = coco["root"] / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    data["annotations"] += [
        {"image_id": 7, "category_id": 18, "segmentation": [[1, 1, "x", 3, 3, 3, 5, 1]]},
        {"image_id": 7, "category_id": 18, "segmentation": [[1, 1, None, 3, 3, 3, 5, 1]]},
        {"image_id": 8, "category_id": 18, "segmentation": {"size": ["twenty", W], "counts": [H * W]}},
        {"image_id": 8, "category_id": 18, "segmentation": {"size": [H, W], "counts": ["many"]}},
        {"image_id": 10, "category_id": 38, "segmentation": [rect_polygon(1, 1, 5, 5)]},
        {"image_id": 11, "category_id": 38, "segmentation": [rect_polygon(1, 1, 5, 5)]},
    ]
    data["images"] += [{"id": 10, "file_name": "poly.jpg", "height": "tall", "width": W},
                       {"id": 11, "file_name": "crowd.jpg", "height": H, "width": None}]
    ann_file.write_text(json.dumps(data))
    out = tmp_path / "cache"
    with pytest.warns(UserWarning) as record:
        prepare_coco_ood(coco["root"], out, min_size=MIN_SIZE)
    messages = " ".join(str(w.message) for w in record)
    assert "5 annotations" in messages and "non-numeric" in messages  # 1 degenerate + 4 of the wrong type
    assert "2 image records" in messages and "not a positive whole number" in messages
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["counts"]["skipped_annotations"] == 5 and manifest["counts"]["bad_image_size"] == 2
    for stem, expected in coco["expected"].items():  # the good annotations still give the same masks
        np.testing.assert_array_equal(read_label(out / f"{stem}.png"), np.where(expected, 254, 0).astype(np.uint8))
