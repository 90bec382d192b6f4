"""Segmenters shipped with the project: DeepLabv3+ over any timm ``features_only`` backbone."""
from rpl.models.deeplabv3plus import DeepLabV3Plus, build_model
from rpl.models.loading import SegmenterSpec, build_segmenter, read_state_dict

__all__ = ["DeepLabV3Plus", "build_model", "SegmenterSpec", "build_segmenter", "read_state_dict"]
