"""Anomaly loaders and the dataset registry on generated trees of every layout, failures included."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fixtures_layouts import (make_cityscapes, make_lost_and_found, make_mask_folder, make_road_anomaly_original,
                              make_smiyc, make_streethazards, raw_label)
from rpl.data import anomaly
from rpl.data.anomaly import SMIYC, LostAndFound, MaskFolderDataset, RoadAnomaly, StreetHazards
from rpl.data.io import read_image, write_image, write_label
from rpl.data.registry import dataset_info, dataset_names, open_dataset
from rpl.errors import RPLInputError


def assert_matches(dataset, layout, exact_images: bool = True) -> None:
    """Sorted names, labels converted exactly, images decoded as written (lossless formats)."""
    assert len(dataset) == len(layout.expected)
    items = [dataset[i] for i in range(len(dataset))]
    assert [it["name"] for it in items] == layout.names
    for it in items:
        assert it["label"].dtype == np.uint8 and it["image"].dtype == np.uint8
        assert it["image"].shape == (*it["label"].shape, 3)
        np.testing.assert_array_equal(it["label"], layout.expected[it["name"]])
        assert Path(it["path"]) == layout.images[it["name"]]
        if exact_images:
            np.testing.assert_array_equal(it["image"], read_image(layout.images[it["name"]]))


@pytest.mark.parametrize("image_dir,label_dir,tail,ext", [
    ("images", "labels_masks", "", ".png"),
    ("images", "labels", "_labels_semantic", ".jpg"),
    ("original", "labels", "_mask", ".webp"),
])
def test_mask_folder_variants(tmp_path, image_dir, label_dir, tail, ext):
    layout = make_mask_folder(tmp_path, image_dir=image_dir, label_dir=label_dir, label_tail=tail, image_ext=ext)
    ds = MaskFolderDataset(tmp_path)
    assert_matches(ds, layout, exact_images=ext == ".png")
    assert {int(v) for v in np.unique(ds[0]["label"])} == {0, 1, 255}


def test_road_anomaly_original_release(tmp_path):
    layout = make_road_anomaly_original(tmp_path)
    ds = RoadAnomaly(tmp_path)
    assert ds.layout == "original"
    assert_matches(ds, layout, exact_images=False)
    assert {int(v) for v in np.unique(ds[0]["label"])} == {0, 1}  # 2 -> 1, no void


def test_road_anomaly_frame_list_without_extensions(tmp_path):
    layout = make_road_anomaly_original(tmp_path, list_with_extension=False)
    assert_matches(RoadAnomaly(tmp_path), layout, exact_images=False)


def test_road_anomaly_repackaged(tmp_path):
    layout = make_mask_folder(tmp_path, values=(0, 1))
    ds = RoadAnomaly(tmp_path)
    assert ds.layout == "repackaged"
    assert_matches(ds, layout)


def test_road_anomaly_original_rejects_values_other_than_0_and_2(tmp_path):
    layout = make_road_anomaly_original(tmp_path)
    write_label(layout.labels["cones0002"], raw_label((0, 1, 2), 0))  # a 0/1 mask inside the 0/2 release
    ds = RoadAnomaly(tmp_path)
    with pytest.raises(RPLInputError, match=r"labels_semantic\.png holds values \[1\]"):
        ds[[f.name for f in ds.files].index("cones0002")]


def test_road_anomaly_neither_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(RPLInputError, match="no frame_list.json and no images/\\+labels_masks/") as err:
        RoadAnomaly(tmp_path)
    assert str(tmp_path) in str(err.value) and "original release" in str(err.value)


def test_road_anomaly_listed_label_missing(tmp_path):
    layout = make_road_anomaly_original(tmp_path)
    layout.labels["cow0001"].unlink()
    with pytest.raises(RPLInputError, match=r"cow0001\.labels/labels_semantic\.png"):
        RoadAnomaly(tmp_path)


@pytest.mark.parametrize("track", ["anomaly", "obstacle"])
def test_smiyc_validation_split(tmp_path, track):
    layout = make_smiyc(tmp_path, track)
    assert_matches(SMIYC(tmp_path, track=track), layout, exact_images=False)


@pytest.mark.parametrize("track", ["anomaly", "obstacle"])
def test_smiyc_test_split_has_no_public_labels(tmp_path, track):
    layout = make_smiyc(tmp_path, track)
    with pytest.raises(RPLInputError, match="test labels are not public"):
        SMIYC(tmp_path, track=track, split="test")
    images_only = SMIYC(tmp_path, track=track, split="test", require_labels=False)
    assert [f.name for f in images_only.files] == sorted(n for n, r in layout.roles.items() if r == "test")
    assert images_only[0]["label"] is None and images_only[0]["image"].shape == (16, 32, 3)


def test_smiyc_without_labels_folder(tmp_path):
    make_smiyc(tmp_path, "anomaly")
    for label in (tmp_path / "labels_masks").iterdir():
        label.unlink()
    (tmp_path / "labels_masks").rmdir()
    with pytest.raises(RPLInputError, match="no labels_masks/ folder"):
        SMIYC(tmp_path)


def test_smiyc_official_split_rules():
    assert anomaly.smiyc_split_of("anomaly", "validation0007") == "validation"
    assert anomaly.smiyc_split_of("anomaly", "carriage0001") == "test"
    assert anomaly.smiyc_split_of("obstacle", "validation_20") == "validation"
    assert anomaly.smiyc_split_of("obstacle", "validation_25") == "other"
    assert anomaly.smiyc_split_of("obstacle", "snowstorm1_00_03_05.185") == "other"
    assert anomaly.smiyc_split_of("obstacle", "curvy-street_carton_6") == "test"


def test_lost_and_found_noknown(tmp_path):
    layout = make_lost_and_found(tmp_path)
    ds = LostAndFound(tmp_path)
    assert_matches(ds, layout)
    labels = np.concatenate([ds[i]["label"].ravel() for i in range(len(ds))])
    assert set(np.unique(labels).tolist()) == {0, 1, 255}
    assert len(LostAndFound(tmp_path, exclude_prefixes=())) == 5  # the whole split


def test_lost_and_found_drops_official_empty_frames_only_on_the_complete_split(tmp_path, monkeypatch):
    make_lost_and_found(tmp_path)
    monkeypatch.setitem(anomaly.LAF_EMPTY_LABEL_FRAMES, "test", (5, (0, 2)))  # pretend 5 frames = complete
    names = [f.name for f in LostAndFound(tmp_path, exclude_prefixes=()).files]
    # sorted frame ids: 01_..000000_000080, 01_..000006_000050, 04_..., 10_..., 15_...; indices 0 and 2 dropped
    assert [n.split("/")[1][:2] for n in names] == ["01", "10", "15"]
    monkeypatch.setitem(anomaly.LAF_EMPTY_LABEL_FRAMES, "test", (1203, (0, 2)))
    assert len(LostAndFound(tmp_path, exclude_prefixes=())) == 5  # partial copy: nothing dropped by index


def test_lost_and_found_missing_folders_and_labels(tmp_path):
    layout = make_lost_and_found(tmp_path)
    missing = layout.labels[layout.names[0]]
    missing.unlink()
    with pytest.raises(RPLInputError, match=re.escape(missing.name)):
        LostAndFound(tmp_path)
    (tmp_path / "leftImg8bit" / "train").mkdir()
    with pytest.raises(RPLInputError, match=r"folder .*gtCoarse/train does not exist"):
        LostAndFound(tmp_path, split="train")


def test_streethazards(tmp_path):
    layout = make_streethazards(tmp_path)
    for root in (tmp_path, tmp_path / "test"):  # the release folder or its test/ sub-folder
        assert_matches(StreetHazards(root), layout)


def test_streethazards_rejects_ids_above_14(tmp_path):
    layout = make_streethazards(tmp_path)
    write_label(layout.labels["test/t5/0007"], raw_label((1, 14, 15, 40), 0))
    ds = StreetHazards(tmp_path)
    with pytest.raises(RPLInputError, match=r"0007\.png holds values \[15, 40\]"):
        ds[[f.name for f in ds.files].index("test/t5/0007")]


# --- failures shared by every folder layout ---
def test_missing_root(tmp_path):
    with pytest.raises(RPLInputError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        MaskFolderDataset(tmp_path / "nope")


def test_empty_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels_masks").mkdir()
    with pytest.raises(RPLInputError, match="holds no images") as err:
        MaskFolderDataset(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_labels_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(RPLInputError, match="no labels_masks/ folder"):
        MaskFolderDataset(tmp_path)


def test_image_without_label_and_label_without_image(tmp_path):
    layout = make_mask_folder(tmp_path)
    layout.labels["frame_b"].unlink()
    with pytest.raises(RPLInputError, match=r"have no label .*frame_b\.png"):
        MaskFolderDataset(tmp_path)
    write_label(layout.labels["frame_b"], raw_label((0, 1), 0))
    layout.images["frame_c"].unlink()
    with pytest.raises(RPLInputError, match=r"have no image: .*labels_masks/frame_c\.png"):
        MaskFolderDataset(tmp_path)


def test_label_of_another_size(tmp_path):
    layout = make_mask_folder(tmp_path)
    write_label(layout.labels["frame_a"], np.zeros((8, 32), np.uint8))
    ds = MaskFolderDataset(tmp_path)
    with pytest.raises(RPLInputError) as err:
        ds[0]
    message = str(err.value)
    assert str(layout.labels["frame_a"]) in message and str(layout.images["frame_a"]) in message
    assert "32x8" in message and "32x16" in message


def test_label_values_outside_convention(tmp_path):
    layout = make_mask_folder(tmp_path)
    write_label(layout.labels["frame_c"], raw_label((0, 1, 2, 254), 0))
    ds = MaskFolderDataset(tmp_path)
    assert ds[1]["name"] == "frame_b"  # the other items still load
    with pytest.raises(RPLInputError) as err:
        ds[2]
    assert str(layout.labels["frame_c"]) in str(err.value) and "[2, 254]" in str(err.value)


def test_corrupt_image(tmp_path):
    layout = make_mask_folder(tmp_path)
    layout.images["frame_b"].write_bytes(b"not an image at all")
    ds = MaskFolderDataset(tmp_path)
    with pytest.raises(RPLInputError, match=re.escape(str(layout.images["frame_b"]))):
        ds[1]


def test_duplicate_image_names(tmp_path):
    layout = make_mask_folder(tmp_path)
    write_image(layout.root / "images" / "frame_a.jpg", np.zeros((16, 32, 3), np.uint8))
    with pytest.raises(RPLInputError, match="share the name 'frame_a'"):
        MaskFolderDataset(tmp_path)


# --- registry ---
def build_data_root(root: Path) -> dict[str, object]:
    return {
        "fs-laf": make_mask_folder(root / "fishyscapes" / "LostAndFound"),
        "fs-static": make_mask_folder(root / "fishyscapes" / "Static", label_dir="labels"),
        "road-anomaly": make_road_anomaly_original(root / "road_anomaly"),
        "smiyc-anomaly": make_smiyc(root / "dataset_AnomalyTrack", "anomaly"),
        "smiyc-obstacle": make_smiyc(root / "dataset_ObstacleTrack", "obstacle"),
        "laf": make_lost_and_found(root / "lost_and_found"),
        "streethazards": make_streethazards(root / "streethazards"),
        "synthstreets-anomaly": make_mask_folder(root / "synthstreets-anomaly"),
        "synthstreets-rural": make_mask_folder(root / "synthstreets-rural"),
        "synthstreets-obstacle": make_mask_folder(root / "synthstreets-obstacle"),
        "cityscapes-val": make_cityscapes(root / "cityscapes"),
    }


def test_registry_opens_every_dataset_from_its_default_folder(tmp_path):
    layouts = build_data_root(tmp_path)
    assert sorted(dataset_names()) == sorted(layouts)
    for name, layout in layouts.items():
        ds = open_dataset(name, tmp_path)
        assert [ds[i]["name"] for i in range(len(ds))] == layout.names, name
        first = ds[0]
        np.testing.assert_array_equal(first["label"], layout.expected[first["name"]])


def test_registry_flags_and_explicit_path(tmp_path):
    assert dataset_info("smiyc-obstacle").track == "obstacle" and dataset_info("laf").track == "obstacle"
    assert dataset_info("synthstreets-obstacle").track == "obstacle" and dataset_info("fs-laf").track == "anomaly"
    assert dataset_info("cityscapes-val").class_labels and not dataset_info("road-anomaly").class_labels
    layout = make_mask_folder(tmp_path / "elsewhere")
    assert len(open_dataset("fs-laf", None, path=layout.root)) == 3


def test_registry_unknown_name_and_missing_folder(tmp_path):
    with pytest.raises(RPLInputError) as err:
        open_dataset("fishyscapes", tmp_path)
    assert "fs-laf" in str(err.value) and "cityscapes-val" in str(err.value)
    with pytest.raises(RPLInputError, match=r"road_anomaly does not exist"):
        open_dataset("road-anomaly", tmp_path)
    with pytest.raises(RPLInputError, match="needs --data-root"):
        open_dataset("road-anomaly", None)
