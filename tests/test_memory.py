"""The per-image memory estimate: a large image is refused before its forward, with --resize advice."""
from __future__ import annotations

import pytest
import torch

import rpl.cli.eval as cli
from rpl.evaluation import Evaluator
from rpl.memory import GB, MemoryGuard, available_bytes, estimate_peak_bytes, fitting_size
from test_cli_outputs import run, world  # noqa: F401 (module fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_estimate_and_fitting_size():
    per_pixel = 19 * 2 * 4 * 2 + 256  # logits of both passes plus a working copy, plus the backbone
    assert estimate_peak_bytes(1024, 2048, 1, 19) == 1024 * 2048 * per_pixel
    assert estimate_peak_bytes(1024, 2048, 2, 19) == 2 * estimate_peak_bytes(1024, 2048, 1, 19)
    need = estimate_peak_bytes(4000, 8000, 1, 19)
    assert need > 16 * GB
    h, w = fitting_size(4000, 8000, need, 4 * GB)
    assert h % 32 == 0 and w % 32 == 0 and abs(w / h - 2) < 0.05
    assert estimate_peak_bytes(h, w, 1, 19) <= 4 * GB
    assert available_bytes(torch.device("cpu")) > 0


def test_image_over_the_budget_is_refused_before_its_forward(world, capsys, monkeypatch):  # noqa: F811
    def no_forward(self, x):
        raise AssertionError("the image was run although it does not fit")

    with monkeypatch.context() as m:
        m.setattr(Evaluator, "_forward", no_forward)
        assert run(world, "--memory-budget", "0.0008") == 2
    err = capsys.readouterr().err
    assert "image" in err and "frame_000.png" in err and "64x32 (WxH)" in err and "--memory-budget" in err
    assert "Pass --resize 32x32" in err and "Traceback" not in err and err.count("\n") == 1
    assert run(world, "--memory-budget", "0.0008", "--resize", "32x32") == 0  # the advice works
    assert run(world, "--memory-budget", "0") == 2
    assert "--memory-budget must be a positive" in capsys.readouterr().err


def test_guard_checks_each_size_once_and_counts_the_batch():
    model = torch.nn.Conv2d(3, 5, 1)
    guard = MemoryGuard(model, torch.device("cpu"), budget_gb=estimate_peak_bytes(8, 8, 2, 5, 1) / GB, wrapped=False)
    guard.check(torch.zeros(2, 3, 8, 8), "d", "a.png")
    assert guard.num_classes == 5 and guard.checked == {(2, 8, 8)}
    with pytest.raises(Exception, match="--batch-size 1"):
        guard.check(torch.zeros(3, 3, 8, 8), "d", "b.png")
