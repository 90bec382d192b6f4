"""End-to-end evaluation benchmark: ``rpl-eval`` against a reference-style evaluation loop.

    python experiments/benchmarks/eval_pipeline.py --workdir work_dirs/eval_full     # 30 images of 1024x2048
    python experiments/benchmarks/eval_pipeline.py --workdir work_dirs/eval_full --scaling   # 10, 20, 40 images
    python experiments/benchmarks/eval_pipeline.py --quick    # 20 images of 512x1024

The data set is generated into a temporary folder in the Fishyscapes layout (``images/`` +
``labels_masks/`` PNGs with 0 inlier / 1 anomaly / 255 void): smooth random colour fields with
noise, one to three elliptic blobs of another colour as anomalies, the bottom eighth void (the
ego vehicle). Model: ``rpl.models.DeepLabV3Plus`` (ResNet-18, widths 32) with a width-32 RPL
block, random init, its last 1x1 scaled x30 so that the logits spread as a trained model's do
(fresh logits are nearly uniform, which would squeeze MSP and entropy into a sliver of their
range), saved as an add-on checkpoint with its segmenter spec, as rpl-train writes it.
Methods: rpl, energy, msp, maxlogit, entropy. Every variant runs in a fresh process; its time is
the wall clock from before the model is built to the last metric (data generation excluded), and
its CPU time (all threads and DataLoader workers: robust to other jobs on a shared machine).
``--workdir`` keeps the generated images and checkpoint, so a later run (or ``--scaling``) reuses
them; ``--scaling`` evaluates the first 10, 20 and 40 images and gives time and memory per image.

- ``rpl-eval``: ``rpl.cli.eval.main`` with its defaults (streaming metrics, DataLoader workers,
  OpenCV decode, one forward per image for all methods, metrics accumulated where the scores are),
  and once more with ``--pixel-mode exact`` (numbers equal to scikit-learn's).
- ``reference``: the loop of the RPL reference code, written here: PIL decode and torchvision
  ``to_tensor``/``normalize`` per image, one forward under ``no_grad``, every method's full score
  map and the label copied to host memory as numpy, then per method ``np.array`` of the maps,
  inlier/anomaly selection, and scikit-learn ``roc_auc_score``, ``average_precision_score`` and
  ``roc_curve`` (FPR at the first threshold with TPR >= 0.95).

Peak host memory: the process's RSS high-water mark above its level after imports, plus the peak
summed PSS of rpl-eval's DataLoader worker processes (sampled every 50 ms). The table also gives
the largest metric difference to the reference (AUROC, AP, FPR@95 over the five methods).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (MB, ChildrenMemory, PeakMemory, add_common_arguments, describe,  # noqa: E402
                    machine, markdown_table, median, run_worker, served_as_worker,
                    write_json)

METHODS = ("rpl", "energy", "msp", "maxlogit", "entropy")
SEGMENTER_KWARGS = {"backbone": "resnet18", "num_classes": 19, "output_stride": 16, "aspp_width": 32,
                    "decoder_width": 32}
BLOCK_WIDTH = 32
LOGIT_SCALE = 30.0  # random-init logits differ by ~0.3 across classes, a trained model's by ~10
DATASET = "fs-laf"  # registry name; its folder under the data root is fishyscapes/LostAndFound
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- data and model ------------------------------------------------------------------------------
def synthetic_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB street-like image with blob anomalies and its 0/1/255 label."""
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.integers(-12, 13, image.shape, dtype=np.int16)
    image = np.clip(image, 0, 255).astype(np.uint8)
    label = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        centre = (int(rng.integers(width // 8, 7 * width // 8)), int(rng.integers(height // 4, 3 * height // 4)))
        axes = (int(rng.integers(width // 80, width // 16)), int(rng.integers(height // 60, height // 10)))
        angle, colour = float(rng.uniform(0, 180)), tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.ellipse(image, centre, axes, angle, 0, 360, colour, -1)
        cv2.ellipse(label, centre, axes, angle, 0, 360, 1, -1)
    label[-height // 8:] = 255
    return image, label


def make_dataset(folder: Path, count: int, height: int, width: int, seed: int = 0) -> Path:
    """``count`` image/label pairs in the Fishyscapes layout under ``folder``; returns ``folder``."""
    from rpl.data.io import write_image, write_label

    rng = np.random.default_rng(seed)
    for i in range(count):
        image, label = synthetic_pair(rng, height, width)
        write_image(folder / "images" / f"frame_{i:04d}.png", image)
        write_label(folder / "labels_masks" / f"frame_{i:04d}.png", label)
    return folder


def make_checkpoint(folder: Path, kwargs: dict[str, Any] = SEGMENTER_KWARGS, width: int = BLOCK_WIDTH) -> Path:
    """A random-init segmenter (safetensors) and an RPL add-on checkpoint that records it, as rpl-train writes."""
    from safetensors.torch import save_file

    import rpl
    from rpl.models import DeepLabV3Plus, SegmenterSpec

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    segmenter = DeepLabV3Plus(**kwargs).eval()
    with torch.no_grad():  # spread the logits as a trained model's: realistic score ranges for every method
        segmenter.final[-1].weight.mul_(LOGIT_SCALE)
    save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(folder / "segmenter.safetensors"))
    spec = SegmenterSpec(model="rpl.models:build_model", kwargs=dict(kwargs), weights="segmenter.safetensors",
                         mean=list(MEAN), std=list(STD))
    return rpl.save(folder / "addon.safetensors", rpl.wrap(segmenter, block={"width": width}),
                    extra={"segmenter": spec.to_dict()})


def dataset_folder(data_root: Path) -> Path:
    from rpl.data.registry import dataset_info

    return data_root / dataset_info(DATASET).folder


# -- the two pipelines -------------------------------------------------------------------------
def rpl_eval_argv(checkpoint: Path, data_root: Path, json_path: Path, pixel_mode: str = "streaming",
                  extra: tuple[str, ...] = (), device: str = "cpu") -> list[str]:
    return ["--checkpoint", str(checkpoint), "--datasets", DATASET, "--data-root", str(data_root),
            "--methods", ",".join(METHODS), "--device", device, "--pixel-mode", pixel_mode, "--json", str(json_path),
            "--quiet", *extra]


def run_rpl_eval(checkpoint: Path, data_root: Path, json_path: Path, pixel_mode: str = "streaming",
                 extra: tuple[str, ...] = (), device: str = "cpu") -> dict[str, dict[str, float]]:
    """``rpl-eval`` in this process; returns {method: {auroc, ap, fpr95}} from its JSON."""
    from rpl.cli.eval import main

    code = main(rpl_eval_argv(checkpoint, data_root, json_path, pixel_mode, extra, device))
    if code != 0:
        raise RuntimeError(f"rpl-eval exited with {code}")
    document = json.loads(json_path.read_text())
    return {r["method"]: {k: r[k] for k in ("auroc", "ap", "fpr95")} for r in document["results"]}


def reference_evaluate(checkpoint: Path, data_folder: Path, limit: int | None = None,
                       device: str = "cpu") -> dict[str, dict[str, float]]:
    """The reference code's evaluation, one image at a time, scikit-learn on host arrays at the end."""
    from PIL import Image
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    from torchvision.transforms.functional import normalize, to_tensor

    import rpl
    from rpl.scores import SCORES

    model = rpl.from_checkpoint(checkpoint, device=device)
    scores: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    labels: list[np.ndarray] = []
    for image_path in sorted((data_folder / "images").glob("*.png"))[:limit]:
        image = Image.open(image_path).convert("RGB")
        label = np.array(Image.open(data_folder / "labels_masks" / image_path.name))
        x = normalize(to_tensor(image), MEAN, STD)[None].to(device)
        with torch.no_grad():
            out = model(x)
            maps = {"rpl": out.anomaly, **{m: SCORES[m](out.logits) for m in METHODS if m != "rpl"}}
        for m in METHODS:
            scores[m].append(maps[m][0].cpu().numpy())
        labels.append(label)
    gts = np.array(labels)
    results = {}
    for m in METHODS:
        maps = np.array(scores.pop(m))
        anomaly, inlier = maps[gts == 1], maps[gts == 0]
        del maps
        values = np.concatenate([inlier, anomaly])
        truth = np.concatenate([np.zeros(len(inlier)), np.ones(len(anomaly))])
        del inlier, anomaly
        auroc = roc_auc_score(truth, values)
        ap = average_precision_score(truth, values)
        fpr, tpr, _ = roc_curve(truth, values, drop_intermediate=False)
        results[m] = {"auroc": float(auroc), "ap": float(ap), "fpr95": float(fpr[np.argmax(tpr >= 0.95)])}
    return results


# -- processes and table -----------------------------------------------------------------------
VARIANTS = {"reference": {}, "rpl-eval": {"pixel_mode": "streaming"},
            "rpl-eval --pixel-mode exact": {"pixel_mode": "exact"}}


def reference_peak_estimate(pixels: int) -> int:
    """Bytes the reference needs: 5 float32 maps per pixel held, plus scikit-learn's ~50 bytes per pixel."""
    return pixels * (4 * len(METHODS) + 50)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import rpl.cli.eval  # noqa: F401  (imports outside the measured block, for every variant alike)
    import sklearn.metrics  # noqa: F401
    import torchvision.transforms.functional  # noqa: F401

    checkpoint, data_root = Path(spec["checkpoint"]), Path(spec["data_root"])
    variant, limit = VARIANTS[spec["variant"]], spec.get("limit")
    memory = PeakMemory("cpu")
    memory.start()
    t0, c0 = time.perf_counter(), time.process_time()
    engine_ips = None
    with ChildrenMemory() as workers:
        if spec["variant"] == "reference":
            metrics = reference_evaluate(checkpoint, dataset_folder(data_root), limit, spec["device"])
        else:
            json_path = Path(spec["json"])
            extra = ("--limit", str(limit)) if limit else ()
            metrics = run_rpl_eval(checkpoint, data_root, json_path, variant["pixel_mode"], extra, spec["device"])
            engine_ips = json.loads(json_path.read_text())["datasets"][DATASET]["images_per_second"]
    seconds = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)          # DataLoader workers, once joined
    cpu = time.process_time() - c0 + children.ru_utime + children.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": memory.peak_added(),
            "worker_peak_bytes": workers.peak, "metrics": metrics, "engine_images_per_second": engine_ips,
            "load_average": os.getloadavg()[0]}


def prepare(workdir: Path, count: int, height: int, width: int) -> tuple[Path, Path]:
    """The data set and checkpoint under ``workdir``, generated unless a matching one is there."""
    data_root, manifest = workdir / "data", workdir / "manifest.json"
    wanted = {"images": count, "size": [height, width], "kwargs": SEGMENTER_KWARGS, "block": BLOCK_WIDTH}
    checkpoint = workdir / "model" / "addon.safetensors"
    have = json.loads(manifest.read_text()) if manifest.exists() else {}
    if checkpoint.exists() and have.get("images", 0) >= count and {**have, "images": count} == wanted:
        print(f"Reusing the first {count} of {have['images']} images of {height}x{width} in {workdir}", flush=True)
        return data_root, checkpoint
    t0 = time.perf_counter()
    make_dataset(dataset_folder(data_root), count, height, width)
    checkpoint = make_checkpoint(workdir / "model")
    manifest.write_text(json.dumps(wanted))
    print(f"Generated {count} images of {height}x{width} in {time.perf_counter() - t0:.0f} s", flush=True)
    return data_root, checkpoint


def measure(variants: list[str], rounds: int, data_root: Path, checkpoint: Path, workdir: Path,
            threads: int | None, limit: int | None = None, device: str = "cpu") -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants:
            spec = {"variant": variant, "checkpoint": str(checkpoint), "data_root": str(data_root),
                    "json": str(workdir / f"result_{r}.json"), "limit": limit, "device": device}
            runs[variant].append(run_worker(__file__, spec, threads))
            last = runs[variant][-1]
            print(f"  {limit or 'all'} images, round {r + 1}/{rounds} {variant}: {last['seconds']:.1f} s wall, "
                  f"{last['cpu_seconds']:.1f} s CPU, load {last['load_average']:.1f}", flush=True)
    return runs


def main_table(runs: dict[str, list[dict[str, Any]]], count: int) -> str:
    ref = runs.get("reference")
    ref_seconds = median([run["seconds"] for run in ref]) if ref else None
    ref_cpu = median([run["cpu_seconds"] for run in ref]) if ref else None
    rows = []
    for variant, variant_runs in runs.items():
        seconds = median([run["seconds"] for run in variant_runs])
        cpu = median([run["cpu_seconds"] for run in variant_runs])
        peak = median([run["peak_bytes"] for run in variant_runs])
        workers = median([run["worker_peak_bytes"] for run in variant_runs])
        diff = "-"
        if ref and variant != "reference":
            m, r = variant_runs[0]["metrics"], ref[0]["metrics"]
            diff = f"{max(abs(m[k][x] - r[k][x]) for k in METHODS for x in ('auroc', 'ap', 'fpr95')):.1e}"
        rows.append([variant, f"{seconds:.1f}", f"{cpu:.1f}", f"{count / seconds:.3f}",
                     f"{ref_seconds / seconds:.2f}x" if ref_seconds else "-",
                     f"{ref_cpu / cpu:.2f}x" if ref_cpu else "-", f"{peak * MB:.0f}",
                     f"{workers * MB:.0f}" if workers else "-", f"{(peak + workers) * MB:.0f}", diff,
                     f"{median([run['load_average'] for run in variant_runs]):.1f}"])
    return markdown_table(["pipeline", "wall (s)", "CPU (s)", "images/s (wall)", "speed vs reference (wall)",
                           "speed vs reference (CPU)", "main process peak added (MB)", "workers' peak PSS (MB)",
                           "host memory total (MB)", "max metric diff to reference", "load avg"], rows)


def scaling_table(by_count: dict[int, dict[str, list[dict[str, Any]]]]) -> str:
    rows = []
    for count, runs in by_count.items():
        for variant, variant_runs in runs.items():
            run = variant_runs[0]
            total = run["peak_bytes"] + run["worker_peak_bytes"]
            rows.append([count, variant, f"{run['seconds']:.1f}", f"{run['seconds'] / count:.2f}",
                         f"{run['cpu_seconds'] / count:.2f}", f"{total * MB:.0f}", f"{total * MB / count:.0f}",
                         f"{run['load_average']:.1f}"])
    return markdown_table(["images", "pipeline", "wall (s)", "wall s/image", "CPU s/image", "host memory (MB)",
                           "host memory MB/image", "load avg"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 images of 512x1024 instead of 30 of 1024x2048")
    parser.add_argument("--images", type=int,
                        help="number of generated images (default 30, quick 20; 40 with --scaling)")
    parser.add_argument("--size", help="HxW of the generated images (default 1024x2048, quick 512x1024)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, interleaved (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated among " + ", ".join(VARIANTS))
    parser.add_argument("--workdir", help="keep the generated data and checkpoint here (reused when they match)")
    parser.add_argument("--scaling", action="store_true", help="evaluate the first 10, 20 and 40 images instead")
    parser.add_argument("--device", default="cpu", help="where both pipelines run the model and the scores: cpu "
                                                        "(default) or cuda")
    add_common_arguments(parser)
    args = parser.parse_args()
    if served_as_worker(args, worker):
        return
    counts = [10, 20, 40] if args.scaling else None
    count = args.images or (max(counts) if counts else (20 if args.quick else 30))
    height, width = (int(v) for v in (args.size or ("512x1024" if args.quick else "1024x2048")).split("x"))
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    need, have = reference_peak_estimate(count * height * width), available_bytes()
    if "reference" in variants and need > 0.8 * have:
        parser.error(f"the reference loop needs about {need / 2**30:.1f} GiB for {count} images of {height}x{width} "
                     f"but only {have / 2**30:.1f} GiB are available; use fewer --images or a smaller --size")
    info = machine(args.threads)
    print(f"Machine: {describe(info)}", flush=True)
    raw: dict[str, Any] = {"machine": info, "images": count, "size": [height, width]}
    with tempfile.TemporaryDirectory(prefix="rpl_eval_bench_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data_root, checkpoint = prepare(workdir, count, height, width)
        if counts:
            by_count = {c: measure(variants, 1, data_root, checkpoint, workdir, args.threads, c, args.device)
                        for c in counts}
            raw["scaling"] = {str(c): runs for c, runs in by_count.items()}
            print(f"\nScaling, images of {height}x{width}, methods {', '.join(METHODS)}, {args.device}\n")
            print(scaling_table(by_count), flush=True)
        else:
            raw["runs"] = measure(variants, args.rounds, data_root, checkpoint, workdir, args.threads, count,
                                  args.device)
            print(f"\n{count} images of {height}x{width}, methods {', '.join(METHODS)}, {args.device}, "
                  f"{args.rounds} round(s)\n")
            print(main_table(raw["runs"], count), flush=True)
    write_json(args.json, raw)


if __name__ == "__main__":
    main()
