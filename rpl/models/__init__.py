"""Segmenters shipped with the project: DeepLabv3+ over any timm ``features_only`` backbone."""
from rpl.models.deeplabv3plus import DeepLabV3Plus, build_model

__all__ = ["DeepLabV3Plus", "build_model"]
