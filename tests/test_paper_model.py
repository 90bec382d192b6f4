"""The paper's segmenter (DeepLabv3+ WideResNet38) and the published checkpoint layouts.

The expected keys and shapes are written here from the published code (NVIDIA semantic-segmentation
``network/wider_resnet.py`` + ``network/deepv3.py``, RPL ``rpl_corocl.code/model/wide_network.py``),
not read off our model, so a drift of our layout from the published files fails here.
Random weights, CPU, 64x64 inputs.
"""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rpl
from rpl.checkpoint import read_metadata, strip_prefix
from rpl.config import load_config
from rpl.errors import RPLInputError
from rpl.models.loading import SegmenterSpec, build_segmenter, import_factory
from rpl.models.reference import main as convert_main, read_checkpoint, split_reference_state
from rpl.models.wider_resnet import DeepWV3Plus

REPO = Path(__file__).resolve().parent.parent
K = 19


# -- the published layouts, from the reference code --------------------------------------------------
def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def _conv_bn(prefix: str, cout: int, cin: int, kernel: int) -> dict[str, tuple[int, ...]]:
    """``Sequential(conv, BN, ReLU)``: keys ``.0.weight`` and ``.1.*``."""
    return {f"{prefix}.0.weight": (cout, cin, kernel, kernel), **_bn(f"{prefix}.1", cout)}


def nvidia_layout(num_classes: int = K) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of NVIDIA's ``cityscapes_best.pth`` (``module.`` prefix removed)."""
    keys: dict[str, tuple[int, ...]] = {"mod1.conv1.weight": (64, 3, 3, 3)}
    # WiderResNet38-A2 structure [3, 3, 6, 3, 1, 1] with its channel lists; bn_out/classifier are not kept
    stages = [(2, 3, (128, 128)), (3, 3, (256, 256)), (4, 6, (512, 512)), (5, 3, (512, 1024)),
              (6, 1, (512, 1024, 2048)), (7, 1, (1024, 2048, 4096))]
    cin = 64
    for mod, blocks, ch in stages:
        for b in range(1, blocks + 1):
            p = f"mod{mod}.block{b}"
            keys.update(_bn(f"{p}.bn1.0", cin))  # bn1 = Sequential(BN, ReLU)
            if len(ch) == 2:
                keys[f"{p}.convs.conv1.weight"] = (ch[0], cin, 3, 3)
                keys.update(_bn(f"{p}.convs.bn2.0", ch[0]))
                keys[f"{p}.convs.conv2.weight"] = (ch[1], ch[0], 3, 3)
            else:
                keys[f"{p}.convs.conv1.weight"] = (ch[0], cin, 1, 1)
                keys.update(_bn(f"{p}.convs.bn2.0", ch[0]))
                keys[f"{p}.convs.conv2.weight"] = (ch[1], ch[0], 3, 3)
                keys.update(_bn(f"{p}.convs.bn3.0", ch[1]))
                keys[f"{p}.convs.conv3.weight"] = (ch[2], ch[1], 1, 1)
            if b == 1:  # every stage's first block changes the width (mod4's also strides): 1x1 projection
                keys[f"{p}.proj_conv.weight"] = (ch[-1], cin, 1, 1)
            cin = ch[-1]
    keys.update(_aspp_layout("aspp"))
    keys["bot_fine.weight"] = (48, 128, 1, 1)
    keys["bot_aspp.weight"] = (256, 1280, 1, 1)
    keys["final.0.weight"] = (256, 304, 3, 3)
    keys.update(_bn("final.1", 256))
    keys["final.3.weight"] = (256, 256, 3, 3)
    keys.update(_bn("final.4", 256))
    keys["final.6.weight"] = (num_classes, 256, 1, 1)  # no bias
    return keys


def _aspp_layout(prefix: str) -> dict[str, tuple[int, ...]]:
    keys = _conv_bn(f"{prefix}.img_conv", 256, 4096, 1)
    keys.update(_conv_bn(f"{prefix}.features.0", 256, 4096, 1))
    for i in (1, 2, 3):
        keys.update(_conv_bn(f"{prefix}.features.{i}", 256, 4096, 3))
    return keys


def rpl_block_layout() -> dict[str, tuple[int, ...]]:
    """RPL's ``residual_block`` (ResidualAnomalyBlock): ASPP copy, 1x1 1280->256, 1x1 256->304, projection 256->304."""
    keys = _aspp_layout("residual_block.atten_aspp")
    keys["residual_block.bot_atten_aspp.weight"] = (256, 1280, 1, 1)
    keys["residual_block.atten_aspp_final.weight"] = (304, 256, 1, 1)
    keys["residual_block.proj_head.proj.0.weight"] = (304, 256, 1, 1)
    keys["residual_block.proj_head.proj.0.bias"] = (304,)
    return keys


def random_state(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the layout's shapes; activations stay O(1) through the deep network."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BN weight
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=g) * (0.5 / math.sqrt(fan_in))
    return state


@pytest.fixture(scope="module")
def published() -> dict[str, torch.Tensor]:
    return random_state(nvidia_layout(), seed=1)


@pytest.fixture(scope="module")
def block_state() -> dict[str, torch.Tensor]:
    return random_state(rpl_block_layout(), seed=2)


@pytest.fixture(scope="module")
def model(published) -> DeepWV3Plus:
    m = DeepWV3Plus(K)
    m.load_state_dict(published, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def bare_run(model, image) -> dict[str, torch.Tensor]:
    """One forward of the bare model: logits, low-level map m2, deepest map, decoder concat (the head's input)."""
    seen = {}
    hooks = [model.mod2.register_forward_hook(lambda m, a, o: seen.__setitem__("m2", o)),
             model.mod7.register_forward_hook(lambda m, a, o: seen.__setitem__("deep", o)),
             model.final.register_forward_pre_hook(lambda m, a: seen.__setitem__("concat", a[0]))]
    try:
        with torch.no_grad():
            seen["logits"] = model(image)
    finally:
        for h in hooks:
            h.remove()
    return seen


# -- the segmenter -----------------------------------------------------------------------------------
def test_state_dict_is_exactly_the_published_layout(model):
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = nvidia_layout()
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(137.1e6, rel=1e-3)


def _on_meta() -> DeepWV3Plus:
    with torch.device("meta"):  # no random init: only the key/shape checks of load_state_dict matter here
        return DeepWV3Plus(K)


def test_published_checkpoint_loads_strictly_with_and_without_prefix(published):
    as_published = {"module." + k: v for k, v in published.items()}
    as_published["module.criterion.nll_loss.weight"] = torch.ones(K)  # NVIDIA's file also stores its loss weights
    target = _on_meta()
    target.load_state_dict(as_published, strict=True, assign=True)  # as the file is: prefixes and loss weights
    assert target.final[6].weight.data_ptr() == published["final.6.weight"].data_ptr()
    assert torch.equal(target.mod7.block1.convs.conv3.weight, published["mod7.block1.convs.conv3.weight"])
    fresh = _on_meta()
    fresh.load_state_dict(strip_prefix({"module." + k: v for k, v in published.items()}), strict=True, assign=True)
    assert torch.equal(fresh.aspp.features[3][1].running_var, published["aspp.features.3.1.running_var"])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _on_meta().load_state_dict({**published, "mod8.block1.convs.conv1.weight": torch.zeros(1)}, strict=True,
                                   assign=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        _on_meta().load_state_dict({k: v for k, v in published.items() if k != "bot_fine.weight"}, strict=True,
                                   assign=True)


def test_forward_strides_widths_and_published_order_of_operations(model, image, bare_run):
    """Shapes at each stage, and the decoder recomputed with the published formula (fine branch first,
    bilinear align_corners=True everywhere)."""
    assert bare_run["m2"].shape == (1, 128, 32, 32)  # low-level map at stride 2
    assert bare_run["deep"].shape == (1, 4096, 8, 8)  # output stride 8
    assert bare_run["concat"].shape == (1, 304, 32, 32)
    assert bare_run["logits"].shape == (1, K, 64, 64) and torch.isfinite(bare_run["logits"]).all()
    up = lambda x, s: F.interpolate(x, size=s, mode="bilinear", align_corners=True)
    deep, m2 = bare_run["deep"], bare_run["m2"]
    with torch.no_grad():
        pooled = up(model.aspp.img_conv(F.adaptive_avg_pool2d(deep, 1)), deep.shape[-2:])
        aspp = torch.cat([pooled] + [f(deep) for f in model.aspp.features], dim=1)
        concat = torch.cat([model.bot_fine(m2), up(model.bot_aspp(aspp), m2.shape[-2:])], dim=1)
        logits = up(model.final(concat), image.shape[-2:])
    assert torch.equal(concat, bare_run["concat"]) and torch.equal(logits, bare_run["logits"])
    dilations = [model.aspp.features[i][0].dilation for i in (1, 2, 3)]
    assert dilations == [(12, 12), (24, 24), (36, 36)]
    assert [b.convs.conv2.dilation for b in (model.mod4.block6, model.mod5.block1, model.mod6.block1, model.mod7.block1)] \
        == [(1, 1), (2, 2), (4, 4), (4, 4)]


def test_factory_is_usable_from_configs():
    factory = import_factory("rpl.models.wider_resnet:deepwv3plus")
    with torch.device("meta"):
        assert factory(num_classes=7).final[6].weight.shape == (7, 256, 1, 1)


# -- wrapping -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrapped(model):
    return rpl.wrap(model, probe_size=(32, 32)).eval()


def test_preset_attaches_as_the_reference(wrapped, model):
    assert (wrapped.head_name, wrapped.feature_name) == ("final", "mod7")
    addon = wrapped.bare_addon
    assert (addon.feature_channels, addon.head_channels, addon.stride) == (4096, 304, 8)
    # block initialised from the segmenter's own ASPP + bot_aspp, as the reference's loader does
    block = addon.block
    assert torch.equal(block.aspp.pooling.conv[0].weight, model.aspp.img_conv[0].weight)
    assert torch.equal(block.aspp.pooling.conv[1].running_var, model.aspp.img_conv[1].running_var)
    for ours, theirs in zip(block.aspp.branches, model.aspp.features):
        assert torch.equal(ours[0].weight, theirs[0].weight) and ours[0].dilation == theirs[0].dilation
        assert torch.equal(ours[1].running_mean, theirs[1].running_mean)
    assert torch.equal(block.bottleneck.weight, model.bot_aspp.weight)
    assert sum(p.numel() for p in addon.parameters()) == pytest.approx(30.9e6, rel=0.01)


def test_wrapped_closed_set_output_equals_bare_model(wrapped, bare_run, image):
    with torch.no_grad():
        out = wrapped(image)
    assert torch.equal(out.logits, bare_run["logits"])
    assert out.anomaly_logits.shape == out.logits.shape and not torch.equal(out.anomaly_logits, out.logits)


# -- RPL's released checkpoint ------------------------------------------------------------------------
def rpl_checkpoint(published, block_state, ddp: bool = False) -> dict[str, torch.Tensor]:
    prefix = "module.branch1." if ddp else "branch1."
    return {prefix + k: v for k, v in {**published, **block_state}.items()}


def reference_perturbed(model: DeepWV3Plus, block: dict[str, torch.Tensor], bare_run: dict[str, torch.Tensor],
                        size) -> tuple[torch.Tensor, torch.Tensor]:
    """RPL's forward, written from its published code on the raw ``residual_block`` tensors:
    ``r = atten_aspp_final(up(bot_atten_aspp(atten_aspp(mod7))))``, ``z = up(final(concat + r))``,
    embedding ``proj_head(up(...))`` (L2-normalised by its loss)."""
    f, d = bare_run["deep"], bare_run["concat"]
    up = lambda x, s: F.interpolate(x, size=s, mode="bilinear", align_corners=True)

    def conv_bn_relu(x, name, dilation=1):
        w = block[f"residual_block.atten_aspp.{name}.0.weight"]
        y = F.conv2d(x, w, padding=dilation * (w.shape[-1] // 2), dilation=dilation)
        bn = lambda s: block[f"residual_block.atten_aspp.{name}.1.{s}"]
        return F.relu(F.batch_norm(y, bn("running_mean"), bn("running_var"), bn("weight"), bn("bias"), False, 0.0, 1e-5))

    with torch.no_grad():
        pooled = up(conv_bn_relu(F.adaptive_avg_pool2d(f, 1), "img_conv"), f.shape[-2:])
        branches = [conv_bn_relu(f, "features.0")] + [conv_bn_relu(f, f"features.{i}", r)
                                                        for i, r in ((1, 12), (2, 24), (3, 36))]
        hidden = up(F.conv2d(torch.cat([pooled] + branches, 1), block["residual_block.bot_atten_aspp.weight"]),
                    d.shape[-2:])
        r = F.conv2d(hidden, block["residual_block.atten_aspp_final.weight"])
        z = up(model.final(d + r), size)
        emb = F.conv2d(hidden, block["residual_block.proj_head.proj.0.weight"],
                       block["residual_block.proj_head.proj.0.bias"])
    return z, F.normalize(emb, dim=1)


@pytest.fixture(scope="module")
def reference_out(model, block_state, bare_run, image):
    return reference_perturbed(model, block_state, bare_run, image.shape[-2:])


def test_converted_rpl_checkpoint_gives_the_reference_perturbed_logits(published, block_state, wrapped, image,
                                                                        reference_out):
    segmenter_state, addon_state, info = split_reference_state(rpl_checkpoint(published, block_state, ddp=True))
    assert info["kind"] == "rpl" and info["num_classes"] == K
    assert info["removed_prefixes"] == ["branch1.", "module."]
    assert segmenter_state.keys() == published.keys()
    assert all(segmenter_state[k] is published[k] for k in published)
    assert addon_state["block.residual.weight"] is block_state["residual_block.atten_aspp_final.weight"]
    assert addon_state["block.aspp.branches.2.0.weight"] is block_state["residual_block.atten_aspp.features.2.0.weight"]
    assert split_reference_state(rpl_checkpoint(published, block_state))[1].keys() == addon_state.keys()

    addon = wrapped.bare_addon  # the default wrap has the reference block's shapes (strict load below)
    initial = {k: v.clone() for k, v in addon.state_dict().items()}
    try:
        addon.load_state_dict(addon_state, strict=True)
        wrapped.return_embedding = True
        with torch.no_grad():
            out = wrapped(image)
    finally:
        wrapped.return_embedding = None
        addon.load_state_dict(initial)
    z_ref, emb_ref = reference_out
    torch.testing.assert_close(out.anomaly_logits, z_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.embedding, emb_ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.anomaly_logits, out.logits)  # the residual does perturb


def test_nvidia_checkpoint_converts_to_segmenter_only(published):
    state = {"module." + k: v for k, v in published.items()}
    state["module.criterion.nll_loss.weight"] = torch.ones(K)
    segmenter_state, addon_state, info = split_reference_state(state)
    assert addon_state is None and info["kind"] == "segmenter"
    assert info["dropped"] == ["module.criterion.nll_loss.weight"]
    assert segmenter_state.keys() == published.keys()


def test_unknown_missing_and_misshapen_keys_are_named(published, block_state):
    good = rpl_checkpoint(published, block_state)
    with pytest.raises(RPLInputError, match=r"unknown key.*branch1\.residual_block\.extra\.weight"):
        split_reference_state({**good, "branch1.residual_block.extra.weight": torch.zeros(1)}, "ckpt.pth")
    without = {k: v for k, v in good.items() if k != "branch1.residual_block.atten_aspp_final.weight"}
    with pytest.raises(RPLInputError, match=r"ckpt\.pth.*missing key.*residual_block\.atten_aspp_final\.weight"):
        split_reference_state(without, "ckpt.pth")
    without = {k: v for k, v in good.items() if k != "branch1.mod4.block6.convs.conv2.weight"}
    with pytest.raises(RPLInputError, match=r"mod4\.block6\.convs\.conv2\.weight"):
        split_reference_state(without, "ckpt.pth")
    wrong = {**good, "branch1.bot_fine.weight": torch.zeros(48, 256, 1, 1)}
    with pytest.raises(RPLInputError, match=r"shape mismatch.*bot_fine\.weight: \(48, 256, 1, 1\)"):
        split_reference_state(wrong, "ckpt.pth")
    # a missing num_batches_tracked is harmless (BatchNorm fills it in) and accepted
    lean = {k: v for k, v in good.items() if not k.endswith("num_batches_tracked")}
    seg_lean, addon_lean, _ = split_reference_state(lean)
    seg_full, addon_full, _ = split_reference_state(good)
    assert all(addon_lean[k] is addon_full[k] for k in addon_lean)
    assert set(addon_lean) == {k for k in addon_full if not k.endswith("num_batches_tracked")}
    assert set(seg_lean) == {k for k in seg_full if not k.endswith("num_batches_tracked")}


def test_read_checkpoint_is_weights_only_and_unwraps_nesting(tmp_path):
    path = tmp_path / "cityscapes_best.pth"
    nvidia = {"state_dict": {"module.mod1.conv1.weight": torch.ones(64, 3, 3, 3)}, "epoch": 170,
              "mean_iu": np.float64(0.8), "iu": np.arange(3.0), "command": "train.py --arch ..."}
    for legacy_format in (False, True):  # files from PyTorch < 1.6 use the legacy (non-zip) format
        torch.save(nvidia, path, _use_new_zipfile_serialization=not legacy_format)
        assert list(read_checkpoint(path)) == ["module.mod1.conv1.weight"]
    rpl_path = tmp_path / "rpl.pth"
    torch.save({"model": {"branch1.mod1.conv1.weight": torch.ones(1)}, "optimizer": {"state": {}}, "epoch": 3}, rpl_path)
    assert list(read_checkpoint(rpl_path)) == ["branch1.mod1.conv1.weight"]
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.ones(1)}, "hook": subprocess.Popen}, evil)  # a global that must never load
    with pytest.raises(RPLInputError, match="evil.pth.*weights_only"):
        read_checkpoint(evil)
    with pytest.raises(RPLInputError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")


@pytest.fixture(scope="module")
def converted(published, block_state, tmp_path_factory):
    """The command line (``convert_reference_checkpoint`` + ``write_converted``) run once on a saved RPL checkpoint."""
    tmp = tmp_path_factory.mktemp("convert")
    source = tmp / "rpl_corocl.pth"
    torch.save({"model": rpl_checkpoint(published, block_state), "epoch": 39, "iteration": 0}, source)
    out_dir = tmp / "converted"
    code = convert_main([str(source), "--out-dir", str(out_dir)])
    source.unlink()
    return code, out_dir


def test_command_line_writes_segmenter_and_addon(converted, published, block_state, capsys):
    from safetensors.torch import load_file

    code, out_dir = converted
    assert code == 0
    segmenter = load_file(str(out_dir / "segmenter.safetensors"))
    assert segmenter.keys() == published.keys()
    assert all(torch.equal(segmenter[k], published[k]) for k in ("mod1.conv1.weight", "final.6.weight"))
    addon = load_file(str(out_dir / "rpl_addon.safetensors"))
    _, expected, _ = split_reference_state(rpl_checkpoint(published, block_state))
    assert addon.keys() == expected.keys() and all(torch.equal(addon[k], expected[k]) for k in expected)
    meta = read_metadata(out_dir / "rpl_addon.safetensors")
    assert (meta["wrap"]["head"], meta["wrap"]["feature"]) == ("final", "mod7")
    spec = SegmenterSpec.from_dict(meta["extra"]["segmenter"])
    assert spec.model == "rpl.models.wider_resnet:deepwv3plus" and spec.weights == "segmenter.safetensors"
    assert spec.kwargs == {"num_classes": K} and list(spec.mean) == [0.485, 0.456, 0.406]
    assert convert_main([str(out_dir / "nope.pth"), "--out-dir", str(out_dir)]) == 2
    assert "nope.pth" in capsys.readouterr().err


@pytest.mark.slow
def test_converted_files_rebuild_the_reference_model(converted, bare_run, reference_out, image):
    _, out_dir = converted
    meta = read_metadata(out_dir / "rpl_addon.safetensors")
    segmenter = build_segmenter(SegmenterSpec.from_dict(meta["extra"]["segmenter"]), base_dir=out_dir)  # as rpl-eval
    loaded = rpl.load(out_dir / "rpl_addon.safetensors", segmenter, probe_size=(32, 32)).eval()
    with torch.no_grad():
        out = loaded(image)
    assert torch.equal(out.logits, bare_run["logits"])
    torch.testing.assert_close(out.anomaly_logits, reference_out[0], rtol=1e-4, atol=1e-5)


# -- recipes ----------------------------------------------------------------------------------------------
def test_reference_recipe_config():
    cfg = load_config(REPO / "experiments" / "cityscapes_rpl_corocl.yaml")
    assert cfg.segmenter.model == "rpl.models.wider_resnet:deepwv3plus"
    from rpl.models.wider_resnet import deepwv3plus

    assert import_factory(cfg.segmenter.model) is deepwv3plus
    assert cfg.wrap.width == 256 and cfg.wrap.init_from_aspp and cfg.wrap.head is None
    assert list(cfg.data.crop_size) == [700, 700] and cfg.data.inliers == "cityscapes"
    assert cfg.optim.lr == 7.5e-5 and cfg.optim.last_layer_lr_mult == 10 and cfg.optim.batch_size == 8
    assert cfg.optim.epochs == 40 and cfg.optim.iterations is None and cfg.optim.poly_power == 0.9
    assert (cfg.loss.outlier, cfg.loss.contrastive, cfg.loss.temperature, cfg.loss.max_samples) == (0.05, 1.0, 0.1, 512)
    from rpl.data.transforms import PASTE_SCALES
    assert tuple(cfg.data.paste_scales) == PASTE_SCALES
    assert tuple(load_config(REPO / "experiments" / "cityscapes_deeplabv3_resnet101.yaml").data.paste_scales) == PASTE_SCALES


def test_paper_evaluation_script_uses_valid_rpl_eval_flags():
    from rpl.cli.eval import build_parser

    script = (REPO / "experiments" / "reproduce_paper.sh").read_text()
    commands = [line for line in _joined_lines(script) if line.lstrip().startswith("rpl-eval ")]
    assert commands, "the script runs rpl-eval"
    parser = build_parser()
    for command in commands:
        argv = [a.replace('"', "") for a in command.split()[1:]]
        args = parser.parse_args(argv)
        assert args.pixel_mode == "exact" and args.resize is None  # pooled exact metrics at native resolution
    r = subprocess.run(["bash", "-n", str(REPO / "experiments" / "reproduce_paper.sh")], capture_output=True)
    assert r.returncode == 0, r.stderr


def _joined_lines(script: str) -> list[str]:
    lines, current = [], ""
    for line in script.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            lines.append(current + line)
            current = ""
    return lines


def test_build_segmenter_reads_a_pth_with_numpy_scalars(tmp_path):
    """NVIDIA-style training files store numpy metrics beside the weights; weights_only must still load them."""
    import numpy as np

    from rpl.models.loading import read_state_dict

    state = {"conv.weight": torch.zeros(2, 2)}
    torch.save({"state_dict": state, "mean_iu": np.float64(0.8), "epoch": 3}, tmp_path / "seg.pth")
    loaded = read_state_dict(tmp_path / "seg.pth")
    assert set(loaded) == {"conv.weight"}
