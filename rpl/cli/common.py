"""What every command shares: bad input -> one paragraph on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from rpl.errors import RPLInputError

EXIT_BAD_INPUT = 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; every option's help ends with its default when it has one
    (None and False mean "not given" and are described in words by the help itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default is None or default is False
                or default is argparse.SUPPRESS or not action.option_strings or default == []):
            return text
        return f"{text} (default: %(default)s)"


def plain(doc: str | None) -> str:
    """A docstring as plain text for --help: no reStructuredText double backticks."""
    return (doc or "").replace("``", "")


def make_parser(prog: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """The parser of a command: its module docstring as plain-text description, defaults in the help."""
    return argparse.ArgumentParser(prog=prog, description=plain(doc), formatter_class=HelpFormatter, **kwargs)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def run_command(body: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run ``body(args)`` and turn bad input into exit code 2.

    ``RPLInputError`` (and missing files) are the user's to fix, so they print as a single
    paragraph; ``--debug`` adds the traceback. Anything else is our bug and keeps its traceback.
    """
    args = parser.parse_args(argv)
    try:
        code = body(args)
    except (RPLInputError, FileNotFoundError) as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
