"""Copy an add-on checkpoint from rpl-train into ``weights/`` with paths that resolve from there.

    python experiments/ship_addon.py work_dirs/rpl/best.safetensors weights/rpl_synthstreets.safetensors

rpl-train records the segmenter's weights path relative to its work dir; the shipped file must find
``weights/segmenter_synthstreets.safetensors`` from its own folder instead. Weights are unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from rpl.checkpoint import atomic_save_file, read_metadata


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--note", default="", help="text stored as extra['shipped_note']")
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
    raw["extra"] = json.dumps(extra)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(load_file(str(src)), dst, raw)
    print(f"wrote {dst} (segmenter weights -> {seg['weights']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
