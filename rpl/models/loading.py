"""Build a segmenter from a spec: ``package.module:factory`` + keyword arguments + a weights file.

The same spec is recorded in add-on checkpoints, so ``rpl-eval`` can rebuild the frozen model. A
recorded spec is data from whoever wrote the file: its factory must be a listed one
(:mod:`rpl.models.factories`) with arguments that fit it, and its weights path must stay in the
checkpoint's folder; specs the user writes (config, command line) may name any factory. ``.pth`` files are read with ``torch.load(weights_only=True)``: never unpickle arbitrary code.
"""
from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from rpl.checkpoint import strip_prefix
from rpl.conventions import IMAGENET_MEAN, IMAGENET_STD
from rpl.errors import RPLInputError


SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"  # the project's own files: trusted
MAX_TEXT = 4096  # longest model name / weights path a spec may hold
MODEL_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class SegmenterSpec:
    model: str = "rpl.models:build_model"  # "package.module:factory"
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # .safetensors or .pth/.pt state dict
    num_classes: int = 19
    mean: tuple[float, float, float] | None = IMAGENET_MEAN  # input normalisation (None: raw 0..1)
    std: tuple[float, float, float] | None = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Any, where: str = "segmenter", source: str | Path | None = None) -> "SegmenterSpec":
        """A spec from plain data (a config or a checkpoint's metadata), every field's type checked.

        ``where``/``source`` name the field and the file in the error message.
        """
        def bad(name: str, problem: str) -> RPLInputError:
            prefix = f"checkpoint {source}: metadata field" if source is not None else "segmenter option"
            return RPLInputError(f"{prefix} {where}.{name} {problem}" if name else f"{prefix} {where} {problem}")

        if not isinstance(d, dict):
            raise bad("", f"is a {type(d).__name__}; expected an object with {sorted(cls.__dataclass_fields__)}.")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise bad("", f"has unknown option(s) {sorted(str(u)[:40] for u in unknown)[:10]}; known: "
                          f"{sorted(cls.__dataclass_fields__)}.")
        model = d.get("model", cls.model)
        if not isinstance(model, str) or len(model) > MAX_TEXT or not MODEL_NAME.match(model):
            raise bad("model", f"= {str(model)[:100]!r} is not of the form package.module:factory (for example "
                               "torchvision.models.segmentation:deeplabv3_resnet101).")
        kwargs = d.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise bad("kwargs", f"is a {type(kwargs).__name__}; expected a JSON object of factory arguments.")
        weights = d.get("weights")
        if weights is not None and (not isinstance(weights, str) or not weights or len(weights) > MAX_TEXT
                                    or "\0" in weights):
            raise bad("weights", f"= {str(weights)[:100]!r} is not a file name (a non-empty string or null).")
        num_classes = d.get("num_classes", cls.num_classes)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 0 < num_classes <= 100_000:
            raise bad("num_classes", f"= {str(num_classes)[:40]!r} is not a positive integer.")
        norm = {}
        for name in ("mean", "std"):
            value = d.get(name, getattr(cls, name))
            if value is not None:
                ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                if not ok or (name == "std" and min(value) <= 0):
                    raise bad(name, f"= {str(value)[:100]} is not three finite numbers r,g,b (or null)"
                                    + (" with std > 0." if name == "std" else "."))
                value = tuple(float(v) for v in value)
            norm[name] = value
        return cls(model=model, kwargs=kwargs, weights=weights, num_classes=num_classes, **norm)


def import_factory(path: str) -> Any:
    """Resolve ``"package.module:factory"`` by importing it: only for names the user gave (never a checkpoint's)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RPLInputError(f"model {path!r} is not of the form package.module:factory "
                            "(for example torchvision.models.segmentation:deeplabv3_resnet101).")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RPLInputError(f"cannot import module {module_name!r} for model {path!r}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RPLInputError(f"module {module_name!r} has no {attr!r} (model {path!r}).") from None


def refusal(spec: SegmenterSpec, checkpoint: Path, reason: str) -> RPLInputError:
    """The one-paragraph refusal of a checkpoint's recorded segmenter, with the ways to proceed."""
    call = f"{spec.model}(**{json.dumps(spec.kwargs)[:300]})"
    return RPLInputError(
        f"checkpoint {checkpoint}: the segmenter it records (metadata field extra.segmenter) was not built, "
        f"because {reason} A checkpoint is data from whoever wrote it, and building its segmenter runs the named "
        f"code; nothing was imported or called. To proceed, pass your own segmenter: rpl-eval --model "
        f"package.module:factory [--model-kwargs JSON] --weights FILE (in Python rpl.load(path, segmenter)); or, "
        f"after reading what it would run, allow the recorded call with --trust-checkpoint (in Python "
        f"rpl.from_checkpoint(path, trust_checkpoint=True)): {call}")


def resolve_factory(spec: SegmenterSpec, recorded_in: str | Path | None = None,
                    trust_checkpoint: bool = False) -> Callable[..., Any]:
    """The callable that builds ``spec``'s segmenter, checked before anything is called.

    A spec recorded in checkpoint ``recorded_in`` may name only a listed factory
    (:mod:`rpl.models.factories`) with arguments that fit it, unless ``trust_checkpoint``; a spec the
    user wrote (``recorded_in`` None) may name any importable factory.
    """
    from rpl.models import factories

    entry = factories.lookup(spec.model)
    if recorded_in is not None and not trust_checkpoint:
        checkpoint = Path(recorded_in)
        if entry is None:
            raise refusal(spec, checkpoint, f"its factory {spec.model!r} (metadata field extra.segmenter.model) is "
                                            "not among the factories a checkpoint may name "
                                            "(rpl.models.factories.names() lists them: rpl's models, the "
                                            "torchvision segmentation builders, timm:create_model, "
                                            "segmentation_models_pytorch architectures, transformers "
                                            "*ForSemanticSegmentation/*ForUniversalSegmentation).")
        try:
            factory = entry.load()
            factories.check_arguments(entry, factory, spec.kwargs, "extra.segmenter.kwargs")
        except factories.FactoryArgumentError as err:
            raise refusal(spec, checkpoint, f"its arguments (metadata field extra.segmenter.kwargs) are not "
                                            f"accepted: {err}") from None
        return factory
    if entry is not None:
        try:
            factory = entry.load()
        except factories.FactoryArgumentError as err:
            raise RPLInputError(f"model {spec.model}: {err}") from None
    else:
        factory = import_factory(spec.model)
    if not callable(factory):
        raise RPLInputError(f"model {spec.model!r} is a {type(factory).__name__}, not a callable factory.")
    try:
        factories.check_signature(factory, spec.kwargs, spec.model)
    except factories.FactoryArgumentError as err:
        where = f"checkpoint {recorded_in}: " if recorded_in is not None else ""
        raise RPLInputError(f"{where}model factory {spec.model}: {err}") from None
    return factory


def resolve_weights(spec: SegmenterSpec, base_dir: str | Path | None = None,
                    recorded_in: str | Path | None = None) -> Path | None:
    """The segmenter weights file of ``spec``.

    Recorded in checkpoint ``recorded_in``: relative to its folder and inside it (or inside the
    shipped ``weights/``); anything else (``..``, absolute, a link out) is refused, the user names it
    with ``--weights``. Written by the user: as given, else relative to ``base_dir``.
    """
    if not spec.weights:
        return None
    wpath = Path(spec.weights)
    if recorded_in is None:
        if not wpath.is_absolute() and base_dir is not None and not wpath.exists():
            wpath = Path(base_dir) / wpath
        return wpath
    checkpoint = Path(recorded_in)
    folder = checkpoint.resolve().parent
    resolved = (folder / wpath).resolve()
    if not any(resolved.is_relative_to(root) for root in (folder, SHIPPED_WEIGHTS)):
        raise RPLInputError(
            f"checkpoint {checkpoint}: its segmenter weights path (metadata field extra.segmenter.weights) "
            f"{spec.weights[:200]!r} leads to {str(resolved)[:200]}, outside the checkpoint's folder {folder}; a "
            "checkpoint may only point at files next to it, so it was not read. If that file is the segmenter the "
            "add-on was trained on, pass it yourself: rpl-eval --weights FILE (in Python "
            "rpl.from_checkpoint(path, weights=FILE)).")
    return resolved


def numpy_safe_globals() -> list[Any]:
    """Numpy scalar/array reconstruction (data only), under the numpy 1 and numpy 2 module names.

    NVIDIA's file stores its validation mIoU as a numpy scalar, which ``weights_only`` refuses by default.
    """
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: list[Any] = [np.ndarray, np.dtype]
    for fn in (multiarray.scalar, multiarray._reconstruct):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    allowed += list({type(np.dtype(code)) for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")})
    return allowed


NESTING_KEYS = ("state_dict", "model", "model_state_dict", "model_state")  # where training scripts nest weights


def read_raw_state_dict(path: str | Path, what: str = "weights file",
                        expected: str = "a .safetensors or .pth state dict") -> dict[str, torch.Tensor]:
    """The state dict in ``.safetensors`` or ``.pth``/``.pt`` (nested under ``state_dict``/``model``/...),
    keys untouched, loaded with ``weights_only=True`` (plain numbers and numpy scalars allowed, code never).

    The one reader of weight files: segmenter weights and the published reference checkpoints use it.
    """
    path = Path(path)
    if not path.is_file():
        raise RPLInputError(f"{what} {path} does not exist; expected {expected}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            with torch.serialization.safe_globals(numpy_safe_globals()):  # e.g. NVIDIA's numpy mean_iu
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled code, ...: all the user's to fix
        raise RPLInputError(f"{what} {path} could not be read safely with weights_only=True ({type(err).__name__}: "
                            f"{str(err)[:300]}); expected {expected} saved with torch.save(model.state_dict()) or "
                            "safetensors (pickled code is never loaded).") from None
    if path.suffix == ".safetensors":
        state = _tuned_segmenter(path, state)
    while isinstance(state, Mapping):
        nested = next((k for k in NESTING_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = state[nested]
    if not isinstance(state, Mapping) or not state:
        raise RPLInputError(f"{what} {path} holds no state dict (looked under {', '.join(NESTING_KEYS)}).")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise RPLInputError(f"{what} {path}: entries {bad[:5]} are not tensors; expected a state dict of tensors.")
    return dict(state)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pth``/``.pt`` with leading ``module.`` prefixes removed."""
    return strip_prefix(read_raw_state_dict(path))


def _tuned_segmenter(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fine-tuned method's checkpoint (e.g. PEBAL's) used as segmenter weights: its ``segmenter.*`` tensors."""
    from rpl.checkpoint import SEGMENTER_PREFIX, is_checkpoint, read_metadata

    if not is_checkpoint(path):
        return state
    meta = read_metadata(path)
    tuned = {k[len(SEGMENTER_PREFIX):]: v for k, v in state.items() if k.startswith(SEGMENTER_PREFIX)}
    if not tuned:
        raise RPLInputError(f"weights file {path} is a checkpoint of method {meta['method']!r}, which holds no "
                            "segmenter weights (an add-on only); give the segmenter's own weights file, or a "
                            "fine-tuned method's checkpoint (e.g. PEBAL's).")
    return tuned


def build_segmenter(spec: SegmenterSpec, base_dir: str | Path | None = None, *,
                    recorded_in: str | Path | None = None, trust_checkpoint: bool = False,
                    weights: str | Path | None = None) -> nn.Module:
    """Instantiate the frozen segmenter of ``spec`` and load its weights (strictly).

    ``recorded_in``: the checkpoint ``spec`` was read from, whose factory and weights path are checked
    (:func:`resolve_factory`, :func:`resolve_weights`); ``weights``: the user's own weights file,
    replacing the recorded one.
    """
    factory = resolve_factory(spec, recorded_in, trust_checkpoint)
    if weights is not None:
        wpath: Path | None = Path(weights)
    else:
        wpath = resolve_weights(spec, base_dir, recorded_in)
    where = f" (recorded in checkpoint {recorded_in})" if recorded_in is not None else ""
    try:
        model = factory(**spec.kwargs)
    except Exception as err:  # the factory's own validation of its arguments
        raise RPLInputError(f"model factory {spec.model!r}{where} rejected its arguments "
                            f"{json.dumps(spec.kwargs)[:300]}: {type(err).__name__}: {str(err)[:300]}") from err
    if not isinstance(model, nn.Module):
        raise RPLInputError(f"model factory {spec.model!r}{where} returned a {type(model).__name__}, not a "
                            "torch.nn.Module; expected a function or class that builds the segmenter.")
    if wpath is not None:
        state = read_state_dict(wpath)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise RPLInputError(f"weights file {wpath} does not fit model {spec.model!r}{where}: "
                                f"{str(err)[:500]}") from None
        if result.missing_keys or result.unexpected_keys:
            raise RPLInputError(f"weights file {wpath} does not fit model {spec.model!r}{where}: missing "
                                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} "
                                f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected).")
    return model.eval()
