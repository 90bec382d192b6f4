"""``rpl-eval --report DIR``: the HTML page against the JSON, its images, its plots, and a real browser."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score

import rpl
import rpl.cli.eval as cli
from rpl.models import DeepLabV3Plus, SegmenterSpec
from rpl.report import GalleryCollector, fp_threshold
from fixtures_layouts import make_cityscapes
from test_cli_eval import KWARGS, write_anomaly_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0")


class Page(HTMLParser):
    """The parts of the report the tests read: image sources, links, table cells, plot legends."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.cells: list[dict] = []      # results-table cells: dataset, method, key, value, text
        self.iou_cells: list[dict] = []
        self.legends: dict[str, list[list[str]]] = {}  # dataset -> one list of legend texts per plot
        self._table = None
        self._row: dict = {}
        self._cell: dict | None = None
        self._plots: str | None = None
        self._in_legend = False
        self._in_text = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.sources.append(a["src"])
        if tag == "a":
            self.links.append(a["href"])
        if tag == "table":
            self._table = a.get("class")
        if tag == "tr":
            self._row = a
        if tag == "td" and "data-key" in a:
            self._cell = {"dataset": self._row.get("data-dataset"), "method": self._row.get("data-method"),
                          "key": a["data-key"], "value": a.get("data-value"), "text": ""}
        if tag == "div" and a.get("class") == "plots":
            self._plots = a["data-dataset"]
        if tag == "svg" and self._plots is not None:
            self.legends.setdefault(self._plots, []).append([])
        if tag == "g" and a.get("class") == "legend" and self._plots is not None:
            self._in_legend = True
        if tag == "text" and self._in_legend:
            self._in_text = True
            self.legends[self._plots][-1].append("")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            (self.cells if self._table == "results" else self.iou_cells).append(self._cell)
            self._cell = None
        if tag == "g":
            self._in_legend = False
        if tag == "text":
            self._in_text = False
        if tag == "div" and self._plots is not None and not self._in_legend:
            self._plots = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._in_text and self._plots is not None:
            self.legends[self._plots][-1][-1] += data


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A report of an add-on and the baselines on three small anomaly sets and a Cityscapes val."""
    root = tmp_path_factory.mktemp("report_world")
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**KWARGS).eval()
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(root / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors")
    checkpoint = rpl.save(root / "addon.safetensors", rpl.wrap(segmenter, block={"width": 16}),
                          extra={"segmenter": spec.to_dict()})
    data = root / "data"
    write_anomaly_set(data / "synthstreets-anomaly", 4, seed=1)
    write_anomaly_set(data / "synthstreets-obstacle", 3, seed=3, obstacle=True)
    make_cityscapes(data / "cityscapes")
    out = root / "report"
    code = cli.main(["--checkpoint", str(checkpoint), "--data-root", str(data), "--quiet", "--num-workers", "0",
                     "--datasets", "synthstreets-anomaly,synthstreets-obstacle,cityscapes-val",
                     "--report", str(out), "--report-images", "2", "--json", str(root / "eval.json")])
    assert code == 0
    page = Page()
    text = (out / "index.html").read_text(encoding="utf-8")
    page.feed(text)
    return out, text, page, json.loads((root / "eval.json").read_text())


def test_report_references_only_local_files_that_exist(built):
    out, text, page, _ = built
    assert page.sources, "the report shows no image"
    for ref in page.sources + page.links:
        assert not re.match(r"^[a-z]+:|^//", ref), ref
        assert (out / ref).is_file(), ref
    assert not re.search(r"https?:|//[a-z]", text, re.IGNORECASE), "an external URL is referenced"
    assert set(re.findall(r'(?:src|href)="([^"]+)"', text)) == set(page.sources + page.links)


def test_report_table_equals_the_json(built):
    out, _, page, document = built
    assert json.loads((out / "results.json").read_text())["results"] == document["results"]
    cells = {(c["dataset"], c["method"], c["key"]): c for c in page.cells}
    checked = 0
    for row in document["results"]:
        keys = ("miou", "pixel_accuracy") if "miou" in row else ("auroc", "ap", "fpr95")
        for key in keys:
            cell = cells.pop((row["dataset"], row["method"], key))
            assert cell["text"] == f"{100 * row[key]:.2f}"
            assert float(cell["value"]) == row[key]
            checked += 1
    assert not cells and checked == 3 * 10 + 2 * 2
    # the best value of each column is marked per dataset (FPR95: the lowest)
    anomaly = [r for r in document["results"] if r["dataset"] == "synthstreets-anomaly"]
    best_fpr = min(r["fpr95"] for r in anomaly)
    marked = re.findall(r'<td class="num best" data-key="fpr95" data-value="([^"]+)"', built[1])
    assert best_fpr in [float(v) for v in marked]


def test_report_curve_legends_name_every_method(built):
    _, _, page, document = built
    for dataset in ("synthstreets-anomaly", "synthstreets-obstacle"):
        methods = [r["method"] for r in document["results"] if r["dataset"] == dataset]
        plots = page.legends[dataset]
        assert len(plots) == 2  # ROC and precision-recall
        for legend in plots:
            assert [t.split()[0] for t in legend] == methods
    assert "cityscapes-val" not in page.legends


def test_report_iou_per_class_and_gallery(built):
    out, text, page, document = built
    for row in (r for r in document["results"] if "miou" in r):
        for i, v in enumerate(row["iou_per_class"]):
            cell = [c for c in page.iou_cells if (c["dataset"], c["method"], c["key"]) ==
                    (row["dataset"], row["method"], f"iou_{i}")]
            assert (cell[0]["text"] == f"{100 * v:.2f}") if v is not None else not cell
    assert "Where the methods disagree most" in text and "Largest false-positive area" in text
    tiles = [s for s in page.sources if "synthstreets-anomaly" in s]
    assert len(tiles) == 2 * 2 * (2 + 5)  # two sections x two images x (image, ground truth, five methods)
    strip = cv2.imread(str(out / "img/synthstreets-anomaly-0/gallery.jpg"))
    assert strip.shape[1] == 7 * 64 and strip.shape[0] == 2 * 32


def test_gallery_statistics():
    """Per-image AP equals scikit-learn's; the false-positive ranking and disagreement mean what they say."""
    rng = np.random.default_rng(0)
    label = np.zeros((20, 30), np.uint8)
    label[5:9, 5:12] = 1
    label[-2:] = 255
    base = rng.normal(size=label.shape).astype(np.float32) + 2 * (label == 1)
    collector = GalleryCollector(("a", "b"), n_show=1)
    quiet = np.where(label == 1, base, base - 5)                       # inliers far below: few false positives
    noisy = base.copy()
    noisy[12:16] += 4                                                  # a band of inliers scoring high
    for name, score in (("quiet", quiet), ("noisy", noisy)):
        t = torch.from_numpy(score)
        collector.add(name, {"a": t, "b": t.clone()}, torch.from_numpy(label))
    valid = label != 255
    ap = average_precision_score(label[valid] == 1, noisy[valid])
    assert collector.records[1].ap["a"] == pytest.approx(ap, abs=1e-12)
    assert collector.records[0].disagreement == 0.0  # identical maps
    picked = collector.select({"a": 1.0, "b": 1.0})
    assert [r.name for r in picked["false_positives"]] == ["noisy"]
    assert fp_threshold({"fpr95_threshold": None, "best_f1_threshold": 0.5}) == 0.5
    other = GalleryCollector(("a", "b"), n_show=2)
    t = torch.from_numpy(noisy)
    other.add("same", {"a": t, "b": t}, torch.from_numpy(label))
    other.add("differ", {"a": t, "b": -t}, torch.from_numpy(label))
    assert [r.name for r in other.select({"a": 0.0, "b": 0.0})["disagreement"]] == ["differ", "same"]


# -- the browser -------------------------------------------------------------------------------
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(browser: str, page: Path, png: Path, profile: Path, height: int) -> list[str]:
    """Headless Chromium opens ``page`` from disk and saves a screenshot; returns its console lines."""
    profile.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size=1280,{height}",
                           f"--screenshot={png}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert png.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium; "
                                               ".ci/run installs it when apt can)")
def test_report_in_headless_chromium(built, tmp_path):
    out = built[0]
    browser = chromium()
    # the console check can fail: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><p>x</p><script>console.error("boom"); missing_function();</script>')
    console = screenshot(browser, bad, tmp_path / "bad.png", tmp_path / "profile-bad", 300)
    assert any("missing_function" in line for line in console), console
    # the whole page: tall enough that the last rows are the page background (nothing cut off)
    height = 6000
    for _ in range(3):
        png = tmp_path / f"report-{height}.png"
        console = screenshot(browser, out / "index.html", png, tmp_path / f"profile-{height}", height)
        assert not console, f"console messages while loading the report: {console}"
        shot = cv2.imread(str(png))
        background = shot[-1, 0]
        content = np.flatnonzero((shot != background).any(axis=(1, 2)))
        if content.size and content[-1] < height - 50:
            break
        height *= 2
    else:
        pytest.fail("the report did not fit in a 24000-pixel-high screenshot")
    page = shot[:content[-1] + 1]
    colours = np.unique(page.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 500, f"the screenshot looks blank ({len(colours)} distinct colours)"
    assert page.shape[0] > 1500  # table, two datasets with plots and galleries, IoU, settings
    # the plots and gallery tiles were drawn: the palette's first colour and JPEG tiles are there
    assert ((page[..., 0] == 0xb4) & (page[..., 1] == 0x77) & (page[..., 2] == 0x1f)).sum() > 100


def test_rpl_train_final_evaluation_writes_the_report(monkeypatch, tmp_path):
    """The README's first command (rpl-train on the embedded default) ends with rpl-eval --report."""
    import types

    import rpl.cli.train as train_cli
    import rpl.training

    class FakeTrainer:  # the training itself is tested in test_training.py
        finished = False

        def __init__(self, cfg, work_dir, **options):
            self.d = types.SimpleNamespace(main=True)
            self.method = types.SimpleNamespace(name=cfg.method)

        def fit(self):
            return {"steps": 1, "seconds": 0.0, "skipped_steps": 0, "best_ap": 0.5, "best_step": 1}

        def close(self):
            pass

    calls = []
    monkeypatch.setattr(rpl.training, "build_trainer", FakeTrainer)
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    work = tmp_path / "work"
    assert train_cli.main(["--work-dir", str(work), "--quiet"]) == 0
    (argv,) = calls
    assert argv[argv.index("--report") + 1] == f"{work}/report"


def test_report_onto_a_file_is_an_input_error(tmp_path, capsys):
    taken = tmp_path / "report.html"
    taken.write_text("keep me")
    assert cli.main(["--report", str(taken), "--data-root", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--report" in err and str(taken) in err and "Traceback" not in err
    assert taken.read_text() == "keep me"
    assert cli.main(["--report", str(tmp_path / "r"), "--report-images", "-1", "--quiet"]) == 2
    assert "--report-images" in capsys.readouterr().err


def test_report_of_any_methods_and_segmenters(tmp_path):
    """Written against the results structure only: any method names, component columns, several mIoU rows,
    galleries of several models for one dataset."""
    from rpl.metrics import PixelMetrics
    from rpl.report import Gallery, GalleryImage, write_report

    rng = np.random.default_rng(1)
    label = (rng.random((16, 24)) < 0.2).astype(np.uint8)
    rows, curves = [], {}
    for k, method in enumerate(("pebal", "pebal+rpl", "my <method>")):
        score = rng.normal(size=label.shape).astype(np.float32) + k * label
        metric = PixelMetrics(mode="exact")
        metric.update(score, label)
        rows.append({"dataset": "set-a", "method": method, **metric.compute(), "siou": 0.1 * k, "ppv": None,
                     "mean_f1": 0.2})
        curves[method] = metric.curve()
    rows += [{"dataset": "val", "method": f"segmenter {i}", "auroc": None, "ap": None, "fpr95": None,
              "miou": 0.5 + 0.1 * i, "pixel_accuracy": 0.9, "iou_per_class": [0.5 + 0.1 * i, None, 0.4]}
             for i in range(3)]
    image = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
    shown = GalleryImage("frame/1", image, label, {"pebal": rng.normal(size=label.shape).astype(np.float32)},
                         {"pebal": 0.5}, {"pebal": 0.25}, None)
    galleries = [Gallery("set-a", ("pebal",), {"pebal": 0.0}, {"false_positives": [shown]}) for _ in range(2)]
    page = write_report(tmp_path / "r", {"results": rows, "pixel_mode": "exact", "checkpoints": ["a", "b"]},
                        {"set-a": curves}, {"set-a": galleries}).read_text()
    parsed = Page()
    parsed.feed(page)
    assert [[t.split("  ")[0] for t in legend] for legend in parsed.legends["set-a"]] == \
        [["pebal", "pebal+rpl", "my <method>"]] * 2
    assert "my &lt;method&gt;" in page and "my <method>" not in page
    best = re.findall(r'<td class="num best" data-key="(\w+)" data-value="([^"]+)"', page)
    assert ("siou", "0.2") in best and ("miou", repr(0.5 + 0.1 * 2)) in best
    assert page.count("(pebal)</h3>") == 2  # two models' galleries, each named
    assert all((tmp_path / "r" / s).is_file() for s in parsed.sources) and len(parsed.sources) == 2 * 3
    assert len([c for c in parsed.iou_cells if c["key"] == "iou_0"]) == 3 and "iou_1" not in \
        {c["key"] for c in parsed.iou_cells}


def test_report_of_several_checkpoints_names_each_row(built, capsys):
    """rpl-eval with several --checkpoint writes one report whose curves carry the table's row names, and its
    table says when it was limited (the same output code as one checkpoint's)."""
    out, _, _, _ = built
    root = out.parent
    torch.manual_seed(1)
    segmenter = rpl.models.build_segmenter(
        SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors"), root).eval()
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=KWARGS, weights="segmenter.safetensors")
    other = rpl.save(root / "addon2.safetensors", rpl.wrap(segmenter, block={"width": 16}),
                     extra={"segmenter": spec.to_dict()})
    many = root / "report_many"
    code = cli.main(["--checkpoint", str(root / "addon.safetensors"), "--checkpoint", str(other), "--quiet",
                     "--data-root", str(root / "data"), "--datasets", "synthstreets-anomaly", "--num-workers", "0",
                     "--methods", "rpl,energy", "--report", str(many), "--json", str(root / "many.json"),
                     "--limit", "2"])
    assert code == 0
    assert "--limit 2: first 2 images of each dataset only" in " ".join(capsys.readouterr().out.split())
    methods = [r["method"] for r in json.loads((root / "many.json").read_text())["results"]]
    assert sorted(methods) == ["energy", "rpl", "rpl (addon2)"]
    page = Page()
    page.feed((many / "index.html").read_text(encoding="utf-8"))
    for legend in page.legends["synthstreets-anomaly"]:  # one curve per table row, under its name
        assert sorted(t.split("  ")[0] for t in legend) == sorted(methods)
