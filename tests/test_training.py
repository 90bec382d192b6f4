"""rpl-train on a tiny generated world: loss goes down, base untouched, resume after SIGKILL, DDP, bad input."""
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
from safetensors.torch import load_file

import rpl
import rpl.cli.eval as eval_cli
from rpl.cli.train import main as train_main
from rpl.config import load_config
from rpl.training import ShardedOrder, build_trainer
from train_world import make_world, overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"))


def test_loss_decreases_and_base_is_untouched(world, tmp_path):
    cfg = load_config(None, overrides(world, steps=12, **{"train.checkpoint_every": 100, "train.val_every": 100,
                                                           "optim.lr": 2e-3, "data.flip_p": 0.0}))
    trainer = build_trainer(cfg, tmp_path / "run", quiet=True)
    base_before = {k: v.clone() for k, v in trainer.model.segmenter.state_dict().items()}
    batch = next(iter(trainer._loader(0, 0)))
    trainer.model.eval()
    with torch.no_grad():
        loss_before = trainer._forward_loss(batch)[0].item()
    summary = trainer.fit()
    trainer.model.eval()
    with torch.no_grad():
        loss_after = trainer._forward_loss(batch)[0].item()
    assert loss_after < loss_before
    for k, v in base_before.items():
        assert torch.equal(v, trainer.model.segmenter.state_dict()[k]), k
    assert summary["steps"] == 12 and summary["skipped_steps"] == 0
    run = tmp_path / "run"
    assert (run / "last.safetensors").is_file() and (run / "best.safetensors").is_file() and (run / "last.pt").is_file()
    records = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert {"ce", "entropy", "outlier", "contrastive", "lr", "img_per_s"} <= set(records[0])
    assert any("val_ap" in r for r in records)
    val = rpl.checkpoint.read_metadata(run / "best.safetensors")["extra"]["metrics"]["val"]
    assert {"ap", "fpr95", "fpr95_threshold", "best_f1_threshold"} <= set(val)  # rpl-predict's mask thresholds
    assert all(isinstance(val[k], float) for k in ("fpr95_threshold", "best_f1_threshold"))
    # the checkpoint loads with no flag: listed factory, segmenter weights linked next to it
    best = run / "best.safetensors"
    recorded = rpl.checkpoint.read_metadata(best)["extra"]["segmenter"]["weights"]
    assert not recorded.startswith("..") and (run / recorded).samefile(world / "segmenter.safetensors")
    loaded = rpl.from_checkpoint(best)
    for k, v in trainer.model.segmenter.state_dict().items():
        assert torch.equal(v, loaded.segmenter.state_dict()[k]), k
    args = eval_cli.build_parser().parse_args(["--checkpoint", str(best)])
    assert isinstance(eval_cli.build_model(eval_cli.resolve_source(args), args, torch.device("cpu")), rpl.RPLSegmenter)


def test_sharded_order_is_a_resumable_partition():
    a = ShardedOrder(10, 2, seed=1, rank=0, world=2)
    b = ShardedOrder(10, 2, seed=1, rank=1, world=2)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 4 and not set(ia) & set(ib)
    a.set_epoch(0, start=2)
    assert list(a) == ia[2:]
    a.set_epoch(1)
    assert list(a) != ia


def _addon_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rpl.cli.train", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_sigkill_matches_straight_run(world, tmp_path):
    n = 8
    sets = overrides(world, steps=n, **{"train.checkpoint_every": n // 2, "train.val_every": 0})
    straight = tmp_path / "straight"  # every run in a subprocess with the same thread count: same float sums
    proc = _cli(["--work-dir", str(straight), "--quiet", *sum((["--set", s] for s in sets), [])])
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    killed = tmp_path / "killed"
    proc = _cli(["--work-dir", str(killed), "--quiet", *sum((["--set", s] for s in sets), [])])
    deadline = time.time() + 300
    while time.time() < deadline:
        state = killed / "last.pt"
        if state.exists():
            try:
                step = torch.load(state, weights_only=True)["progress"]["step"]
            except Exception:  # being renamed into place
                step = None
            if step == n // 2:
                break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed: " + (proc.stdout.read() or "")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = torch.load(killed / "last.pt", weights_only=True)["progress"]["step"]
    assert resumed < n
    proc = _cli(["--work-dir", str(killed), "--quiet", "--resume", *sum((["--set", s] for s in sets), [])])
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    a, b = _addon_state(straight / "last.safetensors"), _addon_state(killed / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["rpl", "pebal", "real", "meta-ood"])
def test_ddp_two_processes_gloo(world, tmp_path, method):
    """Two CPU ranks for every trainable method (an add-on's or a tuned segmenter's parameters in DDP);
    paste_prob 0.5 with batch 1 gives steps where a rank has no outlier pixel."""
    work = tmp_path / "ddp"
    sets = overrides(world, steps=6, **{"optim.batch_size": 1, "data.paste_prob": 0.5, "train.val_every": 0,
                                        "train.checkpoint_every": 100, "method": method})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free port itself (a port chosen here could be taken before it binds)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rpl.cli.train", "--work-dir", str(work), "--quiet", *sum((["--set", s] for s in sets), [])]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(l) for l in (work / "log.jsonl").read_text().splitlines()]
    per_rank = [r["outlier_pixels_per_rank"] for r in records if "outlier_pixels_per_rank" in r]
    assert len(per_rank) == 6 and all(r.get("total") is not None for r in records if "outlier_pixels_per_rank" in r)
    assert any(min(c) == 0 and max(c) > 0 for c in per_rank), per_rank  # one rank starved, the other not
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["rank_param_max_diff"] == 0.0  # identical weights on both ranks


def test_bad_inputs_exit_2(world, tmp_path, capsys):
    sets = overrides(world, steps=2)
    args = lambda *extra: ["--work-dir", str(tmp_path / "w"), "--quiet", *sum((["--set", s] for s in [*sets, *extra]), [])]
    assert train_main(args("data.coco=/nonexistent/coco")) == 2
    assert "/nonexistent/coco" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "train").mkdir(parents=True)
    (empty / "gtFine" / "train").mkdir(parents=True)
    assert train_main(args(f"data.inliers={empty}")) == 2
    assert str(empty) in capsys.readouterr().err
    assert train_main(args("optim.lrr=1")) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert train_main(args("data.paste_scales=[0.5, 0]")) == 2
    assert "data.paste_scales" in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim:\n  batch_size: eight\n")
    assert train_main(["--config", str(bad_yaml), "--print-config"]) == 2
    assert "optim.batch_size" in capsys.readouterr().err
    assert train_main(["--work-dir", str(tmp_path / "none"), "--resume", *sum((["--set", s] for s in sets), [])]) == 2
    assert "last.pt" in capsys.readouterr().err


def test_print_config_round_trips(tmp_path, capsys):
    assert train_main(["--print-config", "--set", "optim.lr=1e-4"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(path).optim.lr == 1e-4


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.optim.batch_size > 0 and len(cfg.data.crop_size) == 2


def test_nonfinite_losses_are_skipped_then_stop_with_advice(world, tmp_path, capsys):
    """A huge learning rate blows the block up: non-finite steps are skipped, then the run stops (exit 2)."""
    sets = overrides(world, steps=8, **{"optim.lr": 1e30, "train.max_nonfinite": 2, "train.val_every": 0,
                                        "train.checkpoint_every": 100})
    code = train_main(["--work-dir", str(tmp_path / "nan"), "--quiet", *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err
    assert code == 2
    assert "NaN/inf for 2 consecutive steps" in err and "optim.lr" in err and "Traceback" not in err


def test_outdated_synthstreets_is_regenerated_and_its_outlier_masks_rebuilt(tmp_path, monkeypatch):
    """A world from an older generator version is regenerated before training, and the outlier-mask
    cache built from its old annotations is rebuilt rather than reused."""
    import numpy as np

    from rpl.config import Config
    from rpl.data.io import read_label, write_label
    from rpl.data.synthstreets import GENERATOR_VERSION, generate, read_manifest
    from rpl.data.transforms import PASTE_SCALES
    from rpl.training import Dist, prepare_datasets

    root = tmp_path / "synth"
    generate(root, seed=0, size=(64, 128), scale=0.02, workers=1)
    cfg = Config()
    cfg.data.root, cfg.data.coco_min_size = str(root), 16
    prepare_datasets(cfg, Dist())
    cache = root / cfg.data.ood_cache
    fresh = {p.name: read_label(p) for p in sorted(cache.glob("*.png"))}
    assert fresh

    manifest = json.loads((root / "synthstreets.json").read_text())
    (root / "synthstreets.json").write_text(json.dumps({**manifest, "version": "0"}))
    for name in fresh:  # what an older generation's masks would be: other objects
        write_label(cache / name, np.zeros_like(fresh[name]))
    # an older annotation file: the cache must not trust its masks for the regenerated one
    cache_manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**cache_manifest, "annotations_sha256": "0" * 64}))

    train, _ = prepare_datasets(cfg, Dist())
    assert read_manifest(root)["version"] == GENERATOR_VERSION
    rebuilt = {p.name: read_label(p) for p in sorted(cache.glob("*.png"))}
    assert rebuilt.keys() == fresh.keys()
    for name in fresh:
        np.testing.assert_array_equal(rebuilt[name], fresh[name])
    assert len(train) == len(list((root / "cityscapes" / "leftImg8bit" / "train").rglob("*.png")))
    assert train.scales == tuple(cfg.data.paste_scales) == PASTE_SCALES  # the config reaches pasting
    cfg.data.paste_scales = [0.2, 0.4]
    assert prepare_datasets(cfg, Dist())[0].scales == (0.2, 0.4)


def _sets(*items: str) -> list[str]:
    return sum((["--set", s] for s in items), [])


def test_a_finished_work_dir_is_protected_and_resume_says_it_is_finished(world, tmp_path, capsys, monkeypatch):
    work = tmp_path / "run"
    sets = _sets(*overrides(world, steps=2, **{"train.val_every": 0}))
    assert train_main(["--work-dir", str(work), "--quiet", *sets]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in work.iterdir()}

    # a second run into the same work dir: refused, nothing touched
    assert train_main(["--work-dir", str(work), "--quiet", *sets, "--set", "optim.lr=1e-2"]) == 2
    err = capsys.readouterr().err
    assert "finished run" in err and "--resume" in err and "--work-dir" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before

    # --resume on the finished run: says so, trains nothing, evaluates only when asked
    evaluated = []
    monkeypatch.setattr("rpl.cli.train._evaluate", lambda work_dir, root: evaluated.append(work_dir) or 0)
    assert train_main(["--work-dir", str(work), "--quiet", "--resume", *sets]) == 0
    out = capsys.readouterr().out
    assert "finished (2/2 steps" in out and "Trained" not in out and evaluated == []
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before
    assert train_main(["--work-dir", str(work), "--quiet", "--resume", "--evaluate", *sets]) == 0
    assert evaluated == [str(work)]
    assert train_main(["--work-dir", str(work), "--quiet", "--evaluate", *sets]) == 2  # --evaluate needs --resume
    assert train_main(["--work-dir", str(work), "--resume", "--overwrite", *sets]) == 2
    capsys.readouterr()

    # --overwrite: the earlier run is deleted first, so the log holds the new run only
    assert train_main(["--work-dir", str(work), "--quiet", "--overwrite", *sets, "--set", "optim.iterations=3"]) == 0
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "ce" in r] == [1, 2, 3]
    assert json.loads((work / "summary.json").read_text())["steps"] == 3


def test_an_unfinished_work_dir_is_protected_too(world, tmp_path, capsys):
    work = tmp_path / "run"
    work.mkdir()
    (work / "last.pt").write_bytes(b"a run in progress")
    assert train_main(["--work-dir", str(work), "--quiet", *_sets(*overrides(world, steps=2))]) == 2
    assert "unfinished run (last.pt)" in capsys.readouterr().err
    assert (work / "last.pt").read_bytes() == b"a run in progress"


def test_progress_prints_loss_and_validation_lines_and_checkpoints_are_0644(world, tmp_path, capsys):
    work = tmp_path / "run"
    assert train_main(["--work-dir", str(work), *_sets(*overrides(world, steps=2))]) == 0
    err = capsys.readouterr().err
    assert "step 1/2: total" in err and " ce " in err and "lr " in err
    val_line = next(line for line in err.splitlines() if "step 2/2: held-out val" in line)
    assert "AUROC" in val_line and " AP " in val_line and "FPR95" in val_line
    assert "THRESHOLD" not in val_line  # thresholds are scores, not percentages: kept in the log, not this line
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("last.safetensors", "best.safetensors", "last.pt", "config.yaml"):
        assert (work / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_print_config_marks_changed_and_unused_keys(tmp_path, capsys):
    assert train_main(["--print-config", "--set", "optim.lr=1e-4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  lr: 0.0001  # set by --set; default 0.0005" in lines
    assert any(l.startswith("  epochs: 40  # not used: optim.iterations is set") for l in lines)
    assert not any("#" in l for l in lines if l.startswith("  batch_size:"))
    assert train_main(["--print-config", "--set", "optim.iterations=null"]) == 0
    assert any(l.startswith("  iterations: null  # set by --set") and "optim.epochs sets the length" in l
               for l in capsys.readouterr().out.splitlines())
