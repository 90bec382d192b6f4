"""Pixel-metric benchmark: rpl (exact, streaming, smiyc) against scikit-learn, torchmetrics and pytorch-ood.

    pip install torchmetrics pytorch-ood scikit-learn     # the peers (benchmark-only dependencies)
    python experiments/benchmarks/metrics.py               # 1e7 and 1e8 pixels
    python experiments/benchmarks/metrics.py --quick       # 1e6 and 1e7 pixels
    python experiments/benchmarks/metrics.py --sizes 1e7 --methods rpl-streaming,torchmetrics-exact

Every (method, size) runs in its own fresh Python process (one intra-op thread, so that every
method gets the same single core) that first builds the same data: float32 *unbounded* energy-like
scores (-8 + 2 N(0, 1), anomalies +3, 1 % of pixels with an exponential tail down to about -300),
uint8 labels with 5 % anomaly and 10 % void (255) pixels, fed as 1024 x 2048 images. The process
then times, on those same arrays, a plain numpy pass (``scores.sum()`` and ``labels.sum()``: the
memory-bandwidth floor of anything that reads every pixel once) and the method: every ``update``
plus the final ``compute`` of AUROC, AP and FPR@95 (first threshold with TPR >= 0.95).

How each peer gets the data (the adaptation it needs is part of its time):
- scikit-learn: the valid pixels selected (``labels != 255``), ``roc_auc_score`` +
  ``average_precision_score`` + ``roc_curve(drop_intermediate=False)`` once at the end;
- torchmetrics: ``BinaryAUROC``/``BinaryAveragePrecision``/``BinaryROC`` in one
  ``MetricCollection`` (one shared state), ``ignore_index=255``; it applies a sigmoid itself to
  scores outside [0, 1], which is how it takes energies. ``thresholds=None`` is exact (it keeps
  every score); an integer T uses T thresholds evenly spaced in [0, 1] (after the sigmoid);
- pytorch-ood 0.4: ``OODSegmentationMetrics(device="cpu", void_label=255)``, pooled over all
  pixels; it marks anomalies by negative labels, so the labels are converted per image
  (int16, anomaly -> -1). Its AUPR-OUT (anomaly as positive class) stands for AP; it is a
  trapezoidal area, not the step-wise AP of scikit-learn, so part of its difference is that rule.

Reported per row: wall time, CPU time of the process (robust to other jobs on a shared machine),
peak host memory added (VmHWM after a reset, above the level once the data exist), each metric's
largest absolute difference to scikit-learn at the same size, the CPU-time speed-up over
scikit-learn and, for the streaming rows, the time as a multiple of the numpy pass measured in
the same process (rpl rows: the updates alone; peers: everything). ``--merge`` adds rows where
4 metric objects each take a quarter of the images and are merged before ``compute`` (rpl
``merge``, torchmetrics ``merge_state``; pytorch-ood and scikit-learn have no merge).
``--table-from`` prints one table from the JSON files of separate runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (MB, PeakMemory, add_common_arguments, describe, machine,  # noqa: E402
                    markdown_table, run_worker, served_as_worker, write_json)

IMAGE = (1024, 2048)
PIXELS = IMAGE[0] * IMAGE[1]
METHODS = ("sklearn", "rpl-exact", "rpl-streaming", "rpl-streaming-numpy", "rpl-smiyc", "torchmetrics-exact",
           "torchmetrics-binned-100", "torchmetrics-binned-1000", "pytorch-ood")
MERGEABLE = ("rpl-exact", "rpl-streaming", "torchmetrics-exact", "torchmetrics-binned-1000")
KEYS = ("auroc", "ap", "fpr95")


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Energy-like float32 scores and 0/1/255 uint8 labels, built in chunks (no full-size temporaries)."""
    rng = np.random.default_rng(seed)
    scores, labels = np.empty(n, np.float32), np.empty(n, np.uint8)
    step = 1 << 22
    for start in range(0, n, step):
        stop = min(n, start + step)
        s, lab = scores[start:stop], labels[start:stop]
        rng.standard_normal(out=s, dtype=np.float32)
        s *= 2
        s -= 8
        u = rng.random(stop - start, dtype=np.float32)
        np.less(u, 0.05, out=lab, casting="unsafe")
        s += 3 * lab
        tail = u > 0.99                                   # an unbounded tail of very low energies
        s[tail] -= rng.exponential(40, int(tail.sum())).astype(np.float32)
        lab[rng.random(stop - start, dtype=np.float32) < 0.10] = 255
    return scores, labels


def images(scores: np.ndarray, labels: np.ndarray, part: int = 0, parts: int = 1):
    """(H, W) images (the last one shorter), every ``parts``-th starting at ``part``."""
    for i, start in enumerate(range(0, scores.size, PIXELS)):
        if i % parts == part:
            s, lab = scores[start:start + PIXELS], labels[start:start + PIXELS]
            shape = IMAGE if s.size == PIXELS else (1, s.size)
            yield s.reshape(shape), lab.reshape(shape)


# -- the methods ---------------------------------------------------------------------------------
def rpl_metric(mode: str, scores, labels, parts: int):
    from rpl.metrics import PixelMetrics

    metrics = [PixelMetrics(mode=mode.replace("-numpy", "")) for _ in range(parts)]
    for m in metrics:
        if mode == "streaming-numpy":          # the vectorised numpy path, as without numba
            m._acc.compiled = False
    c0 = time.process_time()
    for p, m in enumerate(metrics):
        for s, lab in images(scores, labels, p, parts):
            m.update(s, lab)
    update_cpu = time.process_time() - c0
    for other in metrics[1:]:
        metrics[0].merge(other)
    out = metrics[0].compute()
    return {**{k: out[k] for k in KEYS}, "update_cpu": update_cpu}


def torchmetrics_metric(thresholds, scores, labels, parts: int):
    import torch
    from torchmetrics import MetricCollection
    from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryROC

    def make():
        kw = {"thresholds": thresholds, "ignore_index": 255}
        return MetricCollection({"auroc": BinaryAUROC(**kw), "ap": BinaryAveragePrecision(**kw),
                                 "roc": BinaryROC(**kw)})

    metrics = [make() for _ in range(parts)]
    for p, m in enumerate(metrics):
        for s, lab in images(scores, labels, p, parts):
            m.update(torch.from_numpy(s), torch.from_numpy(lab))
    for other in metrics[1:]:
        for name in ("auroc", "ap", "roc"):
            metrics[0][name].merge_state(other[name])
    out = metrics[0].compute()
    fpr, tpr, _ = out["roc"]
    first = int(torch.argmax((tpr >= 0.95).int()))       # the first threshold with TPR >= 0.95
    return {"auroc": float(out["auroc"]), "ap": float(out["ap"]), "fpr95": float(fpr[first])}


def pytorch_ood_metric(scores, labels):
    import torch
    from pytorch_ood.metrics import OODSegmentationMetrics

    m = OODSegmentationMetrics(device="cpu", void_label=255)
    for s, lab in images(scores, labels):
        ood_labels = lab.astype(np.int16)
        ood_labels[lab == 1] = -1                         # pytorch-ood: negative label = OOD
        m.update(torch.from_numpy(s), torch.from_numpy(ood_labels))
    out = m.compute()
    return {"auroc": out["AUROC"], "ap": out["AUPR-OUT"], "fpr95": out["FPR95TPR"]}


def sklearn_metric(scores, labels):
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    valid = labels != 255
    y, s = labels[valid], scores[valid]
    del valid
    auroc, ap = roc_auc_score(y, s), average_precision_score(y, s)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auroc": float(auroc), "ap": float(ap), "fpr95": float(fpr[np.argmax(tpr >= 0.95)])}


def run_method(method: str, scores, labels, parts: int = 1):
    if method == "sklearn":
        return sklearn_metric(scores, labels)
    if method.startswith("rpl-"):
        return rpl_metric(method[4:], scores, labels, parts)
    if method == "torchmetrics-exact":
        return torchmetrics_metric(None, scores, labels, parts)
    if method.startswith("torchmetrics-binned-"):
        return torchmetrics_metric(int(method.rsplit("-", 1)[1]), scores, labels, parts)
    if method == "pytorch-ood":
        return pytorch_ood_metric(scores, labels)
    raise ValueError(method)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import rpl.metrics  # noqa: F401  (the same imports, hence the same baseline, for every method)
    torch.set_num_threads(1)
    method, n, parts = spec["method"], int(spec["n"]), int(spec.get("parts", 1))
    scores, labels = make_data(n)
    warm = PIXELS + 1000 if method.startswith("rpl-streaming") else 1000   # numba needs a megapixel update
    tiny_s, tiny_l = make_data(warm, seed=1)            # warm-up: imports, numba's compile cache
    run_method(method, tiny_s, tiny_l)
    del tiny_s, tiny_l
    numpy_cpu, total = float("inf"), 0.0
    for _ in range(3):                                   # the floor: best of three plain passes
        c0 = time.process_time()
        total = float(scores.sum(dtype=np.float32)) + int(labels.sum(dtype=np.uint64))
        numpy_cpu = min(numpy_cpu, time.process_time() - c0)
    memory = PeakMemory("cpu")
    memory.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run_method(method, scores, labels, parts)
    out.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0, peak=memory.peak_added(),
               numpy_cpu=numpy_cpu, checksum=total, load_average=os.getloadavg()[0])
    return out


# -- the table -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e6 and 1e7 pixels instead of 1e7 and 1e8")
    parser.add_argument("--sizes", help="comma-separated pixel counts, e.g. 1e7,1e8")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated among " + ", ".join(METHODS))
    parser.add_argument("--merge", action="store_true", help="also time 4-way merging where the library has it")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a method is stopped")
    add_common_arguments(parser)
    parser.add_argument("--table-from", nargs="+", metavar="JSON",
                        help="print the table of earlier --json outputs (e.g. sizes or methods run separately)")
    args = parser.parse_args()
    if served_as_worker(args, worker):
        return
    if args.table_from:
        merged: dict[str, dict[str, Any]] = {}
        for path in args.table_from:
            for size, results in json.loads(Path(path).read_text())["runs"].items():
                merged.setdefault(size, {}).update(results)
        rows = [row for size in sorted(merged, key=float) for row in table_rows(int(float(size)), merged[size])]
        print(markdown_table(HEADERS, rows))
        return
    sizes = [int(float(v)) for v in (args.sizes or ("1e6,1e7" if args.quick else "1e7,1e8")).split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    info = machine(1)
    print(f"Machine: {describe(info)}", flush=True)
    raw: dict[str, Any] = {"machine": info, "versions": versions(), "runs": {}}
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in raw["versions"].items()), flush=True)
    rows = []
    for n in sizes:
        results: dict[str, Any] = {}
        jobs = [(m, 1) for m in methods] + ([(m, 4) for m in methods if m in MERGEABLE] if args.merge else [])
        for method, parts in jobs:
            name = method if parts == 1 else f"{method} (4-way merge)"
            try:
                results[name] = run_worker(__file__, {"method": method, "n": n, "parts": parts}, threads=1,
                                           timeout=args.timeout)
            except Exception as err:  # noqa: BLE001 - a stopped or failed peer is a row, not the end
                results[name] = {"error": str(err).splitlines()[0][:200]}
            raw["runs"][f"{n:.0e}"] = results
            write_json(args.json, raw)                      # after every row: a stopped run keeps its rows
            r = results[name]
            print(f"  {n:.0e} {name}: " + (f"{r['cpu']:.2f} s CPU, {r['wall']:.2f} s wall"
                                          if "cpu" in r else r["error"]), flush=True)
        raw["runs"][f"{n:.0e}"] = results
        rows += table_rows(n, results)
    print()
    print(markdown_table(HEADERS, rows), flush=True)
    write_json(args.json, raw)


HEADERS = ["pixels", "method", "wall (s)", "CPU (s)", "peak memory added (MB)", "CPU speed-up vs sklearn",
           "max abs diff to sklearn (AUROC / AP / FPR@95)", "update CPU / numpy pass", "load avg"]


def table_rows(n: int, results: dict[str, Any]) -> list[list[str]]:
    sk = results.get("sklearn")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([f"{n:.0e}", name, "-", "-", "-", "-", f"not finished: {r['error']}", "-", "-"])
            continue
        diff = "-" if not sk or "error" in sk or name == "sklearn" else " / ".join(
            f"{abs(r[k] - sk[k]):.1e}" for k in KEYS)
        speed = f"{sk['cpu'] / r['cpu']:.1f}x" if sk and "cpu" in sk else "-"
        spent = r.get("update_cpu", r["cpu"])          # rpl: the updates alone (compute excluded)
        multiple = f"{spent / r['numpy_cpu']:.1f}x" if r["numpy_cpu"] > 0 else "-"
        rows.append([f"{n:.0e}", name, f"{r['wall']:.2f}", f"{r['cpu']:.2f}", f"{r['peak'] * MB:.0f}", speed, diff,
                     multiple, f"{r['load_average']:.1f}"])
    return rows


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("numpy", "torch", "scikit-learn", "torchmetrics", "pytorch-ood", "numba"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


if __name__ == "__main__":
    main()
