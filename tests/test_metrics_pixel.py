"""PixelMetrics: exact mode against scikit-learn, streaming and SMIYC modes within their
documented error, merging, distributed sync, void handling and bad input."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from rpl.errors import RPLInputError
from rpl.metrics import PixelMetrics
from rpl.metrics.accumulators import HistogramAccumulator

TOL = 1e-9


def sklearn_reference(scores: np.ndarray, labels: np.ndarray) -> dict:
    """AUROC, AP and the first-threshold FPR@95 with scikit-learn, on valid pixels."""
    # imported here: the sync test's spawned workers import this module, keep them light
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    valid = labels != 255
    y, s = labels[valid].ravel(), scores[valid].ravel()
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s),
            "fpr95": fpr[np.argmax(tpr >= 0.95)]}


def closest_rule_reference(scores: np.ndarray, labels: np.ndarray) -> float:
    """RPL/PEBAL's FPR@95, written out by brute force: distinct thresholds from the highest down
    to the first reaching full recall; the recall closest to 0.95 wins, ties to the lower one."""
    thresholds = np.unique(scores)[::-1]
    pos, neg = scores[labels == 1], scores[labels == 0]
    candidates = []
    for t in thresholds:
        recall = np.count_nonzero(pos >= t) / pos.size
        candidates.append((abs(recall - 0.95), -len(candidates), np.count_nonzero(neg >= t) / neg.size))
        if recall == 1.0:
            break
    return min(candidates)[2]


def best_f1_reference(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    best = (-1.0, 0.0)
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.count_nonzero(pred & (labels == 1))
        f1 = 2 * tp / (np.count_nonzero(pred) + np.count_nonzero(labels == 1))
        if f1 >= best[0]:
            best = (f1, float(t))
    return best


def smooth_score_maps(n: int, seed: int, h: int = 512, w: int = 1024, separation: float = 4.0):
    """Energy-like score maps: a smooth random field around -10, anomaly blobs raised by
    ``separation`` standard units with soft edges, pixel noise, the top fifth void."""
    rng = np.random.default_rng(seed)
    scores, labels = [], []
    for _ in range(n):
        field = cv2.resize(rng.standard_normal((h // 16, w // 16)).astype(np.float32), (w, h),
                           interpolation=cv2.INTER_CUBIC)
        field = cv2.GaussianBlur(field, (0, 0), 3)
        label = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 5)):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(label, centre, int(rng.integers(10, 60)), 1, -1)
        blobs = cv2.GaussianBlur(label.astype(np.float32), (0, 0), 3)
        label[: h // 5] = 255
        noise = rng.standard_normal((h, w)).astype(np.float32)
        scores.append((2 * field / field.std() - 10 + 2 * separation * blobs + 0.6 * noise)
                      .astype(np.float32))
        labels.append(label)
    return np.stack(scores), np.stack(labels)


def computed(mode: str, scores, labels, **kw) -> dict:
    m = PixelMetrics(mode=mode, **kw)
    m.update(scores, labels)
    return m.compute()


# ---------------------------------------------------------------- exact mode = scikit-learn

@pytest.mark.parametrize("seed", range(6))
def test_exact_equals_sklearn_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    shape = (3, 40, 50)
    decimals = seed % 3                     # 0, 1 or 2 decimals: from a handful of values to ~500
    scores = np.round(rng.standard_normal(shape), decimals).astype(np.float32)
    labels = (rng.random(shape) < 0.2 + 0.1 * seed).astype(np.uint8)
    labels[rng.random(shape) < 0.1] = 255
    ours, ref = computed("exact", scores, labels), sklearn_reference(scores, labels)
    for key in ("auroc", "ap", "fpr95"):
        assert abs(ours[key] - ref[key]) < TOL, key


def test_exact_equals_sklearn_on_constant_scores():
    labels = np.zeros((20, 30), np.uint8)
    labels[5:9, 3:20] = 1
    scores = np.full((20, 30), 0.7, np.float32)
    ours, ref = computed("exact", scores, labels), sklearn_reference(scores, labels)
    # one tied group: AUROC 1/2, AP = precision at the only threshold = 68 / 600, FPR@95 = 1
    assert ours["auroc"] == pytest.approx(0.5, abs=TOL) == ref["auroc"]
    assert ours["ap"] == pytest.approx(68 / 600, abs=TOL)
    assert ours["ap"] == pytest.approx(ref["ap"], abs=TOL)
    assert ours["fpr95"] == 1.0 == ref["fpr95"]


def test_exact_equals_sklearn_on_a_million_pixels():
    rng = np.random.default_rng(7)
    labels = (rng.random((4, 500, 500)) < 0.03).astype(np.uint8)
    scores = (rng.standard_normal(labels.shape) + 1.2 * labels).astype(np.float32)
    labels[:, :50] = 255
    ours, ref = computed("exact", scores, labels), sklearn_reference(scores, labels)
    for key in ("auroc", "ap", "fpr95"):
        assert abs(ours[key] - ref[key]) < TOL, key
    assert ours["n_pixels"] == int((labels != 255).sum())
    assert ours["n_anomaly"] == int((labels == 1).sum())


@pytest.mark.parametrize("seed", range(4))
def test_closest_rule_and_best_f1_match_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    scores = np.round(rng.standard_normal(400), 1).astype(np.float32)
    labels = (rng.random(400) < 0.3).astype(np.uint8)
    scores += labels
    out = computed("exact", scores[None], labels[None], fpr_rule="closest")
    assert out["fpr95"] == pytest.approx(closest_rule_reference(scores, labels), abs=TOL)
    f1, threshold = best_f1_reference(scores, labels)
    assert out["best_f1"] == pytest.approx(f1, abs=TOL)
    assert out["best_f1_threshold"] == pytest.approx(threshold)


def test_closest_rule_differs_from_first_rule_where_expected():
    # 20 anomaly scores: 1 and 2..20; 3 inlier scores: 0.5, 1.5, 5.5.
    # First rule: the highest threshold with TPR >= .95 is 2 (19/20 = .95): inliers >= 2 are
    # {5.5} -> FPR 1/3.
    # Closest rule: recall .95 holds for thresholds in (1, 2]; its lowest distinct threshold is
    # 1.5, where inliers {1.5, 5.5} are flagged -> FPR 2/3 (recall 1.0 at threshold 1 is .05 off).
    scores = np.r_[1.0, np.arange(2, 21), 0.5, 1.5, 5.5].astype(np.float32)[None]
    labels = np.r_[np.ones(20), np.zeros(3)].astype(np.uint8)[None]
    assert computed("exact", scores, labels)["fpr95"] == pytest.approx(1 / 3)
    assert computed("exact", scores, labels, fpr_rule="closest")["fpr95"] == pytest.approx(2 / 3)
    assert closest_rule_reference(scores[0], labels[0]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- streaming and SMIYC modes

@pytest.fixture(scope="module")
def realistic():
    scores, labels = smooth_score_maps(6, seed=3)          # 3.1 M pixels, 2.5 M valid
    return scores, labels, computed("exact", scores, labels)


@pytest.mark.parametrize("separation", [4.0, 1.5])      # a good and a weak detector
def test_streaming_within_1e4_of_exact_on_realistic_maps(realistic, separation):
    scores, labels, exact = realistic
    if separation != 4.0:
        scores, labels = smooth_score_maps(6, seed=1, separation=separation)
        exact = computed("exact", scores, labels)
    streaming = computed("streaming", scores, labels)
    for key in ("auroc", "ap", "fpr95", "best_f1"):
        assert abs(streaming[key] - exact[key]) <= 1e-4, (key, streaming[key], exact[key])
    assert streaming["n_pixels"] == exact["n_pixels"]


def test_streaming_is_exact_on_float16_scores():
    rng = np.random.default_rng(5)
    labels = (rng.random((2, 300, 300)) < 0.1).astype(np.uint8)
    scores = (rng.standard_normal(labels.shape) * 3 + 2 * labels).astype(np.float16)
    exact, streaming = computed("exact", scores, labels), computed("streaming", scores, labels)
    for key in ("auroc", "ap", "fpr95", "best_f1", "best_f1_threshold"):
        assert streaming[key] == pytest.approx(exact[key], abs=TOL), key


def test_streaming_is_exact_on_scores_spanning_many_binades():
    # sign * 2**k * (1 + m / 1024): 10 significant bits, so no two distinct values share a bin;
    # the span (1e-30 .. 1e30) also takes the sparse branch of the CPU histogram update
    rng = np.random.default_rng(6)
    shape = (2, 200, 300)
    scores = (rng.choice([-1.0, 1.0], shape) * 2.0 ** rng.integers(-100, 100, shape)
              * (1 + rng.integers(0, 1024, shape) / 1024)).astype(np.float32)
    labels = (rng.random(shape) < 0.3).astype(np.uint8)
    scores[labels == 1] *= 4
    exact, streaming = computed("exact", scores, labels), computed("streaming", scores, labels)
    for key in ("auroc", "ap", "fpr95", "best_f1", "best_f1_threshold"):
        assert streaming[key] == pytest.approx(exact[key], abs=TOL), key


def test_torch_code_path_of_the_accumulators_agrees_with_numpy():
    # PixelMetrics sends CUDA tensors to the torch branch of each accumulator; CPU tensors fed
    # to the accumulators directly run that same branch here.
    from rpl.metrics import accumulators
    scores, labels = smooth_score_maps(2, seed=8, h=128, w=256)
    for make in (accumulators.ExactAccumulator, accumulators.HistogramAccumulator,
                 accumulators.SmiycAccumulator):
        via_numpy, via_torch = make(), make()
        via_numpy.add(scores, labels)
        via_torch.add(torch.from_numpy(scores), torch.from_numpy(labels))
        assert via_torch.counts() == via_numpy.counts()
        assert via_torch.metrics("first") == via_numpy.metrics("first"), make.__name__


def test_streaming_bins_follow_float_order_and_merge_signed_zeros():
    acc = HistogramAccumulator(bits=23)
    values = np.array([-np.inf, -3e38, -1.0, -1e-30, -1e-45, -0.0, 0.0, 1e-45, 1e-30, 1.0, 3e38,
                       np.inf], np.float32)
    bins = acc._codes(values.view(np.int32)) >> 1
    assert np.all(np.diff(bins) >= 0)
    assert bins[5] == bins[6]                              # -0.0 and +0.0 share a bin
    edges = acc.lower_edges(bins)
    assert np.all(edges <= values)                         # the edge is the bin's smallest float
    assert np.all(acc._codes(edges.astype(np.float32).view(np.int32)) >> 1 == bins)


def test_smiyc_mode_within_documented_tolerance_of_exact(realistic):
    scores, labels, exact = realistic
    smiyc = computed("smiyc", scores, labels)
    assert abs(smiyc["auroc"] - exact["auroc"]) <= 1e-4
    assert abs(smiyc["ap"] - exact["ap"]) <= 2e-3
    assert abs(smiyc["fpr95"] - exact["fpr95"]) <= 1e-3


def test_smiyc_mode_on_a_hand_computed_frame():
    # anomaly scores .8 .9, inlier scores .1 .2 .85. Bin edges: {0, 1}, 2 quantiles of the
    # anomalies (.8, .9), 3 of the inliers (.1, median .2, .85) -> 0 .1 .2 .8 .85 .9 1.
    # Thresholds high to low with cumulative (TP, FP): .9 (1,0) .85 (1,1) .8 (2,1) .2 (2,2)
    # .1 (2,3) 0 (2,3). TPR .5 .5 1 1 1 1; FPR 0 1/3 1/3 2/3 1 1; precision 1 .5 2/3 .5 .4 .4.
    # AUROC = trapezoid from (0, .5): 1/3 * .5 + 2/3 * 1 = 5/6.
    # AP = trapezoid over recall: only .5 -> 1 moves, with precisions .5 and 2/3: .5 * 7/12.
    # FPR@95: first point with TPR >= .95 is threshold .8: FPR 1/3.
    # F1 = 2TP / (TP + FP + 2): 2/3, 1/2, 4/5, 2/3, 4/7, 4/7 -> best 4/5 at threshold .8.
    scores = np.array([[0.8, 0.9, 0.1, 0.2, 0.85]], np.float32)
    labels = np.array([[1, 1, 0, 0, 0]], np.uint8)
    out = computed("smiyc", scores, labels)
    assert out["auroc"] == pytest.approx(5 / 6)
    assert out["ap"] == pytest.approx(0.5 * 7 / 12)
    assert out["fpr95"] == pytest.approx(1 / 3)
    assert out["best_f1"] == pytest.approx(4 / 5)
    assert out["best_f1_threshold"] == pytest.approx(0.8)
    # the exact (step) AP of the same pixels: .5 * 1 + .5 * 2/3
    assert computed("exact", scores, labels)["ap"] == pytest.approx(5 / 6)


# ---------------------------------------------------------------- merge, sync, inputs

@pytest.mark.parametrize("mode", ["exact", "streaming", "smiyc"])
def test_merge_equals_single_accumulation(mode):
    rng = np.random.default_rng(11)
    scores = np.round(rng.standard_normal((6, 60, 80)), 2).astype(np.float32)
    labels = (rng.random(scores.shape) < 0.2).astype(np.uint8)
    labels[2] = 255                                        # one image without valid pixels
    whole = computed(mode, scores, labels)
    parts = [PixelMetrics(mode=mode) for _ in range(3)]
    for i in range(6):
        parts[i % 3].update(scores[i], labels[i])
    merged = parts[0].merge(parts[1]).merge(parts[2]).compute()
    if mode == "smiyc":      # frames are concatenated in another order: equal up to float sums
        assert merged == pytest.approx(whole, abs=1e-12)
    else:
        assert merged == whole
    assert merged["n_images"] == 6 and merged["n_empty_images"] == 1


def test_void_pixels_are_ignored_whatever_their_score():
    rng = np.random.default_rng(2)
    labels = (rng.random((50, 50)) < 0.3).astype(np.uint8)
    scores = rng.standard_normal((50, 50)).astype(np.float32)
    padded_s = np.concatenate([scores, np.full((10, 50), 1e9, np.float32)])
    padded_l = np.concatenate([labels, np.full((10, 50), 255, np.uint8)])
    for mode in ("exact", "streaming", "smiyc"):
        base, out = computed(mode, scores, labels), computed(mode, padded_s, padded_l)
        for key in ("auroc", "ap", "fpr95"):
            assert out[key] == base[key], (mode, key)
        assert out["n_ignored"] == 500 and out["n_pixels"] == 2500


@pytest.mark.parametrize("mode", ["exact", "streaming", "smiyc"])
def test_torch_and_numpy_inputs_agree(mode):
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((2, 40, 40)).astype(np.float32)
    labels = (rng.random((2, 40, 40)) < 0.25).astype(np.uint8)
    from_numpy = computed(mode, scores, labels)
    from_torch = computed(mode, torch.from_numpy(scores).double(), torch.from_numpy(labels).long())
    as_bool = computed(mode, torch.from_numpy(scores), torch.from_numpy(labels).bool())
    assert from_torch == from_numpy == as_bool


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["exact", "streaming", "smiyc"])
def test_cuda_inputs_agree_with_cpu(mode):
    scores, labels = smooth_score_maps(2, seed=1, h=256, w=512)
    on_gpu = computed(mode, torch.from_numpy(scores).cuda(), torch.from_numpy(labels).cuda())
    assert on_gpu == computed(mode, scores, labels)


def _all_metrics(scores, labels, rank: int = 0, world: int = 1) -> dict:
    """Every metric of the package on this rank's share of the images, synced over ranks."""
    from rpl.metrics import ComponentMetrics, MIoU
    results = {}
    for mode in ("exact", "streaming", "smiyc"):
        m = PixelMetrics(mode=mode)
        m.update(scores[rank::world], labels[rank::world])
        results[mode] = m.sync().compute()
    components = ComponentMetrics(track="obstacle")
    components.update(scores[rank::world], labels[rank::world])
    results["components"] = components.sync().compute()
    miou = MIoU(num_classes=2)
    miou.update((scores[rank::world] > -8).astype(np.int64), labels[rank::world])
    results["miou"] = miou.sync().compute()
    return results


def _sync_worker(rank: int, world: int, store: str, queue) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    scores, labels = smooth_score_maps(4, seed=9, h=64, w=128)
    queue.put((rank, _all_metrics(scores, labels, rank, world)))
    dist.destroy_process_group()


def test_sync_over_two_processes_equals_one_process(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = str(tmp_path / "store")  # file rendezvous: no port that another process could take first
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, store, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    scores, labels = smooth_score_maps(4, seed=9, h=64, w=128)
    single = _flat(_all_metrics(scores, labels))
    for rank in (0, 1):
        synced = _flat(results[rank])
        assert synced.keys() == single.keys(), rank
        for name, expected in single.items():
            assert synced[name] == pytest.approx(expected, abs=1e-12), (name, rank)


def _flat(tree, prefix: str = "") -> dict:
    """Nested result dicts as one level of dotted keys (pytest 9's approx refuses nested dicts)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_sync_without_distributed_is_a_no_op_once():
    m = PixelMetrics()
    m.update(np.array([[0.1, 0.9]], np.float32), np.array([[0, 1]], np.uint8))
    assert m.sync().compute()["auroc"] == 1.0
    with pytest.raises(RuntimeError):
        m.sync()
    with pytest.raises(RuntimeError):
        m.update(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.uint8))
    m.reset()
    m.update(np.array([[0.9, 0.1]], np.float32), np.array([[0, 1]], np.uint8))
    assert m.compute()["auroc"] == 0.0


# ---------------------------------------------------------------- bad input

def test_no_anomaly_pixel_says_ap_is_undefined():
    m = PixelMetrics()
    m.update(np.random.rand(8, 8).astype(np.float32), np.zeros((8, 8), np.uint8))
    with pytest.raises(RPLInputError, match="no anomaly pixel.*undefined"):
        m.compute()


def test_no_inlier_pixel_is_refused_too():
    m = PixelMetrics(mode="streaming")
    m.update(np.random.rand(8, 8).astype(np.float32), np.ones((8, 8), np.uint8))
    with pytest.raises(RPLInputError, match="no inlier pixel"):
        m.compute()


def test_image_without_valid_pixels_is_counted_not_fatal():
    m = PixelMetrics()
    m.update(np.random.rand(8, 8).astype(np.float32), np.full((8, 8), 255, np.uint8))
    m.update(np.array([[0.2, 0.7]], np.float32), np.array([[0, 1]], np.uint8))
    out = m.compute()
    assert out["n_empty_images"] == 1 and out["n_images"] == 2 and out["auroc"] == 1.0


@pytest.mark.parametrize("scores, labels, message", [
    (np.zeros((4, 4), np.float32), np.full((4, 4), 7, np.uint8), r"found values \[7\]"),
    (np.zeros((4, 4), np.float32), np.zeros((4, 5), np.uint8), "same shape"),
    (np.full((4, 4), np.nan, np.float32), np.zeros((4, 4), np.uint8), "NaN"),
    (np.zeros(4, np.float32), np.zeros(4, np.uint8), r"\(H, W\) or \(B, H, W\)"),
    (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), "labels must be integers"),
    (np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8), "scores must be real numbers"),
])
def test_bad_inputs_are_refused_with_a_clear_message(scores, labels, message):
    with pytest.raises(RPLInputError, match=message):
        PixelMetrics().update(scores, labels)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "binned"}, "mode must be one of"),
    ({"fpr_rule": "nearest"}, "fpr_rule must be"),
    ({"mode": "smiyc", "fpr_rule": "closest"}, "first threshold"),
    ({"hist_bits": 30}, "hist_bits"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(RPLInputError, match=message):
        PixelMetrics(**kwargs)


@pytest.mark.parametrize("mode", ["exact", "streaming", "smiyc"])
def test_curve_is_the_one_the_metrics_are_read_from(mode):
    """PixelMetrics.curve(): ROC area = AUROC, PR steps sum to AP, points and markers on sklearn's curve."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    rng = np.random.default_rng(3)
    labels = (rng.random((3, 40, 50)) < 0.15).astype(np.uint8)
    labels[:, :4] = 255
    scores = np.round(rng.normal(size=labels.shape) + 1.5 * labels, 1).astype(np.float32)  # heavy ties
    m = PixelMetrics(mode=mode)
    m.update(scores, labels)
    r, c = m.compute(), m.curve(max_points=10**6)
    fpr, tpr = np.array(c["roc"]["fpr"]), np.array(c["roc"]["tpr"])
    recall, precision = np.array(c["pr"]["recall"]), np.array(c["pr"]["precision"])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(r["auroc"], abs=TOL)
    if mode == "smiyc":
        assert np.trapezoid(precision, recall) == pytest.approx(r["ap"], abs=TOL)
    else:
        assert np.sum(np.diff(recall, prepend=0.0) * precision) == pytest.approx(r["ap"], abs=TOL)
        valid = labels != 255
        y, s = labels[valid], scores[valid]
        sk_fpr, sk_tpr, _ = roc_curve(y, s, drop_intermediate=False)
        # every point of sklearn's ROC (all distinct scores) lies on ours: at its TPR level, within our FPR span
        for f, t in zip(sk_fpr, sk_tpr):
            level = fpr[np.isclose(tpr, t, rtol=0, atol=1e-12)]
            assert level.size and level.min() - 1e-12 <= f <= level.max() + 1e-12, (f, t)
        sk_p, sk_r, _ = precision_recall_curve(y, s)
        assert {(round(a, 12), round(b, 12)) for a, b in zip(recall, precision)} <= \
            {(round(a, 12), round(b, 12)) for a, b in zip(sk_r[:-1], sk_p[:-1])}
    assert c["fpr95_point"][0] == r["fpr95"] and c["fpr95_point"][1] >= 0.95
    rec, prec = c["best_f1_point"]
    assert 2 * rec * prec / (rec + prec) == pytest.approx(r["best_f1"], abs=TOL)
    thinned = m.curve(max_points=50)
    assert len(thinned["roc"]["fpr"]) <= 52 and thinned["roc"]["fpr"][-1] == 1.0
    assert m.compute() == r  # reading the curve changes no metric


# ---------------------------------------------------------------- streaming histogram internals

def plain_histogram(scores: np.ndarray, labels: np.ndarray, bits: int) -> np.ndarray:
    """The streaming counts written the straightforward way: one bincount over every valid code."""
    acc = HistogramAccumulator(bits)
    valid = labels != 255
    codes = acc._codes(scores[valid].view(np.int32).astype(np.int64)) | labels[valid]
    return np.bincount(codes, minlength=acc.size)


def hard_score_maps(kind: str, n: int, rng) -> np.ndarray:
    """Scores that stress the bucketing: zero crossings, unbounded energies, many binades, ties,
    infinities, signed zeros, denormals and exact bin edges."""
    if kind == "normal":
        return rng.standard_normal(n, dtype=np.float32)
    if kind == "energy":                    # -logsumexp-like, with a long unbounded tail
        return (-8 + 2 * rng.standard_normal(n) - rng.exponential(20, n) * (rng.random(n) < 0.01)
                ).astype(np.float32)
    if kind == "binades":
        return (rng.choice([-1.0, 1.0], n) * 2.0 ** rng.integers(-140, 128, n)).astype(np.float32)
    if kind == "ties":
        return np.round(rng.standard_normal(n), 1).astype(np.float32)
    special = np.array([np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -1.0, 1.0, -2.0, 0.5,
                        3.4e38, -3.4e38], np.float32)
    scores = rng.standard_normal(n, dtype=np.float32) * 3
    pick = rng.random(n) < 0.2
    scores[pick] = rng.choice(special, int(pick.sum()))
    return scores


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kind", ["normal", "energy", "binades", "ties", "special"])
def test_streaming_counts_equal_a_plain_bincount(kind, compiled):
    if compiled:
        pytest.importorskip("numba")
    rng = np.random.default_rng(sum(map(ord, kind)))
    n = (1 << 20) + 12345                    # at least one compiled-size update and a partial block
    scores = hard_score_maps(kind, n, rng)
    labels = (rng.random(n) < 0.1).astype(np.uint8)
    labels[rng.random(n) < 0.15] = 255
    labels[: n // 50] = 255                  # a void stretch, as the ego vehicle
    for bits in (12, 23, 24):
        acc = HistogramAccumulator(bits, compiled=compiled)
        acc.add(scores[: n - 1000], labels[: n - 1000])
        acc.add(scores[n - 1000:], labels[n - 1000:])  # a small second update
        expected = plain_histogram(scores, labels, bits)
        assert np.array_equal(acc.hist, expected), (kind, bits)
        occupied = np.flatnonzero(expected)
        assert acc.lo <= occupied[0] and acc.hi >= occupied[-1]
        assert acc.counts() == (int(np.count_nonzero(labels == 1)), int(np.count_nonzero(labels == 0)))


def test_streaming_numpy_and_compiled_paths_give_identical_metrics():
    pytest.importorskip("numba")
    scores, labels = smooth_score_maps(3, seed=12)           # 1.5 M pixels in one update
    by_numpy, compiled = PixelMetrics(mode="streaming"), PixelMetrics(mode="streaming")
    by_numpy._acc.compiled = False
    by_numpy.update(scores, labels)
    compiled.update(scores, labels)
    assert by_numpy.compute() == compiled.compute()


def test_one_nan_among_many_pixels_is_refused_and_leaves_the_state_alone():
    rng = np.random.default_rng(13)
    scores = rng.standard_normal((2, 600, 1000)).astype(np.float32)
    labels = (rng.random(scores.shape) < 0.2).astype(np.uint8)
    m = PixelMetrics(mode="streaming")
    m.update(scores[:1], labels[:1])
    before = m.compute()
    bad = scores[1:].copy()
    bad[0, 599, 999] = np.nan                               # the very last pixel
    with pytest.raises(RPLInputError, match="NaN"):
        m.update(bad, labels[1:])
    assert m.compute() == before


@pytest.mark.parametrize("value", [2, 128, 254])
def test_stray_label_values_are_found_by_the_fast_label_check(value):
    labels = np.zeros((300, 400), np.uint8)
    labels[::7] = 1
    labels[::11] = 255
    labels[299, 399] = value
    with pytest.raises(RPLInputError, match=rf"found values \[{value}\]"):
        PixelMetrics(mode="streaming").update(np.zeros((300, 400), np.float32), labels)
