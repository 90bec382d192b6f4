"""``rpl-train``: train an anomaly method on a segmenter (default: RPL on the embedded SynthStreets world).

Methods: rpl (a residual add-on on the frozen segmenter, the default) and pebal (fine-tunes a copy
of the segmenter with an abstention channel); ``--method`` is the config key ``method``.

Launch on several GPUs (or CPU processes) with ``torchrun --nproc_per_node N -m rpl.cli.train ...``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rpl.cli.common import add_debug_flag, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpl-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded SynthStreets recipe)")
    parser.add_argument("--method", help="method to train: rpl (default) or pebal (sets the config key method)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--work-dir", default="work_dirs/rpl", help="where checkpoints and logs go")
    parser.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pt")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    from rpl.config import dump_config, load_config

    overrides = [*args.overrides, *([f"method={args.method}"] if args.method else [])]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from rpl.training import build_trainer

    trainer = build_trainer(cfg, args.work_dir, resume=args.resume, quiet=args.quiet)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.d.main:
        best = f"best val AP {summary['best_ap']:.4f} at step {summary['best_step']}" if summary["best_ap"] >= 0 else ""
        print(f"Trained {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['skipped_steps']} skipped); "
              f"{best}. Checkpoints: {args.work_dir}/last.safetensors, {args.work_dir}/best.safetensors")
        if cfg.train.evaluate_after and args.config is None:
            from rpl.cli import eval as rpl_eval

            return rpl_eval.main(["--checkpoint", f"{args.work_dir}/best.safetensors", "--data-root", cfg.data.root,
                                  "--json", f"{args.work_dir}/eval.json"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
