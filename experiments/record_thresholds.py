"""Record the validation thresholds in an add-on checkpoint written before rpl-train recorded them.

    python experiments/record_thresholds.py weights/rpl_synthstreets.safetensors

rpl-train now stores, next to the validation AP / AUROC / FPR@95 of the selected checkpoint, the
FPR@95 and best-F1 thresholds of that validation (``extra.metrics.val``), which ``rpl-predict --save
mask`` uses when no ``--threshold`` is given. For an older file this script re-runs the same
validation (the run's recorded ``train_config``: held-out inlier val streets with held-out outlier
objects pasted in) on the file's add-on, checks that it reproduces the recorded AUROC / AP / FPR@95
(else it stops and changes nothing), and adds the thresholds to the metadata. The tensors are not
touched. Run from the repository root (the recorded data and weight paths are relative to it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from rpl.checkpoint import atomic_save_file, load_addon, read_metadata
from rpl.config import load_config
from rpl.training import build_trainer

AGREE = 1e-6  # recorded and re-run metrics must agree this closely (same data, same weights, CPU)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    args = p.parse_args(argv)
    path = Path(args.checkpoint)
    meta = read_metadata(path)
    extra = meta["extra"]
    recorded = (extra.get("metrics") or {}).get("val") or {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        train_config = dict(extra["train_config"])
        train_config["train"] = {**train_config["train"], "evaluate_after": False}
        config.write_text(yaml.safe_dump(train_config))
        trainer = build_trainer(load_config(config), Path(tmp) / "run", quiet=True)
        load_addon(path, trainer.model)
        metrics = trainer.validate()
    for key in ("auroc", "ap", "fpr95"):
        if key in recorded and abs(recorded[key] - metrics[key]) > AGREE:
            raise SystemExit(f"re-run validation gives {key} {metrics[key]:.8f}, the file records {recorded[key]:.8f}: "
                             "not the same validation, so nothing was changed")
    extra.setdefault("metrics", {})["val"] = {**recorded, **metrics}
    with safe_open(str(path), framework="pt") as fh:
        raw = dict(fh.metadata())
    raw["extra"] = json.dumps(extra)
    atomic_save_file(load_file(str(path)), path, raw)
    print(f"{path}: validation {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
