"""REAL: closed-set logits exact on several segmenter families, every loss term against a plain
implementation written here from docs/methods.md, the calibration's effect, checkpoints, a tiny run."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

import rpl
from rpl.config import load_config
from rpl.errors import RPLInputError
from rpl.methods import get
from rpl.methods.real import (REALOptions, REALSegmenter, calibration_loss, open_set_ce, real_loss, real_wrap)
from rpl.models import DeepLabV3Plus
from models_for_tests import ToySegmenter, randomize_bn

pytestmark = pytest.mark.usefixtures("one_torch_thread")
K = 5
TINY = {"backbone": "resnet18", "num_classes": K, "output_stride": 16, "aspp_width": 8, "decoder_width": 8}


# -- plain reference implementations -----------------------------------------------------------
def _softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [v / sum(e) for v in e]


def plain_open_set_ce(z: torch.Tensor, t: torch.Tensor, outlier_weight: float) -> float:
    """Weighted CE over K+1 classes: 254 -> class K (weight outlier_weight), 255 skipped, weighted mean."""
    b, k1, h, w = z.shape
    num = den = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                label = int(t[i, y, x])
                if label == 255:
                    continue
                c = k1 - 1 if label == 254 else label
                weight = outlier_weight if c == k1 - 1 else 1.0
                p = _softmax([float(v) for v in z[i, :, y, x]])
                num += -weight * math.log(p[c])
                den += weight
    return num / den


def plain_calibration(z: torch.Tensor, t: torch.Tensor, use_prediction: bool = False) -> float:
    """On known-labelled pixels: drop the label's (or argmax z0's) logit, -log p(K) among the rest, mean."""
    b, k1, h, w = z.shape
    terms = []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                label = int(t[i, y, x])
                if label >= k1 - 1:  # 254 (outlier, K in the open-set CE) and 255 (void) are left out
                    continue
                values = [float(v) for v in z[i, :, y, x]]
                hidden = max(range(k1 - 1), key=lambda c: values[c]) if use_prediction else label
                kept = [v for c, v in enumerate(values) if c != hidden]  # the unknown logit is the last one
                terms.append(-math.log(_softmax(kept)[-1]))
    return sum(terms) / len(terms)


def batch(with_outliers: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, K + 1, 6, 7, generator=g) * 3.0
    t = torch.randint(0, K, (2, 6, 7), generator=g)
    t[:, -1] = 255
    if with_outliers:
        t[1, 1:4, 2:5] = 254
    return z, t


# -- losses --------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_outliers", [False, True])
@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_open_set_ce_equals_plain_loops(with_outliers, weight):
    z, t = batch(with_outliers)
    assert float(open_set_ce(z, t, weight)) == pytest.approx(plain_open_set_ce(z, t, weight), rel=1e-5)


@pytest.mark.parametrize("with_outliers", [False, True])
@pytest.mark.parametrize("labels", ["target", "prediction"])
def test_calibration_equals_plain_loops(with_outliers, labels):
    z, t = batch(with_outliers)
    expected = plain_calibration(z, t, use_prediction=labels == "prediction")
    assert float(calibration_loss(z, t, labels)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("with_outliers", [False, True])
def test_total_is_ce_plus_weighted_calibration(with_outliers):
    z, t = batch(with_outliers)
    opts = REALOptions(outlier_weight=0.3, calibration_weight=0.2)
    total, parts = real_loss(z[:, :K], z[:, K:], t, opts)
    ce, cal = plain_open_set_ce(z, t, 0.3), plain_calibration(z, t)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(parts["calibration"]) == pytest.approx(cal, rel=1e-5)
    assert float(total) == pytest.approx(ce + 0.2 * cal, rel=1e-5)
    with pytest.raises(RPLInputError, match="real.calibration_labels"):
        calibration_loss(z, t, "labels")


def test_all_void_gives_graph_connected_zeros():
    z, t = batch(False)
    z.requires_grad_(True)
    t[:] = 255
    loss, _ = real_loss(z[:, :K], z[:, K:], t)
    loss.backward()
    assert float(loss.detach()) == 0.0 and z.grad is not None


@pytest.mark.parametrize("calibration_weight", [0.1, 0.0])
def test_calibration_puts_the_unknown_logit_in_second_place(calibration_weight):
    """Frozen logits with a clear winner (the label); a free unknown logit per pixel trained with REAL's
    loss ends between the winner and the rest with the calibration term, and last without it."""
    g = torch.Generator().manual_seed(0)
    closed = 0.5 * torch.randn(2, K, 8, 8, generator=g)
    target = torch.randint(0, K, (2, 8, 8), generator=g)
    closed = closed + 6.0 * torch.nn.functional.one_hot(target, K).permute(0, 3, 1, 2)
    unknown = torch.zeros(2, 1, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([unknown], lr=0.1)
    for _ in range(300):
        loss, _ = real_loss(closed, unknown, target, REALOptions(calibration_weight=calibration_weight))
        opt.zero_grad()
        loss.backward()
        opt.step()
    rank = (closed > unknown.detach()).sum(1)  # 0: first place, 1: second place, K: last place
    if calibration_weight:
        assert (rank == 1).float().mean() > 0.95
    else:
        assert (rank == K).float().mean() > 0.95


# -- closed-set logits exact on segmenter families ------------------------------------------------
def _bare(model, x):
    return rpl.wrapping.extract_logits(model(x))  # a tensor, torchvision's dict, HF's output object


def _segformer():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(num_labels=19, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                                          decoder_hidden_size=32, num_attention_heads=[1, 1, 1, 1])
    return transformers.SegformerForSemanticSegmentation(config), {}


CASES = {
    "tv-deeplabv3-mobilenetv3": lambda: (deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                       num_classes=19, aux_loss=True), {}),
    "dlv3plus-resnet18": lambda: (DeepLabV3Plus("resnet18", num_classes=19, aspp_width=32, decoder_width=32), {}),
    "toy-named": lambda: (ToySegmenter(num_classes=5), {"head": "head[:]", "feature": "stem"}),
    "hf-segformer": _segformer,
}


@pytest.mark.parametrize("source", ["d", "deep"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_set_identical_before_and_after_training(case, source):
    base, names = CASES[case]()
    randomize_bn(base)
    base.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = _bare(base, x).clone()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = real_wrap(base, source, classifiers=3, width=16, **names)
    assert isinstance(model, REALSegmenter)
    model.train()
    assert not base.training and all(not m.training for m in base.modules())
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # over *all* parameters, as a careless caller would
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, expected.shape[1], (2, *expected.shape[-2:]), generator=g)
    target[:, : target.shape[1] // 3, : target.shape[2] // 3] = 254
    target[:, -1] = 255
    for _ in range(3):
        out = model(x)
        loss, _ = real_loss(out.logits, out.unknown, target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in base.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
        opt.step()
    for key, value in before.items():
        assert torch.equal(value, base.state_dict()[key]), key  # BN buffers included
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out.logits, expected)
    assert out.unknown.shape == (2, 1, *expected.shape[-2:])
    assert out.anomaly.shape == (2, *expected.shape[-2:])
    torch.testing.assert_close(out.anomaly, torch.softmax(out.all_logits.float(), 1)[:, -1])
    assert torch.equal(_bare(base, x), expected)  # the bare model still works alone
    assert model.unwrap() is base and torch.equal(_bare(base, x), expected)


def test_unknown_logit_is_the_max_of_the_upsampled_classifiers():
    torch.manual_seed(0)
    base = ToySegmenter(num_classes=5).eval()
    model = real_wrap(base, "d", classifiers=2, head="head[:]")
    x = torch.randn(1, 3, 32, 48)
    seen = {}
    model.addon.register_forward_hook(lambda m, a, o: seen.setdefault("r", o))
    with torch.no_grad():
        out = model(x)
        up = torch.nn.functional.interpolate(seen["r"], size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.unknown, up.max(1, keepdim=True).values)
    with pytest.raises(RPLInputError, match="real.classifiers <= 5"):
        real_wrap(ToySegmenter(num_classes=5).eval(), "d", classifiers=6, head="head[:]")


def test_only_the_redundancy_head_trains_and_blur_option():
    torch.manual_seed(0)
    seg = DeepLabV3Plus(**TINY).eval()
    cfg = load_config(None, ["method=real", "real.head=deep", "real.blur=true", "segmenter.num_classes=5"])
    method = get("real")
    model = method.build(seg, cfg)
    trainable = {id(p) for g in method.parameter_groups(model, cfg.optim) for p in g["params"]}
    assert trainable == {id(p) for p in model.addon.parameters()} and model.addon.block is not None
    assert all(not p.requires_grad for p in seg.parameters())
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    p = torch.softmax(out.all_logits.float(), 1)[:, -1]
    torch.testing.assert_close(out.anomaly, rpl.scores.smooth(p, 7, 1.0))
    # what rpl-export traces gives the same map, blurred (here) and not
    from rpl.evaluation import EvalOptions

    options = EvalOptions(methods=("real",), progress=False)
    for smoothing in ((7, 1.0), None):
        model.smoothing = smoothing
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))
        torch.testing.assert_close(method.export_scorer(model, options)(None, out.logits, out),
                                   method.scorer(model, options)(None, out.logits, out), rtol=0, atol=1e-5)
    with pytest.raises(RPLInputError, match="real.head"):
        load_config(None, ["real.head=f"])


# -- checkpoints --------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["d", "deep"])
def test_save_load_identical_scores_and_rpl_files_are_not_interchangeable(tmp_path, source):
    from rpl.checkpoint import fingerprint, read_metadata

    torch.manual_seed(0)
    seg = DeepLabV3Plus(**TINY).eval()
    model = real_wrap(seg, source, classifiers=3, width=8, smoothing=(7, 1.0))
    with torch.no_grad():
        for p in model.addon.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    path = get("real").save(tmp_path / "real.safetensors", model, extra={})
    meta = read_metadata(path)
    assert meta["method"] == "real" and meta["base_fingerprint"] == fingerprint(seg)
    assert meta["real"]["source"] == source and meta["real"]["smoothing"] == [7, 1.0]
    torch.manual_seed(0)
    fresh = DeepLabV3Plus(**TINY).eval()
    loaded = rpl.methods.load(path, fresh)
    assert isinstance(loaded, REALSegmenter) and not loaded.training
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.unknown, after.unknown)
    assert torch.equal(before.anomaly, after.anomaly)
    # REAL and RPL files do not load with each other's loader; another base is refused
    with pytest.raises(RPLInputError, match="holds method 'real'.*method 'rpl'"):
        rpl.load(path, DeepLabV3Plus(**TINY))
    rpl_path = rpl.save(tmp_path / "rpl.safetensors", rpl.wrap(DeepLabV3Plus(**TINY).eval(), block={"width": 8}))
    with pytest.raises(RPLInputError, match="holds method 'rpl'.*method 'real'"):
        get("real").load(rpl_path, DeepLabV3Plus(**TINY))
    other = DeepLabV3Plus(**TINY).eval()
    with pytest.raises(RPLInputError, match="different base model"):
        get("real").load(path, other)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in other.modules())
    with pytest.raises(RPLInputError, match="REAL model"):
        get("real").save(tmp_path / "x.safetensors", rpl.wrap(DeepLabV3Plus(**TINY).eval(), block={"width": 8}))


def test_bad_real_metadata_is_an_input_error(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    path = get("real").save(tmp_path / "real.safetensors", real_wrap(DeepLabV3Plus(**TINY).eval()), extra={})
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    info = json.loads(meta["real"])
    info["source"] = "f"
    meta["real"] = json.dumps(info)
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(RPLInputError, match="metadata field real.source"):
        rpl.methods.load(tmp_path / "bad.safetensors", DeepLabV3Plus(**TINY))


# -- end to end: rpl-train --method real, rpl-eval, and the loaders' refusals (exit 2) -----------------
def test_train_real_evaluate_and_refuse_rpl_loaders(tmp_path, capsys):
    import json

    from rpl.cli.eval import main as eval_main
    from rpl.cli.train import main as train_main
    from test_cli_eval import write_anomaly_set
    from train_world import make_world, overrides

    world = make_world(tmp_path / "world", n_train=4, n_val=2)
    write_anomaly_set(world / "synthstreets-anomaly", 2, seed=1)
    work = tmp_path / "real"
    sets = sum((["--set", s] for s in overrides(world, steps=2, **{"data.paste_prob": 1.0})), [])
    assert train_main(["--method", "real", "--work-dir", str(work), "--quiet", *sets]) == 0
    ckpt = work / "best.safetensors"
    assert rpl.checkpoint.read_metadata(ckpt)["method"] == "real"
    out = tmp_path / "table.json"
    assert eval_main(["--checkpoint", str(ckpt), "--datasets", "synthstreets-anomaly,cityscapes-val", "--data-root",
                      str(world), "--json", str(out), "--quiet", "--num-workers", "0"]) == 0
    rows = {(r["dataset"], r["method"]): r for r in json.loads(out.read_text())["results"]}
    assert 0.0 <= rows[("synthstreets-anomaly", "real")]["auroc"] <= 1.0
    assert ("synthstreets-anomaly", "energy") in rows
    assert rows[("cityscapes-val", "closed-set")]["identical_to_segmenter"] is True
    assert rows[("cityscapes-val", "closed-set")]["miou"] == rows[("cityscapes-val", "bare segmenter")]["miou"]
    # a REAL checkpoint is no RPL add-on, and an RPL run cannot resume a REAL one: exit 2, both named
    assert eval_main(["--checkpoint", str(ckpt), "--methods", "rpl", "--datasets", "synthstreets-anomaly",
                      "--data-root", str(world), "--quiet"]) == 2
    assert "holds method 'real'" in capsys.readouterr().err
    assert train_main(["--method", "rpl", "--resume", "--work-dir", str(work), "--quiet", *sets]) == 2
    err = capsys.readouterr().err
    assert "method 'real'" in err and "'rpl'" in err
