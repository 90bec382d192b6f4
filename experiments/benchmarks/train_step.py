"""Training-step benchmark: ``rpl.training.Trainer.step`` against a reference-style RPL step.

    python experiments/benchmarks/train_step.py            # CPU: embedded config, batch 8 + 8; GPU: + ResNet-101
    python experiments/benchmarks/train_step.py --quick    # CPU: batch 2 + 2, one round

Both steps train the same wrapped model (same seed, same random-init weights) on the same batch
of street crops with pasted outliers (254) plus as many CoroCL context images, with the same
losses (``rpl.losses.rpl_loss``) and Adam groups:

- ``ours``: the real ``Trainer._forward_loss`` + ``Trainer.step`` (a ``Trainer`` whose data
  loading is left out, built as ``rpl.training.build_trainer`` builds it), with the config's precision and memory format: on CPU the embedded
  default is fp32 and contiguous (``train.amp=auto`` means fp32 on CPU); on CUDA bf16 autocast
  and ``channels_last``. The ``channels_last`` row on CPU is the option a user can switch on
  (``train.channels_last``). bf16 autocast is left out on CPU: without bf16 units (AVX-512 BF16
  or AMX) its convolutions are several times slower than fp32.
- ``reference``: what the RPL reference code does, written here: the whole forward in fp32 under
  autograd (no ``no_grad``/``inference_mode`` anywhere, the frozen parameters only carry
  ``requires_grad=False``), the closed-set logits taken from the forward's raw output, detached
  only inside the loss, ``loss.backward()``, ``optimizer.step()``, ``loss.item()`` for the log.

Each (variant, round) runs in a fresh process: 2 unmeasured warm-up steps, then ``--repeats``
timed steps (CUDA synchronised). images/s counts street + context images (16 per step at
batch 8), as ``rpl-train`` logs it. Peak memory is what the steps add on top of the built model
and batch: host RSS high-water mark on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (MB, PeakMemory, add_common_arguments, describe, machine,  # noqa: E402
                    markdown_table, median, run_worker, served_as_worker, time_calls,
                    write_json)
from rpl.config import Config  # noqa: E402
from rpl.losses import rpl_loss  # noqa: E402
from rpl.training import Trainer, build_model, build_wrapped, parameter_groups, poly_lambda  # noqa: E402
from rpl.wrapping import extract_logits  # noqa: E402

TORCHVISION_R101 = "torchvision.models.segmentation:deeplabv3_resnet101"
SETUPS: dict[str, dict[str, Any]] = {
    # the embedded default (rpl/config.py): DeepLabV3Plus over resnet10t, widths 64, block width 64
    "cpu-embedded": {"device": "cpu", "crop": [192, 384], "batch": 8, "width": None, "segmenter": None,
                     "variants": {"reference": {}, "ours": {},
                                  "ours, channels_last": {"channels_last": True}}},
    # the reference recipe's scale: DeepLabV3-ResNet101, 700 x 700 crops, reference-sized block
    "gpu-resnet101": {"device": "cuda", "crop": [700, 700], "batch": 8, "width": 256,
                      "segmenter": {"model": TORCHVISION_R101, "weights": None,
                                    "kwargs": {"weights": None, "weights_backbone": None, "num_classes": 19}},
                      "variants": {"reference": {"amp": "off"},
                                   "ours": {"amp": "auto", "channels_last": True},
                                   "ours, bf16 without channels_last": {"amp": "auto"}}},
}


def make_config(setup: dict[str, Any], variant: dict[str, Any]) -> Config:
    """The training config of a setup: random-init segmenter (no weights file), the variant's options."""
    cfg = Config()
    cfg.segmenter.weights = None
    if setup["segmenter"]:
        cfg.segmenter.model = setup["segmenter"]["model"]
        cfg.segmenter.kwargs = dict(setup["segmenter"]["kwargs"])
    if setup["width"] is not None:
        cfg.wrap.width = setup["width"]
    cfg.data.crop_size = list(setup["crop"])
    cfg.optim.batch_size = setup["batch"]
    cfg.train.device = setup["device"]
    cfg.train.amp = variant.get("amp", "auto")
    cfg.train.channels_last = variant.get("channels_last", False)
    return cfg


def make_batch(batch: int, crop: tuple[int, int], num_classes: int = 19, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the training DataLoader yields: normalised crops, targets with a pasted outlier (254) and a
    void strip (255), context images with objects (254) on background (0) and padding (255)."""
    g = torch.Generator().manual_seed(seed)
    h, w = crop
    target = torch.randint(0, num_classes, (batch, h, w), generator=g)
    context_target = torch.zeros(batch, h, w, dtype=torch.int64)
    for i in range(batch):
        top, left = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
        target[i, top:top + h // 4, left:left + w // 5] = 254
        context_target[i, h // 4:3 * h // 4, w // 3:2 * w // 3] = 254
    target[:, -h // 16:] = 255
    context_target[:, :, : w // 16] = 255
    return {"image": torch.randn(batch, 3, h, w, generator=g), "target": target,
            "context_image": torch.randn(batch, 3, h, w, generator=g), "context_target": context_target}


def StepTrainer(cfg: Config, total_steps: int = 1000) -> Trainer:
    """The real ``Trainer`` (method, model, optimiser, schedule and loss state as ``build_trainer`` makes
    them) without data sets, checkpoints or logging, so ``step`` and ``_forward_loss`` are the real ones."""
    device = torch.device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    method, model, spec, base = build_model(cfg, device)
    optimizer = torch.optim.Adam(method.parameter_groups(model, cfg.optim), lr=cfg.optim.lr)
    return Trainer(method, model, optimizer, None, cfg, None, device=device, spec=spec, base_fingerprint=base,
                   quiet=True, total_steps=total_steps)


class ReferenceStep:
    """The reference RPL training step, written out: fp32 everywhere, autograd never switched off."""

    def __init__(self, cfg: Config, total_steps: int = 1000):
        self.device = torch.device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        self.model, _ = build_wrapped(cfg, self.device)   # frozen part: eval(), requires_grad=False
        o = cfg.optim
        self.optimizer = torch.optim.Adam(parameter_groups(self.model.addon, o.lr, o.last_layer_lr_mult), lr=o.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, poly_lambda(total_steps, o.poly_power))
        self.weights = cfg.loss
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1000)

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = torch.cat([batch["image"], batch["context_image"]]).to(self.device)
        target = batch["target"].to(self.device)
        context_target = batch["context_target"].to(self.device)
        b = target.shape[0]
        out = self.model(images)
        z0 = extract_logits(out.raw)[:b]   # the closed-set pass, still attached to the forward
        emb = out.embedding
        loss, _ = rpl_loss(out.anomaly_logits[:b], z0, target, emb[:b], emb[b:], context_target, self.weights,
                           self.generator)
        return loss

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.model.train()
        self.optimizer.zero_grad()
        loss = self.forward_loss(batch)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    setup = SETUPS[spec["setup"]]
    setup = {**setup, "batch": spec["batch"]}
    cfg = make_config(setup, setup["variants"][spec["variant"]])
    runner = ReferenceStep(cfg) if spec["variant"] == "reference" else StepTrainer(cfg)
    batch = make_batch(setup["batch"], tuple(setup["crop"]))
    if runner.device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    losses: list[float] = []

    def one_step() -> None:
        result = runner.step(batch)
        losses.append(result if isinstance(result, float) else result["total"])

    memory = PeakMemory(runner.device)
    memory.start()
    times = time_calls(one_step, spec["warmup"], spec["repeats"], runner.device)
    return {"times": times, "peak_bytes": memory.peak_added(), "exact_peak": memory.exact,
            "first_loss": losses[0], "images_per_step": 2 * setup["batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 + 2, one round, 3 timed steps")
    parser.add_argument("--rounds", type=int, help="fresh processes per variant, interleaved (default 3, quick 1)")
    parser.add_argument("--repeats", type=int, help="timed steps per process (default 5, quick 3)")
    parser.add_argument("--batch", type=int, help="street crops per step (default 8, quick 2); as many context images")
    parser.add_argument("--setups", default="auto", help="comma-separated among " + ", ".join(SETUPS) +
                        " (default: cpu-embedded, plus gpu-resnet101 when CUDA is available)")
    add_common_arguments(parser)
    args = parser.parse_args()
    if served_as_worker(args, worker):
        return
    rounds = args.rounds or (1 if args.quick else 3)
    repeats = args.repeats or (3 if args.quick else 5)
    names = (["cpu-embedded"] + (["gpu-resnet101"] if torch.cuda.is_available() else [])
             if args.setups == "auto" else [s.strip() for s in args.setups.split(",")])
    info = machine(args.threads)
    print(f"Machine: {describe(info)}", flush=True)
    raw: dict[str, Any] = {"machine": info, "results": {}}
    for name in names:
        setup = SETUPS[name]
        if setup["device"] == "cuda" and not torch.cuda.is_available():
            print(f"{name}: skipped, CUDA is not available", flush=True)
            continue
        batch = args.batch or (2 if args.quick else setup["batch"])
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in setup["variants"]}
        for r in range(rounds):
            for variant in setup["variants"]:
                spec = {"setup": name, "variant": variant, "batch": batch, "warmup": 2, "repeats": repeats}
                runs[variant].append(run_worker(__file__, spec, args.threads))
                print(f"  {name} round {r + 1}/{rounds} {variant}: "
                      f"{median(runs[variant][-1]['times']):.3f} s/step", flush=True)
        raw["results"][name] = runs
        ref_time = median([t for run in runs["reference"] for t in run["times"]])
        ref_peak = median([run["peak_bytes"] for run in runs["reference"]])
        rows = []
        for variant, variant_runs in runs.items():
            t = median([t for run in variant_runs for t in run["times"]])
            peak = median([run["peak_bytes"] for run in variant_runs])
            n = variant_runs[0]["images_per_step"]
            rows.append([variant, f"{t:.3f}", f"{n / t:.2f}", f"{ref_time / t:.2f}x", f"{peak * MB:.0f}",
                         f"{peak / ref_peak:.2f}x", f"{variant_runs[0]['first_loss']:.6f}"])
        crop = "x".join(map(str, setup["crop"]))
        print(f"\n{name}: batch {batch} + {batch} context at {crop}, device {setup['device']}, {rounds} round(s) x "
              f"{repeats} steps after 2 warm-up\n")
        print(markdown_table(["variant", "s/step (median)", "images/s", "speed vs reference", "peak memory added (MB)",
                              "memory vs reference", "loss at step 1"], rows), flush=True)
    write_json(args.json, raw)


if __name__ == "__main__":
    main()
