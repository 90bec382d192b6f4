"""The evaluation engine: one forward per image, scores equal to a direct computation, metrics as sklearn's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

import rpl
from rpl import evaluation
from rpl.errors import RPLInputError
from rpl.evaluation import (BARE_SEGMENTER, CLOSED_SET, DatasetEntry, EvalOptions, Evaluator, Preprocess, collate,
                            dropout_copy, evaluate)
from rpl.scores import SCORES, entropy, smooth
from rpl.visualize import file_stem, normalise, overlay
from models_for_tests import ToySegmenter, randomize_bn

H, W = 24, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sample(i: int, size=(H, W), label_size=None, void_all=False, anomalies=True):
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    lh, lw = label_size or size
    label = np.zeros((lh, lw), np.uint8)
    if anomalies:
        label[lh // 4: lh // 2, lw // 3: lw // 2] = 1
    label[:2] = 255
    if void_all:
        label[:] = 255
    return {"image": image, "label": label, "name": f"img{i}", "path": f"/virtual/img{i}.png"}


def _entry(samples, name="toy", **kw):
    return DatasetEntry(name, list(samples), **kw)


@pytest.fixture(scope="module")
def wrapped():
    torch.manual_seed(0)
    base = randomize_bn(ToySegmenter(num_classes=5), 0).eval()
    return rpl.wrap(base, head="head", feature="stem", block={"width": 8}).eval()


def _direct(model, sample, preprocess=Preprocess()):
    """Scores of every method computed straight from the model, without the engine."""
    x = torch.from_numpy(sample["image"]).permute(2, 0, 1)[None].float() / 255.0
    if preprocess.resize:
        x = F.interpolate(x, size=preprocess.resize, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.no_grad():
        out = model(x)
    scores = {"rpl": out.anomaly, **{m: f(out.logits) for m, f in SCORES.items()}}
    size = sample["label"].shape
    return {m: F.interpolate(s[:, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
            if s.shape[-2:] != size else s[0].numpy() for m, s in scores.items()}


def _sklearn(samples, scores_per_sample, method):
    s = np.concatenate([sc[method][smp["label"] != 255] for smp, sc in zip(samples, scores_per_sample)])
    y = np.concatenate([smp["label"][smp["label"] != 255] for smp in samples])
    return roc_auc_score(y, s), average_precision_score(y, s)


def test_all_methods_come_from_one_forward_and_equal_sklearn(wrapped):
    samples = [_sample(i) for i in range(3)]
    calls = []
    handle = wrapped.segmenter.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        report = evaluate(wrapped, [_entry(samples)],
                          options=EvalOptions(methods=("rpl", "energy", "msp", "maxlogit", "entropy"),
                                              pixel_mode="exact", progress=False))
    finally:
        handle.remove()
    assert calls == [1, 1, 1]  # one forward per image, whatever the number of methods
    direct = [_direct(wrapped, s) for s in samples]
    assert [r["method"] for r in report.results] == ["rpl", "energy", "msp", "maxlogit", "entropy"]
    for row in report.results:
        auroc, ap = _sklearn(samples, direct, row["method"])
        assert row["auroc"] == pytest.approx(auroc, abs=1e-9)
        assert row["ap"] == pytest.approx(ap, abs=1e-9)
        assert row["n_images"] == 3 and row["n_empty_images"] == 0
        assert row["n_anomaly"] == sum(int((s["label"] == 1).sum()) for s in samples)
    rpl_row, energy_row = report.results[0], report.results[1]
    assert rpl_row["auroc"] != energy_row["auroc"]  # the add-on's map, not the closed-set energy

    calls.clear()
    handle = wrapped.segmenter.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        batched = evaluate(wrapped, [_entry(samples)], options=EvalOptions(
            methods=("rpl", "energy"), pixel_mode="exact", batch_size=2, progress=False))
    finally:
        handle.remove()
    assert calls == [2, 1]
    for row, reference in zip(batched.results, report.results):
        assert row["auroc"] == pytest.approx(reference["auroc"], abs=1e-4)  # batched convs round differently


def test_amp_forward_scores_in_float32(wrapped, monkeypatch):
    samples = [_sample(i) for i in range(2)]
    full = evaluate(wrapped, [_entry(samples)], options=EvalOptions(methods=("rpl", "msp"), progress=False))
    seen = []
    original = evaluation.resize_scores

    def recording(scores, size):
        out = original(scores, size)
        seen.append((scores.dtype, out.dtype))
        return out

    forward = Evaluator._forward
    logit_dtypes = []

    def recording_forward(self, x):
        logits, out = forward(self, x)
        logit_dtypes.append(logits.dtype)
        return logits, out

    monkeypatch.setattr(evaluation, "resize_scores", recording)
    monkeypatch.setattr(Evaluator, "_forward", recording_forward)
    amp = evaluate(wrapped, [_entry(samples)], options=EvalOptions(methods=("rpl", "msp"), amp=True, progress=False))
    assert logit_dtypes and set(logit_dtypes) == {torch.bfloat16}  # the forward did run in bf16
    assert len(seen) == 4 and all(dtype == torch.float32 for pair in seen for dtype in pair)  # scores in fp32
    for a, f in zip(amp.results, full.results):
        assert a["auroc"] == pytest.approx(f["auroc"], abs=0.05)  # bf16 logits, same ranking up to rounding


def test_batches_of_mixed_sizes_and_resize_give_native_label_resolution(wrapped):
    # labels at a different size than the network input: scores are resized back (bilinear)
    samples = [_sample(0, size=(H, W)), _sample(1, size=(2 * H, 2 * W)), _sample(2, size=(H, W))]
    pre = Preprocess(resize=(32, 48))
    report = evaluate(wrapped, [_entry(samples)], preprocess=pre,
                      options=EvalOptions(methods=("energy",), pixel_mode="exact", batch_size=2, progress=False))
    direct = [_direct(wrapped, s, pre) for s in samples]
    auroc, ap = _sklearn(samples, direct, "energy")
    assert report.results[0]["auroc"] == pytest.approx(auroc, abs=1e-6)
    assert report.results[0]["ap"] == pytest.approx(ap, abs=1e-6)
    assert report.results[0]["n_pixels"] == sum(int((s["label"] != 255).sum()) for s in samples)


def test_collate_stacks_equal_sizes_and_splits_mixed_ones():
    same = collate([_sample(0), _sample(1)])
    assert len(same["groups"]) == 1 and same["groups"][0]["image"].shape == (2, H, W, 3)
    mixed = collate([_sample(0), _sample(1, size=(8, 8))])
    assert [g["image"].shape[1:3] for g in mixed["groups"]] == [(H, W), (8, 8)]
    assert collate([{"error": "bad file x.png"}, _sample(0)]) == {"error": "bad file x.png"}


def test_pixel_modes_and_fpr_rule_reach_the_metrics(wrapped):
    from rpl.metrics import PixelMetrics

    samples = [_sample(i) for i in range(2)]
    direct = [_direct(wrapped, s) for s in samples]
    for mode, rule in (("streaming", "first"), ("smiyc", "first"), ("exact", "closest")):
        row = evaluate(wrapped, [_entry(samples)], options=EvalOptions(
            methods=("msp",), pixel_mode=mode, fpr_rule=rule, progress=False)).results[0]
        reference = PixelMetrics(mode=mode, fpr_rule=rule)
        for smp, sc in zip(samples, direct):
            reference.update(sc["msp"], smp["label"])
        expected = reference.compute()
        for key in ("auroc", "ap", "fpr95"):
            assert row[key] == pytest.approx(expected[key], abs=1e-9), (mode, key)


def test_smooth_baselines_blurs_post_hoc_scores(wrapped):
    samples = [_sample(i) for i in range(2)]
    plain = evaluate(wrapped, [_entry(samples)], options=EvalOptions(methods=("energy",), pixel_mode="exact",
                                                                     progress=False)).results[0]
    blurred = evaluate(wrapped, [_entry(samples)], options=EvalOptions(methods=("energy",), pixel_mode="exact",
                                                                       smooth_baselines=True,
                                                                       progress=False)).results[0]
    direct = [{"energy": smooth(torch.from_numpy(_direct(wrapped, s)["energy"])[None])[0].numpy()} for s in samples]
    auroc, ap = _sklearn(samples, direct, "energy")
    assert blurred["auroc"] == pytest.approx(auroc, abs=1e-9) and blurred["ap"] == pytest.approx(ap, abs=1e-9)
    assert blurred["auroc"] != plain["auroc"]


def test_empty_images_are_counted_and_undefined_datasets_give_nulls(wrapped):
    samples = [_sample(0), _sample(1, void_all=True)]
    report = evaluate(wrapped, [_entry(samples, "partly-void"),
                                _entry([_sample(2, anomalies=False)], "no-anomaly")],
                      options=EvalOptions(methods=("energy",), progress=False))
    first, second = report.results
    assert first["n_empty_images"] == 1 and first["auroc"] is not None
    assert report.datasets["partly-void"]["n_empty_images"] == 1
    assert second["auroc"] is None and second["ap"] is None and second["fpr95"] is None
    assert any("'no-anomaly' has no anomaly pixel" in n and "undefined" in n for n in report.notes)
    assert any("1 of 2 image(s) have no valid pixel" in n for n in report.notes)
    assert report.defined()
    only_undefined = evaluate(wrapped, [_entry([_sample(2, anomalies=False)])],
                              options=EvalOptions(methods=("energy",), progress=False))
    assert not only_undefined.defined()


def test_closed_set_miou_equals_confusion_of_bare_segmenter(wrapped, monkeypatch):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(2):
        s = _sample(i)
        s["label"] = rng.integers(0, 5, (H, W)).astype(np.uint8)
        s["label"][0] = 255
        samples.append(s)
    report = evaluate(wrapped, [_entry(samples, "classes", track=None, class_labels=True)],
                      options=EvalOptions(methods=("rpl", "energy"), progress=False))
    row, bare_row = report.results
    assert row["method"] == CLOSED_SET and row["identical_to_segmenter"] is True
    assert bare_row["method"] == BARE_SEGMENTER and bare_row["identical_to_segmenter"] is None
    conf = np.zeros((5, 5), np.int64)
    for s in samples:
        x = (torch.from_numpy(s["image"]).permute(2, 0, 1)[None].float() / 255 -
             torch.tensor(Preprocess().mean).view(1, 3, 1, 1)) / torch.tensor(Preprocess().std).view(1, 3, 1, 1)
        with torch.no_grad():
            pred = wrapped.segmenter(x).argmax(1)[0].numpy()  # the bare segmenter
        valid = s["label"] != 255
        np.add.at(conf, (s["label"][valid], pred[valid]), 1)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    assert row["miou"] == pytest.approx(np.mean(inter[union > 0] / union[union > 0]), abs=1e-12)
    assert bare_row["miou"] == row["miou"] and bare_row["iou_per_class"] == row["iou_per_class"]

    # The bare row is measured on the bare segmenter's own logits, not copied from the wrapped ones.
    with monkeypatch.context() as m:
        m.setattr(evaluation, "extract_logits", lambda out, *rule: torch.roll(out, 1, dims=1))  # only the bare path
        row, bare_row = evaluate(wrapped, [_entry(samples, "classes", track=None, class_labels=True)],
                                 options=EvalOptions(methods=("energy",), progress=False)).results
    assert row["identical_to_segmenter"] is False and row["miou"] != bare_row["miou"]


def test_mcdropout_uses_a_copy_with_only_dropout_in_train_mode(wrapped):
    clone = dropout_copy(wrapped.segmenter)
    assert not wrapped.segmenter.training and all(not m.training for m in wrapped.segmenter.modules())
    train_modules = [type(m).__name__ for m in clone.modules() if m.training]
    assert train_modules == ["Dropout2d"]
    assert not clone.head[0]._forward_pre_hooks and not clone.head[-1]._forward_hooks  # RPL's hooks left behind
    x = torch.randn(4, 3, H, W)
    with torch.no_grad():
        assert not torch.equal(clone(x), clone(x))  # stochastic (4 x 16 channels dropped at random)
        assert torch.equal(wrapped.segmenter(x), wrapped.segmenter(x))  # the frozen model is not

    samples = [_sample(i) for i in range(2)]
    opts = EvalOptions(methods=("mcdropout",), mc_samples=3, pixel_mode="exact", progress=False)
    first = evaluate(wrapped, [_entry(samples)], options=opts).results[0]
    again = evaluate(wrapped, [_entry(samples)], options=opts).results[0]
    assert first["auroc"] == again["auroc"]  # seeded

    torch.manual_seed(opts.seed)
    direct = []
    for s in samples:
        x = (torch.from_numpy(s["image"]).permute(2, 0, 1)[None].float() / 255 -
             torch.tensor(Preprocess().mean).view(1, 3, 1, 1)) / torch.tensor(Preprocess().std).view(1, 3, 1, 1)
        with torch.no_grad():
            direct.append({"mc": (sum(entropy(clone(x)) for _ in range(3)) / 3)[0].numpy()})
    auroc, _ = _sklearn(samples, direct, "mc")
    assert first["auroc"] == pytest.approx(auroc, abs=1e-9)


def test_mcdropout_without_dropout_and_rpl_without_addon_are_refused(wrapped):
    from rpl.models import DeepLabV3Plus

    no_dropout = DeepLabV3Plus("resnet18", num_classes=5, aspp_width=8, decoder_width=8)
    with pytest.raises(RPLInputError, match="mcdropout needs a segmenter with dropout"):
        Evaluator(no_dropout, EvalOptions(methods=("mcdropout",)))
    with pytest.raises(RPLInputError, match="rpl needs an RPL add-on"):
        Evaluator(wrapped.segmenter, EvalOptions(methods=("rpl",)))
    with pytest.raises(RPLInputError, match="unknown method 'odin'"):
        Evaluator(wrapped, EvalOptions(methods=("odin",)))
    with pytest.raises(RPLInputError, match="--fpr-rule closest cannot be combined"):
        Evaluator(wrapped, EvalOptions(pixel_mode="smiyc", fpr_rule="closest"))


def test_bad_file_in_a_worker_becomes_one_paragraph_naming_dataset_and_file(wrapped, tmp_path):
    from rpl.data.anomaly import MaskFolderDataset
    from rpl.data.io import write_image, write_label

    for i in range(2):
        s = _sample(i)
        write_image(tmp_path / "images" / f"f{i}.png", s["image"])
        write_label(tmp_path / "labels_masks" / f"f{i}.png", s["label"])
    (tmp_path / "images" / "f1.png").write_bytes(b"\x89PNG broken")
    entry = DatasetEntry("mine", MaskFolderDataset(tmp_path))
    with pytest.raises(RPLInputError) as err:
        evaluate(wrapped, [entry], options=EvalOptions(methods=("energy",), num_workers=1, progress=False))
    message = str(err.value)
    assert message.startswith("Dataset 'mine': Image file") and "f1.png" in message
    assert "Traceback" not in message


def test_preprocess_options_and_record():
    img = torch.full((1, 4, 6, 3), 255, dtype=torch.uint8)
    x = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(img)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    raw = Preprocess(mean=None, std=None, resize=(8, 12))
    assert raw(img).shape == (1, 3, 8, 12) and float(raw(img).max()) == 1.0
    record = raw.to_dict()
    assert record["normalize"] is False and record["resize"] == [8, 12]
    assert "bilinear" in record["score_resize"]
    with pytest.raises(RPLInputError, match="both mean and std"):
        Preprocess(mean=(0.5, 0.5, 0.5), std=None)
    with pytest.raises(RPLInputError, match="positive"):
        Preprocess(std=(0.1, 0.0, 0.1))


def test_overlay_blends_inside_roi_and_outlines_the_anomaly():
    image = np.full((20, 30, 3), 200, np.uint8)
    score = np.tile(np.linspace(0, 1, 30, dtype=np.float32), (20, 1))
    label = np.zeros((20, 30), np.uint8)
    label[5:12, 8:16] = 1
    label[:, :4] = 255
    out = overlay(image, score, label)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[:, :4] == image[:, :4]).all()  # outside the ROI: the image unchanged
    inside = out[15:, 10]
    assert not (inside == 200).all() and (inside.astype(int) >= 100).all()  # image / 2 + colour / 2
    assert (out[5, 8:16] == (0, 255, 0)).all()  # the outline of the ground truth
    assert (out[8, 10] != (0, 255, 0)).any()  # not filled
    n = normalise(score, label != 255)
    assert n.min() == 0.0 and n.max() == 1.0
    assert file_stem("frankfurt/frankfurt_000000_000294") == "frankfurt__frankfurt_000000_000294"


def test_progress_bar_reports_images_per_second(wrapped):
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    evaluate(wrapped, [_entry([_sample(i) for i in range(3)], "speedy")], console=console,
             options=EvalOptions(methods=("energy",), progress=True))
    shown = buffer.getvalue()
    assert "speedy" in shown and "3/3" in shown and "img/s" in shown


def test_compiled_forward_scores_like_eager(wrapped):
    """--compile: the same metrics as the eager forward (aot_eager here; inductor only reorders rounding)."""
    samples = [_sample(i) for i in range(2)]
    options = dict(methods=("rpl", "energy"), pixel_mode="exact", progress=False)
    eager = evaluate(wrapped, [_entry(samples)], options=EvalOptions(**options))
    compiled = evaluate(wrapped, [_entry(samples)],
                        options=EvalOptions(**options, compile="default", compile_backend="aot_eager"))
    for a, b in zip(eager.results, compiled.results):
        assert a["method"] == b["method"]
        assert b["auroc"] == pytest.approx(a["auroc"], abs=1e-6) and b["ap"] == pytest.approx(a["ap"], abs=1e-6)
    classes = [dict(s, label=np.where(s["label"] == 255, 255, s["label"] % 5).astype(np.uint8)) for s in samples]
    row, _ = evaluate(wrapped, [_entry(classes, "classes", track=None, class_labels=True)],
                    options=EvalOptions(**options, compile="default", compile_backend="aot_eager")).results
    assert row["identical_to_segmenter"] is True
    with pytest.raises(RPLInputError, match="--compile"):
        EvalOptions(compile="fastest").check()
