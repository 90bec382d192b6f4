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
        for section in loaded:
            if section not in data:
                raise RPLInputError(f"unknown config section {section!r} in {path}; known: {', '.join(data)}.")
        _merge(data, loaded)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k), dict):
                raise RPLInputError(f"--set {item!r}: unknown config key {'.'.join(keys[: i + 1])!r}.")
            node = node[k]
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
    return cfg


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
