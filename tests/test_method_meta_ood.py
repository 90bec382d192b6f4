"""Meta-OoD: the entropy-maximisation loss against a plain loop of the reference formula, the segment
features of a hand-built probability map, the meta classifier's removal, checkpoints, the optional
scikit-learn solver, the generic several-rows hook and a tiny end-to-end run (meta-ood, +meta, +rpl)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import rpl
from rpl.config import load_config
from rpl.errors import RPLInputError
from rpl.methods import get
from rpl.methods.meta_ood import (MetaClassifier, MetaOoDSegmenter, WithWholeOutlierImages, entropy_max_loss,
                                  false_positive_labels, feature_names, fit_logistic_regression, normalised_entropy,
                                  remove_false_positives, segment_features)
from rpl.models import DeepLabV3Plus

TINY = {"backbone": "resnet18", "num_classes": 5, "output_stride": 16, "aspp_width": 8, "decoder_width": 8}


# -- the loss ----------------------------------------------------------------------------------------------
def plain_loss(z: torch.Tensor, t: torch.Tensor, alpha: float) -> float:
    """The reference formula element by element: targets (1 - alpha) one-hot / alpha / K / 0, mean over B*K*H*W."""
    b, k, h, w = z.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                logits = [float(v) for v in z[i, :, y, x]]
                lse = math.log(sum(math.exp(v) for v in logits))
                label = int(t[i, y, x])
                for c in range(k):
                    target = (1 - alpha) * (c == label) if label < 254 else (alpha / k if label == 254 else 0.0)
                    total += -target * (logits[c] - lse)
    return total / (b * k * h * w)


@pytest.mark.parametrize("with_outliers", [True, False])
@pytest.mark.parametrize("alpha", [0.9, 0.5])
def test_entropy_max_loss_equals_a_plain_loop(with_outliers, alpha):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 5, 6, generator=g) * 2.0
    t = torch.randint(0, 4, (2, 5, 6), generator=g)
    t[:, 0, :3] = 255
    if with_outliers:
        t[1, 2:4, 1:5] = 254
        t[0, 4, 4] = 254
    assert ((t == 254).any()) == with_outliers and (t == 255).any() and (t < 4).any()
    got = float(entropy_max_loss(z, t, alpha))
    assert got == pytest.approx(plain_loss(z, t, alpha), rel=1e-5)


def test_normalised_entropy_is_entropy_over_log_k():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]]).view(2, 4, 1, 1)
    s = normalised_entropy(z)
    p = torch.softmax(torch.tensor([10.0, 0.0, 0.0, 0.0]), 0)
    assert float(s[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(s[1]) == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-4)


# -- segment features -----------------------------------------------------------------------------------------
def hand_map() -> np.ndarray:
    """(3, 5, 6) probabilities. Segment A: rows 0-2 x cols 0-2 (top-left corner), uniform at (0,0), (1,1)
    and (2,2), (0.5, 0.4, 0.1) elsewhere. Segment B: the single pixel (4, 5). Background: (0.9, 0.05, 0.05)
    (argmax 0), in column 3 (0.05, 0.9, 0.05) (argmax 1)."""
    p = np.zeros((3, 5, 6))
    p[:, :, :] = np.array([0.9, 0.05, 0.05])[:, None, None]
    p[:, :, 3] = np.array([0.05, 0.9, 0.05])[:, None]
    p[:, 0:3, 0:3] = np.array([0.5, 0.4, 0.1])[:, None, None]
    for y, x in ((0, 0), (1, 1), (2, 2)):
        p[:, y, x] = 1 / 3
    p[:, 4, 5] = [0.4, 0.3, 0.3]
    return p


def ent(q) -> float:
    eps = float(np.finfo(np.float32).eps)
    return -sum(v * math.log(v + eps) for v in q) / math.log(3)


def test_segment_features_of_a_hand_built_map():
    seg = segment_features(hand_map(), threshold=0.7)
    assert len(seg) == 2 and seg.names == feature_names(3) and len(seg.names) == 37 + 2 * 3
    a = {n: seg.features[0, i] for i, n in enumerate(seg.names)}
    b = {n: seg.features[1, i] for i, n in enumerate(seg.names)}
    assert (seg.components[0:3, 0:3] == 1).all() and seg.components[4, 5] == 2
    assert (seg.components > 0).sum() == 10
    # A: pixels with an in-image neighbour outside the segment are boundary; the image edge is not
    interior = [(0, 0), (0, 1), (1, 0), (1, 1)]
    boundary = [(0, 2), (1, 2), (2, 2), (2, 0), (2, 1)]
    assert (a["S"], a["S_in"], a["S_bd"]) == (9, 4, 5)
    assert a["S_rel"] == pytest.approx(9 / 5) and a["S_rel_in"] == pytest.approx(4 / 5)
    uniform, other = (1 / 3,) * 3, (0.5, 0.4, 0.1)
    probs = {yx: (uniform if yx in ((0, 0), (1, 1), (2, 2)) else other) for yx in interior + boundary}
    heat = {"E": lambda q: ent(q), "D": lambda q: 1 - sorted(q)[-1] + sorted(q)[-2], "V": lambda q: 1 - max(q)}
    for h, fn in heat.items():
        whole = [fn(probs[yx]) for yx in interior + boundary]
        inner = [fn(probs[yx]) for yx in interior]
        edge = [fn(probs[yx]) for yx in boundary]
        mean, var = np.mean(whole), np.var(whole)
        assert a[h] == pytest.approx(mean) and a[f"{h}_in"] == pytest.approx(np.mean(inner))
        assert a[f"{h}_bd"] == pytest.approx(np.mean(edge))
        assert a[f"{h}_var"] == pytest.approx(var, abs=1e-12)
        assert a[f"{h}_var_in"] == pytest.approx(np.var(inner), abs=1e-12)
        assert a[f"{h}_var_bd"] == pytest.approx(np.var(edge), abs=1e-12)
        assert a[f"{h}_rel"] == pytest.approx(mean * 9 / 5) and a[f"{h}_rel_in"] == pytest.approx(np.mean(inner) * 4 / 5)
        assert a[f"{h}_var_rel"] == pytest.approx(var * 9 / 5, abs=1e-12)
    # E by hand: 3 uniform pixels (E = 1) and 6 of (0.5, 0.4, 0.1)
    assert a["E"] == pytest.approx((3 * ent(uniform) + 6 * ent(other)) / 9)
    assert a["V"] == pytest.approx((3 * 2 / 3 + 6 * 0.5) / 9) and a["D"] == pytest.approx((3 * 1.0 + 6 * 0.9) / 9)
    assert a["mean_x"] == pytest.approx(1.0) and a["mean_y"] == pytest.approx(1.0)
    assert a["cprob0"] == pytest.approx((3 / 3 + 6 * 0.5) / 9) and a["cprob2"] == pytest.approx((3 / 3 + 6 * 0.1) / 9)
    # neighbours outside A, counted once per boundary pixel that touches them: 15, of which 8 in column 3 (class 1)
    assert a["ndist1"] == pytest.approx(8 / 15) and a["ndist0"] == pytest.approx(7 / 15) and a["ndist2"] == 0
    # B: one pixel in the corner, all boundary (its 3 in-image neighbours are outside), no interior
    assert (b["S"], b["S_in"], b["S_bd"], b["S_rel_in"]) == (1, 0, 1, 0)
    assert b["E"] == pytest.approx(ent((0.4, 0.3, 0.3))) and b["E_bd"] == b["E"] and b["E_in"] == 0
    assert b["E_var"] == pytest.approx(0, abs=1e-12) and b["E_var_in"] == 0
    assert (b["mean_x"], b["mean_y"]) == (4, 5) and b["ndist0"] == pytest.approx(1.0)
    assert b["V"] == pytest.approx(0.6) and b["D"] == pytest.approx(0.9)
    # labels: a segment with no outlier pixel is a false positive
    outlier = np.zeros((5, 6), bool)
    outlier[1, 1] = True
    assert false_positive_labels(seg.components, outlier).tolist() == [0, 1]
    # torch input and a map without candidates
    assert np.allclose(segment_features(torch.from_numpy(hand_map()).float()).features, seg.features, atol=1e-5)
    empty = segment_features(np.full((3, 4, 4), 0.01) + np.eye(3)[0][:, None, None])
    assert len(empty) == 0 and empty.features.shape == (0, 43)


# -- the classifier ------------------------------------------------------------------------------------------
def synthetic_image(rng: np.random.Generator, true_size: int, false_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, 24, 24) probabilities with one true anomaly (uniform probabilities, outlier pixels) and one false
    positive (entropy just above the threshold, inlier pixels)."""
    p = np.zeros((3, 24, 24)) + np.array([0.96, 0.02, 0.02])[:, None, None]
    outlier = np.zeros((24, 24), bool)
    ty, tx = rng.integers(0, 24 - true_size), rng.integers(0, 11 - true_size)
    p[:, ty:ty + true_size, tx:tx + true_size] = 1 / 3
    outlier[ty:ty + true_size, tx:tx + true_size] = True
    fy, fx = rng.integers(0, 24 - false_size), rng.integers(13, 24 - false_size)
    p[:, fy:fy + false_size, fx:fx + false_size] = np.array([0.62, 0.3, 0.08])[:, None, None]
    return p, outlier


def fitted_classifier() -> MetaClassifier:
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(8):
        p, outlier = synthetic_image(rng, 4 + i % 3, 3 + i % 2)
        seg = segment_features(p)
        xs.append(seg.features)
        ys.append(false_positive_labels(seg.components, outlier))
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert len(y) == 16 and y.sum() == 8
    return MetaClassifier.fit(x, y)


def test_the_classifier_removes_a_false_positive_and_keeps_a_true_segment():
    clf = fitted_classifier()
    p, outlier = synthetic_image(np.random.default_rng(7), 5, 4)
    probs = torch.from_numpy(p).float()[None]
    score = normalised_entropy(torch.log(probs))
    after = remove_false_positives(score, probs, clf)
    seg = segment_features(p)
    fp = seg.components == seg.components[~outlier].max()  # the candidate without outlier pixels
    assert fp.sum() == 16 and (seg.components[outlier] > 0).all()
    assert torch.all(after[0][torch.from_numpy(fp)] == 0.0)
    assert torch.equal(after[0][torch.from_numpy(~fp)], score[0][torch.from_numpy(~fp)])
    probabilities = clf.false_positive_probability(seg.features)
    true_index = int(seg.components[outlier][0]) - 1
    assert probabilities[true_index] < 0.5 < probabilities[1 - true_index]


def test_torch_solver_minimises_the_liblinear_objective():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 6))
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(scale=0.8, size=80) > 0.3).astype(int)
    coef, intercept = fit_logistic_regression(x, y, C=1.0, solver="torch")
    ref = sklearn.LogisticRegression(solver="liblinear", C=1.0, tol=1e-8).fit(x, y)
    np.testing.assert_allclose(coef, ref.coef_[0], atol=1e-4)
    assert intercept == pytest.approx(float(ref.intercept_[0]), abs=1e-4)
    coef2, intercept2 = fit_logistic_regression(x, y, C=1.0, solver="liblinear")
    np.testing.assert_allclose(coef2, coef, atol=1e-2)


def test_liblinear_without_scikit_learn_is_an_install_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(RPLInputError, match=r"pip install 'rpl\[meta\]'"):
        fit_logistic_regression(np.zeros((2, 1)), np.array([0, 1]), solver="liblinear")
    from rpl.cli.train import main as train_main
    from train_world import make_world, overrides

    world = make_world(tmp_path / "world", n_train=2, n_val=1, n_coco=2)
    args = ["--method", "meta-ood", "--work-dir", str(tmp_path / "run"), "--quiet",
            *sum((["--set", s] for s in overrides(world, steps=1)), []), "--set", "meta-ood.solver=liblinear"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "pip install 'rpl[meta]'" in err and "meta-ood.solver=torch" in err
    assert not (tmp_path / "run" / "last.pt").exists()


# -- the model and its checkpoint -------------------------------------------------------------------------------
def test_save_load_gives_identical_scores(tmp_path):
    from rpl.checkpoint import fingerprint

    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**TINY).eval()
    base = fingerprint(segmenter)
    model = get("meta-ood").build(segmenter, load_config(None, ["method=meta-ood", "segmenter.num_classes=5",
                                                                "meta-ood.threshold=0.2"]))
    with torch.no_grad():
        for p in model.segmenter.parameters():
            p.add_(0.01 * torch.randn_like(p))
    clf = MetaClassifier(len(feature_names(5)))
    g = torch.Generator().manual_seed(1)
    clf.coef.copy_(1e-6 * torch.randn(clf.coef.shape, generator=g, dtype=torch.float64))
    clf.mean.copy_(torch.randn(clf.mean.shape, generator=g, dtype=torch.float64))
    clf.intercept.fill_(5.0)  # every segment a false positive
    model.classifier = clf
    model.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        before = model(x)
        before_meta = before.meta_anomaly
    assert not torch.equal(before_meta, before.anomaly)  # the classifier removed something
    path = get("meta-ood").save(tmp_path / "m.safetensors", model, extra={}, base_fingerprint=base)
    torch.manual_seed(0)
    loaded = rpl.methods.load(path, DeepLabV3Plus(**TINY).eval())
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.anomaly, after.anomaly)
    assert torch.equal(before_meta, after.meta_anomaly)
    assert loaded.threshold == 0.2 and torch.equal(loaded.classifier.coef, clf.coef)
    assert list(get("meta-ood").row_scorers(loaded, None)) == ["meta-ood", "meta-ood+meta"]
    # without a classifier: one row; a wrong base is refused; its tuned segmenter serves as segmenter weights
    loaded.classifier = None
    assert list(get("meta-ood").row_scorers(loaded, None)) == ["meta-ood"]
    with pytest.raises(RPLInputError, match="different base model"):
        get("meta-ood").load(path, DeepLabV3Plus(**TINY))
    from rpl.models.loading import read_state_dict

    assert read_state_dict(path).keys() == model.segmenter.state_dict().keys()


def test_tune_last_block_trains_only_the_logit_block():
    torch.manual_seed(0)
    cfg = load_config(None, ["method=meta-ood", "segmenter.num_classes=5", "meta-ood.tune=last_block"])
    model = get("meta-ood").build(DeepLabV3Plus(**TINY), cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("segmenter.final.") for n in names)
    assert isinstance(model, MetaOoDSegmenter)


def test_whole_outlier_images_are_extra_samples(tmp_path):
    from rpl.data.cityscapes import list_cityscapes
    from rpl.data.coco import load_ood_manifest, prepare_coco_ood
    from rpl.data.training import OutlierExposureDataset
    from train_world import make_world

    world = make_world(tmp_path / "world", n_train=10, n_val=1, n_coco=3)
    prepare_coco_ood(world / "coco", world / "ood", min_size=16)
    base = OutlierExposureDataset(list_cityscapes(world / "cityscapes", "train"), load_ood_manifest(world / "ood"),
                                  (32, 64))
    ds = WithWholeOutlierImages(base, 0.2)
    assert len(ds) == 12 and len(ds.inlier_pairs) == 12
    item = ds[11]
    values = set(item["target"].unique().tolist())
    assert 254 in values and values <= {0, 254, 255} and item["image"].shape == (3, 32, 64)
    assert torch.equal(ds[11]["target"], item["target"])  # reproducible
    void = WithWholeOutlierImages(base, 0.2, "void")[11]["target"]
    assert set(void.unique().tolist()) <= {254, 255}
    assert torch.equal(ds[3]["target"], base[3]["target"])


# -- the generic hook: several rows from one method -----------------------------------------------------------
def test_a_method_with_several_rows_gets_each_row(monkeypatch):
    import rpl.methods as methods
    from rpl.cli.eval import row_label
    from rpl.evaluation import DatasetEntry, EvalOptions, evaluate
    from rpl.methods.base import Method

    class Two(Method):
        name, kind = "two-rows", "post-hoc"

        def scorer(self, model, options):
            return lambda x, logits, out: -logits.float().amax(1)

        def row_scorers(self, model, options):
            return {"two-rows": self.scorer(model, options), "two-rows+neg": lambda x, logits, out: logits.amax(1)}

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    methods.register(Two)
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16), np.uint8)
    label[4:8, 4:8] = 1
    items = [{"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "label": label, "name": "a", "path": "a"}]
    seg = torch.nn.Conv2d(3, 4, 1)
    report = evaluate(seg, [DatasetEntry("toy", items)], options=EvalOptions(methods=("two-rows", "maxlogit"),
                                                                             progress=False, report=True))
    rows = {r["method"]: r for r in report.results}
    assert set(rows) == {"two-rows", "two-rows+neg", "maxlogit"}
    assert rows["two-rows"]["auroc"] == pytest.approx(rows["maxlogit"]["auroc"])
    assert rows["two-rows+neg"]["auroc"] == pytest.approx(1 - rows["two-rows"]["auroc"], abs=1e-3)
    assert set(report.curves["toy"]) == set(rows)
    assert row_label("meta-ood+meta", "meta-ood", "meta-ood") == "meta-ood+meta"
    assert row_label("rpl", "rpl", "meta-ood+rpl") == "meta-ood+rpl"
    assert row_label("energy", "rpl", "meta-ood+rpl") == "energy"
    assert row_label("rplx", "rpl", "pebal+rpl") == "rplx"


# -- end to end ------------------------------------------------------------------------------------------------
def test_meta_ood_trains_fits_its_classifier_and_evaluates_with_rpl_on_top(tmp_path, capsys):
    """rpl-train --method meta-ood (4 steps, classifier fitted on the held-out val set), RPL on its tuned
    segmenter, and one rpl-eval table with the meta-ood, meta-ood+meta and meta-ood+rpl rows."""
    import json

    from rpl.checkpoint import read_metadata
    from rpl.cli.eval import main as eval_main
    from rpl.cli.train import main as train_main
    from test_cli_eval import write_anomaly_set
    from train_world import make_world, overrides

    world = make_world(tmp_path / "world", n_train=6, n_val=3, n_coco=4)
    write_anomaly_set(world / "synthstreets-anomaly", 2, seed=1)
    args = lambda work, *sets, steps=2: ["--work-dir", str(work), "--quiet", *sum(
        (["--set", s] for s in overrides(world, steps=steps, **dict(x.split("=", 1) for x in sets))), [])]
    meta = tmp_path / "meta"
    assert train_main(["--method", "meta-ood", *args(meta, "meta-ood.threshold=0.2", "meta-ood.coco_images=0.5")]) == 0
    best = meta / "best.safetensors"
    info = read_metadata(best)
    assert info["meta-ood"]["classifier"] is True and info["extra"]["meta_classifier"]["segments"] > 0
    summary = json.loads((meta / "summary.json").read_text())
    assert summary["meta_classifier"] == info["extra"]["meta_classifier"]
    on_meta = tmp_path / "meta_rpl"
    assert train_main(args(on_meta, f"segmenter.weights={best}")) == 0
    assert read_metadata(on_meta / "best.safetensors")["extra"]["base_method"] == "meta-ood"
    out = tmp_path / "table.json"
    code = eval_main(["--checkpoint", str(best), "--checkpoint", str(on_meta / "best.safetensors"), "--datasets",
                      "synthstreets-anomaly,cityscapes-val", "--data-root", str(world), "--json", str(out), "--quiet",
                      "--num-workers", "0"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    rows = {(r["dataset"], r["method"]): r for r in doc["results"]}
    for m in ("meta-ood", "meta-ood+meta", "meta-ood+rpl", "entropy"):
        assert rows[("synthstreets-anomaly", m)]["auroc"] is not None, m
    miou = [r for r in doc["results"] if r["dataset"] == "cityscapes-val"]
    assert len(miou) == 1 and "meta-ood + post-hoc, meta-ood+rpl" in miou[0]["method"]
    # the single-checkpoint evaluation gives the same two rows
    single = tmp_path / "single.json"
    assert eval_main(["--checkpoint", str(best), "--datasets", "synthstreets-anomaly", "--data-root", str(world),
                      "--json", str(single), "--quiet", "--num-workers", "0"]) == 0
    alone = {r["method"]: r for r in json.loads(single.read_text())["results"]}
    assert alone["meta-ood+meta"]["ap"] == rows[("synthstreets-anomaly", "meta-ood+meta")]["ap"]
    assert alone["meta-ood"]["ap"] == rows[("synthstreets-anomaly", "meta-ood")]["ap"]
    # RPL on the tuned segmenter, alone: its row carries the base method's name, as in the joint table
    assert eval_main(["--checkpoint", str(on_meta / "best.safetensors"), "--datasets", "synthstreets-anomaly",
                      "--data-root", str(world), "--json", str(single), "--quiet", "--num-workers", "0"]) == 0
    alone = {r["method"]: r for r in json.loads(single.read_text())["results"]}
    assert "rpl" not in alone and alone["meta-ood+rpl"]["ap"] == rows[("synthstreets-anomaly", "meta-ood+rpl")]["ap"]
