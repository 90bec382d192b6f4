"""Copy a checkpoint from rpl-train (any method) into ``weights/`` with paths that resolve from there.

    python experiments/ship_addon.py work_dirs/rpl/best.safetensors weights/rpl_synthstreets.safetensors
    python experiments/ship_addon.py work_dirs/pebal/best.safetensors weights/pebal_synthstreets.safetensors \\
        --fp16 --command "rpl-train --method pebal ..."

rpl-train records the segmenter's weights path relative to its work dir; the shipped file must find
its segmenter (``weights/segmenter_synthstreets.safetensors``, or a shipped PEBAL file for
``pebal+rpl``) from its own folder instead. Weights are unchanged unless ``--fp16`` (float32
tensors stored in half precision, as the shipped segmenter is; float64 ones, such as Meta-OoD's
classifier statistics, keep theirs; evaluate the shipped file, not the work dir's, since the
rounding changes scores slightly). ``--command`` is stored as
``extra['command']`` so the file says how it was made.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rpl.checkpoint import atomic_save_file, read_metadata


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--note", default="", help="text stored as extra['shipped_note']")
    p.add_argument("--command", default="", help="the command that trained it, stored as extra['command']")
    p.add_argument("--fp16", action="store_true", help="store float32 tensors in float16 (float64 ones, e.g. a "
                   "meta classifier's statistics, keep their precision and range)")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    meta = read_metadata(src)
    with safe_open(str(src), framework="pt") as fh:
        raw = dict(fh.metadata())
    extra = meta["extra"]
    seg = extra["segmenter"]
    weights = Path(seg["weights"])
    if not weights.is_absolute():
        weights = (src.parent / weights).resolve()
    if not weights.is_file():
        raise SystemExit(f"segmenter weights {weights} recorded in {src} do not exist")
    seg["weights"] = os.path.relpath(weights, dst.parent.resolve())
    if args.note:
        extra["shipped_note"] = args.note
    if args.command:
        extra["command"] = args.command
    raw["extra"] = json.dumps(extra)
    tensors = load_file(str(src))
    if args.fp16:
        tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, dst, raw)
    print(f"wrote {dst} (segmenter weights -> {seg['weights']}{', float16' if args.fp16 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
