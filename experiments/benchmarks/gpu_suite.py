"""The CUDA path in one run: CUDA tests, training step, inference overhead, rpl-eval, every method under bf16.

    bash experiments/benchmarks/gpu_suite.sh                 # on a GPU machine, from a clean checkout
    python experiments/benchmarks/gpu_suite.py --dry-run     # anywhere: what it would run, flags checked

GPU time is short and lent by chance, so the suite is one prepared script with a wall-clock budget
(``--budget``, default 420 s, inside the 8 minutes the GPU issue allows with installs): steps run in
order of value, each under its own timeout cut to what is left, and a step that fails or times out
is recorded as such while the rest go on. Every figure lands in one JSON (``--out``, default
``gpu_suite.json``) together with the device name from ``torch.cuda.get_device_name`` and the date;
the checks against the GPU targets are computed from the figures, never typed in:

- training step (torchvision DeepLabV3-ResNet101, 700x700, batch 8 + 8 context, RPL+CoroCL):
  ours (bf16 autocast, channels_last, frozen forward without autograd) >= 2x the reference-style fp32
  step's images/s at <= 0.6x its peak ``torch.cuda.max_memory_allocated``;
- inference at 1024x2048, bf16: wrapped (both outputs) <= 1.30x the bare segmenter with the
  reference-sized block (256), <= 1.10x with the light one (64), eager and ``torch.compile``;
- ``rpl-eval`` end to end on a generated 1024x2048 set >= 3x the reference-style loop.

Each step is a command of its own (the benchmark scripts beside this file, pytest, rpl-train), so a
crash in one cannot take the others down and each measures in a fresh process.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
TARGETS = {
    "train_speedup": 2.0,  # ours / reference images per second, at least
    "train_memory_ratio": 0.6,  # ours / reference peak memory, at most
    "overhead_reference_block": 0.30,  # wrapped / bare - 1, bf16, block width 256, at most
    "overhead_light_block": 0.10,  # the same with block width 64
    "eval_speedup": 3.0,  # rpl-eval / reference loop images per second, at least
}
REFERENCE_BLOCK, LIGHT_BLOCK = "block 256 (reference)", "block 64 (light)"


@dataclass
class Step:
    """One command of the suite; ``{tmp}`` in ``argv`` is the suite's scratch folder."""

    name: str
    argv: list[str]
    timeout: int
    what: str
    result_file: str | None = None  # JSON the command writes (under {tmp}), kept in the suite's JSON
    script: Path | None = None  # benchmark script whose --help must list the flags used
    flags: list[str] = field(default_factory=list)


def python() -> str:
    return sys.executable or "python3"


def steps() -> list[Step]:
    """The suite, most valuable first (the budget may cut the tail)."""
    py = python()
    bench = lambda name: str(HERE / name)  # noqa: E731
    return [
        Step("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
                            str(REPO_ROOT / "tests"), "--junitxml", "{tmp}/cuda_tests.xml"], 180,
             "the CUDA-only tests (pytest -m cuda)"),
        Step("methods", [py, str(Path(__file__).resolve()), "--methods-step", "--json", "{tmp}/methods.json"], 150,
             "one bf16 training step of every trainable method on a small SynthStreets world",
             "methods.json"),
        Step("train_step", [py, bench("train_step.py"), "--setups", "gpu-resnet101", "--rounds", "1", "--repeats", "5",
                            "--json", "{tmp}/train_step.json"], 180,
             "training step at the paper's scale: ours (bf16, channels_last) against the reference-style fp32 step",
             "train_step.json", HERE / "train_step.py", ["--setups", "--rounds", "--repeats", "--json"]),
        Step("inference", [py, bench("inference.py"), "--setups", "gpu", "--rounds", "1", "--json",
                           "{tmp}/inference.json"], 120,
             "inference overhead at 1024x2048: bare against wrapped, blocks 256 and 64, fp32 and bf16",
             "inference.json", HERE / "inference.py", ["--setups", "--rounds", "--json"]),
        Step("eval_pipeline", [py, bench("eval_pipeline.py"), "--device", "cuda", "--images", "30", "--size",
                               "1024x2048", "--json", "{tmp}/eval_pipeline.json"], 180,
             "rpl-eval end to end on 30 generated 1024x2048 images against the reference-style loop",
             "eval_pipeline.json", HERE / "eval_pipeline.py", ["--device", "--images", "--size", "--json"]),
        Step("inference_compiled", [py, bench("inference.py"), "--setups", "gpu", "--rounds", "1", "--repeats", "5",
                                    "--compile", "default", "--json", "{tmp}/inference_compiled.json"], 240,
             "the same inference overhead under torch.compile (mode default)",
             "inference_compiled.json", HERE / "inference.py", ["--setups", "--compile", "--json"]),
    ]


# -- the methods step (runs in its own process) ---------------------------------------------------
def trainable_methods() -> list[str]:
    """Every method of the registry that trains (RPL alone before the registry existed)."""
    try:
        from rpl import methods
    except ImportError:
        return ["rpl"]
    names = []
    for name in methods.available():
        method = methods.get(name)
        if getattr(method, "trains", True):
            names.append(name)
    return names


def methods_step(json_path: str, device: str = "cuda") -> int:
    """Generate a small world, then two ``rpl-train`` steps per method under bf16 on ``device``."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("methods step: CUDA is not available", file=sys.stderr)
        return 2
    from rpl.cli.train import main as train_main
    from rpl.data.synthstreets import generate

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rpl_gpu_methods_") as tmp:
        root = Path(tmp) / "synthstreets"
        generate(root, seed=0, scale=0.05)
        for name in trainable_methods():
            sets = {"data.root": str(root), "optim.iterations": 2, "optim.batch_size": 2, "train.device": device,
                    "train.amp": "bf16", "train.val_every": 0, "train.evaluate_after": False,
                    "train.checkpoint_every": 2}
            if name != "rpl" or _has_method_key():
                sets["method"] = name
            argv = ["--work-dir", str(Path(tmp) / name), "--quiet"]
            for key, value in sets.items():
                argv += ["--set", f"{key}={value}"]
            t0 = time.perf_counter()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                code = train_main(argv)
                error = None
            except Exception as err:  # recorded, the next method still runs
                code, error = 1, f"{type(err).__name__}: {err}"
            results[name] = {"exit_code": code, "seconds": time.perf_counter() - t0, "error": error,
                             "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
            print(f"  {name}: exit {code} in {results[name]['seconds']:.1f} s", flush=True)
    Path(json_path).write_text(json.dumps(results, indent=1))
    return 0 if all(r["exit_code"] == 0 for r in results.values()) else 1


def _has_method_key() -> bool:
    from rpl.config import Config

    return "method" in Config.__dataclass_fields__


# -- figures against the targets ------------------------------------------------------------------
def _median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def train_figures(raw: dict[str, Any]) -> dict[str, Any]:
    runs = raw["results"]["gpu-resnet101"]
    figures = {}
    for variant, variant_runs in runs.items():
        t = _median([t for run in variant_runs for t in run["times"]])
        figures[variant] = {"seconds_per_step": t, "images_per_second": variant_runs[0]["images_per_step"] / t,
                            "peak_gib": _median([run["peak_bytes"] for run in variant_runs]) / 2**30}
    ours, ref = figures["ours"], figures["reference"]
    speed = ours["images_per_second"] / ref["images_per_second"]
    memory = ours["peak_gib"] / ref["peak_gib"]
    return {"variants": figures, "speedup": speed, "memory_ratio": memory,
            "meets_speed_target": speed >= TARGETS["train_speedup"],
            "meets_memory_target": memory <= TARGETS["train_memory_ratio"]}


def inference_figures(raw: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for entry in raw["results"]:
        if entry["device"] != "cuda":
            continue
        times = {k: _median([v for run in entry["runs"] for v in run["times"][k]]) for k in entry["runs"][0]["times"]}
        row = {"model": entry["model"], "precision": entry["precision"], "channels_last": entry["channels_last"],
               "bare_ms": 1000 * times["bare"]}
        for block, key, target in ((REFERENCE_BLOCK, "reference_block", "overhead_reference_block"),
                                   (LIGHT_BLOCK, "light_block", "overhead_light_block")):
            overhead = times[block] / times["bare"] - 1
            row[f"{key}_ms"] = 1000 * times[block]
            row[f"{key}_overhead"] = overhead
            if entry["precision"] == "bf16":
                row[f"{key}_meets_target"] = overhead <= TARGETS[target]
        rows.append(row)
    return {"rows": rows}


def eval_figures(raw: dict[str, Any]) -> dict[str, Any]:
    runs = raw["runs"]
    seconds = {variant: _median([run["seconds"] for run in variant_runs]) for variant, variant_runs in runs.items()}
    ours = seconds.get("rpl-eval")
    ref = seconds.get("reference")
    out: dict[str, Any] = {"seconds": seconds, "images": raw["images"], "size": raw["size"]}
    if ours and ref:
        out["speedup"] = ref / ours
        out["meets_target"] = out["speedup"] >= TARGETS["eval_speedup"]
    return out


FIGURES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train_step": train_figures, "inference": inference_figures, "inference_compiled": inference_figures,
    "eval_pipeline": eval_figures,
}


# -- the runner -------------------------------------------------------------------------------------
def declared_flags(script: Path) -> set[str]:
    """The options ``script`` declares: ``add_argument("--x", ...)`` calls read from its source (and those of
    ``common.add_common_arguments`` when it calls that), without importing it (no torch start-up per check)."""
    import ast

    tree = ast.parse(script.read_text(), filename=str(script))
    flags: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Attribute, ast.Name)):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        if name == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
        elif name == "add_common_arguments" and script.name != "common.py":
            flags |= declared_flags(script.with_name("common.py"))
    return flags


def check_flags(step: Step) -> str | None:
    """None when ``step.script`` declares every flag the suite passes, else what is missing."""
    if step.script is None:
        return None
    if not step.script.is_file():
        return f"{step.script} does not exist"
    missing = [f for f in step.flags if f not in declared_flags(step.script)]
    return f"{step.script.name} has no option(s) {', '.join(missing)}" if missing else None


def skeleton(device: str | None) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "device": device, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "targets": TARGETS, "steps": {}}


def run_step(step: Step, tmp: Path, remaining: float) -> dict[str, Any]:
    argv = [a.replace("{tmp}", str(tmp)) for a in step.argv]
    timeout = max(1, int(min(step.timeout, remaining)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
        tail = (proc.stdout + proc.stderr)[-4000:]
        code = proc.returncode
    except subprocess.TimeoutExpired as err:
        status, code = "timeout", None
        tail = ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or ""))
        tail = tail[-4000:]
    record: dict[str, Any] = {"status": status, "exit_code": code, "seconds": time.perf_counter() - t0,
                              "timeout": timeout, "command": argv, "output_tail": tail}
    if step.result_file and (tmp / step.result_file).is_file():
        raw = json.loads((tmp / step.result_file).read_text())
        record["raw"] = raw
        if step.name in FIGURES:
            try:
                record["figures"] = FIGURES[step.name](raw)
            except (KeyError, ZeroDivisionError, IndexError) as err:
                record["figures_error"] = f"{type(err).__name__}: {err}"
    print(f"[{step.name}] {status} in {record['seconds']:.0f} s", flush=True)
    return record


def summary_table(report: dict[str, Any]) -> str:
    lines = [f"GPU suite on {report['device']} ({report['date'][:10]})", "",
             "| step | status | seconds | figure | target | met |", "|---|---|---|---|---|---|"]
    for name, rec in report["steps"].items():
        fig = rec.get("figures") or {}
        cells: list[tuple[str, str, str]] = []
        if name == "train_step" and fig:
            cells = [(f"speed-up {fig['speedup']:.2f}x", ">= 2x", str(fig["meets_speed_target"])),
                     (f"memory {fig['memory_ratio']:.2f}x", "<= 0.6x", str(fig["meets_memory_target"]))]
        elif name.startswith("inference") and fig:
            for row in fig["rows"]:
                if row["precision"] == "bf16":
                    cells += [(f"{row['model']} bf16 block 256 {100 * row['reference_block_overhead']:+.0f} %",
                               "<= +30 %", str(row.get("reference_block_meets_target"))),
                              (f"{row['model']} bf16 block 64 {100 * row['light_block_overhead']:+.0f} %",
                               "<= +10 %", str(row.get("light_block_meets_target")))]
        elif name == "eval_pipeline" and "speedup" in fig:
            cells = [(f"speed-up {fig['speedup']:.2f}x", ">= 3x", str(fig["meets_target"]))]
        if not cells:
            cells = [("-", "-", "-")]
        for i, (figure, target, met) in enumerate(cells):
            head = (name, rec["status"], f"{rec['seconds']:.0f}") if i == 0 else ("", "", "")
            lines.append(f"| {' | '.join(head)} | {figure} | {target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps, check their flags, write the JSON "
                                                               "skeleton; needs no GPU")
    parser.add_argument("--out", default="gpu_suite.json", help="the JSON of every figure (default gpu_suite.json)")
    parser.add_argument("--budget", type=float, default=420.0, help="wall-clock seconds for all steps (default 420)")
    parser.add_argument("--only", help="comma-separated step names to run (default: all)")
    parser.add_argument("--methods-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--methods-device", default="cuda", help=argparse.SUPPRESS)  # cpu: to try the step here
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.methods_step:
        return methods_step(args.json, args.methods_device)
    chosen = steps()
    if args.only:
        wanted = [s.strip() for s in args.only.split(",")]
        unknown = sorted(set(wanted) - {s.name for s in chosen})
        if unknown:
            parser.error(f"--only: unknown step(s) {unknown}; known: {', '.join(s.name for s in chosen)}")
        chosen = [s for s in chosen if s.name in wanted]
    if args.dry_run:
        report = skeleton(None)
        problems = []
        for step in chosen:
            problem = check_flags(step)
            print(f"{step.name:20s} {step.timeout:4d} s  {step.what}\n    {' '.join(step.argv)}"
                  + (f"\n    PROBLEM: {problem}" if problem else ""))
            report["steps"][step.name] = {"status": "planned", "timeout": step.timeout, "command": step.argv,
                                          "problem": problem}
            problems += [problem] if problem else []
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"\n{len(chosen)} steps, {sum(s.timeout for s in chosen)} s of timeouts under a {args.budget:.0f} s "
              f"budget; skeleton written to {args.out}")
        return 2 if problems else 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or pass --dry-run to check the suite here.", file=sys.stderr)
        return 2
    report = skeleton(torch.cuda.get_device_name(0))
    report["torch"] = torch.__version__
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rpl_gpu_suite_") as tmp:
        for step in chosen:
            remaining = args.budget - (time.perf_counter() - start)
            if remaining < 20:
                report["steps"][step.name] = {"status": "not run (budget spent)", "seconds": 0.0}
                continue
            report["steps"][step.name] = run_step(step, Path(tmp), remaining)
            Path(args.out).write_text(json.dumps(report, indent=1))  # what ran so far survives a kill
            if step.name == "cuda_tests" and (Path(tmp) / "cuda_tests.xml").is_file():
                shutil.copy(Path(tmp) / "cuda_tests.xml", Path(args.out).with_suffix(".junit.xml"))
    report["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("\n" + summary_table(report))
    return 0 if all(rec["status"] == "ok" for rec in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
