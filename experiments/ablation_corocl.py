"""CoroCL ablation on SynthStreets: RPL with and without the contrastive loss, over several seeds.

    python experiments/ablation_corocl.py                       # seeds 0 1 2, both variants, then the table
    python experiments/ablation_corocl.py --seeds 0 --markdown ablation.md

Each run is the README's main command with two overrides: ``rpl-train --set train.seed=S`` (RPL+CoroCL,
the default config) and ``rpl-train --set train.seed=S --set loss.contrastive=0`` (RPL alone), each
followed by ``rpl-eval`` of its ``best.safetensors`` on the three SynthStreets test sets (rpl-train
does that itself and writes ``eval.json``). A run whose ``eval.json`` exists is reused, so the script
can be stopped and started again. The post-hoc baselines score the frozen segmenter, so they do not
depend on the seed; they are read from the first run.

The table gives mean and sample standard deviation over seeds of AUROC / AP / FPR@95 (in %) per set,
and the per-seed values, so the run-to-run spread is visible.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETS = ("synthstreets-anomaly", "synthstreets-rural", "synthstreets-obstacle")
VARIANTS = {"RPL+CoroCL": [], "RPL (no CoroCL)": ["--set", "loss.contrastive=0"]}
BASELINES = ("energy", "maxlogit", "msp", "entropy")
METRICS = ("auroc", "ap", "fpr95")


def run_dir(root: Path, variant: str, seed: int) -> Path:
    return root / f"{'corocl' if variant == 'RPL+CoroCL' else 'no_corocl'}_seed{seed}"


def train_and_evaluate(work_dir: Path, seed: int, extra: list[str]) -> dict:
    result = work_dir / "eval.json"
    if not result.exists():
        # a run cut short before its evaluation is started again (rpl-train refuses a used work dir otherwise)
        cmd = [sys.executable, "-m", "rpl.cli.train", "--work-dir", str(work_dir), "--set", f"train.seed={seed}",
               *extra, *(["--overwrite"] if work_dir.exists() else [])]
        print("$ " + " ".join(cmd), flush=True)
        start = time.time()
        subprocess.run(cmd, check=True)
        print(f"  {work_dir.name}: {time.time() - start:.0f} s", flush=True)
    return json.loads(result.read_text())


def rows_by(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["dataset"], r["method"]): r for r in report["results"]}


def fmt(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def table(reports: dict[str, list[dict]], seeds: list[int]) -> str:
    head = "| method | " + " | ".join(f"{s.removeprefix('synthstreets-')} AUROC / AP / FPR95" for s in SETS) + " |"
    lines = [head, "|---" * (len(SETS) + 1) + "|"]
    for variant, runs in reports.items():
        cells = []
        for s in SETS:
            values = {m: [rows_by(r)[(s, "rpl")][m] for r in runs] for m in METRICS}
            cells.append(" / ".join(fmt(values[m]) for m in METRICS))
        lines.append(f"| {variant} (seeds {', '.join(map(str, seeds))}) | " + " | ".join(cells) + " |")
    first = rows_by(next(iter(reports.values()))[0])
    for method in BASELINES:
        cells = [" / ".join(f"{100 * first[(s, method)][m]:.2f}" for m in METRICS) for s in SETS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (AP / FPR95, %):", ""]
    for variant, runs in reports.items():
        for seed, r in zip(seeds, runs):
            rows = rows_by(r)
            cells = ", ".join(f"{s.removeprefix('synthstreets-')} {100 * rows[(s, 'rpl')]['ap']:.2f} / "
                              f"{100 * rows[(s, 'rpl')]['fpr95']:.2f}" for s in SETS)
            lines.append(f"- {variant}, seed {seed}: {cells}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work-root", default="work_dirs/ablation")
    p.add_argument("--markdown", help="also write the table here")
    args = p.parse_args(argv)
    root = Path(args.work_root)
    reports = {v: [train_and_evaluate(run_dir(root, v, s), s, extra) for s in args.seeds]
               for v, extra in VARIANTS.items()}
    text = table(reports, args.seeds)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
