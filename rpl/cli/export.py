"""rpl-export: one ONNX graph with the closed-set logits and the anomaly map, for use outside Python.

Examples:
  rpl-export --out model.onnx                                     # the shipped add-on and segmenter
  rpl-export --checkpoint work_dirs/rpl/best.safetensors --out model.onnx --include-preprocess
  rpl-export --checkpoint weights/pebal_synthstreets.safetensors --out pebal.onnx   # any method's checkpoint

Inputs and outputs of the graph:
  images   float32 (N, 3, H, W), normalised with the checkpoint's mean/std; with --include-preprocess
           uint8 (N, H, W, 3) RGB, normalised inside the graph
  logits   float32 (N, K, H, W): the segmenter's own closed-set logits
  anomaly  float32 (N, H, W): the score map of --method, by default the checkpoint's own method (rpl:
           energy of the perturbed logits, blurred; pebal: energy of the class logits, blurred), as
           rpl-eval scores it
Batch, height and width are dynamic when the segmenter allows it (checked with onnxruntime at a
second size; otherwise the graph is exported at the fixed --size and the command says so). The
export is verified against eager torch with onnxruntime (pip install 'rpl[export]') unless --no-verify.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rpl.cli.common import add_debug_flag, run_command
from rpl.errors import RPLInputError

DEFAULT_SIZE = "512x1024"
DEFAULT_OPSET = 17


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rpl-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="FILE", help="a checkpoint of any method (.safetensors from rpl-train), exported "
                                        "with the segmenter it records (default: the shipped "
                                        "weights/rpl_synthstreets.safetensors)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write (required)")
    p.add_argument("--method", metavar="NAME",
                   help="the anomaly output: the checkpoint's own method (rpl, pebal, ...) or a post-hoc score energy, "
                        "msp, maxlogit or entropy (default: the checkpoint's own method)")
    p.add_argument("--include-preprocess", action="store_true",
                   help="take uint8 (N, H, W, 3) RGB and normalise inside the graph (default: off, float NCHW input)")
    p.add_argument("--size", default=DEFAULT_SIZE, metavar="HxW",
                   help=f"input size the graph is traced at, and its size if it cannot be dynamic (default: {DEFAULT_SIZE})")
    p.add_argument("--static", action="store_true", help="fixed batch 1 and --size instead of dynamic axes "
                                                         "(default: dynamic)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N", help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check (default: verify)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")
    add_debug_flag(p)
    return p


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise RPLInputError(f"--out {out} already exists; pass --overwrite to replace it.")
    if out.suffix.lower() != ".onnx":
        raise RPLInputError(f"--out {out}: expected a file name ending in .onnx.")

    import torch

    from rpl.checkpoint import read_metadata
    from rpl.cli.eval import DEFAULT_CHECKPOINT, _size
    from rpl.cli.predict import load_model
    from rpl.evaluation import Preprocess
    from rpl.export import onnx_modules, to_onnx
    from rpl.prediction import check_methods

    size = _size(args.size)
    if not args.no_verify:
        onnx_modules()  # a missing package is said before minutes of tracing
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    meta = read_metadata(checkpoint)
    own = meta["method"]
    method = check_methods([args.method or own], own, where=f"checkpoint {checkpoint}",
                           option="--method")[0]  # before the model loads
    spec = (meta.get("extra") or {}).get("segmenter") or {}
    mean, std = spec.get("mean"), spec.get("std")
    model = load_model(checkpoint, torch.device("cpu"))
    preprocess = Preprocess(mean=tuple(mean) if mean else None, std=tuple(std) if std else None) \
        if args.include_preprocess else None
    info = to_onnx(model, out, method=method, preprocess=preprocess, sample_size=size, opset=args.opset,
                   dynamic=not args.static, verify=not args.no_verify)
    if info.note:
        print(f"rpl-export: note: {info.note}", file=sys.stderr)
    axes = "dynamic batch, height and width" if info.dynamic else f"fixed input {list(info.input_shape)}"
    print(f"rpl-export: wrote {info.path} (opset {info.opset}, {axes}, anomaly = {info.method}, input "
          f"{'uint8 NHWC, preprocessing inside' if info.include_preprocess else 'float32 NCHW, normalised'})")
    if not args.include_preprocess and mean:
        print(f"rpl-export: normalise inputs as (x / 255 - mean) / std with mean {list(mean)} and std {list(std)}")
    if info.parity:
        p = info.parity
        print(f"rpl-export: onnxruntime vs torch on a random input: logits max diff {p['logits_rel']:.2e} x max|logits|, "
              f"anomaly max diff {p['anomaly_rel']:.2e} x range, argmax agreement {100 * p['argmax_agreement']:.4f} %")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
