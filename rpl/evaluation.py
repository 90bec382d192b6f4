"""The evaluation engine behind ``rpl-eval``: one forward per image, every method scored from it.

    model = rpl.load("addon.safetensors", segmenter)          # or a bare segmenter (post-hoc methods)
    report = evaluate(model, ["fs-laf", "road-anomaly"], data_root="/data",
                      options=EvalOptions(methods=("rpl", "energy", "msp")))
    report.results        # [{"dataset", "method", "auroc", "ap", "fpr95", ...}], fractions in [0, 1]

What happens to an image: uint8 RGB -> float / 255 -> optional resize to the network's input size
(bilinear, antialiased) -> optional mean/std normalisation -> **one** forward of the model. The
wrapped model returns the closed-set logits and the perturbed logits of that same forward, so
``rpl`` (its blurred energy ``out.anomaly``) and the post-hoc baselines on the closed-set logits
(``energy``, ``msp``, ``maxlogit``, ``entropy``) all come from it. Only ``mcdropout`` runs more:
``mc_samples`` stochastic passes of a copy of the segmenter whose dropout layers alone are in train
mode (the frozen model itself never leaves eval mode); its score is the mean over the passes of
the per-pass softmax entropy.

Scores are computed at the network's output resolution and resized to the label's resolution
with bilinear interpolation, so metrics are always taken at the dataset's native label resolution.
Post-hoc baselines are not blurred (the convention of the field: RPL and PEBAL blur only their own
energy map); ``smooth_baselines=True`` applies the same Gaussian blur (kernel 7, sigma 1) to them.

Metrics are accumulated where the scores are (``PixelMetrics`` in streaming mode fills its
histogram on the GPU), so no full score map crosses to the host per image; exact, SMIYC and
component metrics need host copies by their nature. Per dataset:

- anomaly sets (labels 0 / 1 / 255): one row per method with pooled AUROC, AP, FPR@95 (and SMIYC
  sIoU / PPV / mean F1 with ``components=True``, size rules of the set's track). A set without any
  anomaly (or any inlier) pixel gets a row of nulls and a note: those metrics are undefined;
- closed-set sets (class labels, e.g. ``cityscapes-val``): one ``closed-set`` row with mIoU of
  ``argmax`` of the closed-set logits (bilinearly resized to the label size first). With a wrapped
  model this is the frozen segmenter's mIoU by construction. A wrapped model also runs every image
  through the bare segmenter: a second row, ``bare segmenter``, gives the mIoU without the add-on,
  and the first row records whether both logits are bit-identical on the first batch.

Images without any valid pixel (label all 255) are counted and reported, not an error.

``EvalOptions(report=True)`` also keeps what ``rpl.report`` draws (``EvalReport.curves`` and
``.galleries``): each method's pooled curve, and per image a few numbers from which the gallery's
images are picked once a dataset is done; only those are then read and scored again.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress, TaskID
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rpl.conventions import IMAGENET_MEAN, IMAGENET_STD, VOID
from rpl.errors import RPLInputError
from rpl.memory import MemoryGuard
from rpl.metrics import ComponentMetrics, MIoU, PixelMetrics
from rpl.methods.mcdropout import DROPOUT_TYPES, dropout_copy  # noqa: F401  (re-exported)
from rpl.progress import make_progress
from rpl.scores import SCORES
from rpl.visualize import overlay
from rpl.wrapping import extract_logits

POST_HOC = tuple(SCORES)
CLOSED_SET = "closed-set"  # the method name of mIoU rows
BARE_SEGMENTER = "bare segmenter"  # the mIoU row of a wrapped model's segmenter without the add-on
PIXEL_MODES = ("exact", "streaming", "smiyc")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
FPR_RULES = ("first", "closest")
IGNORE = VOID

VisualSink = Callable[[str, str, str, np.ndarray], None]  # (dataset, method, sample name, RGB overlay)


# -- preprocessing -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """uint8 RGB -> float / 255 -> optional resize to ``resize`` (H, W) -> optional (x - mean) / std."""

    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD
    resize: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise RPLInputError("preprocessing needs both mean and std, or neither (no normalisation); got "
                                f"mean={self.mean} std={self.std}.")
        if self.mean is not None:
            if len(self.mean) != 3 or len(self.std) != 3:
                raise RPLInputError(f"mean and std need 3 values (r, g, b), got mean={self.mean} std={self.std}.")
            if not all(s > 0 for s in self.std):
                raise RPLInputError(f"std values must be positive, got {self.std}.")
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.resize is not None:
            if len(self.resize) != 2 or not all(int(v) > 0 for v in self.resize):
                raise RPLInputError(f"resize must be two positive sizes (H, W), got {self.resize}.")
            object.__setattr__(self, "resize", (int(self.resize[0]), int(self.resize[1])))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 3)`` uint8 (on the model's device) -> ``(B, 3, H', W')`` float32 network input."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": "RGB uint8 / 255",
            "resize": list(self.resize) if self.resize else None,
            "resize_mode": "bilinear, antialiased" if self.resize else None,
            "normalize": self.mean is not None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "score_resize": "bilinear from the network output to the label size",
            "closed_set_resize": "bilinear logits to the label size, then argmax",
        }


# -- options, datasets, report -----------------------------------------------------------------
@dataclass
class EvalOptions:
    methods: tuple[str, ...] = ("rpl", "energy", "msp", "maxlogit", "entropy")
    pixel_mode: str = "streaming"  # exact | streaming | smiyc (see rpl.metrics.PixelMetrics)
    fpr_rule: str = "first"  # first (official) | closest (RPL/PEBAL code)
    components: bool = False  # SMIYC sIoU / PPV / mean F1
    smooth_baselines: bool = False  # blur post-hoc scores like RPL's energy (not the field's default)
    mc_samples: int = 8  # stochastic passes for mcdropout
    amp: bool = False  # autocast: bf16 (fp16 on GPUs without bf16)
    batch_size: int = 1
    num_workers: int = 0
    limit: int | None = None  # first N images of each dataset
    vis_limit: int = 20  # overlays per dataset (when a visual sink is given)
    seed: int = 0  # RNG seed of the mcdropout passes
    progress: bool = True
    compile: str | None = None  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    compile_backend: str = "inductor"
    report: bool = False  # also collect what rpl.report draws: pooled curves and per-image gallery data
    gallery_images: int = 4  # images per gallery section (with report=True)
    memory_budget: float | None = None  # GB one forward may use (default: free memory; see rpl.memory)

    def check(self) -> None:
        if self.pixel_mode not in PIXEL_MODES:
            raise RPLInputError(f"--pixel-mode {self.pixel_mode!r}: expected one of {', '.join(PIXEL_MODES)}.")
        if self.fpr_rule not in FPR_RULES:
            raise RPLInputError(f"--fpr-rule {self.fpr_rule!r}: expected first (official) or closest (RPL/PEBAL).")
        if self.pixel_mode == "smiyc" and self.fpr_rule != "first":
            raise RPLInputError("--fpr-rule closest cannot be combined with --pixel-mode smiyc: the SMIYC evaluator "
                                "defines FPR@95 by the first threshold reaching TPR >= 0.95.")
        for name, value, low in (("--batch-size", self.batch_size, 1), ("--mc-samples", self.mc_samples, 1),
                                 ("--num-workers", self.num_workers, 0), ("--vis-limit", self.vis_limit, 0),
                                 ("--report-images", self.gallery_images, 0)):
            if int(value) < low:
                raise RPLInputError(f"{name} must be >= {low}, got {value}.")
        if self.limit is not None and int(self.limit) < 1:
            raise RPLInputError(f"--limit must be >= 1, got {self.limit}.")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise RPLInputError(f"--memory-budget must be a positive number of GB, got {self.memory_budget}.")
        if not self.methods:
            from rpl.methods import available

            raise RPLInputError("--methods is empty; expected one or more of " + ", ".join(available()) + ".")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise RPLInputError(f"--compile {self.compile!r}: expected one of {', '.join(COMPILE_MODES)}.")


def check_methods(methods: Iterable[str], model: nn.Module | None = None) -> tuple[str, ...]:
    """Validated, de-duplicated method names in the given order (each must be registered and, when
    ``model`` is given, able to score it)."""
    from rpl.methods import available, get

    out: list[str] = []
    for m in methods:
        if m not in available():
            raise RPLInputError(f"--methods: unknown method {m!r}; known methods: {', '.join(available())}.")
        if model is not None:
            get(m).check_model(model)
        if m not in out:
            out.append(m)
    return tuple(out)


@dataclass
class DatasetEntry:
    """A dataset to evaluate: items ``{"image", "label", "name", "path"}`` as ``rpl.data`` yields them."""

    name: str
    dataset: Dataset
    track: str | None = "anomaly"  # anomaly / obstacle: component size rules; None for closed-set sets
    class_labels: bool = False  # labels are class ids (mIoU) rather than 0 / 1 / 255
    path: str | None = None


def open_datasets(names: Sequence[str], data_root: str | os.PathLike | None) -> list[DatasetEntry]:
    """Registry datasets by name; every layout is checked now, before any model runs."""
    from rpl.data.registry import dataset_info, dataset_path, open_dataset

    entries = []
    for name in names:
        info = dataset_info(name)
        dataset = open_dataset(name, data_root)
        entries.append(DatasetEntry(name, dataset, info.track, info.class_labels,
                                    str(dataset_path(name, data_root))))
    return entries


@dataclass
class EvalReport:
    results: list[dict[str, Any]] = field(default_factory=list)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # undefined metrics, empty images, ...
    # with EvalOptions(report=True): curves[dataset][method] = PixelMetrics.curve(), and each
    # dataset's rpl.report.Gallery (a list: reports of several models are concatenated)
    curves: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    galleries: dict[str, list[Any]] = field(default_factory=dict)

    def extend(self, other: "EvalReport") -> "EvalReport":
        """Append another run's rows, curves and galleries (e.g. another model on the same datasets)."""
        self.results += other.results
        for name, info in other.datasets.items():
            self.datasets.setdefault(name, info)
        self.notes += other.notes
        for name, curves in other.curves.items():
            self.curves.setdefault(name, {}).update(curves)
        for name, galleries in other.galleries.items():
            self.galleries.setdefault(name, []).extend(galleries)
        return self

    def defined(self) -> bool:
        """Whether any row holds a number (a report of only nulls means nothing could be measured)."""
        return any(r.get(k) is not None for r in self.results for k in ("auroc", "miou"))


# -- data loading ------------------------------------------------------------------------------
class _Guarded(Dataset):
    """Bad files become an error marker instead of an exception: DataLoader workers would wrap the
    exception with their own traceback text, and the user's message must stay one paragraph."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.dataset[index]
        except RPLInputError as err:
            return {"error": str(err)}


def _stack(items: list[dict[str, Any]]) -> dict[str, Any]:
    labels = [it["label"] for it in items]
    return {
        "image": torch.from_numpy(np.stack([it["image"] for it in items])),
        "label": None if any(lab is None for lab in labels) else torch.from_numpy(np.stack(labels)),
        "names": [it["name"] for it in items],
        "paths": [it["path"] for it in items],
    }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One stacked group when all images share a size, else one group per image (sizes may differ)."""
    for it in items:
        if "error" in it:
            return {"error": it["error"]}
    if len({it["image"].shape for it in items}) == 1:
        return {"groups": [_stack(items)]}
    return {"groups": [_stack([it]) for it in items]}




# -- the engine --------------------------------------------------------------------------------
def resize_scores(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, h, w)`` scores -> ``(B, H, W)`` float32, bilinear (identity when the size matches)."""
    scores = scores.float()
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, K, h, w)`` logits resized bilinearly to ``size`` (identity when it matches)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def _amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class _Accumulators:
    """What one dataset's evaluation accumulates, on the model's device where the metric allows."""

    pixel: dict[str, PixelMetrics]
    components: dict[str, ComponentMetrics]
    counts: torch.Tensor  # images without valid pixels, valid pixels, anomaly pixels (summed on the device)
    n_images: int = 0
    miou: MIoU | None = None
    bare_miou: MIoU | None = None  # wrapped models: the segmenter alone
    identical: bool | None = None
    vis_left: int = 0
    gallery: Any = None  # rpl.report.GalleryCollector with EvalOptions(report=True)

    @classmethod
    def create(cls, entry: DatasetEntry, methods: Sequence[str], opts: EvalOptions,
               device: torch.device) -> "_Accumulators":
        pixel = {m: PixelMetrics(mode=opts.pixel_mode, fpr_rule=opts.fpr_rule) for m in methods}
        components = {m: ComponentMetrics(track=entry.track or "anomaly", pixel_mode=opts.pixel_mode)
                      for m in methods} if opts.components else {}
        return cls(pixel, components, torch.zeros(3, dtype=torch.int64, device=device))


class Evaluator:
    """Evaluate one model (an ``RPLSegmenter`` or a bare segmenter) on datasets, method by method."""

    def __init__(self, model: nn.Module, options: EvalOptions | None = None, preprocess: Preprocess | None = None,
                 device: str | torch.device | None = None, on_visual: VisualSink | None = None,
                 console: Console | None = None):
        self.options = options or EvalOptions()
        self.options.check()
        self.preprocess = preprocess or Preprocess()
        from rpl.methods import get

        self.wrapped = hasattr(model, "segmenter")  # a method's model around a segmenter (add-on, fine-tuned)
        self.methods = check_methods(self.options.methods, model)
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device).eval()
        # compiled kernels may round differently from eager ones; the identity check below always
        # compares the eager wrapped model with the eager segmenter
        self.forward_model = self.model if self.options.compile is None else torch.compile(
            self.model, mode=self.options.compile, backend=self.options.compile_backend, dynamic=False)
        self.segmenter = model.segmenter if self.wrapped else model
        # one result row per score map: a method may give several (Method.row_scorers)
        self.scorers = {row: fn for m in self.methods
                        for row, fn in get(m).row_scorers(self.model, self.options).items()}
        self.rows = tuple(self.scorers)
        self.on_visual = on_visual
        self.console = console
        self.memory = MemoryGuard(self.model, self.device, self.options.memory_budget, self.wrapped)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=_amp_dtype(self.device), enabled=self.options.amp)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with self._autocast():
            out = self.forward_model(x)
        if self.wrapped:
            return out.logits, out
        return extract_logits(out), None

    def scores(self, x: torch.Tensor, logits: torch.Tensor, out: Any) -> dict[str, torch.Tensor]:
        """Every requested method's ``(B, h, w)`` score map from one forward's outputs (``rpl.methods``)."""
        return {m: scorer(x, logits, out) for m, scorer in self.scorers.items()}

    # one dataset ------------------------------------------------------------------------------
    def evaluate_dataset(self, entry: DatasetEntry, progress: Progress | None = None,
                         task: TaskID | None = None) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
        """Rows of one dataset, its summary (path, counts, speed) and notes (undefined metrics, void images)."""
        opts = self.options
        dataset = entry.dataset
        if opts.limit is not None and opts.limit < len(dataset):
            dataset = Subset(dataset, range(opts.limit))
        loader = DataLoader(_Guarded(dataset), batch_size=opts.batch_size, shuffle=False,
                            num_workers=opts.num_workers, collate_fn=collate,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(opts.seed))  # leaves the global RNG alone
        acc = _Accumulators.create(entry, () if entry.class_labels else self.rows, opts, self.device)
        acc.vis_left = opts.vis_limit if self.on_visual is not None else 0
        if opts.report and opts.gallery_images > 0 and not entry.class_labels:
            from rpl.report import GalleryCollector

            acc.gallery = GalleryCollector(self.rows, opts.gallery_images)
        if "mcdropout" in acc.pixel:
            torch.manual_seed(opts.seed)  # reproducible dropout masks, whatever ran before
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in loader:
                if "error" in batch:
                    raise RPLInputError(f"Dataset {entry.name!r}: {batch['error']}")
                for group in batch["groups"]:
                    self._update(entry, group, acc)
                    if progress is not None and task is not None:
                        progress.advance(task, len(group["names"]))
        seconds = time.perf_counter() - start
        n_images = acc.n_images
        n_empty, n_valid, n_anomaly = (int(v) for v in acc.counts.cpu())
        info = {"path": entry.path, "n_images": n_images, "n_empty_images": n_empty, "track": entry.track,
                "class_labels": entry.class_labels, "seconds": round(seconds, 3),
                "images_per_second": round(n_images / seconds, 3) if seconds > 0 else None}
        notes = []
        if n_empty:
            notes.append(f"Dataset {entry.name!r}: {n_empty} of {n_images} image(s) have no valid pixel (label all "
                         "255); they are counted but add nothing to the metrics.")
        if entry.class_labels:
            rows = [self._miou_row(entry.name, acc.miou, acc.identical, n_images, n_empty, notes)]
            if acc.bare_miou is not None:
                rows.append(self._miou_row(entry.name, acc.bare_miou, None, n_images, n_empty, notes, BARE_SEGMENTER))
        else:
            rows = self._anomaly_rows(entry.name, acc.pixel, acc.components, n_images, n_empty, n_valid, n_anomaly,
                                      notes)
            if opts.report and 0 < n_anomaly < n_valid:
                info["curves"] = {m: metric.curve() for m, metric in acc.pixel.items()}
                if acc.gallery is not None:
                    info["gallery"] = self._gallery(entry.name, dataset, acc.gallery, rows)
        return rows, info, notes

    def _gallery(self, name: str, dataset: Dataset, collector: Any, rows: list[dict[str, Any]]) -> Any:
        """The images the report's gallery shows, read and scored again (only those, see rpl.report)."""
        from rpl.report import Gallery, fp_threshold, make_preview

        thresholds = {r["method"]: fp_threshold(r) for r in rows}
        picked = collector.select(thresholds)
        previews: dict[int, Any] = {}
        if "mcdropout" in self.methods:
            torch.manual_seed(self.options.seed)
        with torch.inference_mode():
            for record in sorted({r.position: r for rs in picked.values() for r in rs}.values(),
                                 key=lambda r: r.position):
                item = dataset[record.position]
                images = torch.from_numpy(item["image"][None]).to(self.device)
                label = item["label"]
                x = self.preprocess(images)
                with self._autocast():  # eager: a compiled forward would recompile for batches of one
                    out = self.model(x)
                logits, out = (out.logits, out) if self.wrapped else (extract_logits(out), None)
                scores = {m: resize_scores(s, label.shape[-2:])[0] for m, s in self.scores(x, logits, out).items()}
                previews[record.position] = make_preview(item["image"], label, scores, record, thresholds)
        return Gallery(name, self.rows, thresholds,
                       {section: [previews[r.position] for r in rs] for section, rs in picked.items()})

    def _update(self, entry: DatasetEntry, group: dict[str, Any], acc: "_Accumulators") -> None:
        """One forward for a group of same-size images, then every metric of the dataset."""
        if group["label"] is None:
            raise RPLInputError(f"Dataset {entry.name!r}: image {group['paths'][0]} has no label; evaluation needs "
                                "a label for every image.")
        images = group["image"].to(self.device, non_blocking=True)
        labels = group["label"].to(self.device, non_blocking=True)
        x = self.preprocess(images)
        self.memory.check(x, entry.name, group["paths"][0])  # a clear error instead of an OOM minutes later
        logits, out = self._forward(x)
        valid = labels != IGNORE
        acc.n_images += labels.shape[0]
        acc.counts += torch.stack([(~valid.flatten(1).any(1)).sum(), valid.sum(), (labels == 1).sum()])
        if entry.class_labels:
            if acc.miou is None:
                acc.miou = MIoU(num_classes=logits.shape[1])
            if self.wrapped:  # the same images through the bare segmenter: mIoU without the add-on
                with self._autocast():
                    bare = extract_logits(self.segmenter(x), getattr(self.model, "logits_option", None))
                    if acc.bare_miou is None:  # first batch: the closed-set half of the (eager) wrapped forward
                        eager = logits if self.forward_model is self.model else self.model(x).logits
                        acc.identical = bool(torch.equal(bare, eager))
                        acc.bare_miou = MIoU(num_classes=bare.shape[1])
                acc.bare_miou.update(resize_logits(bare, labels.shape[-2:]).argmax(1), labels)
            acc.miou.update(resize_logits(logits, labels.shape[-2:]).argmax(1), labels)
            return
        scores = {m: resize_scores(s, labels.shape[-2:]) for m, s in self.scores(x, logits, out).items()}
        for m, s in scores.items():
            acc.pixel[m].update(s, labels)
            if m in acc.components:
                acc.components[m].update(s, labels)
        if acc.vis_left > 0:
            acc.vis_left -= self._visualise(entry.name, group, scores, acc.vis_left)
        if acc.gallery is not None:
            for i, name in enumerate(group["names"]):
                acc.gallery.add(name, {m: s[i] for m, s in scores.items()}, labels[i])

    def _visualise(self, dataset: str, group: dict[str, Any], scores: dict[str, torch.Tensor], budget: int) -> int:
        n = min(budget, len(group["names"]))
        for i in range(n):
            image = group["image"][i].numpy()
            label = group["label"][i].numpy()
            for m, s in scores.items():
                self.on_visual(dataset, m, group["names"][i], overlay(image, s[i].cpu().numpy(), label))
        return n

    @staticmethod
    def _miou_row(name: str, miou: MIoU | None, identical: bool | None, n_images: int, n_empty: int,
                  notes: list[str], method: str = CLOSED_SET) -> dict[str, Any]:
        row: dict[str, Any] = {"dataset": name, "method": method, "auroc": None, "ap": None, "fpr95": None,
                               "miou": None, "pixel_accuracy": None, "identical_to_segmenter": identical,
                               "n_images": n_images, "n_empty_images": n_empty}
        try:
            if miou is None:
                raise RPLInputError("no image was evaluated")
            m = miou.compute()
            row.update(miou=m["miou"], pixel_accuracy=m["pixel_accuracy"], n_pixels=m["n_pixels"],
                       iou_per_class=m["iou_per_class"])
        except RPLInputError as err:
            notes.append(f"Dataset {name!r}: mIoU ({method}) is undefined and reported as null ({err}).")
        if identical is False:
            notes.append(f"Dataset {name!r}: the wrapped model's closed-set logits differ from the bare segmenter's on "
                         "the first batch; the reported mIoU is the wrapped model's.")
        return row

    def _anomaly_rows(self, name: str, pixel: dict[str, PixelMetrics], comps: dict[str, ComponentMetrics],
                      n_images: int, n_empty: int, n_valid: int, n_anomaly: int, notes: list[str]) -> list[dict]:
        defined = 0 < n_anomaly < n_valid
        if not defined:
            missing = "anomaly pixel (label 1)" if n_anomaly == 0 else "inlier pixel (label 0)"
            notes.append(f"Dataset {name!r} has no {missing} among its {n_valid} valid pixels in {n_images} image(s): "
                         "AUROC, AP and FPR95 rank anomaly against inlier pixels, so they are undefined and reported "
                         "as null. Check that the labels use 0 inlier / 1 anomaly / 255 void.")
        rows, component_errors = [], {}
        for m, metric in pixel.items():
            row: dict[str, Any] = {"dataset": name, "method": m, "auroc": None, "ap": None, "fpr95": None}
            if defined:
                r = metric.compute()
                row.update(auroc=r["auroc"], ap=r["ap"], fpr95=r["fpr95"], fpr95_threshold=r["fpr95_threshold"],
                           best_f1=r["best_f1"], best_f1_threshold=r["best_f1_threshold"])
            row.update(n_images=n_images, n_empty_images=n_empty, n_pixels=n_valid, n_anomaly=n_anomaly)
            if m in comps:
                row.update(siou=None, ppv=None, mean_f1=None)
                if defined:
                    try:
                        c = comps[m].compute()
                        row.update(siou=c["siou"], ppv=c["ppv"], mean_f1=c["mean_f1"],
                                   component_threshold=c["threshold"])
                    except RPLInputError as err:
                        component_errors[m] = str(err)
            rows.append(row)
        for message in dict.fromkeys(component_errors.values()):
            which = ", ".join(m for m, e in component_errors.items() if e == message)
            notes.append(f"Dataset {name!r}: component metrics of {which} are null ({message})")
        return rows

    # all datasets -----------------------------------------------------------------------------
    def run(self, entries: Sequence[DatasetEntry]) -> EvalReport:
        report = EvalReport()
        with make_progress(self.console, self.options.progress) as progress:
            for entry in entries:
                total = len(entry.dataset) if self.options.limit is None else min(self.options.limit,
                                                                                   len(entry.dataset))
                task = progress.add_task(entry.name, total=total)
                rows, info, notes = self.evaluate_dataset(entry, progress, task)
                if "curves" in info:
                    report.curves[entry.name] = info.pop("curves")
                if "gallery" in info:
                    report.galleries[entry.name] = [info.pop("gallery")]
                report.results += rows
                report.datasets[entry.name] = info
                report.notes += notes
        return report


def evaluate(model: nn.Module, datasets: Sequence[str | DatasetEntry], data_root: str | os.PathLike | None = None,
             *, options: EvalOptions | None = None, preprocess: Preprocess | None = None,
             device: str | torch.device | None = None, on_visual: VisualSink | None = None,
             console: Console | None = None) -> EvalReport:
    """Evaluate ``model`` on registry dataset names (under ``data_root``) or ready ``DatasetEntry``s."""
    names = [d for d in datasets if isinstance(d, str)]
    opened = iter(open_datasets(names, data_root)) if names else iter(())
    entries = [next(opened) if isinstance(d, str) else d for d in datasets]
    evaluator = Evaluator(model, options, preprocess, device, on_visual, console)
    return evaluator.run(entries)


def sanitize(value: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None (JSON has no NaN), numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value
