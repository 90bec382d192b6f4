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

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    other = rpl.wrap(model.unwrap(), block={"width": 16})  # shapes differ: keeps its own (Kaiming) init
    assert other.addon.block.bottleneck.weight.shape == (16, 5 * 16, 1, 1)
    assert not torch.equal(other.addon.block.bottleneck.weight, base.bottleneck.weight[:16, :80])


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
    model.unwrap()
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
    cl_base = copy.deepcopy(base).to(memory_format=torch.channels_last)
    model = rpl.wrap(base, block={"width": 32}).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base(x)
        out = model(x)
    assert torch.equal(out.logits, expected)
    assert out.anomaly.dtype == torch.float32
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


# -- all-or-nothing, messages, outputs, selectors, batch 1 ---------------------------------------
class ListEncoderSegmenter(torch.nn.Module):
    """An encoder returning its stages as a list and a head whose input is that list (as smp/HF do)."""

    def __init__(self, k=5):
        super().__init__()
        self.encoder = Stages()
        self.head = ListHead(k)

    def forward(self, x):
        return torch.nn.functional.interpolate(self.head(self.encoder(x)), size=x.shape[-2:], mode="bilinear")


class Stages(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.s1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.s2 = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())

    def forward(self, x):
        a = self.s1(x)
        return [a, self.s2(a)]


class ListHead(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.classifier = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                              torch.nn.Conv2d(16, k, 1))

    def forward(self, maps):
        return self.classifier(maps[-1])


class DictOutput(ToySegmenter):
    def __init__(self, key="logits"):
        super().__init__()
        self.key = key

    def forward(self, x):
        return {"aux": x.mean(), self.key: super().forward(x)}


class MappingFeature(ToySegmenter):
    """The feature module returns a one-key mapping of a tuple, like an HF BackboneOutput."""

    def forward(self, x):
        maps = {"feature_maps": (self.stem[:3](x), self.stem(x))}
        self.last = maps
        return torch.nn.functional.interpolate(self.head(self.neck(maps["feature_maps"][-1])), size=x.shape[-2:],
                                               mode="bilinear", align_corners=False)


class NeedsLargeInput(ToySegmenter):
    """Fails on inputs smaller than ``minimum`` px, as smp PAN does at 64x64."""

    def __init__(self, minimum=128):
        super().__init__()
        self.minimum = minimum

    def forward(self, x):
        if x.shape[-1] < self.minimum:
            raise RuntimeError("Given input size: (1x1x1). Calculated output size: (1x0x0). Output size is too small")
        return super().forward(x)


def _hook_counts(module):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in module.modules()]


def _state_of(module):
    return ([p.requires_grad for p in module.parameters()], [m.training for m in module.modules()],
            _hook_counts(module))


FAILING_WRAPS = {
    "no preset": (lambda: lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19), {},
                  "LRASPP"),
    "misspelt feature": (ToySegmenter, {"head": "head", "feature": "stemm"}, "'stemm'.*does not exist"),
    "head input is a list": (ListEncoderSegmenter, {"head": "head", "feature": "encoder[-1]"}, "receives list"),
    "probe mismatch": (BatchMixingSegmenter, {"head": "head", "feature": "stem"}, "refused"),
    "torch error in probe": (lambda: NeedsLargeInput(1000), {"head": "head", "feature": "stem"}, "probe_size"),
    "feature after head": (ToySegmenter, {"head": "neck", "feature": "head"}, "had not run"),
}


@pytest.mark.parametrize("case", sorted(FAILING_WRAPS))
def test_failed_wrap_leaves_the_model_exactly_as_before(case):
    build, names, message = FAILING_WRAPS[case]
    base = build()
    base.train()
    base.get_submodule(next(n for n, _ in base.named_children())).eval()  # a mixed mode, restored as it was
    first = next(base.parameters())
    first.requires_grad_(False)  # a caller's own partial freeze, restored as it was
    handle = base.register_forward_hook(lambda m, a, o: None)  # the caller's own hook stays
    before = _state_of(base)
    with pytest.raises(RPLInputError, match=message):
        rpl.wrap(base, block={"width": 8}, **names)
    assert _state_of(base) == before
    handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


def test_torch_error_in_probe_is_an_input_error_naming_model_names_and_sizes():
    with pytest.raises(RPLInputError) as err:
        rpl.wrap(NeedsLargeInput(1000), head="head", feature="stem", block={"width": 8})
    msg = str(err.value)
    assert "NeedsLargeInput" in msg and "'head'" in msg and "'stem'" in msg and "64x64 and 128x128" in msg
    assert "Output size is too small" in msg and "probe_size=(H, W)" in msg


def test_probe_retries_a_larger_size_once_or_uses_the_given_one():
    model = rpl.wrap(NeedsLargeInput(128), head="head", feature="stem", block={"width": 8})  # 64 fails, 128 works
    assert model.addon.stride == 4
    with pytest.raises(RPLInputError, match="probe size 32x32"):
        rpl.wrap(NeedsLargeInput(128), head="head", feature="stem", probe_size=(32, 32), block={"width": 8})
    assert rpl.wrap(NeedsLargeInput(200), head="head", feature="stem", probe_size=(224, 224),
                    block={"width": 8}).addon.feature_channels == 32


def test_wrap_returns_eval_mode_and_batch_one_forward_works():
    base = randomize_bn(ToySegmenter()).train()
    model = rpl.wrap(base, head="head", feature="stem", block={"width": 8})
    assert model.training is False and model.addon.training is False and base.training is False
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out.logits, base(x))
    assert out.anomaly.shape == (1, 32, 32)


def test_batch_one_trains_and_pooling_norm_uses_running_statistics():
    base = randomize_bn(ToySegmenter())
    model = rpl.wrap(base, head="head", feature="stem", block={"width": 8}).train()
    bn = model.addon.block.aspp.pooling.conv[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)  # same parameters/buffers as before: checkpoints load unchanged
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    target = torch.zeros(1, 32, 32, dtype=torch.long)
    target[:, :8, :8] = 254
    stats = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):  # batch 1: the pooled branch has one value per channel, batch statistics are undefined
        out = model(torch.randn(1, 3, 32, 32))
        loss, _ = rpl_loss(out.anomaly_logits, out.logits, target)
        opt.zero_grad()
        loss.backward()
        assert bn.weight.grad is not None and torch.isfinite(bn.weight.grad).all()
        opt.step()
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    x = torch.randn(1, 8, 1, 1)
    expected = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                                              bn.eps)
    assert torch.equal(bn(x), expected)  # batch 1 in training = eval-mode normalisation
    out = model(torch.randn(2, 3, 32, 32))  # batch 2: batch statistics, running statistics updated as before
    assert not torch.equal(bn.running_mean, stats[0])
    plain = torch.nn.BatchNorm2d(8).eval()
    plain.load_state_dict(bn.state_dict())
    bn.eval()
    x = torch.randn(2, 8, 1, 1)
    assert torch.equal(bn(x), plain(x))  # eval mode: exactly BatchNorm2d


def test_unwrap_gives_the_segmenter_back_and_double_wrap_is_refused():
    base = randomize_bn(ToySegmenter()).train()
    before = _state_of(base)
    model = rpl.wrap(base, head="head", feature="stem", block={"width": 8})
    with pytest.raises(RPLInputError, match="already wrapped"):
        rpl.wrap(model)
    with pytest.raises(RPLInputError, match="already carries the hooks"):
        rpl.wrap(base, head="head", feature="stem")
    assert model.unwrap() is base
    assert _state_of(base) == before
    with pytest.raises(RPLInputError, match="unwrapped"):
        model(torch.randn(1, 3, 32, 32))
    again = rpl.wrap(base, head="head", feature="stem", block={"width": 8})
    assert _hook_counts(base) != before[2]  # hooks attached once again, not stacked
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()) == 3
    again.unwrap()


@pytest.mark.parametrize("key", ["logits", "seg_logits", "pred", "out"])
def test_dict_outputs_under_the_usual_keys(key):
    base = randomize_bn(DictOutput(key)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = base(x)[key].clone()
        model = rpl.wrap(base, head="head", feature="stem", block={"width": 8})
        out = model(x)
    assert torch.equal(out.logits, expected)
    assert set(out.raw) == {"aux", key} and torch.equal(out.raw[key], expected)  # closed-set half of the dict


def test_logits_option_key_or_callable_and_message_for_unknown_outputs():
    base = randomize_bn(DictOutput("scores")).eval()
    with pytest.raises(RPLInputError, match="cannot find logits.*'scores'.*logits='KEY'"):
        rpl.wrap(base, head="head", feature="stem")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = base(x)["scores"].clone()
    by_key = rpl.wrap(base, head="head", feature="stem", logits="scores", block={"width": 8})
    assert by_key.wrap_arguments()["logits"] == "scores"
    with torch.no_grad():
        assert torch.equal(by_key(x).logits, expected)
    by_key.unwrap()
    by_call = rpl.wrap(base, head="head", feature="stem", logits=lambda o: o["scores"], block={"width": 8})
    with torch.no_grad():
        assert torch.equal(by_call(x).logits, expected)


def test_feature_selectors_and_mapping_outputs():
    base = randomize_bn(ListEncoderSegmenter()).eval()
    model = rpl.wrap(base, head="head.classifier", feature="encoder[-1]", block={"width": 8})
    assert (model.addon.feature_channels, model.addon.stride) == (16, 4)
    model.unwrap()
    model = rpl.wrap(base, head="head.classifier", feature="encoder[0]", block={"width": 8})
    assert (model.addon.feature_channels, model.addon.stride) == (8, 2)
    model.unwrap()
    with pytest.raises(RPLInputError, match=r"cannot take \[5\]"):
        rpl.wrap(base, head="head.classifier", feature="encoder[5]")
    with pytest.raises(RPLInputError, match="not of the form"):
        rpl.wrap(base, head="head.classifier", feature="encoder[-1")
    # a module returning {"feature_maps": (a, b)} (HF BackboneOutput): the default rule reads the deepest map
    assert rpl.wrapping.select_feature({"feature_maps": (torch.ones(1, 2, 4, 4), torch.ones(1, 3, 2, 2))}, [],
                                       "backbone").shape == (1, 3, 2, 2)
    assert rpl.wrapping.select_feature({"feature_maps": (torch.ones(1, 2, 4, 4), torch.ones(1, 3, 2, 2))},
                                       ["feature_maps", 0], "backbone").shape == (1, 2, 4, 4)


def test_candidates_list_stage_outputs_with_selectors_deepest_first():
    with pytest.raises(RPLInputError) as err:
        rpl.wrap(ListEncoderSegmenter())
    msg = str(err.value)
    assert "not a known family" in msg and "encoder[-1] [16]" in msg
    assert msg.index("stride 4") < msg.index("stride 2")  # deepest stage first
    with pytest.raises(RPLInputError) as err:
        rpl.wrap(ListEncoderSegmenter(), head="head", feature="encoder[-1]")
    msg = str(err.value)
    assert "receives list" in msg and "ran 1 times" not in msg and "classifier" in msg


def test_deepcopy_of_a_wrapped_model_is_independent():
    base = randomize_bn(ToySegmenter()).eval()
    model = rpl.wrap(base, head="head", feature="stem", block={"width": 8})
    clone = copy.deepcopy(model)
    assert clone.segmenter is not base and clone._chain[0] is clone.segmenter.head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), clone(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.anomaly_logits, b.anomaly_logits)
    clone.unwrap()
    assert _hook_counts(clone.segmenter) == [(0, 0)] * len(_hook_counts(base))
    with torch.no_grad():
        assert torch.equal(model(x).logits, a.logits)  # the original keeps its hooks
    bare = model.segmenter_copy()
    assert _hook_counts(bare) == _hook_counts(clone.segmenter)


def test_torch_error_in_the_wrapped_probe_names_the_preset_names():
    base = randomize_bn(ToySegmenter())
    boom = {"calls": 0}

    def fail_second_time(module, args, output):
        boom["calls"] += 1
        if boom["calls"] > 1:  # discovery passes, the wrapped probe forward fails
            raise RuntimeError("CUDA-like kernel failure")

    handle = base.stem.register_forward_hook(fail_second_time)
    before = _state_of(base)
    with pytest.raises(RPLInputError, match=r"ToySegmenter failed.*head 'head', feature 'stem'.*probe size 32x32.*"
                                            r"kernel failure"):
        rpl.wrap(base, head="head", feature="stem", probe_size=(32, 32), block={"width": 8})
    assert _state_of(base) == before
    handle.remove()
