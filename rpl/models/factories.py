"""The closed list of segmenter factories a checkpoint may name, and the checks on their arguments.

A checkpoint is data from whoever sent it, so its ``extra.segmenter.model`` is looked up here by
exact name and never imported as given: each entry fixes the module to import and the callable to
use. Arguments are checked against the callable's signature (names and JSON types) and against the
family's rules: no argument may point the library at another file, folder, URL or hub repository
(``checkpoint_path``, ``hf-hub:...``), because the segmenter's weights come only from the recorded
weights file. A factory that is not listed runs only when the user names it on their own command
line or config, or allows it with ``--trust-checkpoint``.
"""
from __future__ import annotations

import collections.abc
import enum
import importlib
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

# strings that make timm / smp / transformers fetch from a hub, a URL or a local folder
REMOTE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "http://", "https://", "file:", "timm/")


class FactoryArgumentError(ValueError):
    """An argument a checkpoint recorded for a listed factory breaks its signature or its family's rules."""


@dataclass(frozen=True)
class Factory:
    name: str  # as written in specs: "package.module:attr"
    module: str  # imported by us, never taken from a checkpoint
    attr: str
    family: str
    check: Callable[[dict[str, Any]], None] | None = None  # family rules on the kwargs
    adapter: Callable[[Any], Callable[..., Any]] | None = None  # turns the attribute into the callable

    def load(self) -> Callable[..., Any]:
        try:
            module = importlib.import_module(self.module)
        except ImportError as err:
            raise FactoryArgumentError(f"factory {self.name} needs the package {self.module.split('.')[0]!r}, "
                                       f"which is not installed ({err}); pip install it.") from None
        if not hasattr(module, self.attr):
            raise FactoryArgumentError(f"factory {self.name} is not in the installed {self.module} (another "
                                       "version?).")
        target = getattr(module, self.attr)
        return self.adapter(target) if self.adapter else target


REGISTRY: dict[str, Factory] = {}


def register(name: str, family: str, check: Callable[[dict[str, Any]], None] | None = None,
             adapter: Callable[[Any], Callable[..., Any]] | None = None) -> Factory:
    """Add ``name`` ("package.module:attr") to the factories a checkpoint may name."""
    module, _, attr = name.partition(":")
    entry = Factory(name, module, attr, family, check, adapter)
    REGISTRY[name] = entry
    return entry


def lookup(name: str) -> Factory | None:
    return REGISTRY.get(name) if isinstance(name, str) else None


def names() -> list[str]:
    return sorted(REGISTRY)


# -- argument checks -----------------------------------------------------------------------------
def _json_data(value: Any, where: str, depth: int = 0) -> None:
    if depth > 20:
        raise FactoryArgumentError(f"{where} is nested more than 20 levels deep.")
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, str) and value.lower().startswith(REMOTE_PREFIXES):
            raise FactoryArgumentError(f"{where} = {value[:80]!r} names a hub repository, URL or folder; a checkpoint "
                                       "may not make the factory fetch or read anything besides its weights file.")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FactoryArgumentError(f"{where} = {value} is not a finite number.")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _json_data(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise FactoryArgumentError(f"{where} has a non-string key {key!r}.")
            _json_data(item, f"{where}.{key}", depth + 1)
        return
    raise FactoryArgumentError(f"{where} is a {type(value).__name__}; expected JSON data (null, true/false, a "
                               "number, a string, a list or an object).")


def _matches(value: Any, hint: Any) -> bool:
    """Whether JSON ``value`` fits annotation ``hint``; annotations we cannot judge accept it."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, typing.Sequence, collections.abc.Sequence):
        if not isinstance(value, list):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return len(inner) != 1 or all(_matches(v, inner[0]) for v in value)
    if container in (dict, typing.Mapping, collections.abc.Mapping):
        return isinstance(value, dict)
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):  # e.g. torchvision weight enums, by name
        return isinstance(value, str) or value is None
    return True


def check_signature(fn: Callable[..., Any], kwargs: dict[str, Any], name: str) -> None:
    """``kwargs`` bind to ``fn`` and fit its annotations."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        bound = signature.bind(**kwargs)
    except TypeError as err:
        known = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
        raise FactoryArgumentError(f"arguments {sorted(kwargs)} do not fit {name} ({err}); it takes {known}.") from None
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else inspect.unwrap(fn))
    except Exception:  # unresolvable annotations: names and JSON types are still checked
        hints = {}
    for param, value in bound.arguments.items():
        kind = signature.parameters[param].kind
        if kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        hint = hints.get(param, signature.parameters[param].annotation)
        if isinstance(hint, str):  # an annotation we could not resolve
            continue
        if not _matches(value, hint):
            raise FactoryArgumentError(f"argument {param} = {str(value)[:80]!r} ({type(value).__name__}) does not "
                                       f"fit {name}, which expects {getattr(hint, '__name__', hint)}.")


def check_arguments(entry: Factory, factory: Callable[..., Any], kwargs: Any, where: str) -> None:
    """Everything a listed factory's recorded arguments must satisfy before the factory is called."""
    if not isinstance(kwargs, dict):
        raise FactoryArgumentError(f"{where} is a {type(kwargs).__name__}; expected a JSON object of arguments.")
    _json_data(kwargs, where)
    check_signature(factory, kwargs, entry.name)
    if entry.check is not None:
        entry.check(kwargs)


def _forbid(kwargs: dict[str, Any], keys: tuple[str, ...], family: str) -> None:
    bad = sorted(set(kwargs) & set(keys))
    if bad:
        raise FactoryArgumentError(f"arguments {bad} point {family} at another file or folder; a checkpoint's "
                                   "segmenter weights come only from its recorded weights file.")


# -- the entries -----------------------------------------------------------------------------------
def _check_rpl_deeplab(kwargs: dict[str, Any]) -> None:
    from rpl.models.deeplabv3plus import DeepLabV3Plus

    rest = {k: v for k, v in kwargs.items() if k != "name"}
    if "name" in kwargs and kwargs["name"] != "deeplabv3plus":
        raise FactoryArgumentError(f"argument name = {str(kwargs['name'])[:80]!r}; rpl.models:build_model knows "
                                   "only 'deeplabv3plus'.")
    check_signature(DeepLabV3Plus, rest, "rpl.models.DeepLabV3Plus")
    if "backbone" in rest:
        _check_timm_name(rest["backbone"], "backbone")


def _check_timm_name(model_name: Any, option: str) -> None:
    import timm

    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise FactoryArgumentError(f"argument {option} = {str(model_name)[:80]!r} is not a timm architecture "
                                   "(timm.list_models() lists them).")


def _check_timm(kwargs: dict[str, Any]) -> None:
    _forbid(kwargs, ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"), "timm")
    _check_timm_name(kwargs.get("model_name"), "model_name")


def _check_torchvision(name: str) -> Callable[[dict[str, Any]], None]:
    """torchvision's builders ignore unknown ``**kwargs``: only their named parameters are accepted."""
    def check(kwargs: dict[str, Any]) -> None:
        import torchvision.models.segmentation as tvs

        params = inspect.signature(getattr(tvs, name)).parameters
        named = {p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
        unknown = sorted(set(kwargs) - named)
        if unknown:
            raise FactoryArgumentError(f"arguments {unknown} are not parameters of torchvision.models.segmentation."
                                       f"{name}, which takes {sorted(named)}.")
    return check


def _check_smp(kwargs: dict[str, Any]) -> None:
    name = kwargs.get("encoder_name", "resnet34")
    if not isinstance(name, str):
        raise FactoryArgumentError(f"argument encoder_name = {str(name)[:80]!r} is not a string.")


def _huggingface(cls: Any) -> Callable[..., Any]:
    """``cls`` built from a plain config dict (its own config class; nothing read from a hub)."""
    def build(config: dict) -> Any:
        return cls(cls.config_class(**config))

    build.__name__ = build.__qualname__ = cls.__name__
    return build


def _check_huggingface(kwargs: dict[str, Any]) -> None:
    config = kwargs.get("config", {})
    if not isinstance(config, dict):
        raise FactoryArgumentError("argument config must be a JSON object (the model's config as a dict).")
    _forbid(config, ("use_pretrained_backbone", "auto_map", "trust_remote_code"), "transformers")


for _name in ("rpl.models:build_model", "rpl.models.deeplabv3plus:build_model"):
    register(_name, "rpl", _check_rpl_deeplab)
for _name in ("rpl.models:deepwv3plus", "rpl.models.wider_resnet:deepwv3plus"):
    register(_name, "rpl")
for _name in ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "fcn_resnet50",
              "fcn_resnet101", "lraspp_mobilenet_v3_large"):
    register(f"torchvision.models.segmentation:{_name}", "torchvision", _check_torchvision(_name))
register("timm:create_model", "timm", _check_timm)
for _name in ("Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "PAN",
              "UPerNet", "Segformer", "DPT"):
    register(f"segmentation_models_pytorch:{_name}", "segmentation-models-pytorch", _check_smp)
for _name in ("BeitForSemanticSegmentation", "Data2VecVisionForSemanticSegmentation", "DPTForSemanticSegmentation",
              "MobileNetV2ForSemanticSegmentation", "MobileViTForSemanticSegmentation",
              "MobileViTV2ForSemanticSegmentation", "SegformerForSemanticSegmentation",
              "UperNetForSemanticSegmentation", "Mask2FormerForUniversalSegmentation",
              "OneFormerForUniversalSegmentation", "EomtForUniversalSegmentation"):
    register(f"transformers:{_name}", "transformers", _check_huggingface, _huggingface)
