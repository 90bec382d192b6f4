"""The RPL training set: inlier street crops with one pasted outlier each, plus the CoroCL context view.

Reproducibility: every random choice of item ``i`` in epoch ``e`` comes from a generator seeded by
``(seed, e, i)``, and the outlier assigned to each inlier in epoch ``e`` from one seeded by
``(seed, e)``. A sample therefore does not depend on which worker process builds it, on
``num_workers``, on the sampler's order or on the number of DDP ranks. The epoch lives in shared
memory, so ``set_epoch`` reaches persistent data-loader workers too (call it before iterating, as
with ``DistributedSampler.set_epoch``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from rpl.data.coco import BACKGROUND_LABEL, OOD_LABEL
from rpl.data.io import read_image, read_label
from rpl.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, PASTE_SCALES, VOID_LABEL, as_size, context_image,
                                 hflip, normalize, paste_outlier, random_crop)
from rpl.errors import RPLInputError

PathPair = tuple[Union[str, os.PathLike], Union[str, os.PathLike]]
_ASSIGNMENT_STREAM, _ITEM_STREAM = 0, 1  # keep the two kinds of generators apart


def draw_ood_assignment(num_inliers: int, num_ood: int, seed: int, epoch: int) -> np.ndarray:
    """The outlier index for each inlier index in ``epoch``: a random subset as large as the inlier set.

    With at least as many outliers as inliers, each outlier is used at most once per epoch. With
    fewer, whole random permutations of the outliers are concatenated, so each is used
    ``num_inliers // num_ood`` or one more times (drawing with replacement, but balanced).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, _ASSIGNMENT_STREAM)))
    if num_ood >= num_inliers:
        return rng.choice(num_ood, size=num_inliers, replace=False)
    rounds = -(-num_inliers // num_ood)
    return np.concatenate([rng.permutation(num_ood) for _ in range(rounds)])[:num_inliers]


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one training item; independent of worker and process."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, _ITEM_STREAM, index)))


class OutlierExposureDataset(Dataset):
    """Inlier crops with pasted outliers (``image``/``target``) and the outlier's context view.

    Each item is a dict of tensors: ``image`` float32 (3, H, W) normalised, ``target`` int64 (H, W)
    with train ids ``0..num_classes-1``, 254 pasted outlier, 255 void; ``context_image`` float32
    (3, H, W) and ``context_target`` int64 (H, W) with 0 background, 254 object, 255 padding.
    The default collate stacks them into batches.

    ``inlier_pairs`` are (image, train-id label) files such as ``rpl.data.cityscapes.list_cityscapes``
    returns; ``ood_pairs`` are (image, 0/254 mask) files such as ``rpl.data.coco.load_ood_manifest``
    returns. Shuffling the inliers is the sampler's job.
    """

    def __init__(self, inlier_pairs: Sequence[PathPair], ood_pairs: Sequence[PathPair],
                 crop_size: int | Sequence[int], flip_p: float = 0.5, seed: int = 0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 num_classes: int = 19, scales: Sequence[float] = PASTE_SCALES, paste_prob: float = 1.0) -> None:
        self.inlier_pairs = [(Path(i), Path(l)) for i, l in inlier_pairs]
        self.ood_pairs = [(Path(i), Path(m)) for i, m in ood_pairs]
        if not self.inlier_pairs:
            raise RPLInputError("The inlier training set is empty; expected at least one (image, label) pair "
                                "(check the data root and split of the inlier data set).")
        if not self.ood_pairs:
            raise RPLInputError("The outlier-exposure set is empty; expected at least one (image, mask) pair "
                                "(build it with `rpl-data coco-ood`).")
        try:
            self.crop_size = as_size(crop_size)
        except (TypeError, ValueError):
            raise RPLInputError(f"crop size {crop_size!r} is invalid; expected a positive int or (H, W).") from None
        if int(seed) < 0:
            raise RPLInputError(f"seed {seed} is invalid; expected a non-negative integer.")
        if not 0.0 <= flip_p <= 1.0:
            raise RPLInputError(f"flip probability {flip_p} is invalid; expected a value in [0, 1].")
        if not 1 <= num_classes <= OOD_LABEL:
            raise RPLInputError(
                f"num_classes {num_classes} is invalid; expected 1..{OOD_LABEL} (254 and 255 are reserved)."
            )
        if not 0.0 <= paste_prob <= 1.0:
            raise RPLInputError(f"paste probability {paste_prob} is invalid; expected a value in [0, 1].")
        self.paste_prob = float(paste_prob)
        if not scales or any(s <= 0 for s in scales):
            raise RPLInputError(f"paste scales {tuple(scales)} are invalid (data.paste_scales in an rpl-train "
                                "config); expected one or more positive factors.")
        self.flip_p, self.seed, self.num_classes = float(flip_p), int(seed), int(num_classes)
        self.mean, self.std, self.scales = tuple(mean), tuple(std), tuple(scales)
        # Shared memory, so persistent workers see set_epoch; each process caches its assignment.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._assignment_epoch: int | None = None
        self._assignment = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.inlier_pairs)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: re-draws the outlier assignment and every item's randomness."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def ood_assignment(self, epoch: int | None = None) -> np.ndarray:
        """The outlier index used by each inlier index in ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._assignment_epoch != epoch:
            self._assignment = draw_ood_assignment(len(self.inlier_pairs), len(self.ood_pairs), self.seed, epoch)
            self._assignment_epoch = epoch
        return self._assignment

    def _read_inlier(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.inlier_pairs[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise RPLInputError(
                f"Inlier image {image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} is "
                f"{label.shape[1]}x{label.shape[0]}; expected an image and label of the same size."
            )
        bad = (label >= self.num_classes) & (label != VOID_LABEL)
        if bad.any():
            values = np.unique(label[bad])[:8].tolist()
            raise RPLInputError(
                f"Label file {label_path} holds values {values}; expected train ids 0..{self.num_classes - 1} "
                f"and {VOID_LABEL} for void (for Cityscapes the *_gtFine_labelTrainIds.png files)."
            )
        return image, label

    def _read_ood(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.ood_pairs[index]
        image, mask = read_image(image_path), read_label(mask_path)
        if image.shape[:2] != mask.shape:
            raise RPLInputError(
                f"Outlier image {image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} is "
                f"{mask.shape[1]}x{mask.shape[0]}; expected an image and mask of the same size."
            )
        bad = (mask != OOD_LABEL) & (mask != BACKGROUND_LABEL)
        if bad.any():
            raise RPLInputError(
                f"Outlier mask {mask_path} holds values {np.unique(mask[bad])[:8].tolist()}; expected "
                f"{BACKGROUND_LABEL} background and {OOD_LABEL} object (as written by `rpl-data coco-ood`)."
            )
        return image, mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        epoch = self.epoch  # read once: set_epoch may run in another process
        rng = item_rng(self.seed, epoch, index)
        ood_index = int(self.ood_assignment(epoch)[index])
        image, label = self._read_inlier(index)
        image, label = random_crop(image, label, self.crop_size, rng, image_pad=0, label_pad=VOID_LABEL)
        image, label = hflip(image, label, rng, self.flip_p)
        ood_image, ood_mask = self._read_ood(ood_index)
        if self.paste_prob >= 1.0 or rng.random() < self.paste_prob:  # p = 1 keeps the stream unchanged
            image, label = paste_outlier(image, label, ood_image, ood_mask, rng, self.scales)
        ctx_image, ctx_label = context_image(ood_image, ood_mask, self.crop_size)
        return {
            "image": normalize(image, self.mean, self.std),
            "target": torch.from_numpy(label.astype(np.int64)),
            "context_image": normalize(ctx_image, self.mean, self.std),
            "context_target": torch.from_numpy(ctx_label.astype(np.int64)),
            "index": torch.tensor(index),  # names the images in messages (a NaN loss)
        }
