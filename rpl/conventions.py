"""Label values and input normalisation shared by data, losses, metrics and evaluation (defined once).

Training targets use the segmenter's train ids ``0..K-1`` plus :data:`OUTLIER` (pasted outlier
pixels) and :data:`VOID`; anomaly test labels use :data:`INLIER` / :data:`ANOMALY` / :data:`VOID`.
"""
from __future__ import annotations

INLIER = 0  # anomaly test labels: inlier pixel
ANOMALY = 1  # anomaly test labels: anomaly pixel
OUTLIER = 254  # training targets and outlier masks: pasted outlier-exposure pixel
VOID = 255  # ignored everywhere (void, padding, outside the ROI)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # input normalisation after /255 (torchvision / timm convention)
IMAGENET_STD = (0.229, 0.224, 0.225)
