"""Cityscapes listing and val dataset on generated trees: train ids, label-id conversion, failures."""
from __future__ import annotations

import re

import numpy as np
import pytest

from fixtures_layouts import CITYSCAPES_ID_TO_TRAIN, make_cityscapes, raw_label
from rpl.data.cityscapes import CITYSCAPES_CLASSES, CityscapesSegmentation, list_cityscapes, read_cityscapes_label
from rpl.data.io import read_image, write_label
from rpl.errors import RPLInputError


def test_list_cityscapes_sorted_pairs(tmp_path):
    layout = make_cityscapes(tmp_path, split="train")
    pairs = list_cityscapes(tmp_path, "train")
    assert [(img, lab) for img, lab in pairs] == [(layout.images[n], layout.labels[n]) for n in layout.names]
    assert all(lab.name.endswith("_gtFine_labelTrainIds.png") for _, lab in pairs)


def test_val_dataset_train_ids(tmp_path):
    layout = make_cityscapes(tmp_path)
    ds = CityscapesSegmentation(tmp_path)
    assert len(ds) == 3 and len(CITYSCAPES_CLASSES) == 19
    for i, name in enumerate(layout.names):
        item = ds[i]
        assert item["name"] == name and item["path"] == str(layout.images[name])
        np.testing.assert_array_equal(item["label"], layout.expected[name])
        np.testing.assert_array_equal(item["image"], read_image(layout.images[name]))
    assert set(np.unique(ds[0]["label"]).tolist()) == set(range(19)) | {255}


def test_label_ids_are_converted_with_the_official_table(tmp_path):
    layout = make_cityscapes(tmp_path, label_kind="labelIds")
    ds = CityscapesSegmentation(tmp_path)
    for i, name in enumerate(layout.names):
        np.testing.assert_array_equal(ds[i]["label"], layout.expected[name])
    label_file = layout.labels[layout.names[0]]
    raw = np.array([[7, 8, 26, 33, 9, 0, 31, 255]], np.uint8)
    write_label(label_file, raw)
    assert read_cityscapes_label(label_file).tolist() == [[0, 1, 13, 18, 255, 255, 16, 255]]
    assert CITYSCAPES_ID_TO_TRAIN[24] == 11 and CITYSCAPES_CLASSES[11] == "person"


def test_train_ids_preferred_over_label_ids(tmp_path):
    layout = make_cityscapes(tmp_path)
    for name, label in layout.labels.items():  # a copy holding both files
        write_label(label.with_name(label.name.replace("labelTrainIds", "labelIds")), raw_label((7, 8), 0))
    assert [lab for _, lab in list_cityscapes(tmp_path, "val")] == [layout.labels[n] for n in layout.names]


def test_values_outside_train_ids(tmp_path):
    layout = make_cityscapes(tmp_path)
    bad = layout.labels[layout.names[1]]
    write_label(bad, raw_label((0, 19, 254), 0))
    ds = CityscapesSegmentation(tmp_path)
    with pytest.raises(RPLInputError) as err:
        ds[1]
    assert str(bad) in str(err.value) and "[19, 254]" in str(err.value)
    with pytest.raises(RPLInputError, match=r"values \[40\]"):
        write_label(bad.with_name("x_gtFine_labelIds.png"), raw_label((7, 40), 0))
        read_cityscapes_label(bad.with_name("x_gtFine_labelIds.png"))


def test_label_of_another_size(tmp_path):
    layout = make_cityscapes(tmp_path)
    write_label(layout.labels[layout.names[0]], np.zeros((4, 4), np.uint8))
    with pytest.raises(RPLInputError, match="4x4 .* is 32x16"):
        CityscapesSegmentation(tmp_path)[0]


def test_missing_split_folders(tmp_path):
    with pytest.raises(RPLInputError, match=r"leftImg8bit/val"):
        list_cityscapes(tmp_path, "val")
    make_cityscapes(tmp_path, split="train")
    with pytest.raises(RPLInputError, match=r"no folder .*leftImg8bit/val"):
        CityscapesSegmentation(tmp_path, split="val")


def test_empty_split(tmp_path):
    (tmp_path / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(RPLInputError, match="holds no images"):
        list_cityscapes(tmp_path, "val")


def test_image_without_label_and_label_without_image(tmp_path):
    layout = make_cityscapes(tmp_path)
    name = layout.names[2]
    layout.labels[name].unlink()
    with pytest.raises(RPLInputError, match=r"have no label, e.g. .*munster_000001_000019_gtFine_labelTrainIds\.png"):
        list_cityscapes(tmp_path, "val")
    write_label(layout.labels[name], raw_label((0, 1), 0))
    layout.images[name].unlink()
    with pytest.raises(RPLInputError, match=r"have no image, e.g. .*munster_000001_000019_gtFine_labelTrainIds\.png"):
        list_cityscapes(tmp_path, "val")


def test_corrupt_image(tmp_path):
    layout = make_cityscapes(tmp_path)
    layout.images[layout.names[0]].write_bytes(b"\x89PNG broken")
    with pytest.raises(RPLInputError, match=re.escape(str(layout.images[layout.names[0]]))):
        CityscapesSegmentation(tmp_path)[0]
