"""The evaluation report: ``rpl-eval --report DIR`` writes ``DIR/index.html`` and its images.

    report = Evaluator(model, EvalOptions(report=True, gallery_images=4)).run(entries)  # + curves, galleries
    write_report("work_dirs/report", document, report.curves, report.galleries)  # document: rpl-eval's JSON

One self-contained page (no script, no server, no network: open the file): the results table with
the best value of each column marked per dataset, the run's settings, per dataset the ROC and
precision-recall curves of every method on one plot each (FPR@95 and best-F1 points marked), a
gallery of the images where the methods disagree most and of those with the largest false-positive
area, and the closed-set IoU per class of each segmenter as a table and a bar plot.

Curves come from ``PixelMetrics.curve()``: the pooled points the table's metrics are computed from
(the streaming histogram's bins in the default mode), never recomputed by another library.

Plots are inline SVG written here rather than matplotlib: the README's first command (a plain
``pip install -e .``) writes this report, so it must not need an optional dependency; the plots are
a few polylines, markers and bars on unit axes; and inline SVG keeps the text as text (the legend is
searchable and tested), is a few kB, and the same input gives the same bytes.

The gallery is collected during evaluation with bounded memory (``GalleryCollector``): per image and
method a handful of numbers (per-image AP, a 64-value sketch of the inlier scores) and per image the
methods' disagreement; no score map is kept. When a dataset is done, the images to show are picked
and only those (at most 2 N per dataset) are read and run through the model again for their
previews: the false-positive area needs the pooled FPR@95 threshold, known only at the end.

- disagreement: each method's map is scaled to [0, 1] between its 1st and 99th percentile inside the
  image's ROI (as ``rpl.visualize.overlay`` shows it), and the per-pixel range (max - min over the
  methods) is averaged over the ROI: the images whose overlays look most different;
- false-positive area: the share of the ROI made of inlier pixels scoring at or above the method's
  pooled FPR@95 threshold (the operating point detecting 95 % of all anomaly pixels; best-F1
  threshold in SMIYC mode when FPR@95 has none), averaged over the methods for ranking (ranked from
  the sketch, within about 1/64 of the inliers; the shown numbers are exact, from the second pass);
- per-image AP: average precision of that image's pixels alone (scikit-learn's definition), shown
  where the image has both anomaly and inlier pixels.

Gallery overlays use one colour scale per method for the whole gallery (1st to 99th percentile of
that method's scores over the shown images' ROIs), so images can be compared with each other.
"""
from __future__ import annotations

import html
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

IGNORE = 255
SKETCH = 64  # inlier-score quantiles kept per image and method
PREVIEW_WIDTH = 384  # gallery tiles are at most this wide
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
LOWER_IS_BETTER = {"fpr95"}
SECTIONS = (("disagreement", "Where the methods disagree most"),
            ("false_positives", "Largest false-positive area (at each method's FPR@95 threshold)"))


# -- collection during evaluation --------------------------------------------------------------
def image_ap(scores: np.ndarray, label: np.ndarray) -> float | None:
    """AP of one image's pixels alone (scikit-learn's definition, ties included); None unless the
    image has both anomaly and inlier pixels."""
    from rpl.errors import RPLInputError
    from rpl.metrics import PixelMetrics

    metric = PixelMetrics(mode="exact")
    metric.update(scores, label)
    try:
        return metric.compute()["ap"]
    except RPLInputError:
        return None


@dataclass
class ImageRecord:
    """What the gallery keeps of one image: no map, a few numbers per method."""

    position: int  # index in the evaluated dataset
    name: str
    n_valid: int
    n_inlier: int
    ap: dict[str, float | None]
    sketch: dict[str, np.ndarray]  # ascending inlier-score quantiles (empty without inliers)
    disagreement: float | None


class GalleryCollector:
    """Per-image statistics of one dataset, fed image by image during evaluation."""

    def __init__(self, methods: Sequence[str], n_show: int):
        self.methods, self.n_show = tuple(methods), int(n_show)
        self.records: list[ImageRecord] = []
        self.position = 0

    def add(self, name: str, scores: dict[str, torch.Tensor], label: torch.Tensor) -> None:
        """One image: ``scores[method]`` (H, W) and ``label`` (H, W) 0 / 1 / 255, on any device."""
        position, self.position = self.position, self.position + 1
        label = label.cpu().numpy()
        valid = label != IGNORE
        n_valid = int(valid.sum())
        if n_valid == 0:
            return
        inlier = label[valid] == 0
        ap, sketch, units = {}, {}, []
        for m in self.methods:
            score = scores[m].float().cpu().numpy()
            values = score[valid]
            ap[m] = image_ap(score, label)
            inliers = np.sort(values[inlier])
            sketch[m] = inliers[np.linspace(0, inliers.size - 1, SKETCH).round().astype(np.int64)] if inliers.size \
                else np.empty(0, np.float32)
            k_low, k_high = round(0.01 * (n_valid - 1)), round(0.99 * (n_valid - 1))
            low, high = np.partition(values, (k_low, k_high))[[k_low, k_high]]
            units.append((values > low).astype(np.float32) if not high > low
                         else np.clip((values - low) / (high - low), 0.0, 1.0))
        disagreement = None
        if len(units) > 1:
            stack = np.stack(units)
            disagreement = float((stack.max(0) - stack.min(0)).mean())
        self.records.append(ImageRecord(position, name, n_valid, int(inlier.sum()), ap, sketch, disagreement))

    def estimated_fp_area(self, record: ImageRecord, thresholds: dict[str, float]) -> float | None:
        """Mean over methods of the ROI share of inliers scoring >= the threshold, from the sketch."""
        shares = []
        for m, t in thresholds.items():
            q = record.sketch.get(m)
            if q is None or q.size == 0 or t is None:
                continue
            below = float(np.interp(t, q, np.linspace(0.0, 1.0, q.size), left=0.0, right=1.0))
            shares.append(record.n_inlier * (1.0 - below) / record.n_valid)
        return float(np.mean(shares)) if shares else None

    def select(self, thresholds: dict[str, float]) -> dict[str, list[ImageRecord]]:
        """The records each gallery section shows, best first."""
        picked: dict[str, list[ImageRecord]] = {}
        disagreeing = [r for r in self.records if r.disagreement is not None]
        if disagreeing:
            picked["disagreement"] = sorted(disagreeing, key=lambda r: -r.disagreement)[:self.n_show]
        fp = [(a, r) for r in self.records if (a := self.estimated_fp_area(r, thresholds)) is not None]
        if fp:
            picked["false_positives"] = [r for _, r in sorted(fp, key=lambda ar: -ar[0])[:self.n_show]]
        return picked


@dataclass
class GalleryImage:
    name: str
    image: np.ndarray  # RGB uint8 preview
    label: np.ndarray  # uint8 preview, 0 / 1 / 255
    scores: dict[str, np.ndarray]  # float32 previews
    ap: dict[str, float | None]
    fp_area: dict[str, float | None]  # exact, at full resolution
    disagreement: float | None


@dataclass
class Gallery:
    """One dataset's gallery for one model: sections of images, each with one overlay per method."""

    dataset: str
    methods: tuple[str, ...]
    thresholds: dict[str, float]
    sections: dict[str, list[GalleryImage]] = field(default_factory=dict)


def fp_threshold(row: dict[str, Any]) -> float | None:
    """The threshold the false-positive area is taken at: FPR@95's, else best F1's (SMIYC mode)."""
    for key in ("fpr95_threshold", "best_f1_threshold"):
        t = row.get(key)
        if t is not None and math.isfinite(t):
            return float(t)
    return None


def make_preview(image: np.ndarray, label: np.ndarray, scores: dict[str, torch.Tensor], record: ImageRecord,
                 thresholds: dict[str, float]) -> GalleryImage:
    """A gallery image at most ``PREVIEW_WIDTH`` wide, with its exact false-positive areas."""
    label_t = torch.as_tensor(label, device=next(iter(scores.values())).device)
    valid = label_t != IGNORE
    fp_area = {}
    for m, s in scores.items():
        t = thresholds.get(m)
        fp_area[m] = None if t is None else float(((s >= t) & (label_t == 0)).sum()) / max(int(valid.sum()), 1)
    h, w = label.shape
    size = (w, h) if w <= PREVIEW_WIDTH else (PREVIEW_WIDTH, max(1, round(h * PREVIEW_WIDTH / w)))
    small = {m: cv2.resize(s.float().cpu().numpy(), size, interpolation=cv2.INTER_AREA) for m, s in scores.items()}
    return GalleryImage(record.name, cv2.resize(image, size, interpolation=cv2.INTER_AREA),
                        cv2.resize(label, size, interpolation=cv2.INTER_NEAREST), small, record.ap, fp_area,
                        record.disagreement)


# -- inline SVG plots --------------------------------------------------------------------------
def _f(v: float) -> str:
    return f"{v:.1f}"


def line_plot(title: str, xlabel: str, ylabel: str, series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
              markers: Sequence[tuple[int, list[float] | None, str]] = (), width: int = 460,
              plot_height: int = 300) -> str:
    """Curves on the unit square. ``series``: (legend text, xs, ys); ``markers``: (series index, [x, y], shape)."""
    left, top, right, bottom = 50, 28, 14, 42
    pw, ph = width - left - right, plot_height - top - bottom
    legend_height = 18 * len(series) + 8
    height = plot_height + legend_height

    def px(x: float) -> float:
        return left + min(max(x, 0.0), 1.0) * pw

    def py(y: float) -> float:
        return top + (1.0 - min(max(y, 0.0), 1.0)) * ph

    out = [f'<svg class="plot" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2}" y="17" text-anchor="middle" class="title">{html.escape(title)}</text>']
    for i in range(6):
        v = i / 5
        out.append(f'<line x1="{_f(px(v))}" y1="{top}" x2="{_f(px(v))}" y2="{top + ph}" class="grid"/>'
                   f'<line x1="{left}" y1="{_f(py(v))}" x2="{left + pw}" y2="{_f(py(v))}" class="grid"/>'
                   f'<text x="{_f(px(v))}" y="{top + ph + 15}" text-anchor="middle">{v:.1f}</text>'
                   f'<text x="{left - 6}" y="{_f(py(v) + 4)}" text-anchor="end">{v:.1f}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 33}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(13 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(ylabel)}</text>')
    for i, (_, xs, ys) in enumerate(series):
        points = " ".join(f"{px(x):.2f},{py(y):.2f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{points}" fill="none" stroke="{PALETTE[i % len(PALETTE)]}" '
                   'stroke-width="1.8" stroke-linejoin="round"/>')
    for i, point, shape in markers:
        if point is None:
            continue
        colour, x, y = PALETTE[i % len(PALETTE)], px(point[0]), py(point[1])
        if shape == "diamond":
            d = f"M{x:.1f} {y - 6:.1f} L{x + 6:.1f} {y:.1f} L{x:.1f} {y + 6:.1f} L{x - 6:.1f} {y:.1f} Z"
            out.append(f'<path d="{d}" fill="{colour}" stroke="#fff" stroke-width="1"/>')
        else:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}" stroke="#fff" stroke-width="1"/>')
    out.append('<g class="legend">')
    for i, (text, _, _) in enumerate(series):
        y = plot_height + 4 + 18 * i
        out.append(f'<rect x="{left}" y="{y}" width="14" height="4" fill="{PALETTE[i % len(PALETTE)]}"/>'
                   f'<text x="{left + 20}" y="{y + 6}">{html.escape(text)}</text>')
    out.append("</g></svg>")
    return "\n".join(out)


def bar_plot(title: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]],
             width: int = 900, height: int = 300) -> str:
    """Grouped bars in % (0..100): one group per class, one bar per series (segmenter); None = no bar."""
    left, top, right, bottom = 46, 28, 10, 70 + 18 * len(series)
    pw, ph = width - left - right, height - top - bottom
    gw = pw / max(len(groups), 1)
    bw = 0.8 * gw / max(len(series), 1)
    out = [f'<svg class="plot" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2}" y="17" text-anchor="middle" class="title">{html.escape(title)}</text>']
    for i in range(6):
        y = top + ph - i / 5 * ph
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{20 * i}</text>')
    for g, name in enumerate(groups):
        x0 = left + g * gw + 0.1 * gw
        for s, (_, values) in enumerate(series):
            v = values[g]
            if v is None:
                continue
            h = min(max(v, 0.0), 1.0) * ph
            out.append(f'<rect x="{x0 + s * bw:.1f}" y="{top + ph - h:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                       f'fill="{PALETTE[s % len(PALETTE)]}"><title>{html.escape(name)}: {100 * v:.2f}</title></rect>')
        cx = left + (g + 0.5) * gw
        out.append(f'<text transform="translate({cx:.1f} {top + ph + 10}) rotate(35)" text-anchor="start">'
                   f'{html.escape(name)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    out.append('<g class="legend">')
    for s, (text, _) in enumerate(series):
        y = height - 18 * (len(series) - s) + 2
        out.append(f'<rect x="{left}" y="{y - 8}" width="14" height="10" fill="{PALETTE[s % len(PALETTE)]}"/>'
                   f'<text x="{left + 20}" y="{y + 1}">{html.escape(text)}</text>')
    out.append("</g></svg>")
    return "\n".join(out)


# -- gallery images ----------------------------------------------------------------------------
def ground_truth_tile(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The image dimmed, anomaly pixels orange, void pixels dark grey."""
    out = (image.astype(np.float32) * 0.45).astype(np.uint8)
    out[label == 1] = (255, 150, 0)
    out[label == IGNORE] = (40, 40, 40)
    return out


def colour_scales(gallery: Gallery) -> dict[str, tuple[float, float]]:
    """One (low, high) per method over every shown image's ROI: the 1st and 99th percentile."""
    scales = {}
    images = [im for section in gallery.sections.values() for im in section]
    for m in gallery.methods:
        values = np.concatenate([im.scores[m][im.label != IGNORE].ravel() for im in images] or [np.zeros(1)])
        values = values[np.isfinite(values)]
        low, high = (np.percentile(values, [1, 99]) if values.size else (0.0, 1.0))
        scales[m] = (float(low), float(high) if high > low else float(low) + 1e-6)
    return scales


def gallery_strip(gallery: Gallery, section: str, scales: dict[str, tuple[float, float]] | None = None) -> np.ndarray:
    """One section as a single RGB picture (a row per image: image, ground truth, one overlay per method),
    each tile labelled; the README's figure is one of these."""
    from rpl.visualize import overlay

    scales = scales or colour_scales(gallery)
    rows = []
    for im in gallery.sections[section]:
        tiles = [("image", im.image), ("ground truth", ground_truth_tile(im.image, im.label))]
        tiles += [(m, overlay(im.image, im.scores[m], im.label, scale=scales[m])) for m in gallery.methods]
        labelled = []
        for text, tile in tiles:
            tile = tile.copy()
            cv2.putText(tile, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(tile, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
            labelled.append(tile)
        rows.append(np.concatenate(labelled, axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]):
        from rpl.errors import RPLInputError

        raise RPLInputError(f"--report: cannot write {path}; check that the folder is writable.")


# -- the page ----------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1280px;margin:0 auto;padding:16px 28px 48px}
h1{font-size:26px;margin:18px 0 4px}h2{font-size:20px;margin:34px 0 10px;border-bottom:2px solid #d8dce4;
padding-bottom:4px}h3{font-size:16px;margin:20px 0 8px}
.sub{color:#5a6478;margin:0 0 14px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0 10px;box-shadow:0 1px 2px #0001}
th,td{padding:4px 9px;border-bottom:1px solid #e4e7ec;text-align:left}
th{background:#e9ecf2;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700;background:#e3f3e6}tr.first td{border-top:2px solid #c9ced8}
.settings td:first-child{color:#5a6478;white-space:nowrap}.settings td{font-family:ui-monospace,monospace;
font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:14px}.plot{background:#fff;box-shadow:0 1px 2px #0001}
.plot text{font-size:11px;fill:#333}.plot .title{font-size:13px;font-weight:600}
.plot .grid{stroke:#e6e8ee;stroke-width:1}.plot .frame{fill:none;stroke:#9aa2b1}
.gallery{display:grid;gap:6px;align-items:start;margin-bottom:8px}
.gallery figure{margin:0;background:#fff;box-shadow:0 1px 2px #0001}.gallery img{width:100%;height:auto;display:block}
.gallery figcaption{font-size:11px;padding:2px 5px 4px;color:#333;line-height:1.35}
.gallery .head{font-size:12px;font-weight:600;padding:2px 0}
.bar{height:8px;background:linear-gradient(90deg,#00008f,#0000ff,#00ffff,#ffff00,#ff0000,#800000);margin:2px 0}
.scale{font-size:10px;color:#5a6478;font-weight:400;display:flex;justify-content:space-between}
.notes li{font-size:13px;margin:3px 0}
"""


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100.0 * v:.2f}"


def _columns(results: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    cols = [("AUROC", "auroc"), ("AP", "ap"), ("FPR95", "fpr95")]
    cols += [(t, k) for t, k in (("sIoU", "siou"), ("PPV", "ppv"), ("mean F1", "mean_f1"))
             if any(k in r for r in results)]
    if any(r.get("miou") is not None or "iou_per_class" in r for r in results):
        cols += [("mIoU", "miou"), ("pixel acc.", "pixel_accuracy")]
    return cols


def _is_miou_row(row: dict[str, Any]) -> bool:
    return "miou" in row


def _best(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and (key in ("miou", "pixel_accuracy")) == _is_miou_row(r)]
    if len(values) < 2:
        return None
    return min(values) if key in LOWER_IS_BETTER else max(values)


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """Every (dataset, method) row, metrics in %, the best value of each column per dataset in bold."""
    cols = _columns(results)
    out = ['<table class="results"><thead><tr><th>dataset</th><th>method</th>' +
           "".join(f"<th>{t}</th>" for t, _ in cols) + "</tr></thead><tbody>"]
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    for d in datasets:
        rows = [r for r in results if r["dataset"] == d]
        best = {k: _best(rows, k) for _, k in cols}
        for i, r in enumerate(rows):
            cells = []
            for _, k in cols:
                applies = (k in ("miou", "pixel_accuracy")) == _is_miou_row(r) and k in r
                if not applies:
                    cells.append('<td class="num">-</td>')
                    continue
                v = r[k]
                cls = "num best" if v is not None and best[k] is not None and v == best[k] else "num"
                value = "" if v is None else f' data-value="{v!r}"'
                cells.append(f'<td class="{cls}" data-key="{k}"{value}>{_pct(v)}</td>')
            out.append(f'<tr class="{"first" if i == 0 else ""}" data-dataset="{html.escape(d)}" '
                       f'data-method="{html.escape(r["method"])}"><td>{html.escape(d)}</td>'
                       f'<td>{html.escape(r["method"])}</td>{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """Versions and hardware, for the settings table."""
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "cpu": f"{cpu} ({os.cpu_count()} logical cores)"}
    if torch.cuda.is_available():
        info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return info


def _value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v, default=str))
    return html.escape("null" if v is None else str(v))


def settings_table(document: dict[str, Any], when: str) -> str:
    skip = {"results", "datasets", "notes"}
    rows = [(k, v) for k, v in document.items() if k not in skip]
    rows += [("date (UTC)", when), ("process command line", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))]
    rows += list(machine().items())
    return ('<table class="settings"><tbody>' +
            "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_value(v)}</td></tr>" for k, v in rows) +
            "</tbody></table>")


def datasets_table(datasets: dict[str, dict[str, Any]]) -> str:
    keys = ("n_images", "n_empty_images", "track", "seconds", "images_per_second", "path")
    return ('<table class="datasets"><thead><tr><th>dataset</th>' + "".join(f"<th>{k}</th>" for k in keys) +
            "</tr></thead><tbody>" + "".join(
                f"<tr><td>{html.escape(d)}</td>" + "".join(f"<td>{_value(info.get(k))}</td>" for k in keys) + "</tr>"
                for d, info in datasets.items()) + "</tbody></table>")


def curve_plots(dataset: str, rows: Sequence[dict[str, Any]], curves: dict[str, dict[str, Any]]) -> str:
    methods = [r["method"] for r in rows if r["method"] in curves]
    if not methods:
        return ""
    by = {r["method"]: r for r in rows}
    roc = line_plot(f"ROC: {dataset}", "false positive rate", "true positive rate",
                    [(f"{m}  AUROC {_pct(by[m].get('auroc'))}, FPR95 {_pct(by[m].get('fpr95'))}",
                      curves[m]["roc"]["fpr"], curves[m]["roc"]["tpr"]) for m in methods],
                    [(i, curves[m]["fpr95_point"], "circle") for i, m in enumerate(methods)])
    pr = line_plot(f"Precision-recall: {dataset}", "recall", "precision",
                   [(f"{m}  AP {_pct(by[m].get('ap'))}, best F1 {_pct(by[m].get('best_f1'))}",
                     curves[m]["pr"]["recall"], curves[m]["pr"]["precision"]) for m in methods],
                   [(i, curves[m]["best_f1_point"], "diamond") for i, m in enumerate(methods)])
    return (f'<div class="plots" data-dataset="{html.escape(dataset)}">{roc}{pr}</div>'
            '<p class="sub">Pooled over every valid pixel of the set (the points the table is computed from). '
            "Circles: the FPR@95 operating point; diamonds: the best-F1 point.</p>")


def gallery_html(gallery: Gallery, folder: Path, prefix: str, name_methods: bool = False) -> str:
    """The gallery's sections as grids of captioned tiles; writes the tiles under ``folder``.
    ``name_methods``: say whose gallery it is (a dataset with galleries of several models)."""
    if not gallery.sections:
        return ""
    scales = colour_scales(gallery)
    columns = 2 + len(gallery.methods)
    out = []
    for section, title in SECTIONS:
        images = gallery.sections.get(section)
        if not images:
            continue
        whose = f" ({', '.join(gallery.methods)})" if name_methods else ""
        out.append(f"<h3>{html.escape(title + whose)}</h3>")
        out.append(f'<div class="gallery" style="grid-template-columns:repeat({columns},1fr)">')
        out.append('<div class="head">image</div><div class="head">ground truth<div class="scale">'
                   "orange anomaly, grey void</div></div>")
        for m in gallery.methods:
            low, high = scales[m]
            out.append(f'<div class="head">{html.escape(m)}<div class="bar"></div><div class="scale">'
                       f"<span>{low:.3g}</span><span>{high:.3g}</span></div></div>")
        from rpl.visualize import file_stem, overlay

        for k, im in enumerate(images):
            stem = f"{prefix}/{section}-{k}-{file_stem(im.name)}"
            tiles = [("image", im.image), ("gt", ground_truth_tile(im.image, im.label))]
            tiles += [(f"m{j}", overlay(im.image, im.scores[m], im.label, scale=scales[m]))
                      for j, m in enumerate(gallery.methods)]
            captions = [html.escape(im.name) + (f"<br>disagreement {im.disagreement:.3f}"
                                                if im.disagreement is not None else ""), ""]
            for m in gallery.methods:
                ap = im.ap.get(m)
                fp = im.fp_area.get(m)
                captions.append(("" if ap is None else f"AP {100 * ap:.1f}") +
                                ("" if fp is None else f"{' · ' if ap is not None else ''}FP {100 * fp:.1f} % of ROI"))
            for (tag, tile), caption in zip(tiles, captions):
                rel = f"{stem}-{tag}.jpg"
                _write_jpeg(folder / rel, tile)
                out.append(f'<figure><img src="{html.escape(rel)}" alt="{html.escape(im.name)} {tag}" '
                           f'width="{tile.shape[1]}" height="{tile.shape[0]}" loading="eager">'
                           f"<figcaption>{caption}</figcaption></figure>")
        out.append("</div>")
    strip_rel = f"{prefix}/gallery.jpg"
    first = next(s for s, _ in SECTIONS if gallery.sections.get(s))
    _write_jpeg(folder / strip_rel, gallery_strip(gallery, first, scales))
    out.append(f'<p class="sub">Colours: each method on one scale for the whole gallery (1st to 99th percentile '
               f'of its scores over these images), blue low, red high; the green outline is the ground-truth anomaly. '
               f'<a href="{html.escape(strip_rel)}">The first section as one picture</a>.</p>')
    return "\n".join(out)


def class_names(n: int) -> list[str]:
    from rpl.data.cityscapes import CITYSCAPES_CLASSES

    return list(CITYSCAPES_CLASSES) if n == len(CITYSCAPES_CLASSES) else [f"class {i}" for i in range(n)]


def miou_section(results: Sequence[dict[str, Any]]) -> str:
    """Per-class IoU of every mIoU row (one per segmenter and dataset): a table and a bar plot."""
    rows = [r for r in results if r.get("iou_per_class")]
    if not rows:
        return ""
    n = max(len(r["iou_per_class"]) for r in rows)
    names = class_names(n)
    present = [i for i in range(n) if any(i < len(r["iou_per_class"]) and r["iou_per_class"][i] is not None
                                          for r in rows)]

    def iou(r: dict[str, Any], i: int) -> float | None:
        return r["iou_per_class"][i] if i < len(r["iou_per_class"]) else None

    out = ['<h2 id="miou">Closed-set IoU per class</h2><table class="iou"><thead><tr><th>dataset</th>'
           "<th>segmenter</th><th>mIoU</th>" + "".join(f"<th>{html.escape(names[i])}</th>" for i in present) +
           "</tr></thead><tbody>"]
    for r in rows:
        out.append(f'<tr data-dataset="{html.escape(r["dataset"])}" data-method="{html.escape(r["method"])}">'
                   f'<td>{html.escape(r["dataset"])}</td><td>{html.escape(r["method"])}</td>'
                   f'<td class="num" data-key="miou" data-value="{r.get("miou")!r}">{_pct(r.get("miou"))}</td>' +
                   "".join(f'<td class="num" data-key="iou_{i}">{_pct(iou(r, i))}</td>' for i in present) + "</tr>")
    out.append("</tbody></table>")
    series = [(f'{r["dataset"]} / {r["method"]}  mIoU {_pct(r.get("miou"))}', [iou(r, i) for i in present])
              for r in rows]
    out.append(bar_plot("IoU per class (%)", [names[i] for i in present], series,
                        width=max(560, 46 + 10 + len(present) * (14 * len(rows) + 24))))
    return "\n".join(out)


def render(document: dict[str, Any], curves: dict[str, dict[str, dict[str, Any]]],
           galleries: dict[str, list[Gallery]], folder: Path, when: str) -> str:
    results = document["results"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>rpl-eval report</title>", f"<style>{CSS}</style></head><body><main>",
             "<h1>rpl-eval report</h1>",
             f'<p class="sub">{html.escape(when)} · pixel mode {html.escape(str(document.get("pixel_mode")))}, '
             f'FPR@95 rule {html.escape(str(document.get("fpr_rule")))} · metrics in %, best per dataset in bold '
             "(lowest for FPR95)</p>",
             "<h2 id=\"results\">Results</h2>", results_table(results)]
    if document.get("notes"):
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in document["notes"]) + "</ul>")
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    for d in datasets:
        rows = [r for r in results if r["dataset"] == d and not _is_miou_row(r)]
        section = curve_plots(d, rows, curves.get(d, {}))
        from rpl.visualize import file_stem

        for j, gallery in enumerate(galleries.get(d, [])):
            section += gallery_html(gallery, folder, f"img/{file_stem(d)}-{j}", len(galleries[d]) > 1)
        if section:
            parts.append(f'<h2 id="{html.escape(d)}">{html.escape(d)}</h2>{section}')
    parts.append(miou_section(results))
    parts += ["<h2 id=\"settings\">Settings</h2>", settings_table(document, when),
              "<h3>Datasets</h3>", datasets_table(document.get("datasets", {})), "</main></body></html>"]
    return "\n".join(p for p in parts if p) + "\n"


def write_report(folder: str | os.PathLike, document: dict[str, Any], curves: dict[str, dict[str, dict[str, Any]]],
                 galleries: dict[str, list[Gallery]]) -> Path:
    """Write ``folder/index.html`` (last, atomically), its images under ``folder/img`` and ``results.json``.

    ``document``: rpl-eval's JSON document (``results`` rows with ``dataset`` / ``method`` / metrics
    as fractions, the settings, ``datasets``, ``notes``); ``curves[dataset][method]``:
    ``PixelMetrics.curve()``; ``galleries[dataset]``: the ``Gallery`` of each model evaluated there.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    page = render(document, curves, galleries, folder, when)
    for name, text in (("results.json", json.dumps(document, indent=2, allow_nan=False) + "\n"),
                       ("index.html", page)):
        tmp = folder / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    return folder / "index.html"
