"""Training transforms on numpy arrays: crop, flip, normalise, outlier pasting, CoroCL context image.

Images are RGB uint8 ``(H, W, 3)``, labels uint8 ``(H, W)``. Every random choice comes from an
explicit ``numpy.random.Generator`` so a sample is a pure function of its generator's seed, whatever
process computes it.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from rpl.conventions import IMAGENET_MEAN, IMAGENET_STD, VOID as VOID_LABEL  # re-exported for the data modules
from rpl.data.coco import BACKGROUND_LABEL, OOD_LABEL

# Reference scale set; 0.5 appears twice, so it is drawn twice as often.
PASTE_SCALES = (0.25, 0.5, 0.5, 0.75, 0.1, 0.125)


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``int`` or ``(H, W)`` -> ``(H, W)``, both positive."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    return int(h), int(w)


def centre_crop_pad(array: np.ndarray, size: int | Sequence[int], pad_value: int = 0) -> np.ndarray:
    """Centre-crop each spatial side that is too large and centre-pad each that is too small.

    For odd differences the extra row/column is cropped from (or padded at) the bottom/right.
    """
    out_h, out_w = as_size(size)
    h, w = array.shape[:2]
    top, left = max(h - out_h, 0) // 2, max(w - out_w, 0) // 2
    array = array[top:top + out_h, left:left + out_w]
    h, w = array.shape[:2]
    pad_top, pad_left = (out_h - h) // 2, (out_w - w) // 2
    if h == out_h and w == out_w:
        return np.ascontiguousarray(array)
    out = np.full((out_h, out_w) + array.shape[2:], pad_value, dtype=array.dtype)
    out[pad_top:pad_top + h, pad_left:pad_left + w] = array
    return out


def random_crop(image: np.ndarray, label: np.ndarray, size: int | Sequence[int], rng: np.random.Generator,
                image_pad: int = 0, label_pad: int = VOID_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random crop of ``size``; a side shorter than the crop is first centre-padded.

    Image padding is ``image_pad`` (black), label padding ``label_pad`` (void), so padded pixels
    never enter a loss.
    """
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} differ in size")
    out_h, out_w = as_size(size)
    h, w = image.shape[:2]
    pad_h, pad_w = max(out_h, h), max(out_w, w)
    if (pad_h, pad_w) != (h, w):
        image = centre_crop_pad(image, (pad_h, pad_w), image_pad)
        label = centre_crop_pad(label, (pad_h, pad_w), label_pad)
    top = int(rng.integers(0, pad_h - out_h + 1))
    left = int(rng.integers(0, pad_w - out_w + 1))
    return (np.ascontiguousarray(image[top:top + out_h, left:left + out_w]),
            np.ascontiguousarray(label[top:top + out_h, left:left + out_w]))


def hflip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
          p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Flip image and label left-right with probability ``p`` (one draw from ``rng`` either way)."""
    if rng.random() < p:
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
    return image, label


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)``, scaled to [0, 1] then standardised."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t).contiguous()


def _resize(image: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (width, height)
    return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))


def paste_outlier(street_image: np.ndarray, street_label: np.ndarray, ood_image: np.ndarray,
                  ood_mask: np.ndarray, rng: np.random.Generator,
                  scales: Sequence[float] = PASTE_SCALES) -> tuple[np.ndarray, np.ndarray]:
    """Paste the object pixels (``ood_mask == 254``) of an outlier image into a street crop.

    The outlier image and mask are rescaled by a factor drawn uniformly from ``scales`` (image
    bilinear, mask nearest) and centre-cropped/padded to the street crop's size. The bounding box
    of the remaining object pixels is then placed at a uniformly random offset such that the whole
    box lies inside the crop (every valid offset equally likely), and only the object pixels are
    copied; they get label 254. Every other pixel is returned unchanged. If no object pixel survives
    the rescale and crop, the street crop is returned as is.
    """
    if street_image.shape[:2] != street_label.shape[:2] or ood_image.shape[:2] != ood_mask.shape[:2]:
        raise ValueError("paste_outlier needs image/label pairs of equal spatial size")
    crop_h, crop_w = street_label.shape[:2]
    scale = float(scales[int(rng.integers(0, len(scales)))])
    ood_image, ood_mask = _resize(ood_image, ood_mask, scale)
    ood_image = centre_crop_pad(ood_image, (crop_h, crop_w), 0)
    ood_mask = centre_crop_pad(ood_mask, (crop_h, crop_w), BACKGROUND_LABEL)
    image, label = street_image.copy(), street_label.copy()
    rows, cols = np.nonzero(ood_mask == OOD_LABEL)
    if rows.size == 0:
        return image, label
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    top = int(rng.integers(0, crop_h - (y1 - y0) + 1))
    left = int(rng.integers(0, crop_w - (x1 - x0) + 1))
    dst_rows, dst_cols = rows - y0 + top, cols - x0 + left
    image[dst_rows, dst_cols] = ood_image[rows, cols]
    label[dst_rows, dst_cols] = OOD_LABEL
    return image, label


def context_image(ood_image: np.ndarray, ood_mask: np.ndarray,
                  size: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The CoroCL context view: the outlier image at its own scale, centre-cropped/padded to ``size``.

    Labels: 254 object, 0 background, 255 where padded, so padding enters neither context pool.
    """
    if ood_image.shape[:2] != ood_mask.shape[:2]:
        raise ValueError("context_image needs an image and mask of equal spatial size")
    label = np.where(ood_mask == OOD_LABEL, OOD_LABEL, BACKGROUND_LABEL).astype(np.uint8)
    return centre_crop_pad(ood_image, size, 0), centre_crop_pad(label, size, VOID_LABEL)
