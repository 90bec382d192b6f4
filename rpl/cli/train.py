"""``rpl-train``: train an anomaly method on a segmenter (default: RPL on the embedded SynthStreets world).

Methods: rpl (a residual add-on on the frozen segmenter, the default), pebal (fine-tunes a copy
of the segmenter with an abstention channel) and meta-ood (fine-tunes it by entropy maximisation,
then fits a meta classifier on held-out validation segments); ``--method`` is the config key ``method``.

With no --config it trains on the embedded default (SynthStreets, generated under data.root on
first use, then evaluated with rpl-eval's default table). Launch on several GPUs (or CPU
processes) with ``torchrun --nproc_per_node N -m rpl.cli.train OPTIONS``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Sequence

from rpl.cli.common import add_debug_flag, make_parser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("rpl-train", __doc__)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (default: the embedded SynthStreets recipe, rpl/config.py)")
    parser.add_argument("--method", metavar="NAME",
                        help="method to train: rpl (default), pebal or meta-ood; sets the config key method "
                             "(docs/methods.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--work-dir", metavar="DIR", default="work_dirs/rpl",
                        help="where checkpoints, logs and the config go")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in WORK_DIR from its last.pt (a finished run is not trained again); "
                             "the config must match the stored one")
    parser.add_argument("--allow-changes", metavar="KEYS", default="",
                        help="with --resume: comma-separated config keys (or sections) allowed to differ from the "
                             "stored config, e.g. optim.lr,optim.iterations; never shape keys (wrap.width, "
                             "wrap.rates, segmenter.*)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the earlier run in WORK_DIR and start again (without it, rpl-train refuses "
                             "a WORK_DIR that holds a run)")
    parser.add_argument("--evaluate", action="store_true",
                        help="with --resume on a finished run: evaluate it again (rpl-eval's default table)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged config (what differs from the default and what does not apply "
                             "is marked) and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no loss lines")
    add_debug_flag(parser)
    return parser


def annotated_config(cfg, config_file: str | None, overrides: Sequence[str]) -> str:
    """The config as YAML, with a comment on every key that differs from the default (and where it was
    set) and on keys that the run ignores. The comments leave it a valid --config file."""
    from rpl.config import Config, dump_config, parse_override

    defaults, values = Config().to_dict(), cfg.to_dict()
    from_set = {".".join(parse_override(item)[0][:2]) for item in overrides} | (
        {"method"} if any(item.startswith("method=") for item in overrides) else set())
    notes: dict[str, str] = {}
    for section, keys in values.items():
        if not isinstance(keys, dict):  # a top-level key (method)
            if keys != defaults[section]:
                notes[section] = f"set by {'--set' if section in from_set else config_file}; default {defaults[section]}"
            continue
        for key, value in keys.items():
            if value != defaults[section][key]:
                where = "--set" if f"{section}.{key}" in from_set else config_file
                notes[f"{section}.{key}"] = f"set by {where}; default {json.dumps(defaults[section][key])}"
    ignored = "not used: optim.iterations is set and overrides it" if cfg.optim.iterations else None
    if ignored:
        notes["optim.epochs"] = "; ".join(filter(None, [notes.get("optim.epochs"), ignored]))
    else:
        notes["optim.iterations"] = "; ".join(filter(None, [notes.get("optim.iterations"),
                                                            "null: optim.epochs sets the length"]))
    if config_file is not None:
        notes["train.evaluate_after"] = "; ".join(filter(None, [notes.get("train.evaluate_after"),
                                                                "not used with --config (only the embedded default "
                                                                "is evaluated at the end)"]))
    lines, section = [], None
    for line in dump_config(cfg).splitlines():
        if line and not line.startswith(" ") and line.split(":", 1)[1].strip():  # a top-level key: value
            section = None
            note = notes.get(line.split(":", 1)[0])
            line = f"{line}  # {note}" if note else line
        elif line and not line.startswith(" "):
            section = line.rstrip(":")
        elif line.startswith("  ") and not line.startswith("   ") and ":" in line and not line.lstrip().startswith("-"):
            note = notes.get(f"{section}.{line.strip().split(':', 1)[0]}")
            if note:
                line = f"{line}  # {note}"
        lines.append(line)
    header = "# rpl-train config: the embedded default" + (f" + {config_file}" if config_file else "") + \
        (" + --set" if overrides else "") + "; '#' notes mark changed or unused keys"
    return header + "\n" + "\n".join(lines) + "\n"


def _evaluate(work_dir: str, data_root: str) -> int:
    from rpl.cli import eval as rpl_eval

    return rpl_eval.main(["--checkpoint", f"{work_dir}/best.safetensors", "--data-root", data_root,
                          "--json", f"{work_dir}/eval.json", "--report", f"{work_dir}/report"])


def _run(args: argparse.Namespace) -> int:
    from rpl.config import load_config
    from rpl.errors import RPLInputError

    overrides = [*args.overrides, *([f"method={args.method}"] if args.method else [])]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(annotated_config(cfg, args.config, overrides), end="")
        return 0
    if args.evaluate and not args.resume:
        raise RPLInputError("--evaluate re-evaluates a finished run and goes with --resume; a new run is evaluated "
                            "at its end anyway (train.evaluate_after).")
    if args.allow_changes and not args.resume:
        raise RPLInputError("--allow-changes only applies to --resume (it lists the config keys a resumed run may "
                            "change).")
    from rpl.workdir import hold_work_dir

    main_rank = int(os.environ.get("RANK", "0")) == 0  # one lock per run, held by rank 0
    with hold_work_dir(args.work_dir, quiet=args.quiet) if main_rank else contextlib.nullcontext() as lock:
        return _train(args, cfg, lock.run_id if lock else None)


def _train(args: argparse.Namespace, cfg, run_id: str | None) -> int:
    """The run itself, while this process holds the work dir."""
    from rpl.training import build_trainer  # torch loads once the work dir is ours: a refusal comes at once

    trainer = build_trainer(cfg, args.work_dir, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite,
                            run_id=run_id, allow_changes=tuple(args.allow_changes.split(",")))
    if trainer.finished:
        trainer.close()
        if trainer.d.main:
            p = trainer.progress
            best = f", best val AP {p.best_ap:.4f} at step {p.best_step}" if p.best_ap >= 0 else ""
            print(f"{args.work_dir}: this run is finished ({p.step}/{trainer.total_steps} steps{best}); nothing to "
                  "train. " + ("Evaluating it again." if args.evaluate else
                               "--evaluate evaluates it again; a larger optim.iterations with --allow-changes "
                               "optim.iterations trains it further."))
            if args.evaluate:
                return _evaluate(args.work_dir, cfg.data.root)
        return 0
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.d.main:
        best = f"best val AP {summary['best_ap']:.4f} at step {summary['best_step']}" if summary["best_ap"] >= 0 else ""
        print(f"Trained {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['skipped_steps']} skipped); "
              f"{best}. Checkpoints: {args.work_dir}/last.safetensors, {args.work_dir}/best.safetensors")
        if cfg.train.evaluate_after and args.config is None:
            return _evaluate(args.work_dir, cfg.data.root)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
