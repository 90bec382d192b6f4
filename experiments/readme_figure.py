"""Tile ``rpl-eval --save-vis`` overlays into the README's picture: one row per image, one column per method.

    rpl-eval --datasets synthstreets-anomaly,synthstreets-rural --methods rpl,energy --save-vis work_dirs/vis
    python experiments/readme_figure.py work_dirs/vis synthstreets-anomaly/0000 synthstreets-anomaly/0002 \
        synthstreets-rural/0001 --methods rpl,energy --out docs/overlays.jpg
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vis_dir")
    p.add_argument("images", nargs="+", help="DATASET/NAME of each row")
    p.add_argument("--methods", default="rpl,energy")
    p.add_argument("--out", default="docs/overlays.jpg")
    args = p.parse_args(argv)
    rows = []
    for item in args.images:
        dataset, name = item.split("/")
        tiles = []
        for method in args.methods.split(","):
            path = Path(args.vis_dir) / dataset / method / f"{name}.png"
            tile = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if tile is None:
                sys.exit(f"{path}: no overlay there; run rpl-eval --save-vis {args.vis_dir} first")
            cv2.putText(tile, f"{dataset.removeprefix('synthstreets-')}: {method}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.concatenate(tiles, axis=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, np.concatenate(rows, axis=0))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
