"""Add-on checkpoints: round trip, base fingerprint, DDP prefixes, corrupt files."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import rpl
from rpl.checkpoint import fingerprint, load_addon, read_metadata
from rpl.errors import RPLInputError
from models_for_tests import ToySegmenter, randomize_bn


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    base = randomize_bn(ToySegmenter(), seed).eval()
    return rpl.wrap(base, head="head", feature="stem", block={"width": 8, **kw})


def test_round_trip_restores_outputs(tmp_path):
    model = _model().eval()
    for p in model.addon.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    path = rpl.save(tmp_path / "addon.safetensors", model, extra={"note": "test"})
    meta = read_metadata(path)
    assert meta["extra"] == {"note": "test"} and meta["wrap"]["head"] == "head"
    assert meta["base_fingerprint"] == fingerprint(model.segmenter)

    fresh_base = randomize_bn(ToySegmenter(), 0).eval()
    fresh_base.load_state_dict(model.segmenter.state_dict())
    loaded = rpl.load(path, fresh_base).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.anomaly_logits, b.anomaly_logits)
    assert torch.equal(a.logits, b.logits)
    assert not list(tmp_path.glob(".*tmp*"))  # temp file renamed away


def test_other_base_model_is_refused(tmp_path):
    path = rpl.save(tmp_path / "a.safetensors", _model(seed=0))
    other = randomize_bn(ToySegmenter(), 1)
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in other.modules()]
    with pytest.raises(RPLInputError, match="different base model"):
        rpl.load(path, other)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in other.modules()] == hooks  # not left wrapped
    assert all(p.requires_grad for p in other.parameters())
    rpl.load(path, other, check_base=False)  # explicit opt-out works


def test_block_config_mismatch_and_corrupt_files(tmp_path):
    model = _model()
    path = rpl.save(tmp_path / "a.safetensors", model)
    wider = _model(width=16)
    with pytest.raises(RPLInputError, match="does not fit"):
        load_addon(path, wider)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(RPLInputError, match="bad.safetensors"):
        read_metadata(bad)
    with pytest.raises(RPLInputError, match="does not exist"):
        read_metadata(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(RPLInputError, match="format"):
        read_metadata(plain)


def test_module_prefixes_are_stripped(tmp_path):
    model = _model()
    path = rpl.save(tmp_path / "a.safetensors", model)
    state = {f"module.{k}": v for k, v in load_file(str(path)).items()}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    prefixed = tmp_path / "prefixed.safetensors"
    save_file(state, str(prefixed), metadata=meta)
    other = _model(seed=0)
    load_addon(prefixed, other)
    for k, v in model.addon.state_dict().items():
        assert torch.equal(v, other.addon.state_dict()[k])


def test_inside_ddp(tmp_path):
    """Single-process gloo group: the add-on in DDP and the whole wrapper in DDP both train and save."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model()
        expected_base = {k: v.clone() for k, v in model.segmenter.state_dict().items()}
        model.addon = DDP(model.addon)
        whole = DDP(_model())  # frozen parameters are ignored by DDP (requires_grad=False)
        x = torch.randn(2, 3, 32, 32)
        for m, params in ((model, model.trainable_parameters()), (whole, whole.parameters())):
            opt = torch.optim.SGD(list(params), lr=0.1)
            out = m(x)
            out.anomaly_logits.square().mean().backward()
            opt.step()
        for k, v in expected_base.items():
            assert torch.equal(v, model.segmenter.state_dict()[k])
        path = rpl.save(tmp_path / "ddp.safetensors", model)
        assert not any(k.startswith("module.") for k in load_file(str(path)))
        plain = _model()
        load_addon(path, plain)
        with torch.no_grad():
            assert torch.equal(plain.eval()(x).anomaly_logits, model.eval()(x).anomaly_logits)
        # a whole-wrapper DDP state dict carries "module." prefixes everywhere
        from rpl.checkpoint import strip_prefix

        state = strip_prefix(whole.state_dict())
        assert set(state) == set(whole.module.state_dict())
    finally:
        dist.destroy_process_group()


def test_strip_prefix_only_touches_the_start_of_keys():
    from rpl.checkpoint import strip_prefix

    t = torch.zeros(1)
    state = {"module.encoder.submodule.weight": t, "module.module.head.weight": t, "encoder.module.bias": t}
    assert sorted(strip_prefix(state)) == ["encoder.module.bias", "encoder.submodule.weight", "head.weight"]
    assert list(strip_prefix({"encoder.submodule.weight": t})) == ["encoder.submodule.weight"]


def test_one_reader_for_weight_files(tmp_path):
    from rpl.models.loading import read_raw_state_dict, read_state_dict
    from rpl.models.reference import read_checkpoint

    t = torch.arange(3.0)
    torch.save({"model": {"module.encoder.submodule.weight": t}, "epoch": 3}, tmp_path / "w.pth")
    assert list(read_raw_state_dict(tmp_path / "w.pth")) == ["module.encoder.submodule.weight"]
    assert list(read_checkpoint(tmp_path / "w.pth")) == ["module.encoder.submodule.weight"]
    assert list(read_state_dict(tmp_path / "w.pth")) == ["encoder.submodule.weight"]
    torch.save({"epoch": 3}, tmp_path / "numbers.pth")
    with pytest.raises(RPLInputError, match=r"numbers.pth: entries \['epoch'\] are not tensors"):
        read_state_dict(tmp_path / "numbers.pth")
    torch.save({"model": {}}, tmp_path / "empty.pth")
    with pytest.raises(RPLInputError, match="empty.pth holds no state dict"):
        read_checkpoint(tmp_path / "empty.pth")


def test_load_returns_eval_mode_for_inference(tmp_path):
    """rpl.load's model is ready for inference whatever mode it was saved in: BatchNorm statistics stay put,
    a batch of one works, and scores do not depend on the rest of the batch."""
    model = _model()
    model.train()  # saved straight from training
    path = rpl.save(tmp_path / "addon.safetensors", model)
    fresh = randomize_bn(ToySegmenter(), 0)
    fresh.load_state_dict(model.segmenter.state_dict())
    fresh.train()  # a user's segmenter fresh from its factory may be in training mode
    loaded = rpl.load(path, fresh)
    assert not loaded.training and not loaded.addon.training and not loaded.segmenter.training
    buffers = {k: v.clone() for k, v in loaded.addon.state_dict().items() if "running" in k or "num_batches" in k}
    assert buffers
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        one = loaded(x[:1]).anomaly  # a batch of one (train-mode BatchNorm over a 1x1 pooled map would fail)
        three = loaded(x).anomaly
    assert torch.allclose(one[0], three[0], atol=1e-5)  # batch-independent scores
    for k, v in loaded.addon.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    loaded.train()  # how to train it further: only the add-on switches
    assert loaded.addon.training and not loaded.segmenter.training
