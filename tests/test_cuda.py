"""The CUDA path: bit-identical closed-set logits on the GPU, mixed-precision training, GPU evaluation.

Every test here needs a CUDA device and is marked ``cuda``: ``pytest -m cuda`` runs exactly these
(``experiments/benchmarks/gpu_suite.sh`` does, on a lent GPU). They go through the public entry
points (``rpl.wrap``, ``rpl-train``, ``rpl-eval``), so they test what a user runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import rpl
from rpl.cli.eval import main as eval_main
from rpl.cli.train import main as train_main
from rpl.data.io import write_image, write_label
from rpl.models import DeepLabV3Plus
from rpl.models.loading import SegmenterSpec
from train_world import SEG_KWARGS, make_world, overrides

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("cuda_world"))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_closed_set_logits_bit_identical_on_cuda(amp, channels_last):
    segmenter = DeepLabV3Plus(**SEG_KWARGS).cuda().eval()
    x = torch.randn(2, 3, 64, 128, device="cuda")
    if channels_last:
        segmenter = segmenter.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model = rpl.wrap(segmenter, block={"width": 16})
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        bare = segmenter(x)
        out = model(x)
    bare = bare["out"] if isinstance(bare, dict) else bare
    assert out.logits.device.type == "cuda"
    assert torch.equal(out.logits, bare)
    assert out.anomaly.shape == (2, 64, 128) and torch.isfinite(out.anomaly.float()).all()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_steps_under_mixed_precision(world, tmp_path, amp):
    """A few rpl-train steps on the GPU: finite, not skipped, the add-on moves, the frozen base does not."""
    run = tmp_path / amp
    code = train_main(["--work-dir", str(run), "--quiet", *[a for item in overrides(
        world, steps=4, **{"train.device": "cuda", "train.amp": amp}) for a in ("--set", item)]])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert all(np.isfinite(v) for k, v in summary["last_losses"].items() if isinstance(v, float))
    trained = load_file(str(run / "last.safetensors"))
    torch.manual_seed(0)
    untrained = rpl.wrap(DeepLabV3Plus(**SEG_KWARGS).eval(), block={"width": 16}).bare_addon.state_dict()
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained if k in untrained)
    meta = rpl.checkpoint.read_metadata(run / "last.safetensors")
    base = DeepLabV3Plus(**SEG_KWARGS)
    base.load_state_dict(load_file(str(world / "segmenter.safetensors")))
    assert meta["base_fingerprint"] == rpl.checkpoint.fingerprint(base)


def _anomaly_set(folder: Path, n: int = 3, size=(64, 128)) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(40, 120, (*size, 3), dtype=np.uint8)
        label = np.zeros(size, np.uint8)
        image[20:34, 30:60] = 230
        label[20:34, 30:60] = 1
        label[-3:] = 255
        write_image(folder / "images" / f"f{i}.png", image)
        write_label(folder / "labels_masks" / f"f{i}.png", label)


def test_evaluation_on_cuda_matches_cpu(tmp_path):
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**SEG_KWARGS).eval()
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(tmp_path / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=SEG_KWARGS, weights="segmenter.safetensors")
    checkpoint = rpl.save(tmp_path / "addon.safetensors", rpl.wrap(segmenter, block={"width": 16}),
                          extra={"segmenter": spec.to_dict()})
    _anomaly_set(tmp_path / "data" / "synthstreets-anomaly")
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        assert eval_main(["--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "data"), "--datasets",
                          "synthstreets-anomaly", "--device", device, "--num-workers", "0", "--quiet",
                          "--pixel-mode", "exact", "--json", str(out)]) == 0
        results[device] = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results["cpu"]) == set(results["cuda"])
    for method, row in results["cpu"].items():
        for key in ("auroc", "ap", "fpr95"):
            assert results["cuda"][method][key] == pytest.approx(row[key], abs=2e-3), (method, key)
