"""ONNX export: onnxruntime against eager torch on SynthStreets pictures (shipped model) and the rpl-export CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rpl
from rpl.cli.export import main as export_main
from rpl.cli.predict import load_model
from rpl.evaluation import Preprocess
from rpl.models import DeepLabV3Plus, SegmenterSpec
from models_for_tests import ToySegmenter, save_pebal_checkpoint, tuned_pebal

onnx = pytest.importorskip("onnx", reason="ONNX export checks need onnx and onnxruntime (pip install 'rpl[export]')")
ort = pytest.importorskip("onnxruntime", reason="ONNX parity needs onnxruntime (pip install 'rpl[export]')")

from rpl.export import parity, run_onnx, to_onnx  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "rpl_synthstreets.safetensors"
KWARGS = dict(backbone="resnet18", num_classes=19, aspp_width=16, decoder_width=16)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthstreets_images(n: int, size) -> np.ndarray:
    """Streets with anomalies, drawn as the SynthStreets anomaly test set draws them."""
    from rpl.data.synthstreets.scene import render_street

    return np.stack([render_street(np.random.default_rng(100 + i), size, anomalies=1).image for i in range(n)])


def test_onnx_matches_eager_on_synthstreets_with_the_shipped_model(tmp_path):
    model = load_model(SHIPPED, torch.device("cpu")).eval()
    path = tmp_path / "rpl.onnx"
    info = to_onnx(model, path, preprocess=Preprocess(), sample_size=(192, 384))
    assert info.dynamic and info.include_preprocess and info.note is None and info.parity is not None
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rpl_opset"] == str(info.opset) and meta["rpl_method"] == "rpl"
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["logits",
                                                                                                         "anomaly"]
    for size, n in (((192, 384), 3), ((96, 160), 2)):  # the traced size and another (dynamic axes)
        images = synthstreets_images(n, size)
        logits, anomaly = run_onnx(path, images)
        with torch.no_grad():
            out = model(Preprocess()(torch.from_numpy(images)))
        p = parity(logits, anomaly, out.logits.numpy(), out.anomaly.numpy())
        assert logits.shape == (n, 19, *size) and anomaly.shape == (n, *size)
        assert p["logits_rel"] <= 1e-4, p
        assert p["anomaly_rel"] <= 1e-3, p
        assert p["argmax_agreement"] >= 0.9999, p


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_world")
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**KWARGS).eval()
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(root / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors")
    return rpl.save(root / "addon.safetensors", rpl.wrap(segmenter, block={"width": 16}),
                    extra={"segmenter": spec.to_dict()})


def test_rpl_export_cli_float_input_and_posthoc_method(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--size", "32x64"]) == 0
    printed = capsys.readouterr().out
    assert "dynamic batch, height and width" in printed and "argmax agreement" in printed
    model = load_model(tiny_checkpoint, torch.device("cpu")).eval()
    x = torch.randn(2, 3, 48, 96)
    logits, anomaly = run_onnx(out, x.numpy())
    with torch.no_grad():
        ref = model(x)
    p = parity(logits, anomaly, ref.logits.numpy(), ref.anomaly.numpy())
    assert p["logits_rel"] <= 1e-4 and p["anomaly_rel"] <= 1e-3 and p["argmax_agreement"] >= 0.9999, p

    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    energy = tmp_path / "energy.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(energy), "--size", "32x64",
                        "--method", "energy", "--static"]) == 0
    logits, score = run_onnx(energy, x[:1, :, :32, :64].contiguous().numpy())
    with torch.no_grad():
        ref = model(x[:1, :, :32, :64])
    np.testing.assert_allclose(score, rpl.scores.energy(ref.logits).numpy(), rtol=0, atol=1e-4)
    assert {p.key: p.value for p in onnx.load(str(energy)).metadata_props}["rpl_dynamic"] == "false"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x.onnx"),
                        "--method", "mystery"]) == 2
    assert "unknown method 'mystery'" in capsys.readouterr().err


# -- every method of the registry -----------------------------------------------------------------
def assert_agrees(path: Path, model, x: torch.Tensor, onnx_input: np.ndarray | None = None) -> None:
    """onnxruntime's logits and anomaly (on ``onnx_input``, default ``x``) against eager ``model(x)``, with
    the tolerances of the rpl tests; the class may differ only where the top two logits nearly tie (a
    random-weight segmenter has such pixels)."""
    logits, anomaly = run_onnx(path, x.numpy() if onnx_input is None else onnx_input)
    with torch.no_grad():
        ref = model(x)
    ref_logits = ref.logits.numpy()
    assert logits.shape == ref_logits.shape and anomaly.shape == tuple(ref.anomaly.shape)
    p = parity(logits, anomaly, ref_logits, ref.anomaly.numpy())
    assert p["logits_rel"] <= 1e-4 and p["anomaly_rel"] <= 1e-3, p
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    tie = top2[:, 1] - top2[:, 0] <= 2e-4 * np.abs(ref_logits).max()
    assert np.array_equal(logits.argmax(1)[~tie], ref_logits.argmax(1)[~tie]) and tie.mean() < 0.01, p


def test_onnx_of_a_pebal_model_matches_eager_at_dynamic_sizes(tmp_path):
    torch.manual_seed(0)
    model = tuned_pebal(DeepLabV3Plus(**KWARGS).eval(), 19)
    info = to_onnx(model, tmp_path / "pebal.onnx", sample_size=(32, 64))  # its own method: pebal
    assert info.method == "pebal" and info.dynamic and info.note is None
    assert info.parity["anomaly_rel"] <= 1e-3, info.parity
    assert {p.key: p.value for p in onnx.load(str(info.path)).metadata_props}["rpl_method"] == "pebal"
    for shape in ((1, 3, 32, 64), (2, 3, 48, 80)):  # the traced size and another
        assert_agrees(info.path, model, torch.randn(*shape))
    with torch.no_grad():  # the blurred energy, not the unblurred one
        ref = model(torch.randn(1, 3, 32, 64))
    assert float((ref.anomaly - rpl.scores.energy(ref.logits)).abs().max()) > 1e-3
    with pytest.raises(rpl.errors.RPLInputError, match="holds method 'pebal', not 'rpl'"):
        to_onnx(model, tmp_path / "x.onnx", method="rpl", sample_size=(32, 64))
    with pytest.raises(rpl.errors.RPLInputError, match="rpl-eval --methods mcdropout"):
        to_onnx(model, tmp_path / "x.onnx", method="mcdropout", sample_size=(32, 64))


def test_rpl_export_cli_with_a_pebal_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**KWARGS).eval()
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(tmp_path / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors")
    checkpoint = save_pebal_checkpoint(tmp_path / "pebal.safetensors", segmenter, 19, {"segmenter": spec.to_dict()})
    out = tmp_path / "pebal.onnx"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--size", "32x64",
                        "--include-preprocess"]) == 0, capsys.readouterr().err
    assert "anomaly = pebal" in capsys.readouterr().out
    model = load_model(checkpoint, torch.device("cpu")).eval()
    images = synthstreets_images(2, (48, 96))
    assert_agrees(out, model, Preprocess()(torch.from_numpy(images)), images)
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.onnx"), "--method", "rpl"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} holds method 'pebal', not 'rpl'" in err and "Traceback" not in err
    assert not (tmp_path / "r.onnx").exists()


def test_a_registered_method_is_exported_with_no_other_change(monkeypatch, tmp_path):
    from test_predict import ToyWrapper, register_toys

    register_toys(monkeypatch)
    torch.manual_seed(0)
    model = ToyWrapper(ToySegmenter(num_classes=5).eval())
    info = to_onnx(model, tmp_path / "toy.onnx", sample_size=(32, 48))
    assert info.method == "toy" and info.dynamic
    assert_agrees(info.path, model, torch.randn(2, 3, 40, 56))
    spread = to_onnx(model.segmenter, tmp_path / "spread.onnx", method="spread", sample_size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    _, score = run_onnx(spread.path, x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(score, model.segmenter(x).std(1).numpy(), rtol=0, atol=1e-5)
