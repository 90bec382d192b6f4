"""MIoU: a confusion matrix worked out by hand, the ignore index, absent classes, merge, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rpl.errors import RPLInputError
from rpl.metrics import MIoU


def test_hand_computed_confusion_and_ious():
    target = np.array([[0, 0, 1, 1],
                       [2, 2, 255, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [2, 0, 0, 1]], np.int64)
    m = MIoU(num_classes=4)
    m.update(pred, target)
    # valid pixels (target != 255): 7. Confusion (rows GT, cols pred):
    #   GT 0: pred 0, 1        -> [1, 1, 0, 0]
    #   GT 1: pred 1, 1, 1     -> [0, 3, 0, 0]
    #   GT 2: pred 2, 0        -> [1, 0, 1, 0]
    # IoU0 = 1 / (2 + 2 - 1) = 1/3 ; IoU1 = 3 / (3 + 4 - 3) = 3/4 ; IoU2 = 1 / (2 + 1 - 1) = 1/2
    # class 3 is in neither GT nor prediction: no IoU, left out of the mean.
    assert m.confusion.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    out = m.compute()
    assert out["iou_per_class"] == pytest.approx([1 / 3, 3 / 4, 1 / 2, None])
    assert out["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert out["pixel_accuracy"] == pytest.approx(5 / 7)
    assert out["n_pixels"] == 7


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    m = MIoU(num_classes=3)
    m.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    # IoU0 = 1 / (2 + 1 - 1) = 1/2 ; IoU2 = 0 / (0 + 1 - 0) = 0 ; class 1 absent
    out = m.compute()
    assert out["iou_per_class"] == [0.5, None, 0.0]
    assert out["miou"] == pytest.approx(0.25)


def test_merge_and_sync_equal_single_accumulation():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 19, (4, 32, 32)).astype(np.uint8)
    target[:, :4] = 255
    pred = np.where(rng.random(target.shape) < 0.7, target % 19, rng.integers(0, 19, target.shape))
    whole = MIoU()
    whole.update(pred, target)
    a, b = MIoU(), MIoU()
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    assert a.merge(b).sync().compute() == whole.compute()
    with pytest.raises(RuntimeError):
        a.update(pred, target)
    a.reset()
    a.update(pred, target)
    assert a.compute() == whole.compute()


@pytest.mark.parametrize("pred, target, message", [
    (np.zeros((2, 2), np.int64), np.full((2, 2), 19, np.uint8), r"target has class ids \[19\]"),
    (np.full((2, 2), -1, np.int64), np.zeros((2, 2), np.uint8), r"pred has class ids \[-1\]"),
    (np.zeros((1, 19, 2, 2), np.float32), np.zeros((1, 2, 2), np.uint8), "same shape"),
    (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8), "integer class ids"),
])
def test_bad_inputs_are_refused(pred, target, message):
    with pytest.raises(RPLInputError, match=message):
        MIoU().update(pred, target)


def test_all_ignored_is_undefined():
    m = MIoU()
    m.update(np.zeros((2, 2), np.int64), np.full((2, 2), 255, np.uint8))
    with pytest.raises(RPLInputError, match="undefined"):
        m.compute()
