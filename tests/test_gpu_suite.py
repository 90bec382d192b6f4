"""The GPU suite's CPU-checkable parts: shell syntax, --dry-run (steps, flags, JSON schema), target logic."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "experiments" / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(SUITE.parent))
import gpu_suite  # noqa: E402


def test_shell_wrapper_parses():
    subprocess.run(["bash", "-n", str(SUITE.with_suffix(".sh"))], check=True)


def test_dry_run_lists_every_step_and_checks_their_flags(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    names = [s.name for s in gpu_suite.steps()]
    assert list(report["steps"]) == names
    assert {"cuda_tests", "methods", "train_step", "inference", "eval_pipeline", "inference_compiled"} == set(names)
    assert report["schema"] == gpu_suite.SCHEMA_VERSION and report["targets"] == gpu_suite.TARGETS
    assert all(step["status"] == "planned" and step["problem"] is None for step in report["steps"].values())
    for name in names:
        assert name in proc.stdout


def test_dry_run_reports_a_flag_a_script_lacks(tmp_path):
    step = gpu_suite.Step("x", [], 1, "", script=SUITE.parent / "inference.py", flags=["--no-such-flag"])
    assert "--no-such-flag" in gpu_suite.check_flags(step)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_the_suite_refuses_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SUITE), "--out", str(tmp_path / "x.json")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def _train_raw(ours_s: float, ours_bytes: int, ref_s: float, ref_bytes: int) -> dict:
    run = lambda t, b: {"times": [t, t, t], "peak_bytes": b, "images_per_step": 16}  # noqa: E731
    return {"results": {"gpu-resnet101": {"reference": [run(ref_s, ref_bytes)], "ours": [run(ours_s, ours_bytes)]}}}


def test_train_targets_are_computed_from_the_figures():
    met = gpu_suite.train_figures(_train_raw(0.4, 5 * 2**30, 1.0, 10 * 2**30))
    assert met["speedup"] == pytest.approx(2.5) and met["memory_ratio"] == pytest.approx(0.5)
    assert met["meets_speed_target"] and met["meets_memory_target"]
    missed = gpu_suite.train_figures(_train_raw(0.8, 7 * 2**30, 1.0, 10 * 2**30))
    assert missed["speedup"] == pytest.approx(1.25) and not missed["meets_speed_target"]
    assert not missed["meets_memory_target"]


def test_inference_targets_only_judge_bf16_rows():
    def entry(precision: str, bare: float, ref: float, light: float) -> dict:
        times = {"bare": [bare], gpu_suite.REFERENCE_BLOCK: [ref], gpu_suite.LIGHT_BLOCK: [light]}
        return {"device": "cuda", "model": "deeplabv3-resnet101", "precision": precision, "channels_last": True,
                "runs": [{"times": times}]}

    rows = gpu_suite.inference_figures({"results": [entry("bf16", 10.0, 12.5, 10.5), entry("fp32", 20.0, 40.0, 30.0),
                                                    {"device": "cpu", "runs": []}]})["rows"]
    assert len(rows) == 2
    bf16, fp32 = rows
    assert bf16["reference_block_overhead"] == pytest.approx(0.25) and bf16["reference_block_meets_target"]
    assert bf16["light_block_overhead"] == pytest.approx(0.05) and bf16["light_block_meets_target"]
    assert "reference_block_meets_target" not in fp32 and fp32["reference_block_overhead"] == pytest.approx(1.0)
    slow = gpu_suite.inference_figures({"results": [entry("bf16", 10.0, 14.0, 11.5)]})["rows"][0]
    assert not slow["reference_block_meets_target"] and not slow["light_block_meets_target"]


def test_eval_target_and_summary_table():
    raw = {"images": 30, "size": [1024, 2048], "runs": {"reference": [{"seconds": 90.0}], "rpl-eval": [{"seconds": 20.0}]}}
    fig = gpu_suite.eval_figures(raw)
    assert fig["speedup"] == pytest.approx(4.5) and fig["meets_target"]
    report = gpu_suite.skeleton("NVIDIA H200")
    report["steps"]["eval_pipeline"] = {"status": "ok", "seconds": 110.0, "figures": fig}
    report["steps"]["train_step"] = {"status": "timeout", "seconds": 180.0}
    table = gpu_suite.summary_table(report)
    assert "NVIDIA H200" in table and "speed-up 4.50x" in table and "| train_step | timeout | 180 |" in table


def test_trainable_methods_include_rpl():
    assert "rpl" in gpu_suite.trainable_methods()
