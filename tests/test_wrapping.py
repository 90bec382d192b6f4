"""rpl.wrap: closed-set logits bit-identical, base untouched, gradients only into the add-on."""
from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, fcn_resnet50, lraspp_mobilenet_v3_large

import rpl
from rpl.errors import RPLInputError
from rpl.losses import LossWeights, rpl_loss
from rpl.models import DeepLabV3Plus
from models_for_tests import BatchMixingSegmenter, ToySegmenter, TwoHeadCallsSegmenter, randomize_bn


def _bare(model, x):
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def _targets(b, h, w, k):
    """Street targets with class ids, void and a pasted-outlier square; context targets 0/254/255."""
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, k, (b, h, w), generator=g)
    t[:, : h // 8] = 255
    t[:, h // 3: h // 2, w // 3: w // 2] = 254
    c = torch.zeros(b, h, w, dtype=torch.long)
    c[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 254
    c[:, -2:] = 255
    return t, c


def _state_bytes(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


CASES = {
    "tv-deeplabv3-mobilenetv3": lambda: (deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                       num_classes=19, aux_loss=True), {}),
    "tv-fcn-resnet50": lambda: (fcn_resnet50(weights=None, weights_backbone=None, num_classes=19), {}),
    "dlv3plus-resnet18": lambda: (DeepLabV3Plus("resnet18", num_classes=19, aspp_width=64, decoder_width=64), {}),
    "dlv3plus-mobilenetv3": lambda: (DeepLabV3Plus("mobilenetv3_large_100", num_classes=19, aspp_width=64,
                                                   decoder_width=64), {}),
    "toy-named": lambda: (ToySegmenter(num_classes=5), {"head": "head[:]", "feature": "stem"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_set_identical_before_and_after_training(case):
    base, names = CASES[case]()
    randomize_bn(base)
    base.eval()
    x = torch.randn(4, 3, 64, 96)
    with torch.no_grad():
        expected = _bare(base, x).clone()
    before = _state_bytes(base)

    model = rpl.wrap(base, block={"width": 32}, **names)
    model.train()  # the caller asks for training mode: the segmenter must stay in eval
    assert not base.training and all(not m.training for m in base.modules())
    assert model.addon.training
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)

    # an optimiser over *all* parameters, as a careless caller would build it
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    k = expected.shape[1]
    target, ctx_target = _targets(2, 64, 96, k)
    for _ in range(5):
        out = model(x)
        emb = out.embedding
        assert emb is not None and emb.shape[0] == 4
        loss, parts = rpl_loss(out.anomaly_logits[:2], out.logits[:2], target, emb[:2], emb[2:], ctx_target,
                               LossWeights())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in base.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
        opt.step()

    after = base.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # BN buffers included
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out.logits, expected)
    assert out.anomaly_logits.shape == expected.shape
    assert out.anomaly.shape == (4, 64, 96)
    assert out.embedding is None  # projection only in training
    assert torch.equal(_bare(base, x), expected)  # the bare model still works alone


def test_only_addon_parameters_are_trainable():
    base = ToySegmenter()
    model = rpl.wrap(base, head="head", feature="neck", block={"width": 8})
    trainable = set(map(id, model.trainable_parameters()))
    assert trainable == set(map(id, model.addon.parameters()))
    model.requires_grad_(True)  # must not unfreeze the segmenter
    assert all(not p.requires_grad for p in base.parameters())


def test_default_feature_is_head_input_and_zero_init_is_identity():
    base = randomize_bn(ToySegmenter())
    model = rpl.wrap(base, head="head", block={"width": 8, "zero_init": True}).eval()
    assert model.addon.feature_channels == model.addon.head_channels == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out.anomaly_logits, out.logits, atol=1e-6)


def test_kaiming_default_perturbs_from_step_zero():
    base = randomize_bn(ToySegmenter())
    model = rpl.wrap(base, head="head", feature="stem", block={"width": 8}).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert (out.anomaly_logits - out.logits).abs().max() > 1e-3


def test_init_from_segmenter_aspp():
    base = DeepLabV3Plus("resnet18", num_classes=7, aspp_width=32, decoder_width=32)
    model = rpl.wrap(base, block={"width": 32})
    assert torch.equal(model.addon.block.bottleneck.weight, base.bottleneck.weight)
    for ours, theirs in zip(model.addon.block.aspp.state_dict().values(), base.aspp.state_dict().values()):
        assert torch.equal(ours, theirs)
    other = rpl.wrap(base, block={"width": 16})  # shapes differ: keeps its own init
    assert other.addon.block.bottleneck.weight.shape[0] == 16


def test_init_from_torchvision_aspp_matches_its_output():
    base = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19).eval()
    randomize_bn(base)
    model = rpl.wrap(base)  # width 256 = torchvision's ASPP width
    f = torch.randn(2, 960, 5, 6)
    aspp = base.classifier[0]
    with torch.no_grad():
        theirs = aspp.project[0](torch.cat([c(f) for c in aspp.convs], dim=1))
        block = model.addon.block.eval()
        ours = block.bottleneck(block.aspp(f))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_head_slice_and_index_names():
    base = ToySegmenter()
    assert len(rpl.wrapping.resolve_chain(base, "head[2:]")) == 3
    assert len(rpl.wrapping.resolve_chain(base, "head[-1]")) == 1
    model = rpl.wrap(base, head="head[3:]", feature="stem", block={"width": 8})
    assert model.addon.head_channels == 16
    with pytest.raises(RPLInputError, match="does not exist"):
        rpl.wrap(base, head="decoder", feature="stem")
    with pytest.raises(RPLInputError, match="nn.Sequential"):
        rpl.wrap(base, head="head.0[1:]")


def test_unknown_model_error_lists_candidates():
    with pytest.raises(RPLInputError) as err:
        rpl.wrap(ToySegmenter())
    msg = str(err.value)
    assert "head candidates" in msg and "head.4" in msg and "feature candidates" in msg


def test_lraspp_is_refused_with_candidates():
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19)
    with pytest.raises(RPLInputError, match="LRASPP.*high_classifier"):
        rpl.wrap(model)


def test_probe_refuses_batch_mixing_and_double_heads():
    with pytest.raises(RPLInputError, match="refused|mixes"):
        rpl.wrap(randomize_bn(BatchMixingSegmenter()), head="head", feature="stem", block={"width": 8})
    with pytest.raises(RPLInputError, match="ran 2 times"):
        rpl.wrap(TwoHeadCallsSegmenter(), head="head", feature="stem", block={"width": 8})


def test_feature_after_head_is_refused():
    class Late(ToySegmenter):
        def __init__(self):
            super().__init__()
            self.refine = torch.nn.Conv2d(5, 5, 1)

        def forward(self, x):
            return self.refine(self.head(self.neck(self.stem(x))))

    with pytest.raises(RPLInputError, match="had not run"):
        rpl.wrap(Late(), head="head", feature="refine", block={"width": 8})


def test_autocast_and_channels_last():
    base = randomize_bn(DeepLabV3Plus("resnet18", num_classes=19, aspp_width=32, decoder_width=32)).eval()
    x = torch.randn(2, 3, 64, 64)
    model = rpl.wrap(base, block={"width": 32}).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base(x)
        out = model(x)
    assert torch.equal(out.logits, expected)
    assert out.anomaly.dtype == torch.float32
    cl_base = copy.deepcopy(base).to(memory_format=torch.channels_last)
    cl_model = rpl.wrap(cl_base, block={"width": 32}).eval().to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(cl_model(xc).logits, cl_base(xc))


def test_torch_compile_matches_eager():
    base = randomize_bn(ToySegmenter()).eval()
    model = rpl.wrap(base, head="head", feature="stem", block={"width": 8}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager")(x)
    # compiled graphs decompose ops (BatchNorm -> primitives), so equality is up to float rounding
    assert torch.allclose(compiled.logits, eager.logits, atol=1e-6)
    assert torch.allclose(compiled.anomaly_logits, eager.anomaly_logits, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    base = randomize_bn(ToySegmenter()).eval()
    model = rpl.wrap(base, head="head", feature="stem", block={"width": 8}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert torch.allclose(compiled.logits, eager.logits, atol=1e-5)
    assert torch.allclose(compiled.anomaly_logits, eager.anomaly_logits, atol=1e-5)
