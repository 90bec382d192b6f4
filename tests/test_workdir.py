"""One run per work dir: lock, stale temporaries, run ids, resume config checks, a consistent checkpoint pair."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rpl.cli.train import main as train_main
from rpl.config import load_config
from rpl.errors import RPLInputError
from rpl.training import build_trainer
from rpl.workdir import (LOCK_NAME, WorkDirLock, check_resume_config, config_changes, hold_work_dir,
                         remove_stale_temporaries, safetensors_step)
from train_world import make_world, overrides

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys, time
from rpl.workdir import WorkDirLock
lock = WorkDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"))


def _holder(work: Path) -> subprocess.Popen:
    """Another process holding the lock of ``work`` until killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _sets(items: list[str]) -> list[str]:
    return sum((["--set", s] for s in items), [])


# -- the lock -------------------------------------------------------------------------------------
def test_second_run_is_refused_at_once_with_the_holders_pid(world, tmp_path, capsys, monkeypatch):
    work = tmp_path / "run"
    proc = _holder(work)
    try:
        import rpl.training

        def no_model(*a, **k):
            raise AssertionError("the model was built although the work dir is taken")

        monkeypatch.setattr(rpl.training, "build_model", no_model)
        assert train_main(["--work-dir", str(work), "--quiet", *_sets(overrides(world))]) == 2
        err = capsys.readouterr().err
        holder = json.loads((work / LOCK_NAME).read_text())
        assert f"pid {proc.pid}" in err and holder["started"] in err and "in use by another rpl-train run" in err
        assert "Traceback" not in err
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    work = tmp_path / "run"
    proc = _holder(work)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((work / LOCK_NAME).read_text())["pid"] == proc.pid  # what the killed run left
    with WorkDirLock(work) as lock:
        assert lock.previous["pid"] == proc.pid and not lock.previous["alive"]
        assert f"pid {proc.pid}" in lock.takeover_note()
        assert json.loads((work / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RPLInputError, match=f"pid {os.getpid()}"):
            WorkDirLock(work).acquire()  # the same process opening it again is refused too
    with WorkDirLock(work) as again:  # released cleanly: nothing to take over
        assert again.takeover_note() is None


def test_unwritable_work_dir_is_refused_before_the_model(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train_main(["--work-dir", str(blocker / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--work-dir" in err and "cannot be written" in err and "Traceback" not in err


def test_stale_temporaries_are_removed_on_start(tmp_path, capsys):
    work = tmp_path / "run"
    work.mkdir()
    stale = [work / ".last.pt.tmp4242", work / ".last.safetensors.tmp4242", work / ".best.safetensors.tmp17"]
    for path in stale:
        path.write_bytes(b"partial")
    keep = [work / "last.pt", work / ".hidden", work / "notes.tmp1"]
    for path in keep:
        path.write_bytes(b"keep")
    with hold_work_dir(work):
        pass
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert "removed 3 stale temporary file(s)" in capsys.readouterr().err
    assert remove_stale_temporaries(work) == []


# -- resume config ---------------------------------------------------------------------------------
def test_config_comparison_is_a_pure_function():
    old = {"wrap": {"width": 64, "rates": [1, 6]}, "optim": {"lr": 5e-4, "iterations": 150},
           "data": {"num_workers": 2}, "segmenter": {"kwargs": {"aspp_width": 64}}}
    assert config_changes(old, old) == {}
    lr = {**old, "optim": {"lr": 1e-3, "iterations": 300}, "data": {"num_workers": 0}}
    with pytest.raises(RPLInputError, match=r"optim.iterations \(150 -> 300\), optim.lr") as err:
        check_resume_config(old, lr)
    assert "--allow-changes optim.iterations,optim.lr" in str(err.value) and "num_workers" not in str(err.value)
    assert check_resume_config(old, lr, ["optim.lr", "optim.iterations"]) == {
        "optim.iterations": (150, 300), "optim.lr": (5e-4, 1e-3)}
    assert check_resume_config(old, lr, ["optim"]) == check_resume_config(old, lr, ["optim.lr", "optim.iterations"])
    for key, changed in (("wrap.width", {"wrap": {"width": 32, "rates": [1, 6]}}),
                         ("wrap.rates", {"wrap": {"width": 64, "rates": [1, 12]}}),
                         ("segmenter.kwargs.aspp_width", {"segmenter": {"kwargs": {"aspp_width": 32}}}),
                         ("method", {"method": "pebal"})):
        with pytest.raises(RPLInputError, match="set the model's shape") as err:
            check_resume_config({**old, "method": "rpl"}, {**old, "method": "rpl", **changed}, [key, "wrap", "method"])
        assert key in str(err.value)
    with pytest.raises(RPLInputError, match="pebal.hidden_width"):  # a method's own model-shape key
        check_resume_config({"pebal": {"hidden_width": 8}}, {"pebal": {"hidden_width": 16}}, ["pebal"])


def _train(world: Path, work: Path, steps: int, *extra: str, resume: bool = False) -> int:
    sets = overrides(world, steps=steps, **{"train.val_every": 0, "train.checkpoint_every": 1})
    return train_main(["--work-dir", str(work), "--quiet", *(["--resume"] if resume else []),
                       *_sets([*sets, *extra])])


def test_resume_refuses_shape_and_unlisted_changes_and_records_allowed_ones(world, tmp_path, capsys):
    work = tmp_path / "run"
    assert _train(world, work, 2) == 0
    rows = [json.loads(l) for l in (work / "log.jsonl").read_text().splitlines()]
    assert rows and len({r["run_id"] for r in rows}) == 1 and rows[0]["run_id"]
    first_run = rows[0]["run_id"]
    capsys.readouterr()

    assert _train(world, work, 2, "wrap.width=8", resume=True) == 2
    err = capsys.readouterr().err
    assert "wrap.width (16 -> 8)" in err and "shape" in err and "size mismatch" not in err
    assert _train(world, work, 4, "optim.lr=0.002", resume=True) == 2
    err = capsys.readouterr().err
    assert "optim.lr (0.001 -> 0.002)" in err and "optim.iterations (2 -> 4)" in err
    assert "--allow-changes optim.iterations,optim.lr" in err

    assert train_main(["--work-dir", str(work), "--quiet", "--resume", "--allow-changes", "optim.lr,optim.iterations",
                       *_sets([*overrides(world, steps=4, **{"train.val_every": 0, "train.checkpoint_every": 1}),
                               "optim.lr=0.002"])]) == 0
    text = (work / "config.yaml").read_text()
    assert yaml.safe_load(text)["optim"]["lr"] == 0.002 and load_config(work / "config.yaml").optim.lr == 0.002
    assert "# resumed at step 2 with --allow-changes: optim.lr was 0.001, now 0.002" in text
    from rpl.checkpoint import read_metadata

    extra = read_metadata(work / "last.safetensors")["extra"]
    assert extra["train_config"]["optim"]["lr"] == 0.002 and extra["step"] == 4
    assert extra["resume_changes"] == [{"step": 2, "changes": {"optim.iterations": [2, 4],
                                                                "optim.lr": [0.001, 0.002]}}]
    state = torch.load(work / "last.pt", weights_only=True)
    assert state["scheduler"]["base_lrs"][0] == 0.002  # the optimiser really continued at the new rate
    rows = [json.loads(l) for l in (work / "log.jsonl").read_text().splitlines()]
    assert len({r["run_id"] for r in rows}) == 2 and rows[-1]["run_id"] != first_run


def test_allow_changes_needs_resume(tmp_path, capsys):
    assert train_main(["--work-dir", str(tmp_path / "w"), "--allow-changes", "optim.lr"]) == 2
    assert "--allow-changes only applies to --resume" in capsys.readouterr().err


# -- checkpoint pair, NaN message -----------------------------------------------------------------
def test_checkpoint_pair_is_consistent_after_a_kill_between_the_writes(world, tmp_path, monkeypatch):
    import rpl.checkpoint

    work = tmp_path / "run"
    cfg = load_config(None, overrides(world, steps=3, **{"train.val_every": 0, "train.checkpoint_every": 1}))
    real_save = rpl.checkpoint.save

    def dies_at_step_2(path, model, extra=None, **kw):
        if Path(path).name == "last.safetensors" and extra["step"] == 2:
            raise KeyboardInterrupt  # killed after last.pt was renamed into place, before last.safetensors
        return real_save(path, model, extra=extra, **kw)

    monkeypatch.setattr(rpl.checkpoint, "save", dies_at_step_2)
    trainer = build_trainer(cfg, work, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert torch.load(work / "last.pt", weights_only=True)["progress"]["step"] == 2
    assert safetensors_step(work / "last.safetensors") == 1  # one save behind
    monkeypatch.setattr(rpl.checkpoint, "save", real_save)

    resumed = build_trainer(cfg, work, resume=True, quiet=True)
    assert safetensors_step(work / "last.safetensors") == 2  # rewritten from last.pt on resume
    state = torch.load(work / "last.pt", weights_only=True)["model"]
    weights = load_file(str(work / "last.safetensors"))
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert resumed.fit()["steps"] == 3 and safetensors_step(work / "last.safetensors") == 3


def test_nonfinite_message_names_method_dataset_and_images(world, tmp_path):
    cfg = load_config(None, overrides(world, steps=4, **{"train.max_nonfinite": 1, "train.val_every": 0}))
    trainer = build_trainer(cfg, tmp_path / "run", quiet=True)
    trainer._forward_loss = lambda batch: (torch.tensor(float("nan")), {})
    with pytest.raises(RPLInputError) as err:
        trainer.fit()
    message = str(err.value)
    assert "method rpl" in message and str(world / "cityscapes") in message and "split train" in message
    assert "_leftImg8bit.png" in message
