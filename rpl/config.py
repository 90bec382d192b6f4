"""Training configuration: typed dataclasses, YAML files, dotted ``--set a.b=c`` overrides.

The dataclass defaults ARE the embedded default (SynthStreets + the shipped segmenter), so
``rpl-train`` with no config needs no file; ``experiments/*.yaml`` hold the other recipes. An
unknown key or a value of the wrong type is an error that names it.

Sections reuse the library's own dataclasses: ``segmenter`` is ``rpl.models.SegmenterSpec``,
``wrap`` extends ``rpl.BlockConfig`` with where the block attaches, ``loss`` is
``rpl.losses.LossWeights``. ``method`` names the trained method (``rpl.methods``); a method with
options (``Method.Options``, e.g. PEBAL's) gets a top-level section of its name, found in the
method registry, so adding a method never touches this file.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rpl.blocks import BlockConfig
from rpl.conventions import IMAGENET_MEAN, IMAGENET_STD
from rpl.errors import RPLInputError
from rpl.losses import LossWeights
from rpl.models.loading import SegmenterSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEGMENTER_WEIGHTS = "weights/segmenter_synthstreets.safetensors"


def _embedded_segmenter() -> SegmenterSpec:
    """The shipped SynthStreets segmenter: rpl's DeepLabv3+ over timm resnet10t, widths 64."""
    return SegmenterSpec(model="rpl.models:build_model",
                         kwargs={"backbone": "resnet10t", "num_classes": 19, "output_stride": 16, "aspp_width": 64,
                                 "decoder_width": 64},
                         weights=DEFAULT_SEGMENTER_WEIGHTS, num_classes=19, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass
class WrapConfig(BlockConfig):
    """The RPL block (``rpl.BlockConfig``) plus where it attaches (``rpl.wrap``'s ``head`` / ``feature``)."""

    width: int = 64  # residual block width (reference 256; the embedded segmenter is small)
    head: str | None = None  # None: the family's preset
    feature: str | None = None


@dataclass
class DataConfig:
    root: str = "data/synthstreets"  # base for the relative paths below
    generate_synthstreets: bool = True  # generate SynthStreets into ``root`` when it is missing
    inliers: str = "cityscapes"  # Cityscapes layout
    train_split: str = "train"
    val_split: str = "val"  # held-out inliers for checkpoint selection (never the test sets)
    coco: str = "coco"  # COCO layout (train2017/, annotations/)
    coco_split: str = "train2017"
    coco_min_size: int = 480
    ood_cache: str = "coco_ood"  # outlier masks generated once
    ood_val_fraction: float = 0.1  # outlier images held out for validation pasting
    crop_size: list = field(default_factory=lambda: [192, 384])
    flip_p: float = 0.5
    paste_prob: float = 1.0
    # Outlier rescale factors, drawn uniformly (the reference set; 0.5 twice). On SynthStreets, scaling
    # them by 0.4 (objects as large relative to the crop as in the reference) lowered anomaly AP 36 -> 30.
    paste_scales: list = field(default_factory=lambda: [0.25, 0.5, 0.5, 0.75, 0.1, 0.125])
    num_workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 5e-4  # reference 7.5e-5 over 15k iterations; the embedded default trains 200
    last_layer_lr_mult: float = 10.0
    batch_size: int = 8  # street crops per step (+ as many context images with CoroCL)
    epochs: int = 40
    iterations: int | None = 150  # overrides epochs when set
    poly_power: float = 0.9
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on CUDA if supported, else fp16 + GradScaler; fp32 on CPU) | bf16 | fp16 | off
    channels_last: bool = False
    log_every: int = 10
    checkpoint_every: int = 50
    val_every: int = 50
    val_limit: int | None = None  # validate on at most this many images
    max_nonfinite: int = 5  # consecutive non-finite losses before stopping
    wandb: str = "disabled"  # disabled | offline | online
    evaluate_after: bool = True  # run rpl-eval's default evaluation at the end (embedded default)


def method_option_classes() -> dict[str, type]:
    """``{method name: its Options dataclass}`` for every registered method that has options."""
    from rpl.methods import available, get

    return {name: get(name).Options for name in available() if getattr(get(name), "Options", None) is not None}


@dataclass
class Config:
    method: str = "rpl"  # the trained method: a name from rpl.methods.trainable()
    segmenter: SegmenterSpec = field(default_factory=_embedded_segmenter)
    wrap: WrapConfig = field(default_factory=WrapConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossWeights = field(default_factory=lambda: LossWeights(contrastive=2.0))  # reference 1.0 (README: why)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: dict = field(default_factory=lambda: {n: c() for n, c in method_option_classes().items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples); each method's options as a top-level section of its name."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        d.update({name: dataclasses.asdict(opts) for name, opts in self.options.items()})
        return json.loads(json.dumps(d))

    def method_options(self, name: str) -> Any:
        return self.options[name]

    def __getattr__(self, name: str) -> Any:
        """A method's options section by its name (``cfg.pebal``), like the fixed sections."""
        options = self.__dict__.get("options") or {}
        if not name.startswith("_") and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def data_path(self, name: str) -> Path:
        """A data path from the config: absolute, or relative to ``data.root``."""
        p = Path(getattr(self.data, name))
        return p if p.is_absolute() else Path(self.data.root) / p


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to ``hint`` where that is lossless, else an error naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except RPLInputError as err:
                errors.append(err)
        raise errors[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is collections.abc.Sequence:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif hint is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif hint in (list, dict) or origin in (list, dict):
        if isinstance(value, (origin or hint)) or (hint is list and isinstance(value, tuple)):
            return list(value) if hint is list else value
    elif dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    raise RPLInputError(f"config key {where!r} has value {value!r} of type {type(value).__name__}; expected "
                        f"{getattr(hint, '__name__', hint)}.")


def _build(cls: type, data: Any, where: str = "") -> Any:
    if not isinstance(data, dict):
        raise RPLInputError(f"config section {where or '<root>'!r} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise RPLInputError(f"unknown config key {prefix + unknown[0]!r}; known keys in "
                            f"{where or 'the top level'}: {', '.join(names)}.")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    base = cls()
    for k, v in kwargs.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            v = _build(hints[k], v, k)
        setattr(base, k, v)
    return base


def _merge(into: dict, update: dict) -> dict:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and k != "kwargs":
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in item:
        raise RPLInputError(f"--set {item!r} is not of the form key=value (for example optim.lr=1e-4).")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then ``--set`` overrides; validated."""
    data = Config().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RPLInputError(f"config file {path} does not exist; expected a YAML file such as experiments/synthstreets.yaml.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RPLInputError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise RPLInputError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}.")
        for section, value in loaded.items():
            if section not in data:
                raise RPLInputError(f"unknown config section {section!r} in {path}; known: {', '.join(data)}.")
            if isinstance(data[section], dict) and not isinstance(value, dict):
                raise RPLInputError(f"config file {path}: section {section!r} is {value!r}; expected a mapping of "
                                    f"its keys ({', '.join(data[section])}).")
        _merge(data, loaded)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            if k in node and not isinstance(node[k], dict):
                raise RPLInputError(f"--set {item!r}: {'.'.join(keys[: i + 1])!r} holds {node[k]!r}, not a mapping "
                                    "of keys (an earlier --set replaced it).")
            if not isinstance(node.get(k), dict):
                raise RPLInputError(f"--set {item!r}: unknown config key {'.'.join(keys[: i + 1])!r}.")
            node = node[k]
        if isinstance(node.get(keys[-1]), dict) and not isinstance(value, dict) and keys[-1] != "kwargs":
            raise RPLInputError(f"--set {item!r}: {'.'.join(keys)!r} is a config section; set one of its keys "
                                f"({', '.join(node[keys[-1]])}), e.g. --set {'.'.join(keys)}."
                                f"{next(iter(node[keys[-1]]), 'key')}=VALUE.")
        if keys[-1] not in node and not (len(keys) > 2 and keys[-2] == "kwargs"):
            raise RPLInputError(f"--set {item!r}: unknown config key {'.'.join(keys)!r}.")
        node[keys[-1]] = value
    return build_config(data)


def build_config(data: dict[str, Any]) -> Config:
    """A validated ``Config`` from plain data (``Config.to_dict()`` layout)."""
    option_classes = method_option_classes()
    sections = {k: v for k, v in data.items() if k not in option_classes}
    cfg = _build(Config, sections)
    cfg.options = {name: _build(cls, data.get(name, {}), name) for name, cls in option_classes.items()}
    return check_ranges(cfg)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# -- value ranges ------------------------------------------------------------------------------------
# Where a value is meaningless: "> 0", ">= 0", ">= 1", "[0, 1]", "[0, 1)". Lists are checked item by
# item; None passes wherever the type allows it (it means "not set").
RANGES = {
    "segmenter.num_classes": ">= 1",
    "wrap.width": ">= 1", "wrap.rates": ">= 1", "wrap.projection_dim": ">= 1",
    "data.coco_min_size": ">= 1", "data.ood_val_fraction": "[0, 1)", "data.crop_size": ">= 1",
    "data.flip_p": "[0, 1]", "data.paste_prob": "[0, 1]", "data.paste_scales": "> 0", "data.num_workers": ">= 0",
    "loss.ce": ">= 0", "loss.entropy": ">= 0", "loss.outlier": ">= 0", "loss.contrastive": ">= 0",
    "loss.temperature": "> 0", "loss.max_samples": ">= 1",
    "optim.lr": "> 0", "optim.last_layer_lr_mult": "> 0", "optim.batch_size": ">= 1", "optim.epochs": ">= 1",
    "optim.iterations": ">= 1", "optim.poly_power": ">= 0", "optim.grad_clip": "> 0",
    "train.seed": ">= 0", "train.log_every": ">= 1", "train.checkpoint_every": ">= 1",
    "train.val_every": ">= 0", "train.val_limit": ">= 1", "train.max_nonfinite": ">= 1",
}
# Free numeric keys (no range rule): normalisation constants (any value is a valid affine map).
FREE_NUMERIC = ("segmenter.mean", "segmenter.std")
CHOICES = {"loss.energy_loss": ("hinge", "pebal"), "train.wandb": ("disabled", "offline", "online"),
           "train.amp": ("auto", "bf16", "fp16", "off")}
NOTES = {"train.val_every": " (0 turns validation off)", "data.crop_size": " (H and W)"}


def _in_range(value: float, rule: str) -> bool:
    if rule.startswith("["):
        low, high = (float(v) for v in rule.strip("[]()").split(","))
        return low <= value and (value <= high if rule.endswith("]") else value < high)
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def rules() -> tuple[dict[str, str], dict[str, tuple], tuple[str, ...]]:
    """Range rules, allowed choices and free numeric keys of the whole config: the fixed sections'
    (``RANGES``, ``CHOICES``, ``FREE_NUMERIC`` above) and each method's, declared on its ``Options``
    dataclass as the class attributes ``RANGES``, ``CHOICES`` and ``FREE`` (keys without the section),
    so that a method's rules live in its own module."""
    ranges, choices, free = dict(RANGES), dict(CHOICES), list(FREE_NUMERIC)
    for section, cls in method_option_classes().items():
        ranges |= {f"{section}.{k}": v for k, v in getattr(cls, "RANGES", {}).items()}
        choices |= {f"{section}.{k}": tuple(v) for k, v in getattr(cls, "CHOICES", {}).items()}
        free += [f"{section}.{k}" for k in getattr(cls, "FREE", ())]
    return ranges, choices, tuple(free)


def check_ranges(config: Config) -> Config:
    """``config`` if every numeric key is in its meaningful range (:func:`rules`), else a one-line error naming it."""
    all_ranges, all_choices, _ = rules()
    for key, rule in all_ranges.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
               or not _in_range(v, rule)]
        if key == "data.crop_size" and len(items) != 2:
            raise RPLInputError(f"config key {key!r} is {value!r}; expected two integers >= 1 (H and W).")
        if bad:
            what = f"holds {bad[0]!r}" if isinstance(value, list) else f"is {value!r}"
            kind = "an integer" if isinstance(bad[0], int) and not isinstance(value, list) else "a number"
            if isinstance(value, list):
                expected = f"values {rule}" if not rule.startswith("[") else f"values in {rule}"
            else:
                expected = f"{kind} in {rule}" if rule.startswith("[") else f"{kind} {rule}"
            raise RPLInputError(f"config key {key!r} {what}; expected {expected}{NOTES.get(key, '')}.")
    for key, allowed in all_choices.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise RPLInputError(f"config key {key!r} is {value!r}; expected one of {', '.join(allowed)}.")
    return config
