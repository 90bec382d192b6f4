"""``rpl-eval`` end to end, in-process: outputs, numbers against scikit-learn, defaults, bad input."""
from __future__ import annotations

import csv
import json
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import rpl
import rpl.cli.eval as cli
from rpl.data.io import read_image, write_image, write_label
from rpl.metrics import ComponentMetrics
from rpl.models import DeepLabV3Plus, SegmenterSpec, build_segmenter
from rpl.scores import SCORES
from fixtures_layouts import make_cityscapes, make_mask_folder

SIZE = (32, 64)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KWARGS = dict(backbone="resnet18", num_classes=19, aspp_width=16, decoder_width=16)
FCN = "torchvision.models.segmentation:fcn_resnet50"
FCN_KWARGS = {"weights": None, "weights_backbone": None, "num_classes": 19}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class World:
    root: Path
    checkpoint: Path
    data: Path


def write_anomaly_set(folder: Path, n: int, seed: int, obstacle: bool = False, anomalies: bool = True) -> None:
    """Fishyscapes layout: smooth images with a bright box (the anomaly); obstacle sets label the road only."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = np.zeros((*SIZE, 3), np.uint8)
        image[:] = rng.integers(40, 120, 3, dtype=np.uint8)
        image[SIZE[0] // 2:] = rng.integers(60, 90, 3, dtype=np.uint8)
        image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
        label = np.zeros(SIZE, np.uint8)
        top, left = int(rng.integers(12, 20)), int(rng.integers(4, 44))
        if anomalies:
            image[top:top + 10, left:left + 14] = rng.integers(150, 256, 3, dtype=np.uint8)
            label[top:top + 10, left:left + 14] = 1
        if obstacle:
            label[: SIZE[0] // 3] = 255  # ROI: the road, the lower part
        label[-2:] = 255
        write_image(folder / "images" / f"frame_{i:03d}.png", image)
        write_label(folder / "labels_masks" / f"frame_{i:03d}.png", label)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("eval_world")
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**KWARGS).eval()
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(root / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors")
    model = rpl.wrap(segmenter, block={"width": 16})
    checkpoint = rpl.save(root / "addon.safetensors", model, extra={"segmenter": spec.to_dict()})
    data = root / "data"
    write_anomaly_set(data / "synthstreets-anomaly", 3, seed=1)
    write_anomaly_set(data / "synthstreets-rural", 2, seed=2)
    write_anomaly_set(data / "synthstreets-obstacle", 3, seed=3, obstacle=True)
    make_cityscapes(data / "cityscapes")
    make_mask_folder(data / "fishyscapes" / "LostAndFound")
    return World(root, checkpoint, data)


def run(*argv: str) -> int:
    return cli.main([*argv, "--num-workers", "0", "--quiet"])


def load_wrapped(world: World):
    spec = SegmenterSpec.from_dict(rpl.checkpoint.read_metadata(world.checkpoint)["extra"]["segmenter"])
    return rpl.load(world.checkpoint, build_segmenter(spec, base_dir=world.root)).eval()


def network_input(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def direct_scores(model, folder: Path) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    scores, labels = [], []
    for image_path in sorted((folder / "images").iterdir()):
        with torch.no_grad():
            out = model(network_input(read_image(image_path)))
        if isinstance(out, rpl.RPLOutput):
            maps = {"rpl": out.anomaly, **{m: f(out.logits) for m, f in SCORES.items()}}
        else:
            maps = {m: f(out["out"]) for m, f in SCORES.items()}
        scores.append({m: s[0].numpy() for m, s in maps.items()})
        labels.append(read_image(folder / "labels_masks" / image_path.name)[..., 0])
    return scores, labels


def sklearn_metrics(scores, labels, method):
    s = np.concatenate([sc[method][lab != 255] for sc, lab in zip(scores, labels)])
    y = np.concatenate([lab[lab != 255] for lab in labels])
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return roc_auc_score(y, s), average_precision_score(y, s), fpr[np.searchsorted(tpr, 0.95)]


def test_json_csv_markdown_and_numbers_equal_sklearn(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run("--checkpoint", str(world.checkpoint), "--datasets", "synthstreets-anomaly,cityscapes-val",
             "--data-root", str(world.data), "--pixel-mode", "exact", "--json", str(out / "r.json"),
             "--csv", str(out / "r.csv"), "--markdown", str(out / "r.md"))
    assert rc == 0
    doc = json.loads((out / "r.json").read_text())
    assert {"results", "preprocess", "checkpoint", "pixel_mode", "segmenter", "datasets", "notes"} <= set(doc)
    assert doc["checkpoint"] == str(world.checkpoint) and doc["pixel_mode"] == "exact"
    assert doc["preprocess"]["mean"] == list(MEAN) and doc["preprocess"]["resize"] is None
    assert doc["segmenter"]["weights"] == "segmenter.safetensors"
    rows = {(r["dataset"], r["method"]): r for r in doc["results"]}
    methods = ["rpl", "energy", "msp", "maxlogit", "entropy"]
    assert list(rows) == [("synthstreets-anomaly", m) for m in methods] + [("cityscapes-val", "closed-set"),
                                                                                   ("cityscapes-val", "bare segmenter")]

    scores, labels = direct_scores(load_wrapped(world), world.data / "synthstreets-anomaly")
    for m in methods:
        row = rows["synthstreets-anomaly", m]
        auroc, ap, fpr95 = sklearn_metrics(scores, labels, m)
        assert isinstance(row["auroc"], float) and 0.0 <= row["auroc"] <= 1.0
        assert row["auroc"] == pytest.approx(auroc, abs=1e-9)
        assert row["ap"] == pytest.approx(ap, abs=1e-9)
        assert row["fpr95"] == pytest.approx(fpr95, abs=1e-9)
        assert row["n_images"] == 3 and row["n_anomaly"] == sum(int((lab == 1).sum()) for lab in labels)

    miou_row = rows["cityscapes-val", "closed-set"]
    assert miou_row["identical_to_segmenter"] is True and miou_row["auroc"] is None
    assert 0.0 <= miou_row["miou"] <= 1.0 and miou_row["n_images"] == 3

    table = list(csv.DictReader((out / "r.csv").open()))
    assert [(r["dataset"], r["method"]) for r in table] == list(rows)
    assert float(table[0]["ap"]) == pytest.approx(rows["synthstreets-anomaly", "rpl"]["ap"], abs=1e-12)
    markdown = (out / "r.md").read_text()
    assert f"| synthstreets-anomaly | rpl | {100 * rows['synthstreets-anomaly', 'rpl']['auroc']:.2f} |" in markdown
    assert not list(out.glob(".*tmp*"))  # written atomically, temp files renamed away
    bare = rows["cityscapes-val", "bare segmenter"]
    assert bare["miou"] == miou_row["miou"] and bare["identical_to_segmenter"] is None  # mIoU without the add-on
    assert f"| cityscapes-val | bare segmenter | - | - | - | {100 * bare['miou']:.2f} |" in markdown
    shown = capsys.readouterr().out
    assert "synthstreets-anomaly" in shown and "closed-set" in shown and "bare segmenter" in shown and "mIoU" in shown


def test_components_and_preprocessing_options(world, tmp_path):
    out = tmp_path / "r.json"
    rc = run("--checkpoint", str(world.checkpoint), "--datasets", "synthstreets-obstacle", "--methods", "rpl,msp",
             "--data-root", str(world.data), "--pixel-mode", "exact", "--components", "--no-normalize",
             "--resize", "48x96", "--weights", str(world.root / "segmenter.safetensors"), "--json", str(out))
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["preprocess"]["normalize"] is False and doc["preprocess"]["resize"] == [48, 96]
    assert doc["segmenter"]["weights"] == str(world.root / "segmenter.safetensors")  # --weights replaced it
    model = load_wrapped(world)
    folder = world.data / "synthstreets-obstacle"
    for row in doc["results"]:
        reference = ComponentMetrics(track="obstacle", pixel_mode="exact")
        for image_path in sorted((folder / "images").iterdir()):
            x = torch.from_numpy(read_image(image_path)).permute(2, 0, 1)[None].float() / 255.0
            x = torch.nn.functional.interpolate(x, size=(48, 96), mode="bilinear", align_corners=False, antialias=True)
            with torch.no_grad():
                o = model(x)
            s = o.anomaly if row["method"] == "rpl" else SCORES["msp"](o.logits)
            s = torch.nn.functional.interpolate(s[:, None], size=SIZE, mode="bilinear", align_corners=False)[0, 0]
            reference.update(s, read_image(folder / "labels_masks" / image_path.name)[..., 0])
        expected = reference.compute()
        for key in ("siou", "mean_f1"):
            assert row[key] == pytest.approx(expected[key], abs=1e-12), (row["method"], key)


def test_default_checkpoint_data_root_and_generation(world, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "weights" / "rpl_synthstreets.safetensors"
    monkeypatch.setattr(cli, "DEFAULT_CHECKPOINT", missing)
    assert run() == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "rpl-train" in err and "--checkpoint" in err

    # the shipped weights and data root, with the data generated on first use
    generated = tmp_path / "synthstreets"
    calls = []

    import rpl.data.synthstreets as synthstreets

    def fake_ensure_generated(root, seed=0, **kw):
        if synthstreets.read_manifest(root) is None:
            calls.append((Path(root), seed))
            shutil.copytree(world.data, root)
            (Path(root) / synthstreets.MANIFEST).write_text("{}")  # written last: the generation is complete

    monkeypatch.setattr(synthstreets, "ensure_generated", fake_ensure_generated)
    monkeypatch.setattr(cli, "DEFAULT_CHECKPOINT", world.checkpoint)
    monkeypatch.setattr(cli, "DEFAULT_DATA_ROOT", generated)
    out = tmp_path / "default.json"
    assert run("--json", str(out), "--limit", "1") == 0
    assert calls == [(generated, 0)]
    doc = json.loads(out.read_text())
    assert list(doc["datasets"]) == list(cli.DEFAULT_DATASETS)
    assert doc["methods"] == ["rpl", "energy", "msp", "maxlogit", "entropy"]
    assert doc["checkpoint"] == str(world.checkpoint) and doc["data_root"] == str(generated)
    assert all(info["n_images"] == 1 for info in doc["datasets"].values())
    capsys.readouterr()
    assert run("--limit", "1") == 0 and len(calls) == 1  # generated once
    caption = " ".join(capsys.readouterr().out.split())  # rich wraps a long caption to the table's width
    assert "--limit 1: first 1 images of each dataset only" in caption


def test_save_vis_writes_overlays_per_method(world, tmp_path, capsys):
    vis = tmp_path / "vis"
    rc = run("--checkpoint", str(world.checkpoint), "--datasets", "synthstreets-anomaly", "--methods", "rpl,energy",
             "--data-root", str(world.data), "--save-vis", str(vis), "--vis-limit", "2")
    assert rc == 0
    files = sorted(p.relative_to(vis).as_posix() for p in vis.rglob("*.png"))
    assert files == [f"synthstreets-anomaly/{m}/frame_{i:03d}.png" for m in ("energy", "rpl") for i in range(2)]
    overlay = read_image(vis / files[0])
    original = read_image(world.data / "synthstreets-anomaly" / "images" / "frame_000.png")
    assert overlay.shape == original.shape and not np.array_equal(overlay, original)
    assert "4 overlays" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fcn_weights(tmp_path_factory) -> Path:
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("fcn") / "fcn.pth"
    torch.save(fcn_resnet50(**FCN_KWARGS).state_dict(), path)
    return path


def test_torchvision_model_from_pth_with_mcdropout(world, fcn_weights, tmp_path):
    from torchvision.models.segmentation import fcn_resnet50

    out = tmp_path / "fcn.json"
    rc = run("--model", FCN, "--model-kwargs", json.dumps(FCN_KWARGS), "--weights", str(fcn_weights),
             "--methods", "energy,mcdropout", "--mc-samples", "2", "--datasets", "synthstreets-anomaly",
             "--data-root", str(world.data), "--limit", "2", "--pixel-mode", "exact", "--json", str(out))
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["checkpoint"] is None and doc["segmenter"]["model"] == FCN and doc["mc_samples"] == 2
    energy, mc = doc["results"]
    assert (energy["method"], mc["method"]) == ("energy", "mcdropout") and 0.0 <= mc["auroc"] <= 1.0

    model = fcn_resnet50(**FCN_KWARGS).eval()
    model.load_state_dict(torch.load(fcn_weights, weights_only=True))
    scores, labels = direct_scores(model, world.data / "synthstreets-anomaly")
    auroc, ap, _ = sklearn_metrics(scores[:2], labels[:2], "energy")
    assert energy["auroc"] == pytest.approx(auroc, abs=1e-9) and energy["ap"] == pytest.approx(ap, abs=1e-9)

    # MC dropout replayed by hand: seed 0, images in order, 2 passes of the dropout-only-train copy each
    from rpl.evaluation import dropout_copy
    from rpl.scores import entropy

    clone = dropout_copy(model)
    torch.manual_seed(0)
    mc_scores = []
    with torch.no_grad():
        for image_path in sorted((world.data / "synthstreets-anomaly" / "images").iterdir())[:2]:
            x = network_input(read_image(image_path))
            mc_scores.append({"mcdropout": ((entropy(clone(x)["out"]) + entropy(clone(x)["out"])) / 2)[0].numpy()})
    mc_auroc, mc_ap, _ = sklearn_metrics(mc_scores, labels[:2], "mcdropout")
    assert mc["auroc"] == pytest.approx(mc_auroc, abs=1e-6) and mc["ap"] == pytest.approx(mc_ap, abs=1e-6)
    assert mc["auroc"] != pytest.approx(auroc, abs=1e-3)  # not the energy numbers under another name


def test_checkpoint_for_another_model_is_refused(world, fcn_weights, capsys):
    rc = run("--checkpoint", str(world.checkpoint), "--model", FCN, "--model-kwargs", json.dumps(FCN_KWARGS),
             "--weights", str(fcn_weights), "--datasets", "synthstreets-anomaly", "--data-root", str(world.data))
    assert rc == 2
    err = capsys.readouterr().err
    assert str(world.checkpoint) in err and "Traceback" not in err
    # the recorded segmenter with other weights: refused by the strict load, naming the file
    rc = run("--checkpoint", str(world.checkpoint), "--weights", str(fcn_weights), "--datasets",
             "synthstreets-anomaly", "--data-root", str(world.data))
    assert rc == 2
    err = capsys.readouterr().err
    assert f"weights file {fcn_weights} does not fit model" in err


@pytest.mark.parametrize("argv, expected", [
    (["--checkpoint", "nowhere/addon.safetensors"], "nowhere/addon.safetensors does not exist"),
    (["--datasets", "synthstreets-anomaly,moon"], "--datasets: Unknown dataset 'moon'"),
    (["--methods", "rpl,odin"], "unknown method 'odin'"),
    (["--datasets", "fs-static"], "fishyscapes/Static does not exist"),
    (["--resize", "big"], "--resize 'big' is not HxW"),
    (["--mean", "0.5,0.5,0.5"], "--mean and --std go together"),
    (["--mean", "0.5,0.5", "--std", "1,1,1"], "--mean '0.5,0.5' is not three"),
    (["--no-normalize", "--mean", "0,0,0", "--std", "1,1,1"], "--no-normalize cannot be combined"),
    (["--pixel-mode", "smiyc", "--fpr-rule", "closest"], "--fpr-rule closest cannot be combined"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--device", "tpu"], "--device 'tpu': expected cpu or cuda"),
    (["--json", "."], "--json . is a folder"),
])
def test_bad_options_exit_2_with_one_paragraph(world, capsys, argv, expected):
    # later options win, so argv may replace the checkpoint
    assert run("--checkpoint", str(world.checkpoint), "--data-root", str(world.data), *argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, expected", [
    (["--model", FCN, "--methods", "rpl"], "rpl needs an RPL add-on"),
    (["--model", FCN, "--head", "classifier"], "--head/--feature"),
    (["--model-kwargs", "{}"], "--model-kwargs are the arguments of --model's factory"),
    (["--model", FCN, "--model-kwargs", "{num_classes: 19}"], "--model-kwargs '{num_classes: 19}' is not valid JSON"),
    (["--model", FCN, "--datasets", "fs-laf"], "needs --data-root"),
])
def test_model_options_without_their_companions(capsys, argv, expected):
    assert run(*argv) == 2
    assert expected in capsys.readouterr().err


def test_empty_dataset_folder(world, tmp_path, capsys):
    for sub in ("images", "labels_masks"):
        (tmp_path / "synthstreets-anomaly" / sub).mkdir(parents=True)
    assert run("--checkpoint", str(world.checkpoint), "--datasets", "synthstreets-anomaly",
               "--data-root", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "synthstreets-anomaly") in err and "holds no images" in err


def _copy_set(world: World, root: Path) -> Path:
    shutil.copytree(world.data / "synthstreets-anomaly", root / "synthstreets-anomaly")
    return root / "synthstreets-anomaly"


@pytest.mark.parametrize("damage, expected, workers", [
    ("corrupt", "could not be decoded", "1"),
    ("size", "is 10x8 (WxH) but its image", "0"),
    ("values", "outside this layout's convention", "0"),
])
def test_bad_files_exit_2_and_leave_outputs_alone(world, tmp_path, capsys, damage, expected, workers):
    folder = _copy_set(world, tmp_path / "data")
    if damage == "corrupt":
        target = folder / "images" / "frame_001.png"
        target.write_bytes(target.read_bytes()[:40])
    elif damage == "size":
        target = folder / "labels_masks" / "frame_001.png"
        write_label(target, np.zeros((8, 10), np.uint8))
    else:
        target = folder / "labels_masks" / "frame_001.png"
        write_label(target, np.full(SIZE, 7, np.uint8))
    previous = tmp_path / "r.json"
    previous.write_text("previous results")
    rc = cli.main(["--checkpoint", str(world.checkpoint), "--datasets", "synthstreets-anomaly", "--data-root",
                   str(tmp_path / "data"), "--json", str(previous), "--num-workers", workers, "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Dataset 'synthstreets-anomaly'" in err and str(target) in err and expected in err
    assert "Traceback" not in err
    assert previous.read_text() == "previous results"


def test_dataset_without_anomaly_pixels(world, tmp_path, capsys):
    data = tmp_path / "data"
    write_anomaly_set(data / "synthstreets-rural", 2, seed=5, anomalies=False)
    _copy_set(world, data)
    rc = run("--checkpoint", str(world.checkpoint), "--datasets", "synthstreets-rural", "--data-root", str(data),
             "--methods", "energy")
    assert rc == 2
    err = capsys.readouterr().err
    assert "'synthstreets-rural' has no anomaly pixel" in err and "undefined" in err

    out = tmp_path / "r.json"
    rc = run("--checkpoint", str(world.checkpoint), "--datasets", "synthstreets-rural,synthstreets-anomaly",
             "--data-root", str(data), "--methods", "energy", "--json", str(out))
    assert rc == 0
    assert "warning: Dataset 'synthstreets-rural' has no anomaly pixel" in capsys.readouterr().err
    rural, anomaly = json.loads(out.read_text())["results"]
    assert rural["auroc"] is None and rural["ap"] is None and rural["fpr95"] is None
    assert anomaly["auroc"] is not None
    assert any("synthstreets-rural" in n for n in json.loads(out.read_text())["notes"])


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["--checkpoint", "missing.safetensors", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_wandb_logging_is_optional(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    args = ["--checkpoint", str(world.checkpoint), "--datasets", "synthstreets-anomaly", "--methods", "energy",
            "--data-root", str(world.data), "--limit", "2"]
    assert run(*args, "--wandb", "offline") == 2
    assert "needs the wandb package" in capsys.readouterr().err

    logged = {}

    class FakeRun:
        def log(self, payload):
            logged.update(payload)

        def finish(self, exit_code=0):
            logged["finished"] = exit_code

    def init(**kwargs):
        logged["init"] = kwargs
        return FakeRun()

    fake = types.SimpleNamespace(
        init=init,
        Table=lambda columns, data: {"columns": columns, "data": data},
        Image=lambda rgb, caption: ("image", rgb.shape, caption))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert run(*args, "--wandb", "offline") == 0
    assert logged["init"]["mode"] == "offline" and logged["finished"] == 0
    assert logged["results"]["data"][0][:2] == ["synthstreets-anomaly", "energy"]
    assert "synthstreets-anomaly/energy/auroc" in logged
    assert [c for _, _, c in logged["overlays"]] == [f"synthstreets-anomaly / energy / frame_{i:03d}" for i in range(2)]


def test_embedded_test_sets_of_an_older_generator_are_regenerated(tmp_path):
    from rpl.cli.eval import ensure_synthstreets
    from rpl.data.synthstreets import GENERATOR_VERSION, generate, read_manifest

    root = tmp_path / "synth"
    generate(root, seed=1, size=(64, 128), scale=0.005, workers=1)
    manifest = read_manifest(root)
    (root / "synthstreets.json").write_text(json.dumps({**manifest, "version": "0"}))
    ensure_synthstreets(root)
    regenerated = read_manifest(root)
    assert regenerated["version"] == GENERATOR_VERSION
    assert (regenerated["seed"], regenerated["size"], regenerated["scale"]) == (1, [64, 128], 0.005)


def test_default_run_compares_every_rpl_checkpoint_shipped_beside_the_add_on(world, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    first = weights / "rpl_synthstreets.safetensors"
    shutil.copy(world.checkpoint, first)
    for name in ("zeta.safetensors", "alpha.safetensors"):
        shutil.copy(world.checkpoint, weights / name)
    save_file({"w": torch.zeros(1)}, str(weights / "segmenter.safetensors"))  # plain weights: not a checkpoint
    (weights / "notes.safetensors").write_bytes(b"not a safetensors file")
    assert cli.shipped_checkpoints(first) == [first, weights / "alpha.safetensors", weights / "zeta.safetensors"]
    # the real folder: the shipped add-on first, the shipped segmenter never among them
    shipped = cli.shipped_checkpoints(cli.DEFAULT_CHECKPOINT)
    assert shipped[0] == cli.DEFAULT_CHECKPOINT
    assert all("segmenter" not in p.name for p in shipped) and len(shipped) >= 2
    # RPL on a tuned segmenter (extra.base_method) after every method of its own
    from rpl.checkpoint import read_metadata

    on_tuned = [bool(read_metadata(p)["extra"].get("base_method")) for p in shipped]
    assert on_tuned == sorted(on_tuned) and any(on_tuned)
