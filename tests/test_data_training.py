"""Transforms (crop, flip, normalise, pasting, context view) and the outlier-exposure training set."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rpl.data.io import write_image, write_label
from rpl.data.training import OutlierExposureDataset, draw_ood_assignment
from rpl.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, centre_crop_pad, context_image, hflip, normalize,
                                 paste_outlier, random_crop)
from rpl.errors import RPLInputError

CROP = (16, 20)


def blob_mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """0/254 mask with an L-shaped object inside ``box`` (y0, y1, x0, x1), so its shape is not a box."""
    y0, y1, x0, x1 = box
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x0 + max(1, (x1 - x0) // 3)] = 254
    mask[y1 - max(1, (y1 - y0) // 3):y1, x0:x1] = 254
    return mask


# --- transforms ---------------------------------------------------------------------------------

def test_random_crop_is_a_window_and_pads_with_void() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (30, 40), dtype=np.uint8)
    offsets = set()
    for seed in range(40):
        img, lab = random_crop(image, label, CROP, np.random.default_rng(seed))
        assert img.shape == (*CROP, 3) and lab.shape == CROP
        hits = [(y, x) for y in range(30 - CROP[0] + 1) for x in range(40 - CROP[1] + 1)
                if np.array_equal(image[y:y + CROP[0], x:x + CROP[1]], img)]
        assert len(hits) == 1
        y, x = hits[0]
        np.testing.assert_array_equal(label[y:y + CROP[0], x:x + CROP[1]], lab)
        offsets.add(hits[0])
    assert len(offsets) > 20  # uniform over many offsets, not a fixed one

    small_img, small_lab = image[:10, :12], label[:10, :12]
    img, lab = random_crop(small_img, small_lab, CROP, np.random.default_rng(1))
    assert img.shape == (*CROP, 3)
    assert (lab == 255).sum() == CROP[0] * CROP[1] - 10 * 12 and (img[lab == 255] == 0).all()
    np.testing.assert_array_equal(lab[3:13, 4:16], small_lab)  # centred padding


def test_hflip_and_normalize() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (4, 5), dtype=np.uint8)
    img, lab = hflip(image, label, rng, p=1.0)
    np.testing.assert_array_equal(img, image[:, ::-1])
    np.testing.assert_array_equal(lab, label[:, ::-1])
    img, lab = hflip(image, label, rng, p=0.0)
    assert img is image and lab is label

    tensor = normalize(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 4, 5)
    expected = (image.astype(np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD,
                                                                                                      np.float32)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), expected, rtol=1e-6, atol=1e-6)


def _scaled_object(ood_image: np.ndarray, ood_mask: np.ndarray, scale: float, size: tuple[int, int]):
    """Independent recomputation of the rescaled, centre-cropped/padded outlier (object box cut out)."""
    h, w = ood_mask.shape
    dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = centre_crop_pad(cv2.resize(ood_image, dsize, interpolation=cv2.INTER_LINEAR), size, 0)
    obj = centre_crop_pad(cv2.resize(ood_mask, dsize, interpolation=cv2.INTER_NEAREST), size, 0) == 254
    rows, cols = np.nonzero(obj)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return img[box], obj[box]


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5])  # 1.5: the object is cut by the centre crop
def test_paste_outlier_puts_254_exactly_on_the_object(scale: float) -> None:
    rng = np.random.default_rng(0)
    street = np.zeros((*CROP, 3), np.uint8)  # black street, bright outlier: every pasted pixel changes
    street_label = rng.integers(0, 19, CROP).astype(np.uint8)
    street_label[0, :] = 255
    ood_image = rng.integers(50, 256, (24, 30, 3), dtype=np.uint8)
    ood_mask = blob_mask(24, 30, (4, 20, 5, 22))
    exp_img, exp_obj = _scaled_object(ood_image, ood_mask, scale, CROP)

    for seed in range(10):
        img, lab = paste_outlier(street, street_label, ood_image, ood_mask, np.random.default_rng(seed),
                                 scales=(scale,))
        pasted = lab == 254
        changed = (img != street).any(axis=2) | (lab != street_label)
        np.testing.assert_array_equal(pasted, changed)
        assert pasted.sum() == exp_obj.sum()
        rows, cols = np.nonzero(pasted)
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        np.testing.assert_array_equal(pasted[box], exp_obj)  # the object's shape, translated
        np.testing.assert_array_equal(img[box][exp_obj], exp_img[exp_obj])  # its pixels
        np.testing.assert_array_equal(lab[~pasted], street_label[~pasted])
        np.testing.assert_array_equal(img[~pasted], street[~pasted])


def test_paste_position_is_uniform_over_every_fitting_offset() -> None:
    street, label = np.zeros((8, 9, 3), np.uint8), np.zeros((8, 9), np.uint8)
    ood_image = np.full((6, 6, 3), 200, np.uint8)
    ood_mask = np.zeros((6, 6), np.uint8)
    ood_mask[1:4, 2:5] = 254  # a 3x3 object: (8-3+1) * (9-3+1) = 42 valid top-left corners
    corners = []
    for seed in range(1500):
        _, lab = paste_outlier(street, label, ood_image, ood_mask, np.random.default_rng(seed), scales=(1.0,))
        rows, cols = np.nonzero(lab == 254)
        assert rows.size == 9 and rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
        corners.append((rows.min(), cols.min()))
    counts = np.zeros((6, 7))
    for y, x in corners:
        counts[y, x] += 1
    assert (counts > 0).all()  # corners and edges included
    assert counts.max() < 3 * counts.mean()


def test_paste_draws_scales_from_the_set_and_handles_a_vanished_object() -> None:
    street, label = np.zeros((*CROP, 3), np.uint8), np.zeros(CROP, np.uint8)
    ood_image = np.full((16, 16, 3), 90, np.uint8)
    ood_mask = np.full((16, 16), 254, np.uint8)
    areas = {int((paste_outlier(street, label, ood_image, ood_mask, np.random.default_rng(s),
                                scales=(0.25, 0.5))[1] == 254).sum()) for s in range(30)}
    assert areas == {16, 64}
    img, lab = paste_outlier(street, label, ood_image, np.zeros((16, 16), np.uint8), np.random.default_rng(0))
    np.testing.assert_array_equal(img, street)
    np.testing.assert_array_equal(lab, label)


def test_context_image_crops_and_pads() -> None:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    big_mask = blob_mask(30, 40, (5, 25, 8, 30))
    img, lab = context_image(big, big_mask, CROP)
    assert img.shape == (*CROP, 3) and lab.shape == CROP and lab.dtype == np.uint8
    np.testing.assert_array_equal(img, big[7:23, 10:30])
    np.testing.assert_array_equal(lab, big_mask[7:23, 10:30])

    small, small_mask = big[:10, :14], big_mask[:10, :14]
    img, lab = context_image(small, small_mask, CROP)
    assert set(np.unique(lab)) <= {0, 254, 255}
    np.testing.assert_array_equal(lab[3:13, 3:17], small_mask)
    assert (lab == 255).sum() == CROP[0] * CROP[1] - 140 and (img[lab == 255] == 0).all()


# --- the training set ---------------------------------------------------------------------------

def make_pairs(root: Path, n_inliers: int, n_ood: int) -> tuple[list, list]:
    rng = np.random.default_rng(42)
    inliers, ood = [], []
    for i in range(n_inliers):
        h, w = (12, 14) if i == 0 else (24, 32)  # one inlier smaller than the crop
        label = rng.integers(0, 19, (h, w)).astype(np.uint8)
        label[:2] = 255
        img_path, lab_path = root / f"city/img{i}.png", root / f"city/lab{i}_labelTrainIds.png"
        write_image(img_path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        write_label(lab_path, label)
        inliers.append((img_path, lab_path))
    for j in range(n_ood):
        h, w = 20 + 2 * j, 26
        img_path, mask_path = root / f"coco/{j}.png", root / f"ood/{j}.png"
        write_image(img_path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        write_label(mask_path, blob_mask(h, w, (3, h - 3, 4, w - 4)))
        ood.append((img_path, mask_path))
    return inliers, ood


def batches(dataset, num_workers: int, **kwargs) -> list[dict]:
    loader = DataLoader(dataset, batch_size=2, shuffle=False, num_workers=num_workers, **kwargs)
    return list(loader)


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_items(tmp_path: Path) -> None:
    inliers, ood = make_pairs(tmp_path, 4, 3)
    ds = OutlierExposureDataset(inliers, ood, crop_size=CROP, seed=3, scales=(0.5, 0.75))
    assert len(ds) == 4
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == item["context_image"].shape == (3, *CROP)
        assert item["image"].dtype == item["context_image"].dtype == torch.float32
        assert item["target"].shape == item["context_target"].shape == CROP
        assert item["target"].dtype == item["context_target"].dtype == torch.int64
        target_values = set(item["target"].unique().tolist())
        assert 254 in target_values and target_values <= set(range(19)) | {254, 255}
        assert {0, 254} <= set(item["context_target"].unique().tolist()) <= {0, 254, 255}
    assert (ds[0]["target"] == 255).sum() > CROP[0] * CROP[1] - 12 * 14 - 1  # padded small inlier is void


def test_reproducible_across_runs_workers_and_order(tmp_path: Path) -> None:
    inliers, ood = make_pairs(tmp_path, 6, 4)
    ds = OutlierExposureDataset(inliers, ood, crop_size=CROP, seed=7)
    serial = batches(ds, 0)
    assert_same(serial, batches(OutlierExposureDataset(inliers, ood, crop_size=CROP, seed=7), 0))
    assert_same(serial, batches(ds, 2))
    reverse = [ds[i] for i in reversed(range(len(ds)))][::-1]
    for i, item in enumerate(reverse):
        for key in item:
            assert torch.equal(item[key], serial[i // 2][key][i % 2])
    other_seed = batches(OutlierExposureDataset(inliers, ood, crop_size=CROP, seed=8), 0)
    assert not torch.equal(serial[0]["image"], other_seed[0]["image"])


def test_set_epoch_redraws_and_reaches_persistent_workers(tmp_path: Path) -> None:
    inliers, ood = make_pairs(tmp_path, 6, 8)
    ds = OutlierExposureDataset(inliers, ood, crop_size=CROP, seed=1)
    epoch0 = ds.ood_assignment().copy()
    ds.set_epoch(1)
    epoch1 = ds.ood_assignment().copy()
    assert not np.array_equal(epoch0, epoch1)
    ds.set_epoch(0)
    np.testing.assert_array_equal(ds.ood_assignment(), epoch0)

    reference = OutlierExposureDataset(inliers, ood, crop_size=CROP, seed=1)
    expected0 = batches(reference, 0)
    reference.set_epoch(1)
    expected1 = batches(reference, 0)
    assert not torch.equal(expected0[0]["context_image"], expected1[0]["context_image"])

    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    assert_same(list(loader), expected0)
    ds.set_epoch(1)
    assert_same(list(loader), expected1)


def test_ood_assignment_is_a_subset_or_balanced() -> None:
    subset = draw_ood_assignment(10, 25, seed=0, epoch=0)
    assert len(subset) == 10 and len(set(subset.tolist())) == 10 and subset.max() < 25
    balanced = draw_ood_assignment(10, 3, seed=0, epoch=0)
    assert sorted(np.bincount(balanced, minlength=3).tolist()) == [3, 3, 4]
    np.testing.assert_array_equal(balanced, draw_ood_assignment(10, 3, seed=0, epoch=0))


def test_bad_inputs_name_the_files(tmp_path: Path) -> None:
    inliers, ood = make_pairs(tmp_path, 2, 1)
    with pytest.raises(RPLInputError, match="inlier training set is empty"):
        OutlierExposureDataset([], ood, crop_size=CROP)
    with pytest.raises(RPLInputError, match="outlier-exposure set is empty"):
        OutlierExposureDataset(inliers, [], crop_size=CROP)

    mismatched = [(inliers[0][0], inliers[1][1])]
    with pytest.raises(RPLInputError) as err:
        OutlierExposureDataset(mismatched, ood, crop_size=CROP)[0]
    assert str(inliers[0][0]) in str(err.value) and str(inliers[1][1]) in str(err.value)

    bad_label = tmp_path / "bad_labelTrainIds.png"
    label = np.zeros((24, 32), np.uint8)
    label[5, 5] = 33  # a Cityscapes label id, not a train id
    write_label(bad_label, label)
    with pytest.raises(RPLInputError, match=r"bad_labelTrainIds.png holds values \[33\]"):
        OutlierExposureDataset([(inliers[1][0], bad_label)], ood, crop_size=CROP)[0]
    label[5, 5] = 20
    write_label(bad_label, label)
    OutlierExposureDataset([(inliers[1][0], bad_label)], ood, crop_size=CROP, num_classes=21)[0]

    bad_mask = tmp_path / "bad_mask.png"
    write_label(bad_mask, np.ones((20, 26), np.uint8))
    with pytest.raises(RPLInputError, match="bad_mask.png"):
        OutlierExposureDataset(inliers, [(ood[0][0], bad_mask)], crop_size=CROP)[0]


def test_paste_prob_zero_never_pastes(tmp_path: Path) -> None:
    inliers, ood = make_pairs(tmp_path, 4, 3)
    ds = OutlierExposureDataset(inliers, ood, crop_size=CROP, paste_prob=0.0)
    assert all((ds[i]["target"] != 254).all() for i in range(len(ds)))
    assert all((ds[i]["context_target"] == 254).any() for i in range(len(ds)))  # context view unchanged
    with pytest.raises(RPLInputError, match="paste probability"):
        OutlierExposureDataset(inliers, ood, crop_size=CROP, paste_prob=1.5)
