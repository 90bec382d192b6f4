"""ComponentMetrics: SMIYC sIoU / PPV / mean F1 on hand-built masks worked out by hand, against
a literal transcription of the evaluator's rules, and the threshold / merge / error paths."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from rpl.errors import RPLInputError
from rpl.metrics import ComponentMetrics, PixelMetrics
from rpl.metrics.component import TAUS, frame_components


def hand_built_frame() -> tuple[np.ndarray, np.ndarray]:
    """Scores 1 where predicted, 0 elsewhere; labels 0 / 1 / 255. Rows and columns are
    half-open ranges below; no two components touch, even diagonally."""
    labels = np.zeros((200, 300), np.uint8)
    pred = np.zeros((200, 300), bool)
    labels[20:40, 20:60] = 1     # G1: 20 x 40 = 800 px
    labels[20:40, 70:90] = 1     # G2: 20 x 20 = 400 px, 10 background columns from G1
    pred[15:45, 20:90] = True    # P1: 30 x 70 = 2100 px over G1 (800), G2 (400), background 900
    labels[100:108, 20:30] = 1   # G3: 8 x 10 = 80 px < 100: voided in the anomaly track
    pred[95:125, 15:45] = True   # P2: 30 x 30 = 900 px: G3 (80) + background (820)
    labels[150:170, 200:220] = 1  # G4: 20 x 20 = 400 px
    pred[150:170, 200:220] = True  # P3: exactly G4, 400 px < 500: dropped in the anomaly track
    labels[100:140, 200:250] = 1  # G5: 40 x 50 = 2000 px
    pred[100:140, 205:255] = True  # P4: 40 x 50 = 2000 px, 40 x 45 = 1800 on G5, 200 background
    labels[180:200] = 255         # void band ...
    pred[180:200] = True          # ... where a prediction must be ignored
    return pred.astype(np.float32), labels


def test_anomaly_track_by_hand():
    scores, labels = hand_built_frame()
    m = ComponentMetrics(track="anomaly", threshold=0.5)
    m.update(scores, labels)
    out = m.compute()
    # sIoU = |G ∩ P| / (|G| + pixels of the touching predictions on background):
    #   G1: 800 / (800 + 900) ; G2: 400 / (400 + 900) ; G4: P3 dropped -> 0 ;
    #   G5: 1800 / (2000 + 200) ; G3 voided (80 < 100 px) -> not counted.
    siou = [800 / 1700, 400 / 1300, 0.0, 1800 / 2200]
    assert out["n_gt_components"] == 4
    assert out["siou"] == pytest.approx(sum(siou) / 4)            # 0.39912
    # PPV = fraction of a prediction (inside the ROI) on ground truth:
    #   P1: 1200 / 2100 ; P2: 0 / 820 (its 80 px on G3 are void) ; P4: 1800 / 2000
    ppv = [1200 / 2100, 0.0, 1800 / 2000]
    assert out["n_pred_components"] == 3
    assert out["ppv"] == pytest.approx(sum(ppv) / 3)              # 0.49048
    # TP(tau) = #sIoU >= tau over (.47, .31, 0, .82); FN = 4 - TP; FP(tau) = #PPV < tau over
    # (.57, 0, .9); F1 = 2TP / (2TP + FN + FP):
    #   tau .25, .30: TP 3 FN 1 FP 1 -> 6/8 ; .35-.45: TP 2 FN 2 FP 1 -> 4/7 ;
    #   .50, .55: TP 1 FN 3 FP 1 -> 2/6 ;    .60-.75: TP 1 FN 3 FP 2 -> 2/7
    f1 = [6 / 8] * 2 + [4 / 7] * 3 + [2 / 6] * 2 + [2 / 7] * 4
    assert out["mean_f1"] == pytest.approx(sum(f1) / 11)           # 0.45671
    assert out["f1_25"] == pytest.approx(0.75)
    assert out["f1_50"] == pytest.approx(1 / 3)
    assert out["f1_75"] == pytest.approx(2 / 7)


def test_obstacle_track_keeps_small_components():
    scores, labels = hand_built_frame()
    m = ComponentMetrics(track="obstacle", threshold=0.5)
    m.update(scores, labels)
    out = m.compute()
    # sizes 80 (G3) and 400 (P3) now pass (>= 10 and >= 50):
    #   sIoU: G1 800/1700, G2 400/1300, G3 80/(80 + 820), G4 400/400 = 1, G5 1800/2200
    #   PPV: P1 1200/2100, P2 80/900, P3 1, P4 1800/2000
    assert out["siou"] == pytest.approx((800 / 1700 + 400 / 1300 + 80 / 900 + 1 + 1800 / 2200) / 5)
    assert out["ppv"] == pytest.approx((1200 / 2100 + 80 / 900 + 1 + 1800 / 2000) / 4)


def official_rules(pred: np.ndarray, labels: np.ndarray, min_pred: int, min_gt: int):
    """The SMIYC evaluator's per-frame rules written out literally (loops, np.isin)."""
    structure = np.ones((3, 3))
    pred = pred & (labels != 255)
    pred_cc, n_pred = ndimage.label(pred, structure)
    for c in range(1, n_pred + 1):
        if np.count_nonzero(pred_cc == c) < min_pred:
            pred_cc[pred_cc == c] = 0
    gt_cc, n_gt = ndimage.label(labels == 1, structure)
    labels = labels.copy()
    for c in range(1, n_gt + 1):
        if np.count_nonzero(gt_cc == c) < min_gt:
            labels[gt_cc == c] = 255
    roi = labels != 255
    g, p = gt_cc[roi], pred_cc[roi]
    siou = []
    for i in np.unique(g[g > 0]):
        touching = np.unique(p[(g == i) & (p > 0)])
        in_p = np.isin(p, touching)
        inter = np.count_nonzero((g == i) & in_p)
        on_other_gt = np.count_nonzero(~np.isin(g, [0, i]) & in_p)
        union = np.count_nonzero(in_p) + np.count_nonzero(g == i) - inter - on_other_gt
        siou.append(inter / union)
    ppv = [np.count_nonzero((p == j) & (g > 0)) / np.count_nonzero(p == j)
           for j in np.unique(p[p > 0])]
    return np.array(siou), np.array(ppv)


@pytest.mark.parametrize("seed", range(5))
def test_frame_components_match_the_literal_rules_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    labels = (ndimage.gaussian_filter(rng.random((120, 160)), 3) > 0.52).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.02] = 255
    labels[:, :10] = 255
    pred = ndimage.gaussian_filter(rng.random((120, 160)), 3) > 0.51
    for min_pred, min_gt in ((50, 10), (200, 60)):
        siou, ppv = frame_components(pred, labels, min_pred, min_gt)
        ref_siou, ref_ppv = official_rules(pred, labels, min_pred, min_gt)
        assert len(ref_siou) > 1 and len(ref_ppv) > 1
        np.testing.assert_allclose(np.sort(siou), np.sort(ref_siou))
        np.testing.assert_allclose(np.sort(ppv), np.sort(ref_ppv))


def test_threshold_defaults_to_pixel_best_f1_and_frames_spill_to_disk():
    rng = np.random.default_rng(3)
    scores, labels = hand_built_frame()
    scores = scores * 2 + rng.random(scores.shape).astype(np.float32)   # overlapping ranges
    exact_auto = ComponentMetrics(track="obstacle", pixel_mode="exact")
    streaming_auto = ComponentMetrics(track="obstacle")               # pixel_mode="streaming"
    pixel = PixelMetrics(mode="exact")
    for _ in range(2):
        for m in (exact_auto, streaming_auto, pixel):
            m.update(scores, labels)
    threshold = pixel.compute()["best_f1_threshold"]
    given = ComponentMetrics(track="obstacle", threshold=threshold)
    given.update(np.stack([scores, scores]), np.stack([labels, labels]))
    assert exact_auto.compute() == given.compute()
    # the streaming threshold is the lower edge of the best bin: within 2**-14 relative
    streamed = streaming_auto.compute()
    assert streamed.pop("threshold") == pytest.approx(threshold, rel=2**-14)
    expected = given.compute()
    expected.pop("threshold")
    assert streamed == pytest.approx(expected)


def test_prediction_uses_score_at_least_threshold():
    scores, labels = hand_built_frame()
    at = ComponentMetrics(threshold=1.0)
    at.update(scores, labels)
    above = ComponentMetrics(threshold=np.nextafter(np.float32(1.0), np.float32(2.0)))
    above.update(scores, labels)
    assert at.compute()["n_pred_components"] == 3
    assert above.compute()["n_pred_components"] == 0


@pytest.mark.parametrize("threshold", [0.5, None])
def test_merge_equals_single_accumulation(threshold):
    scores, labels = hand_built_frame()
    flipped_s, flipped_l = scores[:, ::-1].copy(), labels[:, ::-1].copy()
    whole = ComponentMetrics(threshold=threshold)
    whole.update(np.stack([scores, flipped_s]), np.stack([labels, flipped_l]))
    a, b = ComponentMetrics(threshold=threshold), ComponentMetrics(threshold=threshold)
    a.update(scores, labels)
    b.update(flipped_s, flipped_l)
    assert a.merge(b).compute() == whole.compute()
    assert ComponentMetrics(threshold=threshold).merge(a).sync().compute() == whole.compute()


def test_nothing_predicted_gives_nan_ppv_and_zero_f1():
    _, labels = hand_built_frame()
    m = ComponentMetrics(threshold=0.5)
    m.update(np.zeros(labels.shape, np.float32), labels)
    out = m.compute()
    assert np.isnan(out["ppv"]) and out["n_pred_components"] == 0
    assert out["siou"] == 0.0 and out["mean_f1"] == 0.0


def test_no_ground_truth_component_is_an_input_error():
    labels = np.zeros((50, 50), np.uint8)
    labels[10:15, 10:15] = 1                      # 25 px: voided in the anomaly track
    m = ComponentMetrics(threshold=0.5)
    m.update(np.zeros((50, 50), np.float32), labels)
    with pytest.raises(RPLInputError, match="no ground-truth anomaly component of at least 100"):
        m.compute()


def test_bad_track_and_bad_labels_are_refused():
    with pytest.raises(RPLInputError, match="track must be"):
        ComponentMetrics(track="lostandfound")
    with pytest.raises(RPLInputError, match=r"found values \[2\]"):
        ComponentMetrics(threshold=0.5).update(np.zeros((4, 4), np.float32),
                                               np.full((4, 4), 2, np.uint8))


def test_taus_are_the_eleven_smiyc_levels():
    assert len(TAUS) == 11 and TAUS[0] == 0.25 and TAUS[-1] == 0.75
    np.testing.assert_allclose(np.diff(TAUS), 0.05)
