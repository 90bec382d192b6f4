"""The README's command-line synopses, generated from the argparse parsers so they cannot drift.

    python -m rpl.cli.synopsis                    # print every command's synopsis
    python -m rpl.cli.synopsis --write README.md  # rewrite the synopsis blocks of README.md
    python -m rpl.cli.synopsis --check README.md  # exit 1 (with a diff) when README.md is stale

Every console script declared in setup.cfg is covered; its module must have ``build_parser()``.
In the README a synopsis is a code block between ``<!-- synopsis: NAME -->`` and
``<!-- /synopsis -->``; commands with sub-commands (rpl-data) get one usage line per sub-command.
"""
from __future__ import annotations

import argparse
import configparser
import difflib
import importlib
import re
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
WIDTH = 110
BLOCK = re.compile(r"(<!-- synopsis: (?P<name>[\w.-]+) -->\n)```\n.*?```\n(<!-- /synopsis -->)", re.S)


def console_scripts(setup_cfg: Path = REPO_ROOT / "setup.cfg") -> dict[str, str]:
    """``{"rpl-eval": "rpl.cli.eval:main", ...}`` from setup.cfg's [options.entry_points]."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg, encoding="utf-8")
    lines = cfg.get("options.entry_points", "console_scripts", fallback="").strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if "=" in line)


def parsers(target: str) -> list[argparse.ArgumentParser]:
    """The parser behind ``module:function`` and, after it, each of its sub-command parsers."""
    module = importlib.import_module(target.split(":")[0])
    parser = module.build_parser()
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += list(dict.fromkeys(action.choices.values()))
    return found


def usage(parser: argparse.ArgumentParser, width: int = WIDTH) -> str:
    """argparse's own usage text at a fixed width (not the terminal's), without ``usage:``."""
    formatter = argparse.HelpFormatter(parser.prog, width=width)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip("\n")


def synopsis(target: str) -> str:
    found = parsers(target)
    shown = found[1:] if len(found) > 1 else found  # with sub-commands, their usages say it all
    return "\n".join(usage(p) for p in shown)


def synopses(setup_cfg: Path = REPO_ROOT / "setup.cfg") -> dict[str, str]:
    return {name: synopsis(target) for name, target in console_scripts(setup_cfg).items()}


def render(readme: str, texts: dict[str, str]) -> str:
    """``readme`` with every synopsis block replaced by the generated text; a command without a block
    (or a block for an unknown command) is an error naming it."""
    names = [m.group("name") for m in BLOCK.finditer(readme)]
    missing, unknown = [n for n in texts if n not in names], [n for n in names if n not in texts]
    if missing or unknown:
        raise SystemExit("README synopsis blocks: " + "; ".join(
            ([f"no block for {', '.join(missing)} (add '<!-- synopsis: NAME -->', a ``` block and "
              "'<!-- /synopsis -->')"] if missing else []) +
            ([f"blocks for commands that setup.cfg does not declare: {', '.join(unknown)}"] if unknown else [])))
    return BLOCK.sub(lambda m: f"{m.group(1)}```\n{texts[m.group('name')]}\n```\n{m.group(3)}", readme)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpl.cli.synopsis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", metavar="README", help="rewrite the synopsis blocks of this file")
    what.add_argument("--check", metavar="README", help="exit 1 with a diff when this file's blocks are stale")
    args = parser.parse_args(argv)
    texts = synopses()
    if not (args.write or args.check):
        print("\n\n".join(texts.values()))
        return 0
    path = Path(args.write or args.check)
    old = path.read_text(encoding="utf-8")
    new = render(old, texts)
    if args.write:
        if new != old:
            path.write_text(new, encoding="utf-8")
        return 0
    if new != old:
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(path),
                                                   "generated from the parsers"))
        print(f"\n{path}: synopses are stale; run python -m rpl.cli.synopsis --write {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
