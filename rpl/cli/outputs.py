"""Output files of a command: proven writable before any compute, never lost after it.

``check_file`` / ``check_folder`` run before the model is built: a folder in place of a file, a
path under a regular file, or a read-only or permission-denied target is an error naming the
option, so no evaluation is computed only to be thrown away. ``write_all`` runs at the end; if a
write still fails (disk full, the target removed meanwhile), the text goes to a fallback file
whose path is printed, and the caller exits non-zero.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from rpl.errors import RPLInputError


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def check_folder(value: str | os.PathLike | None, option: str, named: str | None = None) -> Path | None:
    """``value`` as a folder that exists (created if needed) and accepts a new file, or an error.

    ``named`` is how the message names the target (default ``OPTION FOLDER``)."""
    if value is None:
        return None
    folder = Path(value)
    base = _existing_ancestor(folder)
    if not base.is_dir():
        what = "is a file" if base == folder else f"is under {base}, which is a file"
        raise RPLInputError(f"{option} {folder} {what}; expected a folder (created when missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".rpl-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RPLInputError(f"{named or f'{option} {folder}'} cannot be written ({_reason(err)}); choose a writable "
                            "location. Nothing was computed.") from None
    return folder


def check_file(value: str | os.PathLike | None, option: str) -> Path | None:
    """``value`` as a file path whose folder exists (created if needed) and is writable, or an error."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise RPLInputError(f"{option} {path} is a folder; expected a file name to write.")
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise RPLInputError(f"{option} {path} is under {base}, which is a file; expected a path in a folder.")
    check_folder(path.parent, option, named=f"{option} {path}: its folder {path.parent}")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name next to ``path`` and rename: an interrupted run leaves the old file intact."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def fallback_path(path: Path, prog: str) -> Path:
    """Where ``path``'s text goes when it cannot be written: the current folder, else the temp folder."""
    name = f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{path.name}"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            check_folder(folder, "fallback")
            return folder / name
        except RPLInputError:
            continue
    raise OSError(f"no writable folder for a fallback copy of {path}")


def write_all(items: Sequence[tuple[str, Path, str]], prog: str) -> tuple[list[str], bool]:
    """Write each ``(option, path, text)``; returns (paths written, every write went where asked)."""
    written, ok = [], True
    for option, path, text in items:
        try:
            write_atomic(path, text)
            written.append(str(path))
            continue
        except OSError as err:
            ok = False
            reason = _reason(err)
        try:
            spare = fallback_path(path, prog)
            write_atomic(spare, text)
            print(f"{prog}: error: {option} {path} could not be written ({reason}); its content was saved to "
                  f"{spare} instead.", file=sys.stderr)
            written.append(str(spare))
        except OSError as err:
            print(f"{prog}: error: {option} {path} could not be written ({reason}), nor a fallback copy "
                  f"({_reason(err)}); the table above is the only copy of the results.", file=sys.stderr)
    return written, ok
