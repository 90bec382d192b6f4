"""One run per work dir: an OS file lock, no accidental overwrite, a run id, stale temporaries removed, a
consistent checkpoint pair, and a resume that checks its config.

``rpl-train`` holds ``WORK_DIR/.rpl-train.lock`` with ``fcntl.flock`` for the whole run. The OS
drops the lock when the holding process dies (even on SIGKILL), so a second run on the same
directory is refused at once while the first lives, and a killed run's lock is simply taken over
(the file's recorded pid says whose it was). The lock file also records the run id that every
``log.jsonl`` row carries, so interleaved histories stay attributable.

A work dir that already holds a run is refused unless ``--resume`` continues it or ``--overwrite``
deletes it (``check_work_dir``), so a finished run is never silently replaced.

Checkpoints are written to ``.NAME.tmp<pid>`` and renamed; a kill before the rename leaves such a
file behind. While we hold the lock no other run can be writing, so every one of them is stale and
removed on start. ``last.pt`` (full state) and ``last.safetensors`` (the add-on) are two files, so a
kill between the two renames can leave ``last.safetensors`` one save behind: on ``--resume`` the
trainer compares its step (``safetensors_step``) with ``last.pt``'s and rewrites it from ``last.pt``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

from rpl.errors import RPLInputError

LOCK_NAME = ".rpl-train.lock"
_TEMP_PATTERN = re.compile(r"^\..+\.tmp\d+$")  # what atomic_torch_save / atomic_save_file leave after a kill


def new_run_id() -> str:
    """A short id, unique per run: UTC start time plus random hex (sortable, readable in log.jsonl)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def check_writable_dir(folder: Path, option: str) -> None:
    """Create ``folder`` if needed and prove it is writable, or raise an error naming ``option``."""
    if folder.exists() and not folder.is_dir():
        raise RPLInputError(f"{option} {folder} is a file; expected a folder (it is created when missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".rpl-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RPLInputError(f"{option} {folder} cannot be written ({err.strerror or err}); choose a writable "
                            "folder.") from None


class WorkDirLock:
    """The exclusive lock of one training run on ``work_dir`` (a context manager; ``release`` is idempotent)."""

    def __init__(self, work_dir: str | os.PathLike, run_id: str | None = None):
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / LOCK_NAME
        self.run_id = run_id or new_run_id()
        self.previous: dict[str, Any] | None = None  # the stale holder we took over, if any
        self._fh = None

    def acquire(self) -> "WorkDirLock":
        import fcntl

        check_writable_dir(self.work_dir, "--work-dir")
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fh)
            fh.close()
            raise RPLInputError(
                f"--work-dir {self.work_dir} is in use by another rpl-train run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}, run id "
                f"{holder.get('run_id', '?')}); two runs in one folder would overwrite each other's checkpoints. "
                "Wait for it, stop it, or pass another --work-dir.") from None
        previous = _read_holder(fh)
        if previous.get("pid") and not (previous.get("host") == socket.gethostname()
                                         and previous["pid"] == os.getpid()):
            alive = previous.get("host") == socket.gethostname() and _pid_alive(int(previous["pid"]))
            self.previous = {**previous, "alive": alive}
        record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        import fcntl

        try:
            self._fh.seek(0)
            self._fh.truncate()  # an empty lock file: nobody holds the folder
        except OSError:
            pass
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def __enter__(self) -> "WorkDirLock":
        return self.acquire() if self._fh is None else self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def takeover_note(self) -> str | None:
        """A line for the user when a killed run's lock was taken over."""
        if not self.previous:
            return None
        p = self.previous
        return (f"took over the lock of an earlier run in {self.work_dir} (pid {p.get('pid')}, started "
                f"{p.get('started')}, run id {p.get('run_id')}) that ended without releasing it.")


@contextlib.contextmanager
def hold_work_dir(work_dir: str | os.PathLike, quiet: bool = False) -> Iterator[WorkDirLock]:
    """Lock ``work_dir`` for one run and remove stale temporaries; what ``rpl-train`` wraps its run in."""
    with WorkDirLock(work_dir) as lock:
        note = lock.takeover_note()
        removed = remove_stale_temporaries(work_dir)
        if not quiet:
            if note:
                print(f"rpl-train: {note}", file=sys.stderr)
            if removed:
                print(f"rpl-train: removed {len(removed)} stale temporary file(s) of an interrupted write: "
                      + ", ".join(p.name for p in removed), file=sys.stderr)
        yield lock


def _read_holder(fh: Any) -> dict[str, Any]:
    try:
        fh.seek(0)
        record = json.loads(fh.read() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# -- what a work dir holds --------------------------------------------------------------------------
RUN_FILES = ("config.yaml", "log.jsonl", "last.pt", "last.safetensors", "best.safetensors", "summary.json",
             "eval.json")


def check_work_dir(work_dir: Path, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Never replace an earlier run by accident: a work dir holding one needs --resume or --overwrite.

    With ``overwrite`` the earlier run's files are deleted (on the main process) before anything new
    is written, so its log is not appended to and no stale ``best.safetensors`` survives.
    """
    if resume and overwrite:
        raise RPLInputError("--resume and --overwrite exclude each other: --resume continues the run in --work-dir, "
                            "--overwrite deletes it and starts again.")
    present = [name for name in RUN_FILES if (work_dir / name).exists()]
    if resume or not present:
        return
    if overwrite:
        if main:
            for name in present:
                (work_dir / name).unlink()
        return
    state = "a finished run" if (work_dir / "summary.json").is_file() else "an unfinished run"
    raise RPLInputError(f"--work-dir {work_dir} already holds {state} ({', '.join(present)}); nothing was changed. "
                        "Use --resume to continue it (a finished one is only evaluated again, with --evaluate), "
                        "--work-dir DIR to start a new run elsewhere, or --overwrite to delete it and start again.")


def remove_stale_temporaries(work_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.tmp<pid>`` leftovers of killed writes in ``work_dir``; call it holding the lock."""
    removed = []
    folder = Path(work_dir)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if _TEMP_PATTERN.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def safetensors_step(path: str | os.PathLike) -> int | None:
    """The training step recorded in an add-on checkpoint's metadata (None when missing or unreadable)."""
    from rpl.checkpoint import read_metadata

    try:
        return int(read_metadata(path)["extra"].get("step"))
    except (RPLInputError, TypeError, ValueError):
        return None


# -- resuming with another config -------------------------------------------------------------------
# Keys whose change makes the saved state meaningless (other tensor shapes, another frozen model or
# method): never accepted on --resume. Prefixes match whole dotted components.
SHAPE_KEYS = ("method", "segmenter", "wrap.width", "wrap.rates", "wrap.projection_dim", "wrap.head", "wrap.feature")
# Last components that name a model shape in any section (e.g. a method's own model keys), whole or
# as a suffix: ``hidden_width``, ``out_channels``, ``embed_dim``.
SHAPE_WORDS = ("width", "rates", "dim", "channels", "num_classes", "backbone", "head", "feature")
# Keys that change how a run is watched, not what it computes: free to change on resume.
FREE_ON_RESUME = ("data.num_workers", "train.log_every", "train.wandb", "train.evaluate_after", "train.device")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _matches(key: str, prefixes: Any) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def is_shape_key(key: str) -> bool:
    """Whether a change of dotted config ``key`` changes the model the saved state belongs to."""
    last = key.rsplit(".", 1)[-1]
    return _matches(key, SHAPE_KEYS) or any(last == w or last.endswith("_" + w) for w in SHAPE_WORDS)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config dicts, as ``{key: (old, new)}``.

    Both sides go through JSON first (tuples become lists). A key present on one side only is not a
    change: it is a key an older or newer version of rpl did not record.
    """
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def check_resume_config(old: dict[str, Any], new: dict[str, Any], allowed: Any = (),
                        source: str = "the checkpoint") -> dict[str, tuple[Any, Any]]:
    """The changes a ``--resume`` may apply, or an error listing the ones it may not.

    Shape keys (``is_shape_key``) are always refused; any other change needs its key (or a section
    prefix of it) in ``allowed`` (``--allow-changes``). ``FREE_ON_RESUME`` keys pass silently.
    Returns the accepted changes, which the caller records.
    """
    allowed = tuple(a.strip() for a in allowed if a.strip())
    changes = {k: v for k, v in config_changes(old, new).items() if not _matches(k, FREE_ON_RESUME)}
    shape = {k: v for k, v in changes.items() if is_shape_key(k)}
    if shape:
        raise RPLInputError(
            f"--resume: the config changes {_listing(shape)} against {source}; these keys set the model's shape "
            "(or the frozen segmenter / method), so the saved state cannot continue with them. Resume with the "
            "stored values, or start a new run in another --work-dir.")
    refused = {k: v for k, v in changes.items() if not _matches(k, allowed)}
    if refused:
        raise RPLInputError(
            f"--resume: the config changes {_listing(refused)} against {source}. Resume with the stored values, "
            f"or accept the change(s) with --resume --allow-changes {','.join(refused)} (recorded in config.yaml "
            "and the checkpoint metadata).")
    return changes


def _listing(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changes.items())


def changes_comment(changes: dict[str, tuple[Any, Any]], step: int) -> str:
    """YAML comment lines for config.yaml saying what a resume changed (the file stays loadable)."""
    if not changes:
        return ""
    return "".join(f"# resumed at step {step} with --allow-changes: {k} was {old!r}, now {new!r}\n"
                   for k, (old, new) in changes.items())
