"""``rpl-eval``: pixel-level anomaly metrics (AUROC, AP, FPR@95) of RPL and post-hoc baselines.

Examples:
  rpl-eval                                     # every shipped method + post-hoc scores on the embedded sets
  rpl-eval --checkpoint weights/rpl_synthstreets.safetensors --checkpoint work_dirs/pebal/best.safetensors
  rpl-eval --checkpoint work_dirs/rpl/best.safetensors --datasets fs-laf,road-anomaly --data-root /data
  rpl-eval --model torchvision.models.segmentation:deeplabv3_resnet101 --weights seg.pth \\
           --model-kwargs '{"weights": null, "weights_backbone": null, "num_classes": 19}' \\
           --methods energy,msp,maxlogit,entropy,mcdropout --datasets fs-laf --data-root /data

The segmenter comes from the checkpoint's metadata (written by rpl-train), or from --model/--weights
(weights read with torch.load(weights_only=True) or safetensors). With several checkpoints, each
model is run once per image and scored with its own method; the post-hoc scores come from the
first checkpoint's segmenter; one mIoU row per distinct segmenter. A checkpoint may only name a listed
factory (rpl.models.factories) and weights next to it; --model (yours), or --trust-checkpoint after
reading the call the refusal prints, builds any other. Method ``rpl`` needs a checkpoint;
``energy``, ``msp``, ``maxlogit`` and ``entropy`` score the closed-set logits of the same forward
pass (not blurred unless --smooth-baselines: only RPL blurs its own energy, as in the papers);
``mcdropout`` averages the softmax entropy of --mc-samples passes with dropout on.
Metrics are fractions in [0, 1] in JSON/CSV, percentages in the table and Markdown.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import rpl
from rpl.cli.common import EXIT_BAD_INPUT, add_debug_flag, make_parser, run_command
from rpl.cli.outputs import check_file, check_folder, write_all, write_atomic  # noqa: F401 (write_atomic: API)
from rpl.data.registry import dataset_names
from rpl.errors import RPLInputError

# torch, the models and the evaluation engine are imported inside the functions that need them, so
# that --help and option errors answer at once (a test checks that --help imports no torch).

WEIGHTS_DIR = Path(rpl.__file__).resolve().parent.parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "rpl_synthstreets.safetensors"
# rpl-eval with no arguments compares DEFAULT_CHECKPOINT (required) and every other rpl checkpoint
# shipped beside it (shipped_checkpoints), so shipping a method's weights needs no edit here.
DEFAULT_DATA_ROOT = Path("data/synthstreets")
DEFAULT_DATASETS = ("synthstreets-anomaly", "synthstreets-rural", "synthstreets-obstacle", "cityscapes-val")
WRAPPED_METHODS = ("rpl", "energy", "msp", "maxlogit", "entropy")
BARE_METHODS = ("energy", "msp", "maxlogit", "entropy")
WANDB_OVERLAYS = 2  # per dataset and method, when logging to wandb without --save-vis
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # rpl.evaluation.COMPILE_MODES (a test compares)
METRIC_KEYS = ("auroc", "ap", "fpr95")
COMPONENT_KEYS = ("siou", "ppv", "mean_f1")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("rpl-eval", __doc__)
    p.add_argument("--checkpoint", action="append", metavar="FILE_OR_DIR",
                   help="a checkpoint of any method (.safetensors from rpl-train), or a folder of them; repeat it "
                        "to compare methods in one table (default: every shipped checkpoint in weights/ when "
                        "--model is not given)")
    p.add_argument("--datasets", metavar="A,B", help="comma-separated dataset names, among: " + ", ".join(dataset_names()) +
                                      " (default: the SynthStreets test sets and cityscapes-val under "
                                      "data/synthstreets)")
    p.add_argument("--data-root", metavar="DIR", help="folder holding the datasets (default: data/synthstreets "
                                                      "under the current directory for the embedded sets, generated "
                                                      "there when missing)")
    p.add_argument("--methods", metavar="A,B", help="comma-separated: rpl, energy, msp, maxlogit, entropy, mcdropout (default: "
                                     "rpl,energy,msp,maxlogit,entropy with a checkpoint, else the four baselines)")
    out = p.add_argument_group("outputs")
    out.add_argument("--json", metavar="FILE", help="write the results as JSON (metrics as fractions)")
    out.add_argument("--csv", metavar="FILE", help="write the results table as CSV (fractions)")
    out.add_argument("--markdown", metavar="FILE", help="write the results table as Markdown (percentages)")
    out.add_argument("--save-vis", metavar="DIR", help="write heat-map overlays DIR/<dataset>/<method>/<image>.png, "
                                                       "one per method and image (image/2 + score colours/2 inside "
                                                       "the ROI, ground truth outlined)")
    out.add_argument("--vis-limit", metavar="N", type=int, default=20, help="overlays per dataset")
    out.add_argument("--report", metavar="DIR", help="write an HTML report DIR/index.html (results, settings, ROC and "
                                                     "precision-recall curves, galleries, IoU per class); open it "
                                                     "from disk, it needs no server or network")
    out.add_argument("--report-images", metavar="N", type=int, default=4,
                     help="images per gallery section of the report (0: no gallery)")
    out.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled",
                     help="log the table and a few overlays to Weights & Biases")
    out.add_argument("--wandb-project", metavar="NAME", default="rpl", help="Weights & Biases project")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    model = p.add_argument_group("segmenter (instead of, or on top of, the checkpoint's)")
    model.add_argument("--model", metavar="PKG.MOD:FACTORY", help="segmenter factory package.module:factory")
    model.add_argument("--weights", metavar="FILE", help="segmenter weights (.safetensors or .pth state dict)")
    model.add_argument("--model-kwargs", metavar="JSON", help="JSON object of keyword arguments for the factory")
    model.add_argument("--trust-checkpoint", action="store_true",
                       help="build the checkpoint's recorded segmenter even when its factory is not a listed one "
                            "(read it first: the refusal prints the call)")
    model.add_argument("--head", metavar="NAME", help="frozen head block the add-on perturbs (overrides the checkpoint's)")
    model.add_argument("--feature", metavar="NAME", help="module the add-on reads (overrides the checkpoint's)")
    pre = p.add_argument_group("preprocessing (recorded in the JSON)")
    pre.add_argument("--mean", metavar="R,G,B", help="r,g,b mean after /255 (default: the checkpoint's, else ImageNet)")
    pre.add_argument("--std", metavar="R,G,B", help="r,g,b std after /255 (default: the checkpoint's, else ImageNet)")
    pre.add_argument("--no-normalize", action="store_true", help="feed images in [0, 1] without mean/std")
    pre.add_argument("--resize", metavar="HxW", help="resize inputs to HxW; scores go back to the label size")
    met = p.add_argument_group("metrics")
    met.add_argument("--pixel-mode", choices=("exact", "streaming", "smiyc"), default="streaming",
                     help="streaming (bounded memory), exact (equals scikit-learn), smiyc (SMIYC evaluator)")
    met.add_argument("--fpr-rule", choices=("first", "closest"), default="first",
                     help="FPR@95 at the first threshold with TPR >= 0.95 (official) or the closest (RPL/PEBAL code)")
    met.add_argument("--components", action="store_true", help="also SMIYC sIoU, PPV and mean F1")
    met.add_argument("--smooth-baselines", action="store_true",
                     help="blur the post-hoc scores like RPL's energy (kernel 7, sigma 1)")
    met.add_argument("--mc-samples", metavar="N", type=int, default=8, help="stochastic passes of mcdropout")
    met.add_argument("--seed", metavar="N", type=int, default=0, help="seed of the mcdropout passes")
    run = p.add_argument_group("running")
    run.add_argument("--device", metavar="DEVICE", help="cpu or cuda (default: cuda when available)")
    run.add_argument("--amp", action="store_true", help="mixed precision forward (bf16, fp16 on older GPUs)")
    run.add_argument("--compile", choices=COMPILE_MODES,
                     help="torch.compile the forward with this mode (reduce-overhead uses CUDA graphs on GPU); "
                          "the first images pay the compile time")
    run.add_argument("--batch-size", metavar="N", type=int, default=1, help="images per forward pass")
    run.add_argument("--memory-budget", type=float, metavar="GB",
                     help="memory one forward may use; an image whose estimated peak exceeds it is refused before "
                          "it runs, with --resize advice (default: the free device memory)")
    run.add_argument("--num-workers", metavar="N", type=int, default=min(4, os.cpu_count() or 1),
                     help="data-loading processes (default: the CPU count, at most 4)")
    run.add_argument("--limit", metavar="N", type=int,
                     help="evaluate only the first N images of each dataset (said in the table's caption)")
    add_debug_flag(p)
    return p


# -- option parsing ----------------------------------------------------------------------------
def _names(value: str, option: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise RPLInputError(f"{option} {value!r} names nothing; expected a comma-separated list.")
    return names


def _triple(value: str, option: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise RPLInputError(f"{option} {value!r} is not three comma-separated numbers r,g,b (for example "
                            "0.485,0.456,0.406).")
    return parts  # type: ignore[return-value]


def _size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise RPLInputError(f"--resize {value!r} is not HxW (for example 512x1024).") from None
    if h <= 0 or w <= 0:
        raise RPLInputError(f"--resize {value!r}: both sizes must be positive.")
    return h, w


def _device(value: str | None):
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value not in ("cpu", "cuda") and not value.startswith("cuda:"):
        raise RPLInputError(f"--device {value!r}: expected cpu or cuda (or cuda:N).")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise RPLInputError(f"--device {value}: CUDA is not available on this machine; use --device cpu.")
    return torch.device(value)


# -- the model ---------------------------------------------------------------------------------
@dataclass
class Source:
    """Where the evaluated model comes from."""

    checkpoint: Path | None
    spec: SegmenterSpec
    base_dir: Path | None  # relative weight paths in a checkpoint's spec are relative to its folder
    method: str | None = None  # the checkpoint's method (rpl.methods)
    base_method: str | None = None  # the method whose tuned segmenter the checkpoint's method sits on
    recorded: bool = False  # spec read from the checkpoint (checked), not written by the user
    trust_checkpoint: bool = False
    weights: str | None = None  # the user's --weights, replacing the recorded file


def resolve_source(args: argparse.Namespace) -> Source:
    from rpl.models.loading import SegmenterSpec

    """The checkpoint and segmenter spec the options describe; cheap, so it runs before any data is read.

    The segmenter is the checkpoint's recorded one unless ``--model`` names another; ``--weights``
    alone replaces the recorded weights file (e.g. after moving it).
    """
    from rpl.checkpoint import read_metadata

    if args.model is None and args.model_kwargs is not None:
        raise RPLInputError("--model-kwargs are the arguments of --model's factory; pass --model "
                            "package.module:factory as well (or leave both out to use the checkpoint's segmenter).")
    given = getattr(args, "checkpoint_path", None)
    if given is None and args.checkpoint:  # called directly with parsed options: one --checkpoint FILE
        given = args.checkpoint[-1] if isinstance(args.checkpoint, list) else args.checkpoint
    checkpoint = Path(given) if given else None
    if checkpoint is None and args.model is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not checkpoint.is_file():
            raise RPLInputError(
                f"no --checkpoint or --model given, and the shipped add-on {checkpoint} does not exist. Create it by "
                "training the embedded default (rpl-train, then copy WORK_DIR/best.safetensors to that path), or "
                "pass --checkpoint FILE (an add-on from rpl-train) or --model package.module:factory --weights FILE "
                "to evaluate post-hoc baselines of your own segmenter.")
    if checkpoint is None and (args.head or args.feature):
        raise RPLInputError("--head/--feature say where an RPL add-on attaches to the segmenter; they need "
                            "--checkpoint FILE (without a checkpoint only post-hoc methods run, which need no names).")
    meta = read_metadata(checkpoint) if checkpoint is not None else None
    method = meta["method"] if meta else None
    base_method = (meta or {}).get("extra", {}).get("base_method")
    if method is not None and method != "rpl" and (args.head or args.feature):
        raise RPLInputError(f"--head/--feature say where an RPL add-on attaches; checkpoint {checkpoint} holds method "
                            f"{method!r}, which has no add-on.")
    recorded = (meta or {}).get("extra", {}).get("segmenter")
    if args.model is not None:
        try:
            kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        except json.JSONDecodeError as err:
            raise RPLInputError(f"--model-kwargs {args.model_kwargs!r} is not valid JSON ({err}); expected an object "
                                "such as '{\"num_classes\": 19}'.") from None
        if not isinstance(kwargs, dict):
            raise RPLInputError(f"--model-kwargs must be a JSON object, got {type(kwargs).__name__}.")
        spec = SegmenterSpec(model=args.model, kwargs=kwargs, weights=args.weights)
        if recorded:  # the add-on was trained with this normalisation
            spec.mean, spec.std = recorded.get("mean", spec.mean), recorded.get("std", spec.std)
        return Source(checkpoint, spec, None, method, base_method)
    if not recorded:
        raise RPLInputError(f"checkpoint {checkpoint} records no segmenter (its metadata has no 'segmenter' entry); "
                            "pass --model package.module:factory and --weights FILE for the frozen segmenter it was "
                            "trained on.")
    from rpl.models.loading import resolve_factory, resolve_weights

    spec = SegmenterSpec.from_dict(recorded, where="extra.segmenter", source=checkpoint)
    resolve_factory(spec, checkpoint, args.trust_checkpoint)  # refused here, before any data is read
    if args.weights is None:
        resolve_weights(spec, recorded_in=checkpoint)
    else:
        spec.weights = args.weights
    return Source(checkpoint, spec, checkpoint.parent, method, base_method, recorded=True,
                  trust_checkpoint=args.trust_checkpoint,
                  weights=args.weights)


def build_model(source: Source, args: argparse.Namespace, device) -> Any:
    """The segmenter of ``source`` on ``device``, with the checkpoint's method on it when there is one."""
    from rpl.methods import get
    from rpl.models.loading import build_segmenter

    if source.recorded:
        segmenter = build_segmenter(source.spec, recorded_in=source.checkpoint,
                                    trust_checkpoint=source.trust_checkpoint, weights=source.weights)
    else:
        segmenter = build_segmenter(source.spec, base_dir=source.base_dir)
    segmenter = segmenter.to(device)
    if source.checkpoint is None:
        return segmenter
    overrides = {k: v for k, v in (("head", args.head), ("feature", args.feature)) if v}
    try:
        return get(source.method).load(source.checkpoint, segmenter, **overrides).to(device)
    except RPLInputError as err:
        if str(source.checkpoint) in str(err):
            raise
        raise RPLInputError(f"checkpoint {source.checkpoint} does not fit the segmenter "
                            f"{source.spec.model}: {err}") from None


def resolve_preprocess(source: Source, args: argparse.Namespace) -> Preprocess:
    from rpl.evaluation import Preprocess

    if args.no_normalize and (args.mean or args.std):
        raise RPLInputError("--no-normalize cannot be combined with --mean/--std.")
    if bool(args.mean) != bool(args.std):
        raise RPLInputError("--mean and --std go together: give both (or neither to use the checkpoint's, "
                            "else ImageNet's).")
    if args.no_normalize:
        mean = std = None
    elif args.mean:
        mean, std = _triple(args.mean, "--mean"), _triple(args.std, "--std")
    else:
        mean, std = source.spec.mean, source.spec.std
    return Preprocess(mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
                      resize=_size(args.resize) if args.resize else None)


def check_before_loading(methods: Sequence[str], source: Source) -> None:
    """Refuse, before any model or data loads, a method the source cannot give (e.g. rpl without an add-on)."""
    from rpl.methods import get

    for m in methods:
        method = get(m)
        if method.kind == "post-hoc":
            continue
        if source.checkpoint is None:
            method.check_model(None)
        elif m != source.method:
            raise RPLInputError(f"--methods {m} needs a {m!r} checkpoint, but {source.checkpoint} holds method "
                                f"{source.method!r}; pass a {m} checkpoint or leave {m} out of --methods.")


# -- datasets ----------------------------------------------------------------------------------
def resolve_datasets(args: argparse.Namespace) -> tuple[list[str], Path | None]:
    from rpl.data.registry import dataset_info

    names = _names(args.datasets, "--datasets") if args.datasets else list(DEFAULT_DATASETS)
    for name in names:
        try:
            dataset_info(name)
        except RPLInputError as err:
            raise RPLInputError(f"--datasets: {err}") from None
    names = list(dict.fromkeys(names))
    if args.data_root is not None:
        return names, Path(args.data_root)
    if all(n in DEFAULT_DATASETS for n in names):
        ensure_synthstreets(DEFAULT_DATA_ROOT)
        return names, DEFAULT_DATA_ROOT
    return names, None  # the registry's error names --data-root


def ensure_synthstreets(root: Path) -> None:
    """Generate the embedded SynthStreets world into ``root`` unless a finished generation is there."""
    try:
        from rpl.data.synthstreets import ensure_generated
    except ImportError as err:
        raise RPLInputError(f"the SynthStreets generator cannot be imported ({err}), so the embedded test sets "
                            f"under {root} cannot be checked or created; pass --data-root DIR with the "
                            "datasets.") from None
    ensure_generated(root, seed=0, hint=" (--data-root DIR reads the data sets from elsewhere)")


# -- reporting ---------------------------------------------------------------------------------
def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}"


def table_columns(results: list[dict[str, Any]], components: bool) -> list[tuple[str, str]]:
    cols = [("AUROC", "auroc"), ("AP", "ap"), ("FPR95", "fpr95")]
    if components:
        cols += [("sIoU", "siou"), ("PPV", "ppv"), ("mean F1", "mean_f1")]
    if any("miou" in r for r in results):
        cols.append(("mIoU", "miou"))
    return cols


def _cell(row: dict[str, Any], key: str) -> str:
    from rpl.evaluation import BARE_SEGMENTER, CLOSED_SET

    if key not in row or ("miou" in row and row.get("miou") is not None and key != "miou") or (
            row.get("method") in (CLOSED_SET, BARE_SEGMENTER) and key != "miou"):
        return "-"
    return _pct(row[key])


def print_table(results: list[dict[str, Any]], components: bool, caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rpl-eval (metrics in %)", caption=caption)
    table.add_column("dataset")
    table.add_column("method")
    cols = table_columns(results, components)
    for title, _ in cols:
        table.add_column(title, justify="right")
    for row in results:
        table.add_row(row["dataset"], row["method"], *(_cell(row, key) for _, key in cols))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


def to_markdown(results: list[dict[str, Any]], components: bool, caption: str) -> str:
    cols = table_columns(results, components)
    lines = ["| dataset | method | " + " | ".join(t for t, _ in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for row in results:
        lines.append(f"| {row['dataset']} | {row['method']} | " + " | ".join(_cell(row, k) for _, k in cols) + " |")
    return "\n".join(lines) + f"\n\nMetrics in %. {caption}\n"


def to_csv(results: list[dict[str, Any]]) -> str:
    fields = ["dataset", "method", *METRIC_KEYS, *COMPONENT_KEYS, "miou", "n_images", "n_empty_images",
              "n_pixels", "n_anomaly"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in results:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
    return buf.getvalue()


class VisualSink:
    """Writes overlays as PNG (with --save-vis) and keeps a few for wandb."""

    def __init__(self, folder: Path | None, keep: int):
        self.folder, self.keep = folder, keep
        self.kept: list[tuple[str, str, str, Any]] = []
        self.written = 0
        self.error: str | None = None  # the first failed write; overlays stop there, the evaluation goes on

    def __call__(self, dataset: str, method: str, name: str, rgb) -> None:
        from rpl.data.io import write_image
        from rpl.visualize import file_stem

        if self.folder is not None and self.error is None:
            path = self.folder / dataset / method / f"{file_stem(name)}.png"
            try:
                write_image(path, rgb)
                self.written += 1
            except (OSError, RPLInputError) as err:
                self.error = f"{path}: {getattr(err, 'strerror', None) or err}"
        if sum(1 for d, m, _, _ in self.kept if (d, m) == (dataset, method)) < self.keep:
            self.kept.append((dataset, method, name, rgb))


def init_wandb(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    if args.wandb == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        raise RPLInputError(f"--wandb {args.wandb} needs the wandb package (pip install wandb); use --wandb disabled "
                            "(the default) to evaluate without it.") from None
    return wandb.init(project=args.wandb_project, mode=args.wandb, job_type="eval", config=config)


def log_wandb(run: Any, results: list[dict[str, Any]], visuals: list[tuple[str, str, str, Any]]) -> None:
    import wandb

    columns = ["dataset", "method", *METRIC_KEYS, *COMPONENT_KEYS, "miou"]
    payload: dict[str, Any] = {"results": wandb.Table(columns=columns,
                                                      data=[[r.get(c) for c in columns] for r in results])}
    for r in results:
        for key in columns[2:]:
            if r.get(key) is not None:
                payload[f"{r['dataset']}/{r['method']}/{key}"] = r[key]
    if visuals:
        payload["overlays"] = [wandb.Image(rgb, caption=f"{d} / {m} / {n}") for d, m, n, rgb in visuals]
    run.log(payload)
    run.finish()


# -- the command -------------------------------------------------------------------------------
def checkpoint_paths(args: argparse.Namespace) -> list[Path]:
    """The checkpoints named by --checkpoint (folders expanded to their checkpoints), or the shipped ones."""
    from rpl.checkpoint import is_checkpoint

    if not args.checkpoint:
        if args.model is not None:
            return []
        if not DEFAULT_CHECKPOINT.is_file():
            return []  # resolve_source says what is missing
        return shipped_checkpoints(DEFAULT_CHECKPOINT)
    paths: list[Path] = []
    for item in args.checkpoint:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.safetensors") if is_checkpoint(p))
            if not found:
                raise RPLInputError(f"--checkpoint {path} is a folder without any rpl checkpoint (.safetensors with "
                                    "rpl metadata).")
            paths += found
        else:
            paths.append(path)
    return list(dict.fromkeys(paths))


def shipped_checkpoints(first: Path) -> list[Path]:
    """``first``, then every other rpl checkpoint in its folder in name order, those built on another
    method's tuned segmenter (``extra.base_method``, e.g. pebal+rpl) last; plain segmenter weights, which
    carry no rpl checkpoint metadata, are not among them."""
    from rpl.checkpoint import is_checkpoint, read_metadata

    others = [p for p in first.parent.glob("*.safetensors") if p.name != first.name and is_checkpoint(p)]
    return [first, *sorted(others, key=lambda p: (bool(read_metadata(p)["extra"].get("base_method")), p.name))]


def _run(args: argparse.Namespace) -> int:
    from rpl.evaluation import EvalOptions, check_methods, open_datasets, sanitize

    device = _device(args.device)
    if args.model is None and args.model_kwargs is not None:
        raise RPLInputError("--model-kwargs are the arguments of --model's factory; pass --model "
                            "package.module:factory as well (or leave both out to use the checkpoint's segmenter).")
    paths = checkpoint_paths(args)
    if len(paths) > 1:
        return _run_many(args, paths, device)
    args.checkpoint_path = paths[0] if paths else None
    source = resolve_source(args)
    wrapped = source.checkpoint is not None
    methods = check_methods(_names(args.methods, "--methods") if args.methods else
                            ((source.method, *BARE_METHODS) if wrapped else BARE_METHODS))
    check_before_loading(methods, source)
    options = EvalOptions(methods=methods, pixel_mode=args.pixel_mode, fpr_rule=args.fpr_rule,
                          components=args.components, smooth_baselines=args.smooth_baselines,
                          mc_samples=args.mc_samples, amp=args.amp, batch_size=args.batch_size,
                          num_workers=args.num_workers, limit=args.limit, seed=args.seed, progress=not args.quiet,
                          vis_limit=args.vis_limit if args.save_vis else WANDB_OVERLAYS, compile=args.compile,
                          report=args.report is not None, gallery_images=args.report_images,
                          memory_budget=args.memory_budget)
    options.check()
    preprocess = resolve_preprocess(source, args)
    # every output proven writable before any data is read or model built
    outputs = {k: check_file(getattr(args, k, None), f"--{k}") for k in ("json", "csv", "markdown")}
    vis_dir = check_folder(args.save_vis, "--save-vis")
    args.report = check_folder(args.report, "--report")  # proven writable, as the other outputs

    names, data_root = resolve_datasets(args)
    entries = open_datasets(names, data_root)  # layouts checked before the model loads
    model = build_model(source, args, device)
    document: dict[str, Any] = {
        "checkpoint": str(source.checkpoint) if source.checkpoint else None,
        "segmenter": source.spec.to_dict(),
        "segmenter_class": type(getattr(model, "segmenter", model)).__name__,
        "methods": list(methods),
        "preprocess": preprocess.to_dict(),
        "pixel_mode": args.pixel_mode,
        "fpr_rule": args.fpr_rule,
        "components": args.components,
        "smooth_baselines": args.smooth_baselines,
        "mc_samples": args.mc_samples if "mcdropout" in methods else None,
        "data_root": str(data_root) if data_root else None,
        "limit": args.limit,
        "device": str(device),
        "amp": args.amp,
        "rpl_version": rpl.__version__,
    }
    run = init_wandb(args, sanitize(document))
    try:
        return _evaluate_and_report(args, model, options, preprocess, entries, document, outputs, vis_dir, run,
                                    (source.method, source_label(source)))
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise


def source_label(source: Source) -> str:
    """A checkpoint's row name: its method, prefixed by the method its base segmenter was tuned with."""
    return f"{source.base_method}+{source.method}" if source.base_method else str(source.method)


def row_label(row: str, method: str | None, label: str) -> str:
    """A result row's name in a several-checkpoint table: the checkpoint's own rows (``method`` and its
    variants ``method+...``, ``rpl.methods.base.Method.row_scorers``) under the checkpoint's ``label``."""
    if method and (row == method or row.startswith(method + "+")):
        return label + row[len(method):]
    return row


def segmenter_name(source: Source) -> str:
    """The file holding the segmenter weights a model's closed-set logits come from."""
    from rpl.methods import get

    if source.method and get(source.method).kind == "fine-tune":
        return source.checkpoint.stem
    return Path(source.spec.weights).stem if source.spec.weights else source.spec.model


def _run_many(args: argparse.Namespace, paths: list[Path], device) -> int:
    """Several checkpoints in one table: each model once per image with its own method, post-hoc scores
    from the first checkpoint's segmenter, one mIoU row per distinct segmenter."""
    import copy

    from rpl.checkpoint import fingerprint
    from rpl.evaluation import (BARE_SEGMENTER, CLOSED_SET, EvalOptions, Evaluator, check_methods, open_datasets,
                                sanitize)
    from rpl.methods import get

    for option in ("model", "weights", "model_kwargs", "head", "feature"):
        if getattr(args, option) is not None:
            raise RPLInputError(f"--{option.replace('_', '-')} applies to one checkpoint; with several --checkpoint "
                                "each model is the one its checkpoint records.")
    sources = []
    for path in paths:
        one = copy.copy(args)
        one.checkpoint_path = path
        sources.append(resolve_source(one))
    requested = check_methods(_names(args.methods, "--methods")) if args.methods else None
    post_hoc = tuple(m for m in (requested or BARE_METHODS) if get(m).kind == "post-hoc")
    labels: list[str] = []
    for src in sources:
        label = source_label(src)
        labels.append(label if label not in labels else f"{label} ({src.checkpoint.stem})")
    plan = []  # (source, label, methods)
    for i, (src, label) in enumerate(zip(sources, labels)):
        own = () if requested is not None and src.method not in requested else (src.method,)
        plan.append((src, label, own + (post_hoc if i == 0 else ())))
    if requested is not None:
        unknown = [m for m in requested if get(m).kind != "post-hoc" and m not in {s.method for s in sources}]
        if unknown:
            raise RPLInputError(f"--methods {', '.join(unknown)}: none of the given checkpoints holds that method "
                                f"(they hold {', '.join(sorted({s.method for s in sources}))}).")
    base_options = dict(pixel_mode=args.pixel_mode, fpr_rule=args.fpr_rule, components=args.components,
                        smooth_baselines=args.smooth_baselines, mc_samples=args.mc_samples, amp=args.amp,
                        batch_size=args.batch_size, num_workers=args.num_workers, limit=args.limit, seed=args.seed,
                        progress=not args.quiet, vis_limit=args.vis_limit if args.save_vis else WANDB_OVERLAYS,
                        compile=args.compile, report=args.report is not None,
                        gallery_images=args.report_images, memory_budget=args.memory_budget)
    EvalOptions(methods=post_hoc or ("energy",), **base_options).check()
    if args.wandb != "disabled":
        raise RPLInputError("--wandb logs one checkpoint's evaluation; run rpl-eval once per checkpoint to log each.")
    # every output proven writable before any data is read or model built
    outputs = {k: check_file(getattr(args, k, None), f"--{k}") for k in ("json", "csv", "markdown")}
    vis_dir = check_folder(args.save_vis, "--save-vis")
    report_dir = check_folder(args.report, "--report")
    names, data_root = resolve_datasets(args)
    entries = open_datasets(names, data_root)
    sink = VisualSink(vis_dir, 0) if vis_dir else None

    anomaly_rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    segmenters: dict[str, dict[str, Any]] = {}  # fingerprint -> mIoU rows and who uses them
    reports, notes, datasets_info = [], [], {}
    for index, (src, label, methods) in enumerate(plan):
        model = build_model(src, args, device)
        key = fingerprint(model.segmenter)
        users = segmenters.setdefault(key, {"name": segmenter_name(src), "users": [], "rows": None})
        users["users"].append(label + (" + post-hoc" if index == 0 and post_hoc else ""))
        todo = [e for e in entries if not e.class_labels or users["rows"] is None]
        if not methods:
            todo = [e for e in todo if e.class_labels]
        if not todo:
            continue
        options = EvalOptions(methods=methods or ("energy",), **base_options)
        report = Evaluator(model, options, resolve_preprocess(src, args), device, on_visual=sink).run(todo)
        notes += report.notes
        for name, info in report.datasets.items():
            datasets_info.setdefault(name, {}).update({k: v for k, v in info.items() if k not in ("seconds",
                                                                                             "images_per_second")})
            datasets_info[name].setdefault("seconds", {})[label] = info["seconds"]
        rows = [r for r in report.results if r["method"] != BARE_SEGMENTER]
        for row in rows:
            row["checkpoint"] = str(src.checkpoint)
            if row["method"] == CLOSED_SET:
                row["segmenter"] = users["name"]
                users["rows"] = users["rows"] or []
                users["rows"].append(row)
            else:
                row["method"] = row_label(row["method"], src.method, label)
                anomaly_rows.setdefault((row["dataset"], index), []).append(row)
        for curves in report.curves.values():  # the report's curves under the table's row names
            for name in list(curves):
                if row_label(name, src.method, label) != name:
                    curves[row_label(name, src.method, label)] = curves.pop(name)
        reports.append(report)
        del model
    results: list[dict[str, Any]] = []
    for entry in entries:
        if entry.class_labels:
            for seg in segmenters.values():
                for row in seg["rows"] or []:
                    if row["dataset"] == entry.name:
                        results.append({**row, "method": f"closed-set: {seg['name']} ({', '.join(seg['users'])})"})
        else:
            for index in range(len(plan)):
                results += anomaly_rows.get((entry.name, index), [])
    if not any(r.get(k) is not None for r in results for k in ("auroc", "miou")):
        raise RPLInputError("no dataset gave a defined metric, so nothing was written. " + " ".join(notes))
    for note in dict.fromkeys(notes):
        print(f"rpl-eval: warning: {note}", file=sys.stderr)
    document = sanitize({
        "results": results,
        "checkpoints": [{"path": str(src.checkpoint), "method": src.method, "label": label,
                         "segmenter": src.spec.to_dict(), "methods": list(methods)} for src, label, methods in plan],
        "segmenters": [{"name": s["name"], "fingerprint": k, "used_by": s["users"]} for k, s in segmenters.items()],
        "pixel_mode": args.pixel_mode, "fpr_rule": args.fpr_rule, "components": args.components,
        "smooth_baselines": args.smooth_baselines, "data_root": str(data_root) if data_root else None,
        "limit": args.limit, "device": str(device), "amp": args.amp, "rpl_version": rpl.__version__,
        "datasets": datasets_info, "notes": list(dict.fromkeys(notes)),
    })
    curves: dict[str, dict[str, Any]] = {}
    galleries: dict[str, list] = {}
    for one in reports:
        for name, per_method in one.curves.items():
            curves.setdefault(name, {}).update(per_method)
        for name, kept in one.galleries.items():
            galleries.setdefault(name, []).extend(kept)
    return write_outputs(args, document, outputs, vis_dir, sink, report_dir, curves, galleries)


def _evaluate_and_report(args: argparse.Namespace, model: Any, options: EvalOptions, preprocess: Preprocess,
                         entries: list, document: dict[str, Any], outputs: dict[str, Path | None],
                         vis_dir: Path | None, run: Any, label: tuple[str | None, str] = (None, "")) -> int:
    """One checkpoint's table and files; ``label`` (its method, its row name) names the method's rows as
    the several-checkpoint table does (``pebal+rpl`` for RPL on a PEBAL-tuned segmenter)."""
    from rpl.evaluation import Evaluator, sanitize

    sink = VisualSink(vis_dir, WANDB_OVERLAYS if run is not None else 0) if (vis_dir or run is not None) else None
    report = Evaluator(model, options, preprocess, document["device"], on_visual=sink).run(entries)
    method, name = label
    if method and name != method:
        for row in report.results:
            row["method"] = row_label(row["method"], method, name)
        for curves in report.curves.values():
            for key in [k for k in curves if row_label(k, method, name) != k]:
                curves[row_label(key, method, name)] = curves.pop(key)
    if not report.defined():
        raise RPLInputError("no dataset gave a defined metric, so nothing was written. " + " ".join(report.notes))
    for note in report.notes:
        print(f"rpl-eval: warning: {note}", file=sys.stderr)

    document = sanitize({"results": report.results, **document, "datasets": report.datasets, "notes": report.notes})
    code = write_outputs(args, document, outputs, vis_dir, sink, args.report, report.curves, report.galleries)
    if run is not None:
        log_wandb(run, document["results"], sink.kept if sink else [])
    return code


def write_outputs(args: argparse.Namespace, document: dict[str, Any], outputs: dict[str, Path | None],
                  vis_dir: Path | None, sink: Any, report_dir: Path | None, curves: dict[str, Any],
                  galleries: dict[str, list]) -> int:
    """The table first (a failed write cannot hide it), then every requested file; exit 2 if one went elsewhere."""
    caption = f"pixel mode {args.pixel_mode}, FPR@95 rule {args.fpr_rule}"
    if args.limit is not None:
        caption += f"; --limit {args.limit}: first {args.limit} images of each dataset only"
    print_table(document["results"], args.components, caption)
    texts = {"json": lambda: json.dumps(document, indent=2, allow_nan=False) + "\n",
             "csv": lambda: to_csv(document["results"]),
             "markdown": lambda: to_markdown(document["results"], args.components, caption)}
    written, ok = write_all([(f"--{k}", p, texts[k]()) for k, p in outputs.items() if p], "rpl-eval")
    if vis_dir:
        written.append(f"{sink.written} overlays in {vis_dir}")
        if sink.error:
            ok = False
            print(f"rpl-eval: error: --save-vis stopped after {sink.written} overlays: {sink.error}", file=sys.stderr)
    if report_dir is not None:
        from rpl.report import write_report

        try:
            written.append(str(write_report(report_dir, document, curves, galleries)))
        except OSError as err:
            ok = False
            print(f"rpl-eval: error: --report {report_dir} could not be written ({err}); the table above and any "
                  "other outputs are complete.", file=sys.stderr)
    if written:
        print("Wrote " + ", ".join(written), file=sys.stderr)
    return 0 if ok else EXIT_BAD_INPUT  # results kept (table, fallback files), but not where asked


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
