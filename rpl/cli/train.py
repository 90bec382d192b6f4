"""``rpl-train``: train the RPL add-on of a frozen segmenter (default: the embedded SynthStreets world).

Launch on several GPUs (or CPU processes) with ``torchrun --nproc_per_node N -m rpl.cli.train ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Sequence

from rpl.cli.common import add_debug_flag, run_command
from rpl.errors import RPLInputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpl-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded SynthStreets recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--work-dir", default="work_dirs/rpl", help="where checkpoints and logs go")
    parser.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pt (the config must "
                        "match the stored one)")
    parser.add_argument("--allow-changes", metavar="KEYS", default="",
                        help="with --resume: comma-separated config keys (or sections) allowed to differ from the "
                             "stored config, e.g. optim.lr,optim.iterations; never shape keys (wrap.width, "
                             "wrap.rates, segmenter.*)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    from rpl.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.allow_changes and not args.resume:
        raise RPLInputError("--allow-changes only applies to --resume (it lists the config keys a resumed run may "
                            "change).")
    from rpl.workdir import hold_work_dir

    main_rank = int(os.environ.get("RANK", "0")) == 0  # one lock per run, held by rank 0
    with hold_work_dir(args.work_dir, quiet=args.quiet) if main_rank else contextlib.nullcontext() as lock:
        from rpl.training import Trainer  # torch loads once the work dir is ours: a refusal comes at once

        trainer = Trainer(cfg, args.work_dir, resume=args.resume, quiet=args.quiet,
                          run_id=lock.run_id if lock else None,
                          allow_changes=tuple(args.allow_changes.split(",")))
        try:
            summary = trainer.fit()
        finally:
            trainer.close()
        if trainer.d.main:
            best = (f"best val AP {summary['best_ap']:.4f} at step {summary['best_step']}"
                    if summary["best_ap"] >= 0 else "")
            print(f"Trained {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['skipped_steps']} "
                  f"skipped); {best}. Checkpoints: {args.work_dir}/last.safetensors, {args.work_dir}/best.safetensors")
            if cfg.train.evaluate_after and args.config is None:
                from rpl.cli import eval as rpl_eval

                return rpl_eval.main(["--checkpoint", f"{args.work_dir}/best.safetensors", "--data-root",
                                      cfg.data.root, "--json", f"{args.work_dir}/eval.json"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
