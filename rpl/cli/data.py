"""``rpl-data``: prepare data sets (SynthStreets generation, COCO outlier-exposure masks)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rpl.cli.common import HelpFormatter, add_debug_flag, make_parser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("rpl-data", __doc__)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    syn_help = "generate the embedded SynthStreets world in the real layouts"
    syn = sub.add_parser("synthstreets", help=syn_help, formatter_class=HelpFormatter,
                         description=syn_help + ".\nIt is written into DIR.partial and moved to DIR when finished, "
                         "so an interrupted run leaves no half-written DIR.")
    syn.add_argument("--out", metavar="DIR", required=True, help="output folder (created if missing)")
    syn.add_argument("--seed", metavar="N", type=int, default=0, help="seed: same seed, same bytes")
    syn.add_argument("--size", metavar="HxW", default=None, help="street picture size (default: 192x384)")
    syn.add_argument("--scale", metavar="F", type=float, default=1.0,
                     help="multiply every set's picture count (1.0: 1000 train, 60 val, 300 COCO-layout, 3 x 60 "
                          "test pictures)")

    coco_help = "build the outlier-exposure mask cache from a COCO layout (Meta-OoD rules)"
    coco = sub.add_parser("coco-ood", help=coco_help, description=coco_help, formatter_class=HelpFormatter)
    coco.add_argument("--coco-root", metavar="COCO", required=True, help="folder with train2017/ and annotations/")
    coco.add_argument("--out", metavar="CACHE", required=True, help="cache folder for the images' outlier masks")
    coco.add_argument("--split", default="train2017", help="COCO split (image folder and annotation file)")
    coco.add_argument("--min-size", metavar="PIXELS", type=int, default=480,
                      help="minimum image height and width")
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
