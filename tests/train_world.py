"""A tiny generated training world: Cityscapes-layout inliers, COCO-layout outliers, a small segmenter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from rpl.data.io import write_image, write_label
from rpl.models import DeepLabV3Plus

SEG_KWARGS = {"backbone": "resnet18", "num_classes": 19, "output_stride": 16, "aspp_width": 16, "decoder_width": 16}


def make_world(root: Path, n_train: int = 8, n_val: int = 4, n_coco: int = 6, size=(32, 64)) -> Path:
    rng = np.random.default_rng(0)
    h, w = size
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            label = np.full((h, w), 0, np.uint8)  # road
            label[: h // 3] = 10  # sky
            label[h // 3: h // 2] = 2  # building
            label[h // 2:, : w // 6] = 1  # sidewalk
            label[-2:] = 255
            image = np.zeros((h, w, 3), np.uint8)
            for cls, colour in ((0, (90, 90, 90)), (10, (70, 130, 180)), (2, (120, 60, 40)), (1, (200, 180, 200))):
                image[label == cls] = colour
            image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
            stem = f"town_{i:06d}_000019"
            write_image(root / "cityscapes" / "leftImg8bit" / split / "town" / f"{stem}_leftImg8bit.png", image)
            write_label(root / "cityscapes" / "gtFine" / split / "town" / f"{stem}_gtFine_labelTrainIds.png", label)
    images, anns = [], []
    for j in range(n_coco):
        ch, cw = 40, 48
        img = rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8)
        write_image(root / "coco" / "train2017" / f"{j:012d}.jpg", img)
        images.append({"id": j + 1, "file_name": f"{j:012d}.jpg", "height": ch, "width": cw})
        x0, y0 = 8 + j, 6 + j
        anns.append({"id": j + 1, "image_id": j + 1, "category_id": 38, "iscrowd": 0, "area": 300.0,
                     "bbox": [x0, y0, 20, 16],
                     "segmentation": [[x0, y0, x0 + 20, y0, x0 + 20, y0 + 16, x0, y0 + 16]]})
    (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "coco" / "annotations" / "instances_train2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 38, "name": "kite"}]}))
    torch.manual_seed(0)
    save_file(DeepLabV3Plus(**SEG_KWARGS).state_dict(), str(root / "segmenter.safetensors"))
    return root


def overrides(root: Path, steps: int = 4, **extra: object) -> list[str]:
    """``--set`` items that point rpl-train at the tiny world."""
    items = {
        "data.root": str(root), "data.generate_synthstreets": False, "data.coco_min_size": 16,
        "data.crop_size": "[32,64]", "data.num_workers": 0,
        "segmenter.weights": str(root / "segmenter.safetensors"),
        "segmenter.kwargs": json.dumps(SEG_KWARGS),
        "wrap.width": 16, "optim.batch_size": 2, "optim.iterations": steps, "optim.lr": 1e-3,
        "train.log_every": 1, "train.checkpoint_every": 2, "train.val_every": 2, "train.evaluate_after": False,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]
