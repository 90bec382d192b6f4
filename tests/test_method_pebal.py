"""PEBAL: every loss term against a plain implementation written here from the formulas in
docs/methods.md, the abstention channel, which parameters train, checkpoints, and a tiny run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rpl
from rpl.config import load_config
from rpl.errors import RPLInputError
from rpl.methods import get
from rpl.methods.pebal import (PEBALOptions, PEBALSegmenter, energy_reward, gambler_loss, pebal_energy_loss,
                               pebal_loss, tuned_parameters)
from rpl.models import DeepLabV3Plus

TINY = {"backbone": "resnet18", "num_classes": 5, "output_stride": 16, "aspp_width": 8, "decoder_width": 8}
K = 5


# -- plain reference implementations -----------------------------------------------------------
def plain_blur(x: torch.Tensor) -> torch.Tensor:
    """7x7 Gaussian (sigma 1) with reflect padding, as an explicit normalised kernel."""
    r = torch.arange(-3, 4, dtype=torch.float64)
    g = torch.exp(-(r ** 2) / 2.0)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).float()
    padded = F.pad(x[:, None], (3, 3, 3, 3), mode="reflect")
    return F.conv2d(padded, kernel[None, None])[:, 0]


def plain_lse(z: torch.Tensor) -> torch.Tensor:  # over channel dim, no max trick (small test logits)
    return torch.log(torch.exp(z.double()).sum(1)).float()


def plain_gambler(z: torch.Tensor, t: torch.Tensor, with_outliers: bool, ood_reg: float = 0.1) -> float:
    b, k1, h, w = z.shape
    reward = plain_blur(plain_lse(z[:, :-1]) ** 2)
    in_terms, out_terms = [], []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                p = [math.exp(float(v)) for v in z[i, :, y, x]]
                total = sum(p)
                p = [v / total for v in p]
                a = p[-1] / float(reward[i, y, x])
                label = int(t[i, y, x])
                if label == 254:
                    if with_outliers:
                        out_terms += [math.log(max(p[c] + a, 1e-7)) for c in range(k1 - 1)]
                elif label != 255:
                    in_terms.append(math.log(p[label] + a))
    loss = -sum(in_terms) / len(in_terms) if in_terms else 0.0
    if with_outliers and out_terms:
        loss -= ood_reg * sum(out_terms) / len(out_terms)
    return loss


def plain_energy_loss(z: torch.Tensor, t: torch.Tensor) -> float:
    e = -plain_lse(z[:, :-1])
    b, h, w = e.shape
    e_in = [float(e[i, y, x]) for i in range(b) for y in range(h) for x in range(w) if int(t[i, y, x]) not in (254, 255)]
    e_out = [float(e[i, y, x]) for i in range(b) for y in range(h) for x in range(w) if int(t[i, y, x]) == 254]
    hinge_in = sum(max(0.0, v + 12.0) ** 2 for v in e_in) / len(e_in)
    if e_out:
        hinge_out = sum(max(0.0, -6.0 - v) ** 2 for v in e_out) / len(e_out)
        loss = 0.5 * (hinge_in + hinge_out) + 5e-4 * math.sqrt(sum(v * v for v in e_out))
    else:
        loss = hinge_in
    smooth = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if y + 1 < h:
                    smooth += (float(e[i, y + 1, x]) - float(e[i, y, x])) ** 2
                if x + 1 < w:
                    smooth += (float(e[i, y, x + 1]) - float(e[i, y, x])) ** 2
    return loss + 3e-6 * smooth / 2


def batch(with_outliers: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, K + 1, 6, 7, generator=g) * 3.0
    t = torch.randint(0, K, (2, 6, 7), generator=g)
    t[:, -1] = 255
    if with_outliers:
        t[1, 1:4, 2:5] = 254  # only the second image holds outliers
    return z, t


# -- losses --------------------------------------------------------------------------------------
def test_reward_is_blurred_squared_lse():
    z, _ = batch(False)
    torch.testing.assert_close(energy_reward(z), plain_blur(plain_lse(z[:, :-1]) ** 2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("with_outliers", [False, True])
def test_gambler_loss_equals_plain_loops(with_outliers):
    z, t = batch(with_outliers)
    for part in (False, True):
        got = float(gambler_loss(z, t, part))
        assert got == pytest.approx(plain_gambler(z, t, part), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("with_outliers", [False, True])
def test_energy_loss_equals_plain_loops(with_outliers):
    z, t = batch(with_outliers)
    assert float(pebal_energy_loss(z, t)) == pytest.approx(plain_energy_loss(z, t), rel=1e-5)


@pytest.mark.parametrize("with_outliers", [False, True])
def test_total_splits_the_batch_by_images_with_outliers(with_outliers):
    z, t = batch(with_outliers)
    has = [bool((t[i] == 254).any()) for i in range(2)]
    g_in = plain_gambler(z[[i for i in range(2) if not has[i]]], t[[i for i in range(2) if not has[i]]], False) \
        if not all(has) else 0.0
    g_out = plain_gambler(z[[i for i in range(2) if has[i]]], t[[i for i in range(2) if has[i]]], True) \
        if any(has) else 0.0
    total, parts = pebal_loss(z, t)
    assert float(parts["gambler_in"]) == pytest.approx(g_in, rel=1e-4, abs=1e-6)
    assert float(parts["gambler_out"]) == pytest.approx(g_out, rel=1e-4, abs=1e-6)
    expected = g_in + g_out + 0.1 * plain_energy_loss(z, t)
    assert float(total) == pytest.approx(expected, rel=1e-4)
    assert with_outliers == (float(parts["gambler_out"]) != 0.0)


def test_empty_parts_are_graph_connected_zeros():
    z, t = batch(False)
    z.requires_grad_(True)
    t[:] = 255
    loss, _ = pebal_loss(z, t)
    loss.backward()
    assert torch.isfinite(loss) and z.grad is not None


# -- the model -----------------------------------------------------------------------------------
@pytest.fixture()
def segmenter():
    torch.manual_seed(0)
    return DeepLabV3Plus(**TINY).eval()


def test_abstention_channel_leaves_the_k_logits_unchanged(segmenter):
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        reference = segmenter(x)
        model = PEBALSegmenter(segmenter, "final.6").eval()
        out = model(x)
    assert out.logits.shape == reference.shape and out.abstention.shape == (2, 1, 32, 48)
    assert torch.equal(out.logits, reference)
    assert torch.equal(segmenter(x), reference)  # the hook acts only inside the PEBAL forward
    w = model.abstention.weight
    assert w.shape == (1, 8, 1, 1) and float(w.abs().sum()) > 0 and float(model.abstention.bias) == 0.0
    assert torch.equal(out.anomaly, rpl.scores.smooth(rpl.scores.energy(reference)))


@pytest.mark.parametrize("tune, prefixes", [("all", ("segmenter.", "abstention.")),
                                            ("last_block", ("segmenter.final.", "abstention."))])
def test_gradients_reach_exactly_the_tuned_parameters(segmenter, tune, prefixes):
    cfg = load_config(None, ["method=pebal", f"pebal.tune={tune}", "segmenter.num_classes=5"])
    model = get("pebal").build(segmenter, cfg)
    model.train()
    z, t = batch(True)
    out = model(torch.randn(2, 3, 6 * 16, 7 * 16))
    target = F.interpolate(t[:, None].float(), size=out.logits.shape[-2:], mode="nearest")[:, 0].long()
    loss, _ = pebal_loss(out.all_logits, target)
    loss.backward()
    assert model.abstention.weight.grad.abs().sum() > 0 and model.segmenter.final[6].weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        expected = name.startswith(prefixes)
        assert (p.grad is not None) == expected, name  # (timm zero-inits some BN gammas: grads may be 0)
        assert p.requires_grad == expected, name
    names = {id(p) for p in tuned_parameters(model, tune)}
    assert names == {id(p) for n, p in model.named_parameters() if n.startswith(prefixes)}
    with pytest.raises(RPLInputError, match="pebal.tune"):
        tuned_parameters(model, "everything")


def test_save_load_gives_identical_scores_and_wrong_loader_is_an_error(segmenter, tmp_path):
    from rpl.checkpoint import fingerprint

    base = fingerprint(segmenter)
    cfg = load_config(None, ["method=pebal", "segmenter.num_classes=5"])
    model = get("pebal").build(segmenter, cfg)
    with torch.no_grad():  # move the weights away from the base, as training would
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        before = model(x)
    path = get("pebal").save(tmp_path / "pebal.safetensors", model, extra={}, base_fingerprint=base)
    torch.manual_seed(0)
    fresh = DeepLabV3Plus(**TINY).eval()  # the base it started from
    loaded = rpl.methods.load(path, fresh)
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.anomaly, after.anomaly)
    assert torch.equal(before.abstention, after.abstention)
    with pytest.raises(RPLInputError, match="holds method 'pebal'.*method 'rpl'"):
        rpl.load(path, DeepLabV3Plus(**TINY))
    rpl_path = rpl.save(tmp_path / "rpl.safetensors", rpl.wrap(DeepLabV3Plus(**TINY).eval(), block={"width": 8}))
    with pytest.raises(RPLInputError, match="holds method 'rpl'.*method 'pebal'"):
        get("pebal").load(rpl_path, DeepLabV3Plus(**TINY))
    # the tuned segmenter of a PEBAL checkpoint serves as plain segmenter weights (the base of pebal+rpl)
    from rpl.models.loading import read_state_dict

    state = read_state_dict(path)
    assert state.keys() == loaded.segmenter.state_dict().keys()
    with pytest.raises(RPLInputError, match="holds no segmenter weights"):
        read_state_dict(rpl_path)


# -- end to end: train PEBAL, RPL on its segmenter, compare in one table ------------------------
def test_pebal_trains_and_rpl_on_its_segmenter_evaluates_in_one_table(tmp_path, capsys):
    """The default run's end-to-end check: rpl-train --method pebal, RPL on the tuned segmenter, and
    one rpl-eval table with pebal, pebal+rpl and the tuned segmenter's mIoU (2 steps each, tiny world)."""
    import json

    from rpl.checkpoint import read_metadata
    from rpl.cli.eval import main as eval_main
    from rpl.cli.train import main as train_main
    from test_cli_eval import write_anomaly_set
    from train_world import make_world, overrides

    world = make_world(tmp_path / "world", n_train=4, n_val=2, n_coco=4)
    write_anomaly_set(world / "synthstreets-anomaly", 2, seed=1)
    args = lambda work, *sets: ["--work-dir", str(work), "--quiet", *sum(
        (["--set", s] for s in overrides(world, steps=2, **dict(x.split("=", 1) for x in sets))), [])]
    pebal = tmp_path / "pebal"
    assert train_main(["--method", "pebal", *args(pebal, "data.paste_prob=0.5")]) == 0
    assert read_metadata(pebal / "best.safetensors")["method"] == "pebal"
    on_pebal = tmp_path / "pebal_rpl"
    assert train_main(args(on_pebal, f"segmenter.weights={pebal / 'best.safetensors'}")) == 0
    assert read_metadata(on_pebal / "best.safetensors")["extra"]["base_method"] == "pebal"
    out = tmp_path / "table.json"
    code = eval_main(["--checkpoint", str(pebal / "best.safetensors"), "--checkpoint",
                      str(on_pebal / "best.safetensors"), "--datasets", "synthstreets-anomaly,cityscapes-val",
                      "--data-root", str(world), "--json", str(out), "--quiet", "--num-workers", "0"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    rows = {(r["dataset"], r["method"]): r for r in doc["results"]}
    for m in ("pebal", "pebal+rpl", "energy"):
        assert rows[("synthstreets-anomaly", m)]["auroc"] is not None, m
    miou = [r for r in doc["results"] if r["dataset"] == "cityscapes-val"]
    assert len(miou) == 1 and "pebal + post-hoc, pebal+rpl" in miou[0]["method"] and miou[0]["miou"] is not None


@pytest.mark.slow  # ~15 min on 2 shared cores: two training runs, a resume and a multi-checkpoint evaluation
def test_pebal_and_pebal_rpl_train_resume_and_evaluate_in_one_table(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from rpl.cli.eval import main as eval_main
    from rpl.cli.train import main as train_main
    from test_cli_eval import write_anomaly_set
    from train_world import make_world, overrides

    world = make_world(tmp_path / "world")
    write_anomaly_set(world / "synthstreets-anomaly", 3, seed=1)
    args = lambda work, *sets, steps=2: ["--work-dir", str(work), "--quiet",
                                         *sum((["--set", s] for s in overrides(world, steps=steps, **dict(
                                             x.split("=", 1) for x in sets))), [])]
    pebal = tmp_path / "pebal"
    assert train_main(["--method", "pebal", *args(pebal, "data.paste_prob=0.5", "train.checkpoint_every=1",
                                                  steps=4)]) == 0
    straight = load_file(str(pebal / "last.safetensors"))
    # resume: interrupt after 2 of 4 steps, continue with --resume: the same tuned weights as straight through
    from rpl.training import Trainer

    real_step = Trainer.step

    def interrupting(self, batch):
        if self.progress.step == 2:
            raise KeyboardInterrupt
        return real_step(self, batch)

    resumed = tmp_path / "pebal_resumed"
    Trainer.step = interrupting
    try:
        assert train_main(["--method", "pebal", *args(resumed, "data.paste_prob=0.5", "train.checkpoint_every=1",
                                                      steps=4)]) == 130
    finally:
        Trainer.step = real_step
    assert train_main(["--method", "pebal", "--resume", *args(resumed, "data.paste_prob=0.5",
                                                              "train.checkpoint_every=1", steps=4)]) == 0
    again = load_file(str(resumed / "last.safetensors"))
    assert straight.keys() == again.keys() and any(k.startswith("abstention.") for k in again)
    for k in straight:
        assert torch.equal(straight[k], again[k]), k
    assert json.loads((resumed / "summary.json").read_text())["method"] == "pebal"
    # a PEBAL work dir refuses an RPL resume, and an RPL add-on is not segmenter weights
    assert train_main(["--method", "rpl", "--resume", *args(pebal)]) == 2
    assert "is a run of method 'pebal'" in capsys.readouterr().err

    on_pebal = tmp_path / "pebal_rpl"
    assert train_main(args(on_pebal, f"segmenter.weights={pebal / 'best.safetensors'}")) == 0
    plain = tmp_path / "rpl"
    assert train_main(args(plain)) == 0
    assert train_main(args(tmp_path / "bad", f"segmenter.weights={plain / 'best.safetensors'}")) == 2
    assert "holds no segmenter weights" in capsys.readouterr().err

    out = tmp_path / "table.json"
    code = eval_main(["--checkpoint", str(plain / "best.safetensors"), "--checkpoint", str(pebal / "best.safetensors"),
                      "--checkpoint", str(on_pebal / "best.safetensors"), "--datasets",
                      "synthstreets-anomaly,cityscapes-val", "--data-root", str(world), "--json", str(out),
                      "--quiet", "--num-workers", "0"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    rows = {(r["dataset"], r["method"]): r for r in doc["results"]}
    for m in ("rpl", "pebal", "pebal+rpl", "energy", "msp", "maxlogit", "entropy"):
        assert rows[("synthstreets-anomaly", m)]["auroc"] is not None, m
    miou = [r for r in doc["results"] if r["dataset"] == "cityscapes-val"]
    assert len(miou) == 2 and all(r["miou"] is not None for r in miou)  # the base and the PEBAL-tuned segmenter
    assert "rpl + post-hoc" in miou[0]["method"] and "pebal, pebal+rpl" in miou[1]["method"]
    assert miou[0]["identical_to_segmenter"] is True
    # the pebal row equals a single-checkpoint evaluation of the PEBAL model (one forward per image each)
    single = tmp_path / "single.json"
    assert eval_main(["--checkpoint", str(pebal / "best.safetensors"), "--datasets", "synthstreets-anomaly",
                      "--data-root", str(world), "--json", str(single), "--quiet", "--num-workers", "0"]) == 0
    alone = {r["method"]: r for r in json.loads(single.read_text())["results"]}
    assert alone["pebal"]["ap"] == rows[("synthstreets-anomaly", "pebal")]["ap"]
    # a method the checkpoint does not hold is a clear error, exit 2
    assert eval_main(["--checkpoint", str(pebal / "best.safetensors"), "--methods", "rpl", "--datasets",
                      "synthstreets-anomaly", "--data-root", str(world), "--quiet"]) == 2
    assert "holds method 'pebal'" in capsys.readouterr().err


def test_a_pebal_model_evaluates_anomaly_and_class_label_sets(segmenter):
    """rpl-eval's engine on a PEBAL model: pebal scores on an anomaly set, and on a class-label set the mIoU
    of its K logits plus the tuned segmenter alone (the 'bare segmenter' row), which are the same logits."""
    import numpy as np

    from rpl.evaluation import DatasetEntry, EvalOptions, evaluate

    cfg = load_config(None, ["method=pebal", "segmenter.num_classes=5"])
    model = get("pebal").build(segmenter, cfg).eval()
    rng = np.random.default_rng(0)

    def sample(i: int, classes: bool) -> dict:
        label = rng.integers(0, 5, (32, 48)).astype(np.uint8) if classes else np.zeros((32, 48), np.uint8)
        if not classes:
            label[8:20, 10:30] = 1
        label[:2] = 255
        return {"image": rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), "label": label, "name": f"f{i}",
                "path": f"/virtual/f{i}.png"}

    entries = [DatasetEntry("toy", [sample(i, False) for i in range(2)]),
               DatasetEntry("classes", [sample(i, True) for i in range(2)], track=None, class_labels=True)]
    report = evaluate(model, entries, options=EvalOptions(methods=("pebal", "energy"), progress=False))
    rows = {(r["dataset"], r["method"]): r for r in report.results}
    assert 0.0 <= rows[("toy", "pebal")]["auroc"] <= 1.0 and ("toy", "energy") in rows
    closed = [r for (d, _), r in rows.items() if d == "classes"]
    assert len(closed) == 2 and closed[0]["miou"] == closed[1]["miou"]
    assert closed[0].get("identical_to_segmenter", True) is True
