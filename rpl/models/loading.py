"""Build a segmenter from a spec: ``package.module:factory`` + keyword arguments + a weights file.

The same spec is recorded in add-on checkpoints, so ``rpl-eval`` can rebuild the frozen model.
User ``.pth`` files are read with ``torch.load(weights_only=True)``: never unpickle arbitrary code.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rpl.checkpoint import strip_prefix
from rpl.conventions import IMAGENET_MEAN, IMAGENET_STD
from rpl.errors import RPLInputError


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
    def from_dict(cls, d: dict[str, Any]) -> "SegmenterSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise RPLInputError(f"unknown segmenter option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def import_factory(path: str) -> Any:
    """Resolve ``"package.module:factory"``."""
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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt`` file (``state_dict``/``model`` nesting and
    ``module.`` prefixes handled), loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise RPLInputError(f"weights file {path} does not exist; expected a .safetensors or .pth state dict.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with torch.serialization.safe_globals(numpy_safe_globals()):  # e.g. NVIDIA's numpy mean_iu
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled code, ...: all the user's to fix
        raise RPLInputError(f"weights file {path} could not be read safely ({type(err).__name__}: {err}); expected a "
                            "state dict saved with torch.save(model.state_dict()) or safetensors.") from None
    if path.suffix == ".safetensors":
        state = _tuned_segmenter(path, state)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RPLInputError(f"weights file {path} does not hold a state dict of tensors.")
    return strip_prefix(state)


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


def build_segmenter(spec: SegmenterSpec, base_dir: str | Path | None = None) -> nn.Module:
    """Instantiate the frozen segmenter of ``spec`` and load its weights (strictly)."""
    factory = import_factory(spec.model)
    try:
        model = factory(**spec.kwargs)
    except TypeError as err:
        raise RPLInputError(f"model factory {spec.model!r} rejected its arguments {spec.kwargs}: {err}") from None
    if spec.weights:
        wpath = Path(spec.weights)
        if not wpath.is_absolute() and base_dir is not None and not wpath.exists():
            wpath = Path(base_dir) / wpath
        state = read_state_dict(wpath)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise RPLInputError(f"weights file {wpath} does not fit model {spec.model!r}: {str(err)[:500]}") from None
        if result.missing_keys or result.unexpected_keys:
            raise RPLInputError(f"weights file {wpath} does not fit model {spec.model!r}: missing "
                                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} "
                                f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected).")
    return model.eval()
