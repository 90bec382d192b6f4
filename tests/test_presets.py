"""Presets: the segmenters people use wrap with ``rpl.wrap(model)`` alone, bit-exactly, at batch 1 and 2.

Random-init models from tiny configs (no downloads). For each: closed-set logits ``torch.equal`` to the
frozen bare model before and after 3 optimiser steps at batch 1 and at batch 2 (in the training
forward and in eval), base state dict byte-identical, gradients only in the add-on. "Frozen bare
model": the reference is computed with the segmenter's parameters not requiring grad, as inside the
wrapper (HF Mask2Former's attention takes another kernel when they do, which changes its last bits).
"""
from __future__ import annotations

import pytest
import torch

import rpl
from rpl import presets
from rpl.losses import rpl_loss
from models_for_tests import randomize_bn

pytestmark = pytest.mark.usefixtures("one_torch_thread")
smp = pytest.importorskip("segmentation_models_pytorch")
transformers = pytest.importorskip("transformers")
K = 5

SMP_SMALL = dict(encoder_name="tu-mobilenetv3_small_050", encoder_weights=None, classes=K)
SMP = {name: (lambda name=name: getattr(smp, name)(**SMP_SMALL), 64) for name in presets.SMP_ARCHITECTURES}
SMP["PAN"] = (SMP["PAN"][0], 128)  # PAN's pyramid pooling needs >= 128 px (the wrap's probe retries at 128)
SMP["DPT"] = (lambda: smp.DPT(encoder_name="tu-vit_tiny_patch16_224", encoder_weights=None, classes=K, encoder_depth=4,
                              dynamic_img_size=True, decoder_intermediate_channels=(16, 16, 16, 16),
                              decoder_fusion_channels=16), 64)


def _convnext():
    return transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                       out_features=["stage1", "stage2", "stage3", "stage4"])


def _swin():
    return transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=4,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])


HF = {
    "upernet-convnext": lambda: transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=_convnext(), hidden_size=16, auxiliary_channels=8, num_labels=K)),
    "upernet-swin": lambda: transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=_swin(), hidden_size=16, auxiliary_channels=8, num_labels=K)),
    "dpt": lambda: transformers.DPTForSemanticSegmentation(transformers.DPTConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16, num_labels=K)),
    "segformer": lambda: transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        num_labels=K, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=32,
        num_attention_heads=[1, 1, 1, 1])),
    "beit": lambda: transformers.BeitForSemanticSegmentation(transformers.BeitConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        out_indices=[0, 1, 2, 3], pool_scales=[1, 2], auxiliary_channels=8, num_labels=K)),
    "mask2former": lambda: transformers.Mask2FormerForUniversalSegmentation(transformers.Mask2FormerConfig(
        backbone_config=_swin(), num_labels=K, num_queries=8, hidden_dim=32, mask_feature_size=32, feature_size=32,
        encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2)),
}
EXPECTED_PRESET = {"upernet-convnext": "hf-upernet", "upernet-swin": "hf-upernet", "dpt": "hf-dpt",
                   "segformer": "hf-segformer", "beit": "hf-beit", "mask2former": "hf-mask2former"}
# one per library in the default run, the rest under -m slow
DEFAULT_RUN = {"smp-Unet", "smp-PAN", "smp-DPT", "hf-upernet-swin", "hf-mask2former"}


def hook_counts(module):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in module.modules()]


def _bare_logits(model, base, x):
    with torch.no_grad():
        return model.closed_set_logits(base(x)).clone()


def _targets(shape):
    b, _, h, w = shape
    t = torch.randint(0, K, (b, h, w), generator=torch.Generator().manual_seed(1))
    t[:, : h // 4, : w // 4] = 254
    t[:, -1] = 255
    return t


def check_family(base, size, preset_name):
    """The acceptance checks of one family (see the module docstring)."""
    randomize_bn(base)
    base.eval()
    requires = [p.requires_grad for p in base.parameters()]
    with torch.no_grad():
        base(torch.randn(1, 3, size, size))  # transformers installs its own output-recording hooks on first use
    hooks = hook_counts(base)
    assert presets.detect(base).name == preset_name
    model = rpl.wrap(base, block={"width": 8})
    assert not model.training and not base.training  # wrap returns the model in eval mode
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = model(x[:1])  # batch-1 forward straight after wrap
    expected = {b: _bare_logits(model, base, x[:b]) for b in (1, 2)}
    assert torch.equal(one.logits, expected[1])
    before = {k: v.clone() for k, v in base.state_dict().items()}

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # all parameters, as a careless caller would
    first = {k: v.clone() for k, v in model.addon.state_dict().items()}
    for b in (1, 2):
        for _ in range(3):
            out = model(x[:b])
            assert torch.equal(out.logits, expected[b])
            loss, _ = rpl_loss(out.anomaly_logits, out.logits, _targets(out.logits.shape))
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is None for p in base.parameters())
            opt.step()
    assert any(not torch.equal(v, model.addon.state_dict()[k]) for k, v in first.items())  # the add-on trained

    model.eval()
    with torch.no_grad():
        for b in (1, 2):
            out = model(x[:b])
            assert torch.equal(out.logits, expected[b])
            assert out.anomaly_logits.shape == out.logits.shape and torch.isfinite(out.anomaly).all()
    after = base.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), k
    assert model.unwrap() is base
    assert [p.requires_grad for p in base.parameters()] == requires
    assert hook_counts(base) == hooks
    return model


def _cases():
    for name, (build, size) in SMP.items():
        preset = "smp-dpt" if name == "DPT" else "smp"
        yield f"smp-{name}", build, size, preset
    for name, build in HF.items():
        yield f"hf-{name}", build, 64, EXPECTED_PRESET[name]


CASES = [pytest.param(build, size, preset, id=case, marks=() if case in DEFAULT_RUN else pytest.mark.slow)
         for case, build, size, preset in _cases()]


@pytest.mark.parametrize("build,size,preset", CASES)
def test_family_wraps_by_preset_bit_exactly(build, size, preset):
    check_family(build(), size, preset)


def test_smp_decoder_variant_reads_the_head_input():
    base = smp.FPN(**SMP_SMALL).eval()
    model = rpl.wrap(base, preset="smp-decoder", block={"width": 8})
    assert model.feature_name is None and model.addon.feature_channels == model.addon.head_channels
    deep = rpl.wrap(model.unwrap(), block={"width": 8})
    assert deep.feature_name == "encoder[-1]" and deep.addon.stride == 32


def test_mask2former_scores_follow_rba_and_zero_residual_is_identity():
    from rpl.adapters import rba_scores

    base = HF["mask2former"]().eval()
    model = rpl.wrap(base, block={"width": 8, "zero_init": True})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        raw = base(x)
    cls, masks = raw.class_queries_logits, raw.masks_queries_logits
    by_hand = (cls.softmax(-1)[..., :K, None, None] * masks.sigmoid()[:, :, None]).sum(1)  # sum over queries
    assert torch.allclose(out.logits, by_hand, atol=1e-6) and out.logits.shape == (1, K, 16, 16)
    assert torch.equal(rba_scores(cls, masks), out.logits)
    assert torch.equal(out.anomaly_logits, out.logits)  # r = 0: masks recomputed from the frozen queries exactly
    assert model.wrap_arguments()["adapter"] == "mask-classification"


def test_list_presets_and_registry():
    names = presets.list_presets()
    for name in ("smp", "smp-dpt", "smp-decoder", "hf-upernet", "hf-dpt", "hf-segformer", "hf-beit", "hf-mask2former",
                 "torchvision-deeplabv3", "torchvision-fcn", "rpl-deeplabv3plus", "nvidia-deepwv3plus"):
        assert name in names
    # smp's DeepLabV3Plus and this package's share a class name: the defining module tells them apart
    from rpl.models import DeepLabV3Plus

    assert presets.detect(smp.DeepLabV3Plus(**SMP_SMALL)).name == "smp"
    assert presets.detect(DeepLabV3Plus("resnet18", num_classes=K, aspp_width=8, decoder_width=8)).name == \
        "rpl-deeplabv3plus"
    with pytest.raises(rpl.RPLInputError, match="not registered.*smp"):
        rpl.wrap(smp.Unet(**SMP_SMALL), preset="nope")
    custom = presets.register(presets.Preset("test-toy", ("ToySegmenter",), "head", "stem", module="models_for_tests"))
    try:
        from models_for_tests import ToySegmenter

        assert rpl.wrap(ToySegmenter(), block={"width": 8}).feature_name == "stem"
    finally:
        presets._REGISTRY.pop(custom.name)
