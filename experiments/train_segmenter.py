"""Train the shipped SynthStreets segmenter: rpl's DeepLabv3+ on a small timm backbone, from scratch.

    python experiments/train_segmenter.py --data-root data/synthstreets \
        --out weights/segmenter_synthstreets.safetensors

No pretrained weights can be downloaded here, so the backbone starts from random init. The script
keeps the decoded training set in memory, trains in channels-last layout with class-weighted
cross-entropy (ENet weights 1/ln(1.02 + frequency), so poles, lights and signs count; void 255
ignored), random scale/crop/flip and colour jitter, AdamW and a poly schedule, stops at ``--epochs``
or ``--minutes`` (whichever comes first), evaluates val mIoU with
``rpl.metrics.MIoU`` and writes fp16 safetensors (kept small for ``weights/``) whose metadata records
the model spec, seed, command, time and val mIoU of the fp16 weights as they will be loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from rpl.data.cityscapes import list_cityscapes, read_cityscapes_label
from rpl.data.io import read_image
from rpl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from rpl.metrics import MIoU
from rpl.models import DeepLabV3Plus


def load_file_metadata(path: str) -> dict:
    """The metadata of the run a fine-tune starts from, kept so the shipped file records its whole history."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: v for k, v in (f.metadata() or {}).items() if k != "iou_per_class"}


class Augmented(Dataset):
    def __init__(self, pairs, seed: int, train: bool):
        self.seed, self.train, self.epoch = seed, train, 0
        self.images = [read_image(image) for image, _ in pairs]  # a few hundred MB at the default size
        self.labels = [read_cityscapes_label(label) for _, label in pairs]

    def __len__(self) -> int:
        return len(self.images)

    def class_weights(self, num_classes: int) -> torch.Tensor:
        counts = sum(np.bincount(lab.ravel(), minlength=256)[:num_classes] for lab in self.labels)
        return torch.tensor(1 / np.log(1.02 + counts / counts.sum()), dtype=torch.float32)

    def __getitem__(self, i: int):
        img, lab = self.images[i], self.labels[i]
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            h, w = lab.shape
            s = rng.uniform(0.75, 1.5)
            img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
            lab = cv2.resize(lab, (round(w * s), round(h * s)), interpolation=cv2.INTER_NEAREST)
            ph, pw = max(h - img.shape[0], 0), max(w - img.shape[1], 0)
            if ph or pw:
                img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
                lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=255)
            y, x = rng.integers(0, img.shape[0] - h + 1), rng.integers(0, img.shape[1] - w + 1)
            img, lab = img[y:y + h, x:x + w], lab[y:y + h, x:x + w]
            if rng.random() < 0.5:
                img, lab = img[:, ::-1], lab[:, ::-1]
            jitter = rng.uniform(0.8, 1.2, 3) * rng.uniform(0.8, 1.2)
            img = np.clip(img.astype(np.float32) * jitter + rng.uniform(-15, 15), 0, 255).astype(np.uint8)
        return normalize(np.ascontiguousarray(img), IMAGENET_MEAN, IMAGENET_STD), torch.from_numpy(
            np.ascontiguousarray(lab).astype(np.int64))


@torch.no_grad()
def evaluate(model, loader) -> dict:
    model.eval()
    metric = MIoU(num_classes=19)
    for x, y in loader:
        metric.update(model(x.contiguous(memory_format=torch.channels_last)).argmax(1), y)
    return metric.compute()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/synthstreets")
    p.add_argument("--out", default="weights/segmenter_synthstreets.safetensors")
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--width", type=int, default=64, help="ASPP and decoder width")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--minutes", type=float, default=65.0, help="wall-time budget")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="start from these weights (a file this script wrote) instead of random init, "
                                  "to continue a run whose time budget ran out")
    p.add_argument("--workers", type=int, default=0, help="loader processes (data is in memory)")
    args = p.parse_args(argv)
    if args.init and not Path(args.init).is_file():
        print(f"--init {args.init}: no such file; expected a .safetensors this script wrote.", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    root = Path(args.data_root)
    if not (root / "cityscapes").exists():
        from rpl.data.synthstreets import generate

        generate(root, seed=0)
    kwargs = {"backbone": args.backbone, "num_classes": 19, "output_stride": 16, "aspp_width": args.width,
              "decoder_width": args.width}
    model = DeepLabV3Plus(**kwargs)
    if args.init:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(args.init).items()})
    model = model.to(memory_format=torch.channels_last)
    train = Augmented(list_cityscapes(root / "cityscapes", "train"), args.seed, True)
    val = Augmented(list_cityscapes(root / "cityscapes", "val"), args.seed, False)
    val_loader = DataLoader(val, batch_size=8, num_workers=args.workers)
    weights = train.class_weights(19)
    steps_per_epoch = len(train) // args.batch_size
    total = args.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (1 - s / total) ** 0.9)
    start, step = time.time(), 0
    budget = args.minutes * 60
    for epoch in range(args.epochs):
        train.epoch = epoch
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        loader = DataLoader(train, batch_size=args.batch_size, num_workers=args.workers, drop_last=True,
                            sampler=torch.randperm(len(train), generator=g).tolist())
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y, weight=weights,
                                   ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0:
                print(f"epoch {epoch} step {step}/{total} loss {loss.item():.3f} "
                      f"{(time.time() - start) / 60:.1f} min", flush=True)
        if (epoch + 1) % 3 == 0:
            print(f"epoch {epoch}: val mIoU {evaluate(model, val_loader)['miou']:.4f}", flush=True)
        # stop early if the next epoch would not fit in the budget
        per_epoch = (time.time() - start) / (epoch + 1)
        if time.time() - start + per_epoch > budget:
            print(f"time budget reached after epoch {epoch}", flush=True)
            break
    seconds = time.time() - start
    # round-trip through fp16 (the shipped precision) before measuring what users will get
    model = model.to(memory_format=torch.contiguous_format)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    result = evaluate(model, val_loader)
    meta = {"model": "rpl.models:build_model", "kwargs": json.dumps(kwargs), "val_miou": f"{result['miou']:.6f}",
            "iou_per_class": json.dumps(result["iou_per_class"]), "seed": str(args.seed), "epochs_run": str(epoch + 1),
            "steps": str(step), "train_seconds": f"{seconds:.0f}", "command": " ".join(sys.argv),
            "init": json.dumps(load_file_metadata(args.init) if args.init else None),
            "data": "SynthStreets seed 0, default size"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(out), metadata=meta)
    print(json.dumps({"val_miou": result["miou"], "seconds": seconds, "steps": step, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
