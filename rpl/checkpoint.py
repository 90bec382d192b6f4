"""Checkpoints of every method: safetensors tensors + metadata naming the method (one format).

Metadata keys: ``format`` (:data:`FORMAT`), ``method`` (a name from ``rpl.methods.available()``),
``base_fingerprint`` / ``base_class`` (the segmenter the method was built on), ``extra`` (JSON:
the segmenter's spec, training config, metrics, ...) and method-specific JSON fields (RPL: ``wrap``;
PEBAL: ``pebal``). Add-on methods store only their add-on (the segmenter stays the user's), and the
SHA-256 fingerprint of the frozen base makes loading onto another segmenter fail loudly instead of
giving silent garbage. Fine-tuned methods store the tuned segmenter under ``segmenter.*`` keys, so
such a file can also serve as the weights of a frozen base (see ``rpl.models.read_state_dict``).
Files written before methods were plug-ins (format ``rpl-addon/1``) read as method ``rpl``.
Files are written to a temporary name and renamed, so a kill while saving never corrupts the
previous checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rpl.blocks import BlockConfig
from rpl.errors import RPLInputError

FORMAT = "rpl-checkpoint/1"
LEGACY_FORMATS = {"rpl-addon/1": "rpl"}  # format -> the method its files hold
JSON_FIELDS = ("wrap", "extra", "pebal")
SEGMENTER_PREFIX = "segmenter."  # tensor keys of a fine-tuned segmenter inside a checkpoint


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor in ``module.state_dict()``."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove DDP/DataParallel ``module.`` prefixes wherever they occur in the key path."""
    return {k.replace(prefix, "") if k.startswith(prefix) or f".{prefix}" in k else k: v for k, v in state.items()}


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], method: str, base_fingerprint: str,
                     base_class: str, fields: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` with the metadata of method ``method`` (``fields`` are method-specific JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "method": method, "base_fingerprint": base_fingerprint, "base_class": base_class,
            "extra": json.dumps(extra or {})}
    meta.update({k: json.dumps(v) for k, v in (fields or {}).items()})
    atomic_save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, meta)
    return path


def save(path: str | os.PathLike, model: Any, extra: dict[str, Any] | None = None,
         base_fingerprint: str | None = None) -> Path:
    """Write ``model``'s add-on (an ``RPLSegmenter``) to ``path`` (.safetensors) with its metadata.

    ``extra`` (JSON-serialisable: metrics, training config, the segmenter's spec) goes in the metadata.
    """
    return write_checkpoint(path, model.bare_addon.state_dict(), "rpl",
                            base_fingerprint or fingerprint(model.segmenter), type(model.segmenter).__name__,
                            {"wrap": model.wrap_arguments()}, extra)


def read_metadata(path: str | os.PathLike, method: str | None = None) -> dict[str, Any]:
    """The metadata of a checkpoint, JSON fields decoded; ``method`` given: it must be that method's."""
    path = Path(path)
    if not path.is_file():
        raise RPLInputError(f"checkpoint {path} does not exist; expected a .safetensors checkpoint from rpl-train.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise RPLInputError(f"checkpoint {path} is not a readable safetensors file ({err}); expected a "
                            "checkpoint written by rpl-train or rpl.save.") from None
    fmt = meta.get("format")
    if fmt != FORMAT and fmt not in LEGACY_FORMATS:
        raise RPLInputError(f"checkpoint {path} has format {fmt!r}, expected {FORMAT!r} (a checkpoint written by "
                            "rpl-train or rpl.save).")
    out: dict[str, Any] = dict(meta)
    out["method"] = meta.get("method") or LEGACY_FORMATS.get(fmt, "")
    for key in JSON_FIELDS:
        if key in meta or key in ("wrap", "extra"):
            try:
                out[key] = json.loads(meta.get(key) or "{}")
            except json.JSONDecodeError:
                raise RPLInputError(f"checkpoint {path}: metadata field {key!r} is not valid JSON; the file is "
                                    "damaged or was not written by rpl.") from None
    if method is not None and out["method"] != method:
        raise RPLInputError(f"checkpoint {path} holds method {out['method']!r}, but it was given to the loader of "
                            f"method {method!r}. Load it with its own method (rpl.methods.load(path), or "
                            f"rpl-eval --checkpoint {path}, which picks the method from the file).")
    return out


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file carrying rpl checkpoint metadata."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            fmt = (fh.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return False
    return fmt == FORMAT or fmt in LEGACY_FORMATS


def load_addon(path: str | os.PathLike, model: Any, check_base: bool = True) -> dict[str, Any]:
    """Load the add-on weights of ``path`` into ``model`` (an ``RPLSegmenter``); returns the metadata."""
    path = Path(path)
    meta = read_metadata(path, method="rpl")
    if check_base:
        ours = fingerprint(model.segmenter)
        if meta["base_fingerprint"] != ours:
            raise RPLInputError(
                f"checkpoint {path} was trained on a different base model ({meta.get('base_class')}, fingerprint "
                f"{meta['base_fingerprint'][:12]}...) than the one given ({type(model.segmenter).__name__}, "
                f"fingerprint {ours[:12]}...). An add-on only fits the exact frozen weights it was trained on; "
                "load the matching segmenter weights.")
    state = strip_prefix(load_file(str(path)))
    addon = model.bare_addon
    expected = addon.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise RPLInputError(f"checkpoint {path} does not fit this add-on: missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}, shape mismatch {wrong[:5]}. Was it written for another block config?")
    addon.load_state_dict(state)
    return meta


def load(path: str | os.PathLike, segmenter: nn.Module, check_base: bool = True, **wrap_kwargs: Any) -> Any:
    """Wrap ``segmenter`` exactly as recorded in checkpoint ``path`` and load the add-on weights."""
    from rpl.wrapping import wrap

    meta = read_metadata(path, method="rpl")
    w = meta["wrap"]
    kwargs = dict(head=w["head"], feature=w["feature"], block=BlockConfig.from_dict(w["block"]),
                  smoothing=tuple(w["smoothing"]) if w.get("smoothing") else None)
    kwargs.update(wrap_kwargs)
    model = wrap(segmenter, **kwargs)
    got = (model.bare_addon.feature_channels, model.bare_addon.head_channels)
    if got != (w["feature_channels"], w["head_channels"]):
        raise RPLInputError(f"checkpoint {path} expects feature/head channels {w['feature_channels']}/"
                            f"{w['head_channels']}, the given segmenter has {got[0]}/{got[1]}: it is for another model.")
    load_addon(path, model, check_base=check_base)
    return model
