"""ONNX latency: the shipped model through onnxruntime (CPU) against eager torch, one image per call.

    python experiments/benchmarks/onnx_latency.py                 # 512x1024, 10 timed calls each
    python experiments/benchmarks/onnx_latency.py --size 256x512 --repeats 5
    python experiments/benchmarks/onnx_latency.py --parity-only data/synthstreets/synthstreets-*/images

Both sides compute the same thing: the closed-set logits and the blurred RPL anomaly map of one
normalised float32 (1, 3, H, W) image (a SynthStreets street rendered at that size). Eager is
``model(x)`` under ``torch.inference_mode`` with both outputs materialised; ONNX is the graph of
``rpl.export.to_onnx`` (dynamic axes, no preprocessing inside) in an onnxruntime
``CPUExecutionProvider`` session with graph optimisations on. Both get the same thread count
(``--threads``, default: all cores). Calls alternate (torch, onnxruntime, torch, ...) after two
warm-up calls each, so that load from other jobs hits both alike. Also prints the parity of the two
outputs on that image (the figures the tests bound). ``--parity-only FOLDER...`` skips the timing and
reports the worst parity over every image in the folders, at each image's own size, through the
graph with preprocessing inside (uint8 in), as ``rpl-export --include-preprocess`` writes it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import describe, machine  # noqa: E402
from rpl.cli.predict import load_model  # noqa: E402
from rpl.data.synthstreets.scene import render_street  # noqa: E402
from rpl.evaluation import Preprocess  # noqa: E402
from rpl.export import parity, to_onnx  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "rpl_synthstreets.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="512x1024", help="HxW (default 512x1024)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per side (default 10)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides (default: all cores)")
    p.add_argument("--parity-only", nargs="+", metavar="FOLDER", help="worst parity over these image folders")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    model = load_model(SHIPPED, torch.device("cpu")).eval()
    if args.parity_only:
        return parity_only(model, args.parity_only)
    image = render_street(np.random.default_rng(0), (h, w), anomalies=1).image
    x = Preprocess()(torch.from_numpy(image[None]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rpl.onnx"
        t0 = time.perf_counter()
        info = to_onnx(model, path, sample_size=(h, w))
        export_s = time.perf_counter() - t0
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"images": x.numpy()}

        def eager():
            with torch.inference_mode():
                out = model(x)
                return out.logits.numpy(), out.anomaly.numpy()

        def onnx():
            return tuple(session.run(["logits", "anomaly"], feed))

        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {"eager torch": [], "onnxruntime": []}
        for _ in range(2):
            eager(), onnx()
        for _ in range(args.repeats):
            for name, fn in (("eager torch", eager), ("onnxruntime", onnx)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        load_after = os.getloadavg()[0]
        check = parity(*onnx(), *eager())
    print(f"Machine: {describe(machine(args.threads))} (1-minute load average {load_before:.2f} before the timed "
          f"calls, {load_after:.2f} after)")
    print(f"Shipped model at {h}x{w}, batch 1, {args.repeats} timed calls per side; export took {export_s:.1f} s "
          f"(opset {info.opset}, dynamic axes {info.dynamic})\n")
    print("| runtime | median ms | min ms | speed-up vs eager |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["eager torch"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1000 * med:.1f} | {1000 * min(ts):.1f} | {base / med:.2f}x |")
    print(f"\nParity on this image: logits max diff {check['logits_rel']:.2e} x max|logits|, anomaly max diff "
          f"{check['anomaly_rel']:.2e} x range, argmax agreement {100 * check['argmax_agreement']:.4f} %")
    return 0


def parity_only(model, folders: list[str]) -> int:
    from rpl.data.io import read_image
    from rpl.export import run_onnx

    paths = sorted(q for f in folders for q in Path(f).iterdir() if q.suffix == ".png")
    worst = {"logits_rel": 0.0, "anomaly_rel": 0.0, "argmax_agreement": 1.0}
    pixels = differing = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rpl.onnx"
        first = read_image(paths[0])
        to_onnx(model, path, preprocess=Preprocess(), sample_size=first.shape[:2])
        for q in paths:
            image = read_image(q)[None]
            with torch.inference_mode():
                out = model(Preprocess()(torch.from_numpy(image)))
            logits, anomaly = run_onnx(path, image)
            check = parity(logits, anomaly, out.logits.numpy(), out.anomaly.numpy())
            worst = {"logits_rel": max(worst["logits_rel"], check["logits_rel"]),
                     "anomaly_rel": max(worst["anomaly_rel"], check["anomaly_rel"]),
                     "argmax_agreement": min(worst["argmax_agreement"], check["argmax_agreement"])}
            pixels += logits.shape[-1] * logits.shape[-2]
            differing += int((logits.argmax(1) != out.logits.numpy().argmax(1)).sum())
    print(f"{len(paths)} images from {', '.join(folders)}: worst logits max diff {worst['logits_rel']:.2e} x "
          f"max|logits|, worst anomaly max diff {worst['anomaly_rel']:.2e} x range, worst argmax agreement "
          f"{100 * worst['argmax_agreement']:.4f} % ({differing} of {pixels} pixels differ in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
