"""Where to attach the add-on in known segmenter families, so users need not name modules.

A preset gives the frozen head block (``head``), the module whose output the block reads
(``feature``) and, when the family has one, the pretrained ASPP to initialise the block from.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Attachment:
    head: str
    feature: str | None
    aspp: str | None = None  # module path of a pretrained ASPP to copy into the block
    bottleneck: str | None = None  # its 1x1 projection, when separate from the ASPP module
    family: str = "custom"


def _class_names(model: nn.Module) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def detect(model: nn.Module) -> Attachment | None:
    """The preset for ``model``'s family, or ``None`` when the family is unknown."""
    names = _class_names(model)
    if "DeepLabV3Plus" in names and hasattr(model, "final") and hasattr(model, "deep_feature"):
        # this package's DeepLabv3+: as the reference, read the deepest map, perturb the decoder concat
        return Attachment("final", "deep_feature", "aspp", "bottleneck", "rpl-deeplabv3plus")
    if "DeepWV3Plus" in names and hasattr(model, "final") and hasattr(model, "mod7"):
        # the paper's DeepLabv3+ WideResNet38 (NVIDIA layout): read mod7 (4096 ch, stride 8), perturb the
        # 304-ch decoder concat, re-run final; block copied from aspp + bot_aspp as the reference does
        return Attachment("final", "mod7", "aspp", "bot_aspp", "nvidia-deepwv3plus")
    if "DeepLabV3" in names and hasattr(model, "classifier") and hasattr(model, "backbone"):
        # torchvision: classifier = DeepLabHead(ASPP, 3x3 conv, BN, ReLU, 1x1 conv)
        return Attachment("classifier[1:]", "backbone", "classifier.0", None, "torchvision-deeplabv3")
    if "FCN" in names and hasattr(model, "classifier") and hasattr(model, "backbone"):
        return Attachment("classifier", "backbone", None, None, "torchvision-fcn")
    if "SegformerForSemanticSegmentation" in names:
        return Attachment("decode_head.classifier", None, None, None, "hf-segformer")
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why a known family cannot be wrapped automatically (``None`` if nothing is known against it)."""
    if "LRASPP" in _class_names(model):
        return ("torchvision LRASPP has no single-input head block: its output adds a low-level and a "
                "high-level branch, so the head cannot be re-run on a perturbed input alone")
    return None
