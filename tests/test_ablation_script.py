"""experiments/ablation_corocl.py: reuses finished runs and reports mean ± spread over seeds."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "ablation_corocl.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_corocl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_report(rpl_ap: float) -> dict:
    rows = []
    for s in ("synthstreets-anomaly", "synthstreets-rural", "synthstreets-obstacle"):
        rows.append({"dataset": s, "method": "rpl", "auroc": 0.9, "ap": rpl_ap, "fpr95": 0.2})
        for m in ("energy", "maxlogit", "msp", "entropy"):
            rows.append({"dataset": s, "method": m, "auroc": 0.8, "ap": 0.1, "fpr95": 0.5})
    return {"results": rows}


def test_finished_runs_are_reused_and_tabulated(ablation, tmp_path, monkeypatch):
    aps = {("RPL+CoroCL", 0): 0.30, ("RPL+CoroCL", 1): 0.40, ("RPL (no CoroCL)", 0): 0.20, ("RPL (no CoroCL)", 1): 0.20}
    for (variant, seed), ap in aps.items():
        d = ablation.run_dir(tmp_path, variant, seed)
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps(fake_report(ap)))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation.subprocess, "run", no_training)
    out = tmp_path / "table.md"
    assert ablation.main(["--seeds", "0", "1", "--work-root", str(tmp_path), "--markdown", str(out)]) == 0
    text = out.read_text()
    corocl = next(line for line in text.splitlines() if line.startswith("| RPL+CoroCL"))
    assert "90.00 ± 0.00 / 35.00 ± 7.07 / 20.00 ± 0.00" in corocl
    alone = next(line for line in text.splitlines() if line.startswith("| RPL (no CoroCL)"))
    assert "20.00 ± 0.00" in alone
    assert "| energy | 80.00 / 10.00 / 50.00" in text
    assert "RPL+CoroCL, seed 1: anomaly 40.00 / 20.00" in text


def test_missing_run_is_trained_with_the_variant_overrides(ablation, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        work_dir = Path(cmd[cmd.index("--work-dir") + 1])
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "eval.json").write_text(json.dumps(fake_report(0.5)))

    monkeypatch.setattr(ablation.subprocess, "run", fake_run)
    assert ablation.main(["--seeds", "3", "--work-root", str(tmp_path)]) == 0
    assert len(calls) == 2
    assert "train.seed=3" in calls[0] and "loss.contrastive=0" not in calls[0]
    assert "train.seed=3" in calls[1] and "loss.contrastive=0" in calls[1]
