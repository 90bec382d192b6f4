"""Datasets, on-disk layouts and data transforms.

Submodules: ``io`` (image/label files), ``anomaly`` (anomaly test sets), ``cityscapes``,
``coco`` (outlier exposure preparation), ``transforms`` (crops, pasting), ``synthstreets``.
"""
