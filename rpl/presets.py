"""Where to attach the add-on in the segmenter families people use, so ``rpl.wrap(model)`` needs no names.

A preset names the frozen head block (``head``), the map the residual block reads (``feature``, a
module path with an optional output selector such as ``encoder[-1]``; ``None`` = the head's input)
and, when the family has one, a pretrained ASPP to initialise the block from. Presets are matched
on the class names of the model (its MRO) and, where a class name is shared by two libraries, on
the module that defines it. Add one with :func:`register`; ``list_presets()`` shows them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from rpl.errors import RPLInputError

SMP_ARCHITECTURES = ("Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus",
                     "PAN", "UPerNet", "Segformer")


@dataclass(frozen=True)
class Preset:
    name: str
    classes: tuple[str, ...]  # any of these class names in the model's MRO selects the preset
    head: str
    feature: str | None  # None: the head's input
    module: str = ""  # the defining module must start with this (tells smp's DeepLabV3Plus from ours)
    requires: tuple[str, ...] = ()  # attributes the model must have
    aspp: str | None = None  # module path of a pretrained ASPP to copy into the block
    bottleneck: str | None = None  # its 1x1 projection, when separate from the ASPP module
    adapter: str = "dense"  # "dense" (hooks on a head block) or "mask-classification" (RbA per-pixel scores)
    auto: bool = True  # False: a variant chosen only by name (``rpl.wrap(model, preset=...)``)
    note: str = field(default="", compare=False)

    def matches(self, model: nn.Module) -> bool:
        hit = any(c.__name__ in self.classes and c.__module__.startswith(self.module) for c in type(model).__mro__)
        return hit and all(_has_path(model, a) for a in self.requires)


_REGISTRY: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add a preset (a later one with the same name replaces the earlier). Returns it."""
    _REGISTRY[preset.name] = preset
    return preset


def list_presets() -> list[str]:
    """Names of the registered presets, in matching order."""
    return list(_REGISTRY)


def get_preset(name: str) -> Preset:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RPLInputError(f"preset {name!r} is not registered; known presets: {', '.join(_REGISTRY)}.") from None


def _has_path(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _class_names(model: nn.Module) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def detect(model: nn.Module) -> Preset | None:
    """The first automatic preset that matches ``model``, or ``None`` when the family is unknown."""
    return next((p for p in _REGISTRY.values() if p.auto and p.matches(model)), None)


def near_misses(model: nn.Module) -> list[Preset]:
    """Presets whose class names match but whose required modules are missing (for error messages)."""
    names = _class_names(model)
    return [p for p in _REGISTRY.values() if p.auto and names & set(p.classes) and not p.matches(model)]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why a known family cannot be wrapped automatically (``None`` if nothing is known against it)."""
    if "LRASPP" in _class_names(model):
        return ("torchvision LRASPP has no single-input head block: its output adds a low-level and a "
                "high-level branch, so the head cannot be re-run on a perturbed input alone")
    misses = near_misses(model)
    if misses:
        p = misses[0]
        lacking = [a for a in p.requires if not _has_path(model, a)]
        return (f"{type(model).__name__} has the class name of preset {p.name!r} but lacks its module(s) "
                f"{', '.join(lacking)}")
    return None


# -- the presets -------------------------------------------------------------------------------
# this package's DeepLabv3+: as the reference, read the deepest map, perturb the decoder concat
register(Preset("rpl-deeplabv3plus", ("DeepLabV3Plus",), "final", "deep_feature", module="rpl.",
                requires=("final", "deep_feature"), aspp="aspp", bottleneck="bottleneck"))
# the paper's DeepLabv3+ WideResNet38 (NVIDIA layout): read mod7 (4096 ch, stride 8), perturb the
# 304-ch decoder concat, re-run final; block copied from aspp + bot_aspp as the reference does
register(Preset("nvidia-deepwv3plus", ("DeepWV3Plus",), "final", "mod7", module="rpl.",
                requires=("final", "mod7"), aspp="aspp", bottleneck="bot_aspp"))
# torchvision: classifier = DeepLabHead(ASPP, 3x3 conv, BN, ReLU, 1x1 conv); the backbone returns {"out", "aux"}
register(Preset("torchvision-deeplabv3", ("DeepLabV3",), "classifier[1:]", "backbone['out']",
                module="torchvision.", requires=("classifier", "backbone"), aspp="classifier.0"))
register(Preset("torchvision-fcn", ("FCN",), "classifier", "backbone['out']", module="torchvision.",
                requires=("classifier", "backbone")))
# segmentation-models-pytorch: encoder -> decoder -> segmentation_head (conv, upsampling, activation);
# the encoder returns its stage maps as a list, deepest last. "smp-decoder" perturbs the decoder output.
register(Preset("smp", SMP_ARCHITECTURES, "segmentation_head", "encoder[-1]", module="segmentation_models_pytorch",
                requires=("encoder", "decoder", "segmentation_head")))
# smp DPT: the ViT encoder returns (stage maps, prefix tokens)
register(Preset("smp-dpt", ("DPT",), "segmentation_head", "encoder[0][-1]", module="segmentation_models_pytorch",
                requires=("encoder", "decoder", "segmentation_head")))
register(Preset("smp-decoder", SMP_ARCHITECTURES + ("DPT",), "segmentation_head", None,
                module="segmentation_models_pytorch", requires=("segmentation_head",), auto=False,
                note="reads the decoder output (the head's input) instead of the encoder's deepest map"))
# Hugging Face transformers
register(Preset("hf-segformer", ("SegformerForSemanticSegmentation",), "decode_head.classifier", None,
                module="transformers."))
# UperNet (ConvNeXt, Swin, ... backbones): the backbone returns BackboneOutput(feature_maps=(..., deepest))
register(Preset("hf-upernet", ("UperNetForSemanticSegmentation",), "decode_head.classifier",
                "backbone['feature_maps'][-1]", module="transformers."))
# DPT: the neck returns the fused maps as a list; the head block is head.head (conv, BN, ReLU, dropout, conv, x2)
register(Preset("hf-dpt", ("DPTForSemanticSegmentation",), "head.head", "neck[-1]", module="transformers."))
# BEiT / Data2Vec-vision: UperNet decode head on the ViT's multi-level maps; the fpn neck returns them, deepest last
register(Preset("hf-beit", ("BeitForSemanticSegmentation",), "decode_head.classifier", "fpn[-1]",
                module="transformers.", requires=("fpn", "decode_head.classifier")))
register(Preset("hf-data2vec-vision", ("Data2VecVisionForSemanticSegmentation",), "decode_head.classifier", "fpn4",
                module="transformers.", requires=("fpn4", "decode_head.classifier")))
# Mask2Former: per-pixel scores from masks and classes (RbA); the block perturbs the pixel decoder's mask features
register(Preset("hf-mask2former", ("Mask2FormerForUniversalSegmentation",),
                "model.transformer_module.decoder.mask_predictor", "model.pixel_level_module.encoder['feature_maps'][-1]",
                module="transformers.", adapter="mask-classification"))
