"""rpl-predict end to end on a tiny model: every input kind, every --save kind, SMIYC files, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rpl
import rpl.cli.predict as cli
from rpl.data.inputs import discover, iter_frames
from rpl.data.io import read_image, write_image
from rpl.evaluation import EvalOptions, Evaluator, Preprocess, resize_logits, resize_scores
from rpl.models import DeepLabV3Plus, SegmenterSpec, build_segmenter
from rpl.prediction import from_uint16
from rpl.visualize import CITYSCAPES_PALETTE, overlay
from models_for_tests import ToySegmenter, save_pebal_checkpoint, tuned_pebal

KWARGS = dict(backbone="resnet18", num_classes=19, aspp_width=16, decoder_width=16)
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class World:
    root: Path
    checkpoint: Path
    images: Path  # three 32x64 PNGs and one 48x80 JPEG in a subfolder
    pebal: Path  # a PEBAL checkpoint fine-tuned from the same segmenter


def street(rng: np.random.Generator, size=(32, 64)) -> np.ndarray:
    image = np.zeros((*size, 3), np.uint8)
    image[:] = rng.integers(40, 120, 3, dtype=np.uint8)
    image[size[0] // 2:] = rng.integers(60, 90, 3, dtype=np.uint8)
    top, left = size[0] // 3, int(rng.integers(4, size[1] - 18))
    image[top:top + 8, left:left + 12] = rng.integers(150, 256, 3, dtype=np.uint8)
    return np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("predict_world")
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**KWARGS).eval()
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(root / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors")
    pebal = save_pebal_checkpoint(root / "pebal.safetensors", segmenter, 19, {"segmenter": spec.to_dict()})
    model = rpl.wrap(segmenter, block={"width": 16})
    checkpoint = rpl.save(root / "addon.safetensors", model, extra={"segmenter": spec.to_dict()})
    rng = np.random.default_rng(0)
    images = root / "images"
    for i in range(3):
        write_image(images / f"frame_{i:03d}.png", street(rng))
    write_image(images / "more" / "big.jpg", street(rng, (48, 80)))
    return World(root, checkpoint, images, pebal)


def load_model(world: World):
    spec = SegmenterSpec.from_dict(rpl.checkpoint.read_metadata(world.checkpoint)["extra"]["segmenter"])
    return rpl.load(world.checkpoint, build_segmenter(spec, base_dir=world.root)).eval()


def eval_scores(model, image: np.ndarray, methods=("rpl",)) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """What rpl-eval scores for ``image`` (its Evaluator, preprocessing and resize), and the closed-set argmax."""
    ev = Evaluator(model, EvalOptions(methods=methods, progress=False), Preprocess(), "cpu")
    images = torch.from_numpy(image[None])
    with torch.inference_mode():
        x = ev.preprocess(images)
        logits, out = ev._forward(x)
        scores = {m: resize_scores(s, image.shape[:2])[0].numpy() for m, s in ev.scores(x, logits, out).items()}
        labels = resize_logits(logits, image.shape[:2]).argmax(1)[0].numpy()
    return scores, labels


def predict(*argv: str) -> int:
    return cli.main([*argv, "--quiet"])


def make_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


# -- input discovery ----------------------------------------------------------------------------
def test_discovery_of_files_folders_globs_and_bad_paths(world, tmp_path):
    folder = discover([world.images])
    assert [s.name for s in folder] == ["frame_000", "frame_001", "frame_002", "more/big"]  # recursive, sorted
    assert all(s.kind == "image" for s in folder)
    single = discover([world.images / "frame_001.png"])
    assert [(s.name, s.path.name) for s in single] == [("frame_001", "frame_001.png")]
    pattern = discover([str(world.images / "**" / "*.jpg")])
    assert [s.name for s in pattern] == ["more/big"]
    webp = tmp_path / "w"
    write_image(webp / "a.webp", street(np.random.default_rng(1)))
    (webp / "notes.txt").write_text("not an image")
    assert [s.name for s in discover([webp])] == ["a"]
    with pytest.raises(rpl.RPLInputError, match="does not exist"):
        discover([tmp_path / "missing"])
    with pytest.raises(rpl.RPLInputError, match="matches no image"):
        discover([str(tmp_path / "*.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(rpl.RPLInputError, match="holds no image or video"):
        discover([tmp_path / "empty"])
    with pytest.raises(rpl.RPLInputError, match="both write outputs named 'frame_001'"):
        discover([world.images / "frame_001.png", _copy(world.images / "frame_001.png", tmp_path / "dup")])


def _copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    dst.write_bytes(src.read_bytes())
    return dst


def test_video_is_read_frame_by_frame(tmp_path):
    rng = np.random.default_rng(3)
    frames = [street(rng) for _ in range(4)]
    make_video(tmp_path / "drive.mp4", frames)
    sources = discover([tmp_path / "drive.mp4"])
    assert [(s.kind, s.name) for s in sources] == [("video", "drive")]
    got = list(iter_frames(sources))
    assert [f.name for f in got] == [f"drive/{i:06d}" for i in range(4)] and [f.index for f in got] == [0, 1, 2, 3]
    for f, original in zip(got, frames):
        assert f.error is None and f.image.shape == original.shape and f.image.dtype == np.uint8
        assert np.abs(f.image.astype(int) - original).mean() < 20  # lossy codec, same picture
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    bad = list(iter_frames(discover([tmp_path / "broken.mp4"])))
    assert len(bad) == 1 and bad[0].image is None and "broken.mp4" in bad[0].error


# -- outputs ------------------------------------------------------------------------------------
def test_every_save_kind_matches_rpl_eval(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc = predict(str(world.images), "--checkpoint", str(world.checkpoint), "--out", str(out), "--methods", "rpl,energy",
                 "--save", "overlay,anomaly,prediction,mask", "--anomaly-format", "npy32", "--threshold", "rpl=0,energy=-3",
                 "--batch-size", "2")
    assert rc == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert [it["name"] for it in index["items"]] == ["frame_000", "frame_001", "frame_002", "more/big"]
    assert index["n_predicted"] == 4 and index["n_skipped"] == 0
    assert index["thresholds"] == {"rpl": {"value": 0.0, "source": "--threshold"},
                                   "energy": {"value": -3.0, "source": "--threshold"}}
    model = load_model(world)
    from PIL import Image

    for item in index["items"]:
        image = read_image(item["input"])
        h, w = image.shape[:2]
        assert (item["height"], item["width"]) == (h, w)
        expected, labels = eval_scores(model, image, ("rpl", "energy"))
        for m, threshold in (("rpl", 0.0), ("energy", -3.0)):
            score = np.load(item["outputs"][m]["anomaly"])
            assert score.shape == (h, w) and score.dtype == np.float32
            np.testing.assert_allclose(score, expected[m], rtol=0, atol=1e-5)
            vis = read_image(item["outputs"][m]["overlay"])
            assert vis.shape == (h, w, 3)
            np.testing.assert_array_equal(vis, overlay(image, score))  # rpl-eval --save-vis's look
            mask = cv2.imread(item["outputs"][m]["mask"], cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(mask, np.where(expected[m] >= threshold, 255, 0))
            stats = item["stats"][m]
            assert stats["max"] == pytest.approx(float(expected[m].max()), abs=1e-5)
            assert stats["anomalous_pixels"] == int((score >= threshold).sum())
        palette_png = Image.open(item["outputs"]["prediction"])
        assert palette_png.mode == "P" and palette_png.size == (w, h)
        np.testing.assert_array_equal(np.asarray(palette_png), labels)
        assert palette_png.getpalette()[:6] == [*CITYSCAPES_PALETTE[0], *CITYSCAPES_PALETTE[1]]
    rows = (out / "index.csv").read_text().splitlines()
    assert len(rows) == 5 and "rpl_max" in rows[0] and "energy_mask" in rows[0]


def test_anomaly_png16_and_npy16_within_rounding(world, tmp_path, capsys):
    out16, outnpy = tmp_path / "png16", tmp_path / "npy16"
    assert predict(str(world.images / "frame_000.png"), str(world.images / "frame_001.png"), "--checkpoint",
                   str(world.checkpoint), "--out", str(out16), "--save", "anomaly") == 0
    assert predict(str(world.images / "frame_000.png"), "--checkpoint", str(world.checkpoint), "--out", str(outnpy),
                   "--save", "anomaly", "--anomaly-format", "npy16") == 0
    model = load_model(world)
    index = json.loads((out16 / "index.json").read_text())
    low, high = index["score_ranges"]["rpl"]
    assert index["score_range_source"] == "first image"
    for item in index["items"]:
        expected = eval_scores(model, read_image(item["input"]))[0]["rpl"]
        grey = cv2.imread(item["outputs"]["rpl"]["anomaly"], cv2.IMREAD_UNCHANGED)
        assert grey.dtype == np.uint16 and grey.shape == expected.shape
        assert np.abs(from_uint16(grey, low, high) - expected).max() <= (high - low) / 65535
    first = json.loads((outnpy / "index.json").read_text())["items"][0]
    half = np.load(first["outputs"]["rpl"]["anomaly"])
    expected = eval_scores(model, read_image(first["input"]))[0]["rpl"]
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, expected.astype(np.float16))  # float16 rounding of rpl-eval's scores
    fixed = tmp_path / "fixed"
    assert predict(str(world.images / "frame_000.png"), "--checkpoint", str(world.checkpoint), "--out", str(fixed),
                   "--save", "anomaly", "--score-range=-20,5") == 0
    assert json.loads((fixed / "index.json").read_text())["score_ranges"] == {"rpl": [-20.0, 5.0]}


def test_video_input_with_overlay_video(world, tmp_path, capsys):
    rng = np.random.default_rng(4)
    make_video(tmp_path / "drive.mp4", [street(rng) for _ in range(3)])
    out = tmp_path / "out"
    assert predict(str(tmp_path / "drive.mp4"), "--checkpoint", str(world.checkpoint), "--out", str(out),
                   "--save", "overlay", "--save-video", "--batch-size", "2") == 0
    index = json.loads((out / "index.json").read_text())
    assert [it["name"] for it in index["items"]] == ["drive/000000", "drive/000001", "drive/000002"]
    assert all((out / "overlay" / "rpl" / f"drive/{i:06d}.png").is_file() for i in range(3))
    video = out / "video" / "rpl" / "drive.mp4"
    assert index["videos"] == [str(video)]
    cap = cv2.VideoCapture(str(video))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 3 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 64 and int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == 32
    cap.release()


def test_corrupt_file_is_skipped_and_counted(world, tmp_path, capsys):
    folder = tmp_path / "mixed"
    _copy(world.images / "frame_000.png", folder)
    _copy(world.images / "frame_001.png", folder)
    (folder / "frame_000b.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    assert predict(str(folder), "--checkpoint", str(world.checkpoint), "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "frame_000b.png" in err and "could not be decoded" in err
    index = json.loads((out / "index.json").read_text())
    assert index["n_predicted"] == 2 and index["n_skipped"] == 1
    bad = next(it for it in index["items"] if it["status"] == "skipped")
    assert bad["name"] == "frame_000b" and "could not be decoded" in bad["error"]
    assert predict(str(folder), "--checkpoint", str(world.checkpoint), "--out", str(tmp_path / "strict"),
                   "--strict") == 2
    assert "--strict" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    _copy(folder / "frame_000b.png", only_bad)
    assert predict(str(only_bad), "--checkpoint", str(world.checkpoint), "--out", str(tmp_path / "none")) == 2
    assert "none of the 1 input file(s) could be read" in capsys.readouterr().err


def test_existing_outputs_need_overwrite(world, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(world.images / "frame_000.png"), "--checkpoint", str(world.checkpoint), "--out", str(out)]
    assert predict(*args) == 0
    overlay_path = out / "overlay" / "rpl" / "frame_000.png"
    before = overlay_path.read_bytes()
    overlay_path.write_bytes(b"user's edit")
    assert predict(*args) == 2
    assert "already exist" in capsys.readouterr().err and overlay_path.read_bytes() == b"user's edit"
    assert predict(*args, "--overwrite") == 0
    assert overlay_path.read_bytes() == before


def test_mask_threshold_from_the_checkpoint_or_a_clear_error(world, tmp_path, capsys):
    args = [str(world.images / "frame_000.png"), "--save", "mask", "--out"]
    assert predict(*args, str(tmp_path / "a"), "--checkpoint", str(world.checkpoint)) == 2
    err = capsys.readouterr().err
    assert "--save mask needs a threshold for rpl" in err and "--threshold T" in err and "records no fpr95" in err
    meta = rpl.checkpoint.read_metadata(world.checkpoint)
    recorded = tmp_path / "recorded.safetensors"
    (tmp_path / "segmenter.safetensors").write_bytes((world.root / "segmenter.safetensors").read_bytes())
    model = load_model(world)
    extra = {**meta["extra"], "metrics": {"val": {"ap": 0.5, "fpr95_threshold": -1.5, "best_f1_threshold": -0.5}}}
    rpl.save(recorded, model, extra=extra)
    for source, value in (("fpr95", -1.5), ("best-f1", -0.5)):
        out = tmp_path / source
        assert predict(*args, str(out), "--checkpoint", str(recorded), "--threshold-from", source) == 0
        index = json.loads((out / "index.json").read_text())
        assert index["thresholds"]["rpl"] == {"value": value, "source": f"checkpoint validation ({source})"}
        score = eval_scores(model, read_image(world.images / "frame_000.png"))[0]["rpl"]
        mask = cv2.imread(index["items"][0]["outputs"]["rpl"]["mask"], cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask, np.where(score >= value, 255, 0))


def test_bad_options_exit_2(world, tmp_path, capsys):
    base = ["--checkpoint", str(world.checkpoint), "--out", str(tmp_path / "o")]
    for argv, message in (([], "no INPUT given"),
                          ([str(tmp_path / "nothing")], "does not exist"),
                          ([str(world.images), "--save", "heatmap"], "unknown kind 'heatmap'"),
                          ([str(world.images), "--methods", "rpl,nope"], "unknown method 'nope'"),
                          ([str(world.images), "--threshold", "abc"], "--threshold"),
                          ([str(world.images), "--method-name", "X"], "needs --smiyc-layout"),
                          ([str(world.images), "--smiyc-layout", str(tmp_path / "s"), "--method-name", "X"],
                           "pass --smiyc-dataset")):
        assert predict(*argv, *base) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


# -- SMIYC ----------------------------------------------------------------------------------------
def test_smiyc_layout_round_trip(world, tmp_path, capsys):
    h5py = pytest.importorskip("h5py", reason="the SMIYC writer needs h5py (pip install 'rpl[smiyc]')")
    images = tmp_path / "datasets" / "dataset_AnomalyTrack" / "images"
    for i in range(2):
        _copy(world.images / f"frame_{i:03d}.png", images)
    _copy(world.images / "more" / "big.jpg", images)
    sub = tmp_path / "submission"
    assert predict(str(images), "--checkpoint", str(world.checkpoint), "--smiyc-layout", str(sub), "--method-name",
                   "RPLtest", "--out", str(tmp_path / "out")) == 0
    files = sorted(p.relative_to(sub).as_posix() for p in sub.rglob("*.hdf5"))
    assert files == ["anomaly_p/RPLtest/AnomalyTrack-all/big.hdf5", "anomaly_p/RPLtest/AnomalyTrack-all/frame_000.hdf5",
                     "anomaly_p/RPLtest/AnomalyTrack-all/frame_001.hdf5"]
    assert not (tmp_path / "out" / "overlay").exists()  # only the submission unless --save is given
    model = load_model(world)
    for path in images.iterdir():
        image = read_image(path)
        with h5py.File(sub / "anomaly_p" / "RPLtest" / "AnomalyTrack-all" / f"{path.stem}.hdf5", "r") as fh:
            assert list(fh.keys()) == ["value"]
            value = fh["value"]
            assert value.dtype == np.float16 and value.shape == image.shape[:2]
            assert value.compression == "gzip" and value.compression_opts == 9
            np.testing.assert_array_equal(value[:], eval_scores(model, image)[0]["rpl"].astype(np.float16))
    assert predict(str(images), "--checkpoint", str(world.checkpoint), "--smiyc-layout", str(tmp_path / "s2"),
                   "--method-name", "E", "--methods", "energy", "--smiyc-dataset", "ObstacleTrack-all",
                   "--out", str(tmp_path / "out2")) == 0
    assert len(list((tmp_path / "s2" / "anomaly_p" / "E" / "ObstacleTrack-all").glob("*.hdf5"))) == 3


# -- the shipped model, as the README runs it ---------------------------------------------------------
def test_default_command_on_synthstreets_images(tmp_path, monkeypatch, capsys):
    """``rpl-predict data/synthstreets/synthstreets-anomaly/images``: shipped add-on, default outputs."""
    from rpl.data.synthstreets.scene import render_street

    images = tmp_path / "data" / "synthstreets" / "synthstreets-anomaly" / "images"
    for i in range(2):
        write_image(images / f"{i:04d}.png", render_street(np.random.default_rng(i), (96, 192), anomalies=1).image)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["data/synthstreets/synthstreets-anomaly/images"]) == 0
    out = tmp_path / "work_dirs" / "predict"
    assert sorted(p.name for p in (out / "overlay" / "rpl").iterdir()) == ["0000.png", "0001.png"]
    assert sorted(p.name for p in (out / "anomaly" / "rpl").iterdir()) == ["0000.png", "0001.png"]
    assert "predicted 2 image(s)" in capsys.readouterr().err
    # the shipped add-on records its validation thresholds, so masks need no --threshold
    assert cli.main(["data/synthstreets/synthstreets-anomaly/images", "--save", "mask", "--out", "masks"]) == 0
    index = json.loads((tmp_path / "masks" / "index.json").read_text())
    assert index["thresholds"]["rpl"]["source"] == "checkpoint validation (fpr95)"
    t = index["thresholds"]["rpl"]["value"]
    mask = cv2.imread(index["items"][0]["outputs"]["rpl"]["mask"], cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 192) and set(np.unique(mask)) <= {0, 255}
    assert index["items"][0]["stats"]["rpl"]["anomalous_pixels"] == int((mask == 255).sum())
    assert index["items"][0]["stats"]["rpl"]["threshold"] == t


@pytest.mark.parametrize("command", ["rpl.cli.predict", "rpl.cli.export"])
def test_help_does_not_import_torch(command):
    code = (f"import sys\nfrom {command} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: rpl-" in done.stdout


def test_resize_keeps_outputs_at_the_input_size(world, tmp_path):
    out = tmp_path / "out"
    assert predict(str(world.images), "--checkpoint", str(world.checkpoint), "--out", str(out), "--resize", "32x32",
                   "--save", "anomaly,prediction", "--anomaly-format", "npy32", "--limit", "2") == 0
    index = json.loads((out / "index.json").read_text())
    assert index["preprocess"]["resize"] == [32, 32] and len(index["items"]) == 2  # --limit
    for item in index["items"]:
        assert np.load(item["outputs"]["rpl"]["anomaly"]).shape == (item["height"], item["width"]) == (32, 64)
        from PIL import Image

        assert np.asarray(Image.open(item["outputs"]["prediction"])).shape == (32, 64)


# -- every method of the registry -----------------------------------------------------------------
def own_maps(model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``model(x).anomaly``, ``energy(model(x).logits)`` and the argmax, resized to the image as rpl-eval does."""
    with torch.inference_mode():
        out = model(Preprocess()(torch.from_numpy(image[None])))
        size = image.shape[:2]
        return (resize_scores(out.anomaly, size)[0].numpy(), resize_scores(rpl.scores.energy(out.logits), size)[0].numpy(),
                resize_logits(out.logits, size).argmax(1)[0].numpy())


def test_a_pebal_checkpoint_predicts_pebal_maps_by_default(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict(str(world.images), "--checkpoint", str(world.pebal), "--out", str(out), "--save",
                   "anomaly,prediction", "--anomaly-format", "npy32") == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["methods"] == ["pebal"] and index["n_predicted"] == 4
    assert not (out / "anomaly" / "rpl").exists()
    model = rpl.from_checkpoint(world.pebal)
    assert type(model).__name__ == "PEBALSegmenter" and model.method_name == "pebal"
    rpl_model = load_model(world)
    from PIL import Image

    for item in index["items"]:
        image = read_image(item["input"])
        anomaly, _, labels = own_maps(model, image)
        score = np.load(item["outputs"]["pebal"]["anomaly"])
        assert item["outputs"]["pebal"]["anomaly"].endswith(f"anomaly/pebal/{item['name']}.npy")
        np.testing.assert_allclose(score, anomaly, rtol=0, atol=1e-5)
        np.testing.assert_allclose(score, eval_scores(model, image, ("pebal",))[0]["pebal"], rtol=0, atol=1e-5)
        assert np.abs(score - eval_scores(rpl_model, image, ("energy",))[0]["energy"]).max() > 1e-3  # tuned weights
        np.testing.assert_array_equal(np.asarray(Image.open(item["outputs"]["prediction"])), labels)
    both = tmp_path / "both"
    assert predict(str(world.images / "frame_000.png"), "--checkpoint", str(world.pebal), "--out", str(both),
                   "--methods", "pebal,energy", "--save", "anomaly", "--anomaly-format", "npy32") == 0
    item = json.loads((both / "index.json").read_text())["items"][0]
    anomaly, energy, _ = own_maps(model, read_image(item["input"]))
    np.testing.assert_allclose(np.load(item["outputs"]["pebal"]["anomaly"]), anomaly, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(item["outputs"]["energy"]["anomaly"]), energy, rtol=0, atol=1e-5)


def test_a_method_the_checkpoint_does_not_hold_is_a_clear_error(world, tmp_path, capsys):
    image = str(world.images / "frame_000.png")
    for checkpoint, methods, message in (
            (world.pebal, "rpl", f"checkpoint {world.pebal} holds method 'pebal', not 'rpl'"),
            (world.pebal, "energy,rpl", "gives pebal, energy"),
            (world.checkpoint, "pebal", f"checkpoint {world.checkpoint} holds method 'rpl', not 'pebal'"),
            (world.pebal, "mcdropout", "evaluate it with rpl-eval --methods mcdropout")):
        out = tmp_path / methods
        assert predict(image, "--checkpoint", str(checkpoint), "--out", str(out), "--methods", methods) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()  # refused before anything is written


def test_a_pebal_checkpoint_threshold_is_its_own(world, tmp_path, capsys):
    meta = rpl.checkpoint.read_metadata(world.pebal)
    recorded = tmp_path / "recorded.safetensors"
    (tmp_path / "segmenter.safetensors").write_bytes((world.root / "segmenter.safetensors").read_bytes())
    model = rpl.from_checkpoint(world.pebal)
    extra = {**meta["extra"], "metrics": {"val": {"fpr95_threshold": -9.5}}}
    rpl.methods.get("pebal").save(recorded, model, extra=extra, base_fingerprint=meta["base_fingerprint"])
    out = tmp_path / "out"
    assert predict(str(world.images / "frame_000.png"), "--checkpoint", str(recorded), "--out", str(out),
                   "--save", "mask") == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["thresholds"] == {"pebal": {"value": -9.5, "source": "checkpoint validation (fpr95)"}}
    anomaly = own_maps(model, read_image(world.images / "frame_000.png"))[0]
    mask = cv2.imread(index["items"][0]["outputs"]["pebal"]["mask"], cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(mask, np.where(anomaly >= -9.5, 255, 0))
    assert predict(str(world.images / "frame_000.png"), "--checkpoint", str(recorded), "--out", str(tmp_path / "e"),
                   "--save", "mask", "--methods", "pebal,energy") == 2
    assert "needs a threshold for energy: only the checkpoint's own method, pebal," in capsys.readouterr().err


def test_predictor_scores_a_built_pebal_model_and_posthoc_scores_of_its_logits():
    from rpl.prediction import Predictor

    torch.manual_seed(0)
    model = tuned_pebal(DeepLabV3Plus(**KWARGS).eval(), 19)  # built, never saved: its method is found by check_model
    assert rpl.methods.method_of(model) == "pebal"
    image = street(np.random.default_rng(7), (40, 72))
    predictor = Predictor(model, preprocess=Preprocess(), device="cpu")
    assert predictor.methods == ("pebal",)
    batch = Predictor(model, ("pebal", "energy", "msp"), Preprocess(), "cpu")(torch.from_numpy(image[None]))
    anomaly, energy, labels = own_maps(model, image)
    np.testing.assert_allclose(batch.scores["pebal"][0].numpy(), anomaly, rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch.scores["energy"][0].numpy(), energy, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(batch.prediction[0].numpy(), labels)
    with torch.inference_mode():
        out = model(Preprocess()(torch.from_numpy(image[None])))
    np.testing.assert_allclose(batch.scores["msp"][0].numpy(),
                               resize_scores(rpl.scores.msp(out.logits), (40, 72))[0].numpy(), rtol=0, atol=1e-6)
    with pytest.raises(rpl.errors.RPLInputError, match="holds method 'pebal', not 'rpl'"):
        Predictor(model, ("rpl",))
    with pytest.raises(rpl.errors.RPLInputError, match="bare segmenter with no method of its own"):
        Predictor(DeepLabV3Plus(**KWARGS))
    with pytest.raises(rpl.errors.RPLInputError, match="needs an RPL add-on"):
        Predictor(DeepLabV3Plus(**KWARGS), ("rpl",))


@dataclass
class ToyOutput:
    logits: torch.Tensor
    anomaly: torch.Tensor


class ToyWrapper(torch.nn.Module):
    """A new method's model around a segmenter: ``.logits`` and its own ``.anomaly`` (half the MaxLogit)."""

    def __init__(self, segmenter: torch.nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor) -> ToyOutput:
        logits = self.segmenter(x)
        return ToyOutput(logits, -0.5 * logits.float().amax(1))


def register_toys(monkeypatch) -> None:
    """A fine-tuned toy method with its own model and a post-hoc one, registered as a new module would."""
    from rpl.methods.base import Method

    class Toy(Method):
        name, kind = "toy", "fine-tune"

        def check_model(self, model):
            if not isinstance(model, ToyWrapper):
                raise rpl.errors.RPLInputError("--methods toy needs a toy model.")

        def scorer(self, model, options):
            self.check_model(model)
            return lambda x, logits, out: out.anomaly

    class Spread(Method):
        name, kind = "spread", "post-hoc"

        def scorer(self, model, options):
            return lambda x, logits, out: logits.float().std(1)

    monkeypatch.setattr(rpl.methods, "_REGISTRY", dict(rpl.methods._REGISTRY))
    rpl.methods.register(Toy)
    rpl.methods.register(Spread)


def test_a_registered_method_is_predicted_with_no_other_change(monkeypatch):
    from rpl.prediction import Predictor

    register_toys(monkeypatch)
    torch.manual_seed(0)
    model = ToyWrapper(ToySegmenter(num_classes=5).eval())
    assert rpl.methods.method_of(model) == "toy"
    predictor = Predictor(model, preprocess=Preprocess(), device="cpu")
    assert predictor.methods == ("toy",)
    image = street(np.random.default_rng(3), (32, 48))
    batch = Predictor(model, ("toy", "spread"), Preprocess(), "cpu")(torch.from_numpy(image[None]))
    with torch.inference_mode():
        logits = model.segmenter(Preprocess()(torch.from_numpy(image[None])))
    np.testing.assert_allclose(batch.scores["toy"][0].numpy(), (-0.5 * logits.amax(1))[0].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch.scores["spread"][0].numpy(), logits.std(1)[0].numpy(), rtol=0, atol=1e-6)
    bare = Predictor(model.segmenter, ("spread",), Preprocess(), "cpu")(torch.from_numpy(image[None]))
    torch.testing.assert_close(bare.scores["spread"], batch.scores["spread"])  # post-hoc on a bare segmenter too
    with pytest.raises(rpl.errors.RPLInputError, match="holds method 'toy', not 'pebal'"):
        Predictor(model, ("pebal",))
