"""Inference benchmark: latency of a bare segmenter against the same segmenter wrapped by ``rpl.wrap``.

    python experiments/benchmarks/inference.py            # CPU 512x1024 (+ GPU 1024x2048 when available)
    python experiments/benchmarks/inference.py --quick    # CPU 256x512, 3 timed calls
    python experiments/benchmarks/inference.py --compile default   # also torch.compile both (opt-in)

One image per call, under ``torch.inference_mode``. "bare" is ``segmenter(x)`` (closed-set logits);
"wrapped" is ``model(x)`` with both of its outputs materialised: the closed-set logits and the
anomaly map (free energy of the perturbed logits, Gaussian-blurred), i.e. everything ``rpl-eval``
needs from a forward. Two residual blocks: the reference-sized one (width 256, as RPL) and a light
one (width 64). The overhead column is wrapped / bare - 1.

Models: on CPU the embedded segmenter, ``rpl.models.DeepLabV3Plus`` (timm resnet10t, widths 64), and torchvision's
``deeplabv3_mobilenet_v3_large``, in fp32 with contiguous and with ``channels_last`` tensors; on
CUDA torchvision's ``deeplabv3_resnet101`` under bf16 autocast with ``channels_last``. All random
init (speed does not depend on the weights).

Each (model, precision) runs in a fresh process; within it the bare and wrapped calls alternate
(bare, block 256, block 64, bare, ...) after two warm-up calls each, so that load from other jobs
hits all of them alike. Peak memory: what one call adds on top of the built models and input,
measured in a separate pass after the timed calls (host RSS high-water mark on CPU, with glibc
told to return freed blocks at once; ``torch.cuda.max_memory_allocated`` on CUDA).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (MB, PeakMemory, add_common_arguments, describe, machine,  # noqa: E402
                    markdown_table, median, run_worker, served_as_worker, synchronize,
                    unbuffered_host_allocations, write_json)
import rpl  # noqa: E402
from rpl.models import DeepLabV3Plus  # noqa: E402
from rpl.wrapping import extract_logits  # noqa: E402

BLOCKS = {"block 256 (reference)": 256, "block 64 (light)": 64}


def build_segmenter(name: str) -> torch.nn.Module:
    from torchvision.models import segmentation

    torch.manual_seed(0)
    if name == "deeplabv3plus-resnet10t":
        return DeepLabV3Plus("resnet10t", num_classes=19, output_stride=16, aspp_width=64, decoder_width=64)
    factory = {"deeplabv3-mobilenetv3": segmentation.deeplabv3_mobilenet_v3_large,
               "deeplabv3-resnet101": segmentation.deeplabv3_resnet101}[name]
    return factory(weights=None, weights_backbone=None, num_classes=19)


SETUPS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu", "size": [512, 1024], "quick_size": [256, 512],
            "runs": [("deeplabv3plus-resnet10t", "fp32", False), ("deeplabv3plus-resnet10t", "fp32", True),
                     ("deeplabv3-mobilenetv3", "fp32", False), ("deeplabv3-mobilenetv3", "fp32", True)]},
    "gpu": {"device": "cuda", "size": [1024, 2048], "quick_size": [1024, 2048],
            "runs": [("deeplabv3-resnet101", "bf16", True), ("deeplabv3-resnet101", "fp32", False)]},
}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(spec["device"])
    memory_format = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    segmenter = build_segmenter(spec["model"]).to(device).eval()
    segmenter = segmenter.to(memory_format=memory_format)
    # a segmenter carries one wrapper at a time: each block width wraps its own copy (same weights)
    wrapped = {name: rpl.wrap(copy.deepcopy(segmenter), block={"width": width}) for name, width in BLOCKS.items()}
    x = torch.randn(1, 3, *spec["size"], generator=torch.Generator().manual_seed(0)).to(device)
    x = x.contiguous(memory_format=memory_format)
    amp = spec["precision"] == "bf16"

    def bare_call(model: torch.nn.Module) -> Callable[[], Any]:
        return lambda: extract_logits(model(x))

    def wrapped_call(model: torch.nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            out = model(x)
            return out.logits, out.anomaly   # both outputs, as rpl-eval uses them
        return call

    calls = {"bare": segmenter, **wrapped}
    if spec.get("compile"):
        calls = {k: torch.compile(m, mode=spec["compile"]) for k, m in calls.items()}
    fns = {k: (bare_call(m) if k == "bare" else wrapped_call(m)) for k, m in calls.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, int] = {}
    memory = PeakMemory(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for fn in fns.values():
            for _ in range(spec["warmup"]):
                fn()
        synchronize(device)
        for _ in range(spec["repeats"]):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                times[k].append(time.perf_counter() - t0)
        if device.type == "cpu":  # memory pass: freed blocks must leave RSS, or later calls reuse them unseen
            unbuffered_host_allocations()
        for k, fn in fns.items():
            memory.start()
            fn()
            peaks[k] = memory.peak_added()
    return {"times": times, "peaks": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU at 256x512, one round, 3 timed calls")
    parser.add_argument("--rounds", type=int, help="fresh processes per model, interleaved (default 3, quick 1)")
    parser.add_argument("--repeats", type=int, help="timed calls of each variant per process (default 5, quick 3)")
    parser.add_argument("--compile", metavar="MODE", help="torch.compile both models with this mode (default, "
                        "reduce-overhead = CUDA graphs on GPU, max-autotune); off unless given")
    parser.add_argument("--setups", default="auto", help="comma-separated among " + ", ".join(SETUPS) +
                        " (default: cpu, plus gpu when CUDA is available)")
    add_common_arguments(parser)
    args = parser.parse_args()
    if served_as_worker(args, worker):
        return
    rounds = args.rounds or (1 if args.quick else 3)
    repeats = args.repeats or (3 if args.quick else 5)
    info = machine(args.threads)
    print(f"Machine: {describe(info)}", flush=True)
    raw: dict[str, Any] = {"machine": info, "results": []}
    names = list(SETUPS) if args.setups == "auto" else [s.strip() for s in args.setups.split(",")]
    unknown = [name for name in names if name not in SETUPS]
    if unknown:
        parser.error(f"--setups: unknown setup(s) {unknown}; known: {', '.join(SETUPS)}")
    for setup_name in names:
        setup = SETUPS[setup_name]
        if setup["device"] == "cuda" and not torch.cuda.is_available():
            print("GPU runs skipped: CUDA is not available", flush=True)
            continue
        size = setup["quick_size"] if args.quick else setup["size"]
        results: dict[tuple, list[dict[str, Any]]] = {run: [] for run in setup["runs"]}
        for r in range(rounds):
            for model, precision, channels_last in setup["runs"]:
                spec = {"device": setup["device"], "model": model, "precision": precision, "size": size,
                        "channels_last": channels_last, "warmup": 2, "repeats": repeats, "compile": args.compile}
                results[(model, precision, channels_last)].append(run_worker(__file__, spec, args.threads))
                print(f"  round {r + 1}/{rounds}: {model} {precision}{' channels_last' if channels_last else ''}",
                      flush=True)
        rows = []
        for (model, precision, channels_last), runs in results.items():
            raw["results"].append({"device": setup["device"], "model": model, "precision": precision,
                                   "channels_last": channels_last, "size": size, "runs": runs})
            t = {k: median([v for run in runs for v in run["times"][k]]) for k in runs[0]["times"]}
            peak = {k: median([run["peaks"][k] for run in runs]) for k in runs[0]["peaks"]}
            fmt = precision + (", channels_last" if channels_last else "")
            for k in t:
                overhead = "-" if k == "bare" else f"{100 * (t[k] / t['bare'] - 1):+.0f} %"
                rows.append([model, fmt, k, f"{1000 * t[k]:.1f}", f"{t[k] / t['bare']:.2f}x", overhead,
                             f"{peak[k] * MB:.0f}"])
        compiled = f", torch.compile mode {args.compile}" if args.compile else ""
        print(f"\n{setup['device']}: 1 image of {size[0]}x{size[1]}, {rounds} round(s) x {repeats} calls after 2 "
              f"warm-up{compiled}\n")
        print(markdown_table(["segmenter", "precision", "variant", "latency (ms, median)", "ratio to bare",
                              "overhead", "peak memory added (MB)"], rows), flush=True)
    write_json(args.json, raw)


if __name__ == "__main__":
    main()
