"""A checkpoint is data: forged metadata never runs code, never reads outside its folder, never crashes."""
from __future__ import annotations

import inspect
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rpl
import rpl.cli.eval as cli
from rpl.checkpoint import read_header
from rpl.errors import RPLInputError
from rpl.models import DeepLabV3Plus, SegmenterSpec

KWARGS = {"backbone": "resnet10t", "num_classes": 19, "aspp_width": 8, "decoder_width": 8}
HUGE = 20 * 2**20  # 20 MB

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid add-on whose recorded segmenter (a listed factory) lies next to it."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**KWARGS).eval()
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(root / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors")
    return rpl.save(root / "addon.safetensors", rpl.wrap(segmenter, block={"width": 8}),
                    extra={"segmenter": spec.to_dict()})


def forge(good: Path, folder: Path, name: str, **changes) -> Path:
    """A copy of ``good`` (same folder, so its weights file is next to it) with metadata fields replaced
    (``None`` removes one); ``segmenter`` replaces entries of ``extra.segmenter``."""
    meta = dict(read_header(good))
    extra = json.loads(meta["extra"])
    for key, value in changes.pop("segmenter", {}).items():
        if value is None:
            extra["segmenter"].pop(key, None)
        else:
            extra["segmenter"][key] = value
    meta["extra"] = json.dumps(extra)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path = folder / name
    save_file(load_file(str(good)), str(path), metadata=meta)
    return path


def refused_everywhere(path: Path, capsys, *fields: str) -> str:
    """Refused by rpl.from_checkpoint (RPLInputError) and by rpl-eval (exit 2, no traceback); the message
    names the file and each of ``fields``. Returns the message."""
    with pytest.raises(RPLInputError) as err:
        rpl.from_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and all(f in message for f in fields), message
    code = cli.main(["--checkpoint", str(path), "--datasets", "fs-laf", "--data-root", str(path.parent / "none"),
                     "--quiet", "--num-workers", "0"])
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr and str(path) in stderr, stderr
    assert all(f in stderr for f in fields), stderr
    return message


# -- code in the factory name --------------------------------------------------------------------
@pytest.fixture
def evil_module(tmp_path, monkeypatch) -> tuple[str, Path]:
    """An importable module, not listed, that leaves a marker when imported or called."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_segmenters.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        f"def build(**kwargs):\n    open({str(marker)!r} + '.called', 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evil_segmenters", raising=False)
    return "evil_segmenters:build", marker


@pytest.mark.parametrize("factory,kwargs", [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:call", {"args": ["touch", "{marker}"]}),
    ("builtins:exec", {"source": "open('{marker}', 'w').close()"}),
    ("builtins:eval", {"source": "open('{marker}', 'w').close()"}),
    ("posix:system", {"command": "touch {marker}"}),
])
def test_code_naming_factories_are_refused_and_never_run(good, tmp_path, capsys, factory, kwargs):
    marker = tmp_path / "MARKER"
    filled = json.loads(json.dumps(kwargs).replace("{marker}", str(marker)))
    evil = forge(good, good.parent, f"evil_{factory.replace(':', '_')}.safetensors",
                 segmenter={"model": factory, "kwargs": filled})
    message = refused_everywhere(evil, capsys, "extra.segmenter.model", factory, "--trust-checkpoint")
    assert not marker.exists()
    assert "not among the factories" in message and "--model" in message


def test_unlisted_importable_module_is_not_even_imported(good, tmp_path, capsys, evil_module):
    factory, marker = evil_module
    evil = forge(good, good.parent, "evil_module.safetensors", segmenter={"model": factory, "kwargs": {}})
    refused_everywhere(evil, capsys, factory)
    assert "evil_segmenters" not in sys.modules and not marker.exists()


@pytest.mark.parametrize("factory,kwargs,hint", [
    ("rpl.models:build_model", {**KWARGS, "num_classes": "19"}, "num_classes"),
    ("rpl.models:build_model", {**KWARGS, "backbone": 5}, "backbone"),
    ("rpl.models:build_model", {**KWARGS, "command": "touch x"}, "command"),
    ("rpl.models:build_model", {**KWARGS, "backbone": "hf-hub:someone/evil"}, "hf-hub:"),
    ("rpl.models.wider_resnet:deepwv3plus", {"num_classes": [19]}, "num_classes"),
    ("timm:create_model", {"model_name": "resnet18", "checkpoint_path": "evil.pth"}, "checkpoint_path"),
    ("timm:create_model", {"model_name": "hf-hub:someone/evil"}, "hf-hub:"),
    ("torchvision.models.segmentation:fcn_resnet50", {"num_classes": 19.5}, "num_classes"),
    ("transformers:SegformerForSemanticSegmentation", {"config": "not a dict"}, "config"),
    ("rpl.models:build_model", ["not", "an", "object"], "extra.segmenter.kwargs"),
])
def test_listed_factory_with_bad_arguments_is_refused(good, capsys, factory, kwargs, hint):
    evil = forge(good, good.parent, "bad_kwargs.safetensors", segmenter={"model": factory, "kwargs": kwargs})
    refused_everywhere(evil, capsys, hint)


# -- weights outside the checkpoint's folder -----------------------------------------------------------
def test_weights_outside_the_folder_are_refused_unless_given_on_the_command_line(good, tmp_path, capsys):
    folder = tmp_path / "download"
    folder.mkdir()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((good.parent / "segmenter.safetensors").read_bytes())
    (folder / "link.safetensors").symlink_to(outside)
    for i, weights in enumerate(["../outside.safetensors", str(outside), "link.safetensors"]):
        evil = forge(good, folder, f"outside{i}.safetensors", segmenter={"weights": weights})
        message = refused_everywhere(evil, capsys, "extra.segmenter.weights", "--weights")
        assert "outside the checkpoint's folder" in message
    model = rpl.from_checkpoint(evil, weights=outside)  # the user names the file: accepted
    assert isinstance(model, rpl.RPLSegmenter) and not model.training
    args = cli.build_parser().parse_args(["--checkpoint", str(evil), "--weights", str(outside)])
    assert isinstance(cli.build_model(cli.resolve_source(args), args, torch.device("cpu")), rpl.RPLSegmenter)


# -- what still loads ------------------------------------------------------------------------------------
def test_shipped_checkpoint_loads_with_no_flag():
    model = rpl.pretrained()
    assert isinstance(model, rpl.RPLSegmenter) and not model.training
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 64))
    assert out.logits.shape == (1, 19, 32, 64) and out.anomaly.shape == (1, 32, 64)
    args = cli.build_parser().parse_args([])
    source = cli.resolve_source(args)
    assert source.checkpoint == cli.DEFAULT_CHECKPOINT and source.recorded


def test_from_checkpoint_equals_the_manual_composition(good):
    model = rpl.from_checkpoint(good)
    segmenter = DeepLabV3Plus(**KWARGS)
    segmenter.load_state_dict(load_file(str(good.parent / "segmenter.safetensors")))
    manual = rpl.load(good, segmenter.eval()).eval()
    x = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), manual(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.anomaly, b.anomaly)
    assert model.segmenter_spec.mean == (0.485, 0.456, 0.406)


def test_trust_checkpoint_and_model_still_build_the_users_own_factory(good, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_segmenters.py").write_text(
        "from rpl.models import DeepLabV3Plus\n"
        "def build(width: int = 8):\n"
        f"    return DeepLabV3Plus(backbone='resnet10t', num_classes=19, aspp_width=width, decoder_width=width)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    own = forge(good, good.parent, "own_factory.safetensors",
                segmenter={"model": "my_segmenters:build", "kwargs": {"width": 8}})
    message = refused_everywhere(own, capsys, "my_segmenters:build", 'my_segmenters:build(**{"width": 8})')
    assert "--trust-checkpoint" in message
    assert isinstance(rpl.from_checkpoint(own, trust_checkpoint=True), rpl.RPLSegmenter)
    for argv in (["--checkpoint", str(own), "--trust-checkpoint"],
                 ["--checkpoint", str(own), "--model", "my_segmenters:build", "--model-kwargs", '{"width": 8}',
                  "--weights", str(good.parent / "segmenter.safetensors")]):
        args = cli.build_parser().parse_args(argv)
        assert isinstance(cli.build_model(cli.resolve_source(args), args, torch.device("cpu")), rpl.RPLSegmenter)
    with pytest.raises(RPLInputError, match="width"):  # the user's own factory still gets its arguments checked
        args = cli.build_parser().parse_args(["--checkpoint", str(own), "--model", "my_segmenters:build",
                                              "--model-kwargs", '{"width": "8"}'])
        cli.build_model(cli.resolve_source(args), args, torch.device("cpu"))


def test_every_listed_factory_resolves_and_rejects_unknown_arguments():
    from rpl.models import factories

    assert {"rpl.models:build_model", "rpl.models.wider_resnet:deepwv3plus", "timm:create_model",
            "torchvision.models.segmentation:deeplabv3_resnet50", "segmentation_models_pytorch:Unet",
            "transformers:SegformerForSemanticSegmentation"} <= set(factories.names())
    for name in factories.names():
        entry = factories.lookup(name)
        fn = entry.load()
        assert callable(fn), name
        forwards = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
        if not forwards or entry.family in ("rpl", "torchvision"):  # smp/timm: checked by the constructor
            with pytest.raises(factories.FactoryArgumentError):
                factories.check_arguments(entry, fn, {"no_such_argument_xyz": 1, "model_name": "resnet18"}, "kwargs")


def test_huggingface_segmenter_builds_from_a_config_dict(good, capsys):
    from rpl.models import factories
    from rpl.models.loading import resolve_factory

    config = {"num_channels": 3, "num_encoder_blocks": 1, "depths": [1], "sr_ratios": [1], "hidden_sizes": [8],
              "patch_sizes": [3], "strides": [4], "num_attention_heads": [1], "mlp_ratios": [1],
              "decoder_hidden_size": 8, "num_labels": 19}
    spec = SegmenterSpec(model="transformers:SegformerForSemanticSegmentation", kwargs={"config": config})
    model = resolve_factory(spec, good)(**spec.kwargs)
    assert type(model).__name__ == "SegformerForSemanticSegmentation" and model.config.num_labels == 19
    bad = forge(good, good.parent, "hf_pretrained.safetensors",
                segmenter={"model": spec.model, "kwargs": {"config": {**config, "use_pretrained_backbone": True}}})
    refused_everywhere(bad, capsys, "use_pretrained_backbone")
    assert factories.lookup("transformers:AutoModel") is None


# -- metadata fuzzing ------------------------------------------------------------------------------------
def _cases() -> list[tuple[str, dict, str]]:
    """(id, changes for forge, field the message must name)."""
    huge = "x" * HUGE
    deep = "[" * 100_000
    cases = []
    for field, json_field in (("format", False), ("wrap", True), ("base_fingerprint", False), ("base_class", False),
                              ("extra", True)):
        if field != "base_class":
            cases.append((f"{field}-missing", {field: None}, field))
        if field != "base_class":  # free text: any string up to 200 characters is a class name
            cases += [(f"{field}-number", {field: "5"}, field), (f"{field}-list", {field: "[1, 2]"}, field)]
        cases.append((f"{field}-huge", {field: huge}, field))
        if json_field:
            cases += [(f"{field}-malformed", {field: "{\"head\": "}, field), (f"{field}-deep", {field: deep}, field),
                      (f"{field}-nan", {field: "NaN"}, field), (f"{field}-huge-json", {field: json.dumps({"a": huge})},
                                                                   field)]
    wrap = {"head": "final", "feature": "deep_feature", "smoothing": [7, 1.0], "feature_channels": 512,
            "head_channels": 56, "stride": 32, "block": {"width": 8}}
    for key, value in (("head", None), ("head", 3), ("head", "x" * 5000), ("feature", ["a"]),
                       ("feature_channels", "512"), ("feature_channels", -1), ("feature_channels", True),
                       ("head_channels", 1e300), ("smoothing", [7]), ("smoothing", [7, float("inf")]),
                       ("smoothing", "7,1"), ("block", []), ("block", {"width": "8"}), ("block", {"evil": 1}),
                       ("block", {"rates": [6, "12"]}), ("block", {"width": 0})):
        broken = dict(wrap)
        if value is None:
            broken.pop(key)
        else:
            broken[key] = value
        cases.append((f"wrap.{key}={str(value)[:20]}", {"wrap": json.dumps(broken)}, f"wrap.{key}"))
    for key, value in (("model", None), ("model", 5), ("model", "os.system"), ("model", "a:b" * 5000),
                       ("model", "x; rm -rf /:f"), ("kwargs", "{}"), ("kwargs", None), ("weights", 5),
                       ("weights", ""), ("weights", "a\0b"), ("num_classes", "19"), ("num_classes", 0),
                       ("mean", [0.5]), ("mean", "0.5,0.5,0.5"), ("std", [1, 0, 1]), ("evil_option", 1)):
        field = "extra.segmenter" if key == "evil_option" else f"extra.segmenter.{key}"
        if value is None:  # a missing model/kwargs takes the default: builds or fails cleanly, naming the file
            field = ""
        cases.append((f"segmenter.{key}={str(value)[:20]}", {"segmenter": {key: value}}, field))
    cases.append(("extra-no-segmenter", {"extra": "{}"}, "extra.segmenter"))
    cases.append(("extra.segmenter-list", {"extra": '{"segmenter": [1]}'}, "extra.segmenter"))
    return cases


@pytest.mark.parametrize("case_id,changes,field", _cases(), ids=[c[0] for c in _cases()])
def test_fuzzed_metadata_gives_only_clean_errors(good, tmp_path, case_id, changes, field):
    path = forge(good, good.parent, f"fuzz_{abs(hash(case_id))}.safetensors", **changes)
    try:
        rpl.from_checkpoint(path)
    except RPLInputError as err:
        message = str(err)
        assert str(path) in message and field in message, message  # field "": any clean error naming the file
        assert len(message) < 3000, "error messages stay one paragraph, whatever the field holds"
    else:
        assert field == "" or field.startswith("wrap.feature") or field == "extra.segmenter.kwargs", case_id
    finally:
        path.unlink()


def _raw_file(path: Path, header: bytes, declared: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header)
    return path


@pytest.mark.parametrize("name,make", [
    ("empty", lambda p: (p.write_bytes(b""), p)[1]),
    ("short", lambda p: (p.write_bytes(b"\x01\x02"), p)[1]),
    ("header-claims-exabytes", lambda p: _raw_file(p, b"{}", declared=2**62)),
    ("header-past-end", lambda p: _raw_file(p, b"{}", declared=10_000)),
    ("header-not-json", lambda p: _raw_file(p, b"\xff\xfe{")),
    ("header-list", lambda p: _raw_file(p, b"[]")),
    ("header-deep", lambda p: _raw_file(p, b"[" * 200_000)),
    ("metadata-list", lambda p: _raw_file(p, b'{"__metadata__": []}')),
    ("metadata-value-number", lambda p: _raw_file(p, b'{"__metadata__": {"format": "rpl-addon/1", "wrap": 5}}')),
    ("no-metadata", lambda p: _raw_file(p, b"{}")),
    ("folder", lambda p: (p.mkdir(), p)[1]),
])
def test_damaged_files_give_clean_errors(tmp_path, capsys, name, make):
    path = make(tmp_path / f"{name}.safetensors")
    with pytest.raises(RPLInputError) as err:
        rpl.from_checkpoint(path)
    assert str(path) in str(err.value)
    assert cli.main(["--checkpoint", str(path), "--datasets", "fs-laf", "--data-root", str(tmp_path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_tensors_of_a_damaged_addon_give_a_clean_error(good, tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(good.read_bytes()[:-100])
    import shutil

    shutil.copy(good.parent / "segmenter.safetensors", tmp_path / "segmenter.safetensors")
    with pytest.raises(RPLInputError, match="truncated.safetensors"):
        rpl.from_checkpoint(path)
    assert os.path.exists(path)
