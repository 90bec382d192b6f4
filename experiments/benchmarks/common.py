"""Helpers shared by the speed benchmarks (train_step, inference, eval_pipeline).

Every measured variant runs in its own fresh Python process (``run_worker``), so that its peak
memory is its own: on CPU the process's peak resident set size after a reset of the kernel's
high-water mark (``/proc/self/clear_refs``), on CUDA ``torch.cuda.max_memory_allocated``. A worker
prints one JSON line; the parent collects the lines, takes medians over repeats and prints a
Markdown table (``markdown_table``) headed by the machine it ran on (``machine``).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
MB = 1.0 / 2**20


# -- machine -----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(threads: int | None = None) -> dict[str, Any]:
    """What the numbers were measured on (printed above every table, stored in the JSON); ``threads``:
    the intra-op threads the measuring processes get (default torch's)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "gpu": None,
        "load_average": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe(info: dict[str, Any]) -> str:
    gpu = info["gpu"] or "no GPU"
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), {info['ram_gib']} GiB "
            f"RAM, {gpu}; Python {info['python']}, torch {info['torch']}; load average {info['load_average']:.2f}")


# -- timing ------------------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device | str) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` unmeasured ones (device synced)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -- memory ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


class PeakMemory:
    """Peak memory a block of work adds: host RSS above the level at ``start()`` (CPU), or CUDA bytes.

    CPU: the kernel's high-water mark (VmHWM) is reset at ``start()`` where Linux allows it; if it
    cannot be reset, ``ru_maxrss`` is used and the result is only an upper bound of the block's
    own peak (the process may have peaked earlier). CUDA: ``max_memory_allocated`` minus the
    allocation at ``start()``.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.base = 0
        self.exact = True

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False
        self.base = _status_kib("VmRSS") * 1024

    def peak_added(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = (_status_kib("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return peak - self.base


def unbuffered_host_allocations() -> bool:
    """Ask glibc to give every freed block of 64 KB or more back to the OS at once (``mallopt``), so
    that the RSS peak of a call is the call's own and not hidden by memory an earlier call left
    cached. Slows allocation: use it for memory passes after the timed ones. False if unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 65536) == 1 and libc.mallopt(m_trim_threshold, 65536) == 1
    libc.malloc_trim(0)
    return ok


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:  # the child has exited
        pass
    return 0


class ChildrenMemory:
    """Peak of the summed proportional set size (PSS) of this process's children, e.g. DataLoader
    workers, sampled from a thread while the block runs. PSS splits pages shared with the parent
    among the sharers, so forked workers are not charged the parent's whole footprint."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss_bytes(c) for c in _children(me)))
            self._stop.wait(self.interval)

    def __enter__(self) -> "ChildrenMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# -- isolated runs -----------------------------------------------------------------------------
def run_worker(script: str | Path, spec: dict[str, Any], threads: int | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh interpreter and return the JSON of its last output line.

    ``threads`` sets the worker's intra-op thread count (``OMP_NUM_THREADS``, which torch reads at start).
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average_after"] = os.getloadavg()[0]  # other jobs on the machine while it ran
    return result


def emit(result: dict[str, Any]) -> None:
    """A worker's answer: one JSON line on stdout (the parent reads the last line)."""
    print(json.dumps(result), flush=True)


def add_common_arguments(parser) -> None:
    """--threads, --json and the hidden --worker that every benchmark script takes."""
    parser.add_argument("--threads", type=int, help="torch intra-op threads in each measuring process (default: "
                        "torch's, one per core; use 1 on a machine shared with other jobs)")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def served_as_worker(args, worker: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """In a worker process (``--worker SPEC``): run ``worker(SPEC)``, emit its answer and return True."""
    if not args.worker:
        return False
    emit(worker(json.loads(args.worker)))
    return True


# -- tables ------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")
