"""What every command shares: bad input -> one paragraph on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from rpl.errors import RPLInputError

EXIT_BAD_INPUT = 2


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
