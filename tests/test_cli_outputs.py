"""rpl-eval's outputs: unwritable targets refused before any compute, a failed final write kept in a fallback file."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import rpl
import rpl.cli.eval as cli
import rpl.cli.outputs as outputs
from rpl.models import DeepLabV3Plus, SegmenterSpec
from test_cli_eval import KWARGS, write_anomaly_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("outputs_world")
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**KWARGS).eval()
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(root / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors")
    checkpoint = rpl.save(root / "addon.safetensors", rpl.wrap(segmenter, block={"width": 16}),
                          extra={"segmenter": spec.to_dict()})
    write_anomaly_set(root / "data" / "synthstreets-anomaly", 2, seed=1)
    return checkpoint, root / "data"


def run(world, *argv: str) -> int:
    checkpoint, data = world
    return cli.main(["--checkpoint", str(checkpoint), "--datasets", "synthstreets-anomaly", "--data-root", str(data),
                     "--methods", "rpl,energy", "--num-workers", "0", "--quiet", *argv])


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was built before the outputs were checked")

    monkeypatch.setattr(cli, "build_model", refuse)
    monkeypatch.setattr("rpl.evaluation.open_datasets", refuse)  # imported by rpl-eval when it runs


@pytest.mark.parametrize("option", ["--json", "--csv", "--markdown", "--save-vis"])
@pytest.mark.parametrize("where, expected", [
    ("under_file", "which is a file"),
    ("denied", "cannot be written ("),  # sysfs refuses new files and folders, even to root
])
def test_unwritable_outputs_are_refused_before_any_compute(world, tmp_path, capsys, no_model, option, where,
                                                           expected):
    if where == "under_file":
        blocker = tmp_path / "results"
        blocker.write_text("a regular file")
        target = blocker / "sub" / "out.json"
    else:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs here")
        target = Path("/sys/kernel/rpl-test-out")
    assert run(world, option, str(target)) == 2
    err = capsys.readouterr().err
    assert option in err and expected in err and "Traceback" not in err and err.count("\n") == 1


def test_save_vis_on_a_file_is_refused(world, tmp_path, capsys, no_model):
    target = tmp_path / "vis"
    target.write_text("x")
    assert run(world, "--save-vis", str(target)) == 2
    assert f"--save-vis {target} is a file" in capsys.readouterr().err


def test_a_failed_final_write_keeps_the_table_and_a_fallback_file(world, tmp_path, capsys, monkeypatch):
    lost = tmp_path / "readonly"
    real = outputs.write_atomic

    def read_only(path: Path, text: str) -> None:  # the file system turned read-only after the check
        if path.parent == lost:
            raise OSError(errno.EROFS, "Read-only file system")
        real(path, text)

    monkeypatch.setattr(outputs, "write_atomic", read_only)
    spare_dir = tmp_path / "cwd"
    spare_dir.mkdir()
    monkeypatch.chdir(spare_dir)
    good = tmp_path / "ok" / "r.csv"
    assert run(world, "--json", str(lost / "r.json"), "--csv", str(good)) == 2
    captured = capsys.readouterr()
    assert "synthstreets-anomaly" in captured.out and "rpl" in captured.out  # the table is printed anyway
    assert "--json" in captured.err and "Read-only file system" in captured.err and "Traceback" not in captured.err
    spare = next(spare_dir.glob("rpl-eval-*-r.json"))
    assert str(spare) in captured.err
    doc = json.loads(spare.read_text())
    assert [r["method"] for r in doc["results"]] == ["rpl", "energy"]
    assert good.is_file() and "synthstreets-anomaly,rpl" in good.read_text()  # the other output went where asked


def test_failed_overlay_writes_stop_the_overlays_not_the_evaluation(world, tmp_path, capsys, monkeypatch):
    import rpl.data.io

    calls = []

    def full_disk(path, rgb):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rpl.data.io, "write_image", full_disk)
    out = tmp_path / "r.json"
    assert run(world, "--save-vis", str(tmp_path / "vis"), "--json", str(out)) == 2
    captured = capsys.readouterr()
    assert len(calls) == 1 and "No space left on device" in captured.err and "--save-vis stopped" in captured.err
    assert json.loads(out.read_text())["results"] and "synthstreets-anomaly" in captured.out
