"""Segmenters shipped with the project: DeepLabv3+ over any timm ``features_only`` backbone, and the
paper's DeepLabv3+ WideResNet38 with the keys of NVIDIA's published Cityscapes checkpoint."""
from rpl.models.deeplabv3plus import DeepLabV3Plus, build_model
from rpl.models.loading import SegmenterSpec, build_segmenter, read_state_dict
from rpl.models.wider_resnet import DeepWV3Plus, deepwv3plus

__all__ = ["DeepLabV3Plus", "build_model", "SegmenterSpec", "build_segmenter", "read_state_dict",
           "DeepWV3Plus", "deepwv3plus"]
