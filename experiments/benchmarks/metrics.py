"""Pixel-metric benchmark: rpl's exact and streaming modes against scikit-learn.

    python experiments/benchmarks/metrics.py            # 1e7 and 1e8 pixels (sklearn: minutes)
    python experiments/benchmarks/metrics.py --quick    # 1e6 and 1e7 pixels

Every (method, size) runs in a fresh Python process that first builds the data (float32 scores,
uint8 labels, 5 % anomaly, no void so every method sees the same pixels; built in chunks so
building it costs no more than the data itself), then measures:
- time: wall clock of the method alone (rpl: ``update`` per 1024 x 2048 image + ``compute``;
  scikit-learn: ``roc_auc_score`` + ``average_precision_score``, then ``roc_curve`` for FPR@95);
- peak memory: the process's peak resident set size (``ru_maxrss``) minus its resident size
  just before the method ran, i.e. what the method added on top of the data it was given.
Prints a Markdown table (the one in BENCHMARKS.md) and the largest metric difference to sklearn.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

IMAGE = 1024 * 2048


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = np.empty(n, np.float32)
    labels = np.empty(n, np.uint8)
    for start in range(0, n, 1 << 22):
        stop = min(n, start + (1 << 22))
        rng.standard_normal(out=scores[start:stop], dtype=np.float32)
        np.less(rng.random(stop - start, dtype=np.float32), 0.05, out=labels[start:stop], casting="unsafe")
        scores[start:stop] += 1.5 * labels[start:stop]
    return scores, labels


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: kilobytes


def run_rpl(mode: str, scores: np.ndarray, labels: np.ndarray) -> dict:
    from rpl.metrics import PixelMetrics
    m = PixelMetrics(mode=mode)
    for start in range(0, scores.size, IMAGE):
        s, lab = scores[start:start + IMAGE], labels[start:start + IMAGE]
        shape = (1024, 2048) if s.size == IMAGE else (1, s.size)
        m.update(s.reshape(shape), lab.reshape(shape))
    out = m.compute()
    return {k: out[k] for k in ("auroc", "ap", "fpr95")}


def worker(method: str, n: int) -> dict:
    import rpl.metrics  # noqa: F401  (same imports, hence same baseline, for every method)
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    scores, labels = make_data(n)
    tiny_s, tiny_l = make_data(1000, seed=1)
    if method == "sklearn":                       # warm up, then measure
        roc_auc_score(tiny_l, tiny_s)
        base = rss_bytes()
        t0 = time.perf_counter()
        auroc = roc_auc_score(labels, scores)
        ap = average_precision_score(labels, scores)
        t2 = time.perf_counter()
        peak_two = peak_bytes() - base
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        fpr95 = float(fpr[np.argmax(tpr >= 0.95)])
        t3 = time.perf_counter()
        return {"auroc": auroc, "ap": ap, "fpr95": fpr95, "time_two": t2 - t0,
                "time_fpr95": t3 - t2, "peak_two": peak_two, "peak_all": peak_bytes() - base}
    run_rpl(method, tiny_s.reshape(1, -1), tiny_l.reshape(1, -1))
    base = rss_bytes()
    t0 = time.perf_counter()
    out = run_rpl(method, scores, labels)
    out.update(time=time.perf_counter() - t0, peak=peak_bytes() - base)
    return out


def measure(method: str, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(n)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e6 and 1e7 pixels instead of 1e7 and 1e8")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    sizes = [10**6, 10**7] if args.quick else [10**7, 10**8]
    mb = 1 / 2**20
    rows, raw = [], {}
    for n in sizes:
        sk = measure("sklearn", n)
        raw[n] = {"sklearn": sk}
        rows.append(f"| {n:.0e} | sklearn AUROC+AP | {sk['time_two']:.2f} | {sk['peak_two'] * mb:.0f} | 1.0x | - |")
        rows.append(f"| {n:.0e} | sklearn + roc_curve FPR@95 | {sk['time_two'] + sk['time_fpr95']:.2f} "
                    f"| {sk['peak_all'] * mb:.0f} | - | - |")
        for mode in ("exact", "streaming"):
            r = measure(mode, n)
            raw[n][mode] = r
            diff = max(abs(r[k] - sk[k]) for k in ("auroc", "ap", "fpr95"))
            rows.append(f"| {n:.0e} | rpl {mode} (AUROC+AP+FPR@95) | {r['time']:.2f} | {r['peak'] * mb:.0f} "
                        f"| {sk['time_two'] / r['time']:.0f}x | {diff:.1e} |")
    print("| pixels | method | time (s) | peak memory added (MB) | speed-up vs sklearn AUROC+AP "
          "| max abs diff to sklearn |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
