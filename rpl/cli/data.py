"""``rpl-data``: prepare data sets (SynthStreets generation, COCO outlier-exposure masks)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rpl.cli.common import add_debug_flag, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpl-data", description=__doc__)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    syn = sub.add_parser("synthstreets", help="generate the embedded SynthStreets world in the real layouts")
    syn.add_argument("--out", required=True, help="output folder")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--size", default=None, help="image size HxW, e.g. 192x384 (default: the generator's)")
    syn.add_argument("--scale", type=float, default=1.0, help="multiply every split's image count")

    coco = sub.add_parser("coco-ood", help="build the outlier-exposure mask cache from a COCO layout")
    coco.add_argument("--coco-root", required=True, help="folder with train2017/ and annotations/")
    coco.add_argument("--out", required=True, help="cache folder for images' outlier masks")
    coco.add_argument("--split", default="train2017")
    coco.add_argument("--min-size", type=int, default=480, help="minimum image height and width")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "synthstreets":
        from rpl.data.synthstreets import generate

        size = None
        if args.size:
            try:
                h, w = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                from rpl.errors import RPLInputError

                raise RPLInputError(f"--size {args.size!r} is not HxW (for example 192x384).") from None
            size = (h, w)
        generate(args.out, seed=args.seed, size=size, scale=args.scale)
        return 0
    if args.command == "coco-ood":
        from rpl.data.coco import prepare_coco_ood

        prepare_coco_ood(args.coco_root, args.out, split=args.split, min_size=args.min_size)
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
