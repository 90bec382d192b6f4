"""The fast paths give the straightforward path's numbers (within dtype tolerance).

The straightforward paths are the reference-style code of the speed benchmarks in
``experiments/benchmarks`` (imported here, so the benchmarks compare like with like):
- the trainer's step (``Trainer._forward_loss`` / ``step``) against the reference-style fp32 step;
- ``channels_last`` and bf16 autocast against contiguous fp32;
- ``rpl-eval`` (one forward for all methods, metrics accumulated per image) against the reference
  loop (full score maps on the host, scikit-learn at the end).
No test here measures or asserts a time.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rpl
from rpl.config import Config
from rpl.models import DeepLabV3Plus

BENCHMARKS = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks"
TINY = {"backbone": "resnet18", "num_classes": 19, "output_stride": 16, "aspp_width": 16, "decoder_width": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(name: str):
    """A benchmark script as a module (under a private name, so it cannot clash with other modules)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared ``common`` helpers
    spec = importlib.util.spec_from_file_location(f"rpl_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_step():
    return _load("train_step")


@pytest.fixture(scope="module")
def eval_pipeline():
    return _load("eval_pipeline")


@pytest.fixture(scope="module")
def common():
    return _load("common")


def tiny_config(**train: object) -> Config:
    cfg = Config()
    cfg.segmenter.weights = None
    cfg.segmenter.kwargs = dict(TINY)
    cfg.wrap.width = 16
    cfg.optim.batch_size = 2
    cfg.train.device = "cpu"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


# -- training step -----------------------------------------------------------------------------
def test_trainer_step_equals_reference_step_in_fp32(train_step):
    batch = train_step.make_batch(2, (64, 128))
    assert (batch["target"] == 254).any() and (batch["context_target"] == 254).any()
    ours, reference = train_step.StepTrainer(tiny_config(amp="off")), train_step.ReferenceStep(tiny_config(amp="off"))
    ours_loss, parts = ours._forward_loss(batch)
    reference_loss = reference.forward_loss(batch)
    assert torch.isfinite(ours_loss) and parts["contrastive"] > 0  # every loss term is exercised
    torch.testing.assert_close(ours_loss, reference_loss, rtol=1e-6, atol=0.0)

    frozen = {k: v.clone() for k, v in ours.model.segmenter.state_dict().items()}
    ours_parts, reference_value = ours.step(batch), reference.step(batch)
    assert ours_parts["total"] == pytest.approx(reference_value, rel=1e-6)
    for p, q in zip(ours.model.addon.parameters(), reference.model.addon.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    for key, value in ours.model.segmenter.state_dict().items():
        assert torch.equal(value, frozen[key]), key  # the frozen segmenter never moves
    assert all(p.grad is None for p in ours.model.segmenter.parameters())


def test_channels_last_and_bf16_steps_match_fp32_loss(train_step):
    batch = train_step.make_batch(2, (32, 64))  # small: bf16 convolutions are slow on CPUs without bf16 units
    fp32, _ = train_step.StepTrainer(tiny_config(amp="off"))._forward_loss(batch)
    channels_last, _ = train_step.StepTrainer(tiny_config(amp="off", channels_last=True))._forward_loss(batch)
    bf16_trainer = train_step.StepTrainer(tiny_config(amp="bf16"))
    assert bf16_trainer.amp and bf16_trainer.amp_dtype == torch.bfloat16
    bf16, _ = bf16_trainer._forward_loss(batch)
    torch.testing.assert_close(channels_last, fp32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=1e-3)


# -- inference ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrapped():
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**TINY).eval()
    with torch.no_grad():
        segmenter.final[-1].weight.mul_(30.0)  # logits spread as a trained model's
    return rpl.wrap(segmenter, block={"width": 16}).eval()


def test_bf16_autocast_anomaly_map_close_to_fp32(wrapped):
    x = torch.randn(2, 3, 64, 128)
    with torch.inference_mode():
        fp32 = wrapped(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = wrapped(x)
        a, b = fp32.anomaly, bf16.anomaly
        assert b.dtype == torch.float32 and b.shape == a.shape == (2, 64, 128)
        spread = float(a.max() - a.min())
        assert float((a - b).abs().max()) <= 0.03 * spread
        assert float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) > 0.999
        assert float((fp32.logits.argmax(1) == bf16.logits.argmax(1)).float().mean()) > 0.95


def test_channels_last_inference_keeps_closed_set_identical(wrapped):
    x = torch.randn(1, 3, 128, 256)
    with torch.inference_mode():
        contiguous = wrapped(x)
        fast = wrapped.to(memory_format=torch.channels_last)
        try:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            out = fast(x_cl)
            bare = fast.segmenter(x_cl)
        finally:
            wrapped.to(memory_format=torch.contiguous_format)
    assert torch.equal(out.logits, bare)  # the wrapper still leaves the segmenter's output untouched
    torch.testing.assert_close(out.logits, contiguous.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.anomaly, contiguous.anomaly, rtol=1e-4, atol=1e-5)


# -- evaluation --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_world(tmp_path_factory, eval_pipeline):
    root = tmp_path_factory.mktemp("fast_eval")
    data_root = root / "data"
    folder = eval_pipeline.make_dataset(eval_pipeline.dataset_folder(data_root), 3, 96, 192, seed=1)
    checkpoint = eval_pipeline.make_checkpoint(root / "model", kwargs=TINY, width=16)
    return root, data_root, folder, checkpoint


def test_generated_eval_set_has_the_fishyscapes_conventions(eval_world):
    from rpl.data.registry import open_dataset

    _, data_root, _, _ = eval_world
    dataset = open_dataset("fs-laf", data_root)
    labels = np.stack([dataset[i]["label"] for i in range(len(dataset))])
    assert len(dataset) == 3 and set(np.unique(labels).tolist()) == {0, 1, 255}
    assert (labels[:, -12:] == 255).all()  # the ego-vehicle strip is void


def test_rpl_eval_exact_equals_reference_sklearn_loop(eval_world, eval_pipeline):
    root, data_root, folder, checkpoint = eval_world
    reference = eval_pipeline.reference_evaluate(checkpoint, folder)
    exact = eval_pipeline.run_rpl_eval(checkpoint, data_root, root / "exact.json", "exact",
                                       extra=("--num-workers", "0"))
    batched = eval_pipeline.run_rpl_eval(checkpoint, data_root, root / "batched.json", "streaming",
                                         extra=("--num-workers", "1", "--batch-size", "2"))
    assert set(exact) == set(reference) == set(eval_pipeline.METHODS)
    for method, ref in reference.items():
        assert 0.0 < ref["auroc"] < 1.0
        for key in ("auroc", "ap", "fpr95"):
            assert exact[method][key] == pytest.approx(ref[key], abs=1e-9), (method, key)
            assert batched[method][key] == pytest.approx(ref[key], abs=2e-3), (method, key)


# -- measuring tools ---------------------------------------------------------------------------
def test_peak_memory_sees_an_allocation_and_tables_render(common):
    memory = common.PeakMemory("cpu")
    memory.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
    added = memory.peak_added()
    del block
    assert added >= 60 * 2**20
    table = common.markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
    info = common.machine()
    assert info["cores"] >= 1 and info["cpu"] and "no GPU" in common.describe({**info, "gpu": None})
