"""Add-on checkpoints: safetensors weights + metadata (config, wrap arguments, base fingerprint).

Only the add-on is stored (the segmenter stays the user's); a SHA-256 fingerprint of the frozen
base weights makes loading onto another segmenter fail loudly instead of giving silent garbage.
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

FORMAT = "rpl-addon/1"


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


def save(path: str | os.PathLike, model: Any, extra: dict[str, Any] | None = None,
         base_fingerprint: str | None = None) -> Path:
    """Write ``model``'s add-on (an ``RPLSegmenter``) to ``path`` (.safetensors) with its metadata.

    ``extra`` (JSON-serialisable: metrics, training config, the segmenter's spec) goes in the metadata.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    addon = model.bare_addon
    tensors = {k: v.detach().cpu().contiguous() for k, v in addon.state_dict().items()}
    meta = {
        "format": FORMAT,
        "wrap": json.dumps(model.wrap_arguments()),
        "base_fingerprint": base_fingerprint or fingerprint(model.segmenter),
        "base_class": type(model.segmenter).__name__,
        "extra": json.dumps(extra or {}),
    }
    atomic_save_file(tensors, path, meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an add-on checkpoint, JSON fields decoded."""
    path = Path(path)
    if not path.is_file():
        raise RPLInputError(f"checkpoint {path} does not exist; expected an add-on .safetensors file from rpl-train.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise RPLInputError(f"checkpoint {path} is not a readable safetensors file ({err}); expected an add-on "
                            "checkpoint written by rpl-train or rpl.save.") from None
    if meta.get("format") != FORMAT:
        raise RPLInputError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r} (an RPL add-on "
                            "written by rpl-train or rpl.save).")
    out: dict[str, Any] = dict(meta)
    for key in ("wrap", "extra"):
        out[key] = json.loads(meta.get(key) or "{}")
    return out


def load_addon(path: str | os.PathLike, model: Any, check_base: bool = True) -> dict[str, Any]:
    """Load the add-on weights of ``path`` into ``model`` (an ``RPLSegmenter``); returns the metadata."""
    path = Path(path)
    meta = read_metadata(path)
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
    """Wrap ``segmenter`` exactly as recorded in checkpoint ``path`` and load the add-on weights.

    The model comes back in eval mode, ready for inference: the add-on's BatchNorm uses its stored
    statistics (scores do not depend on the batch, a batch of one works) and nothing it sees changes
    them. To train it further call ``model.train()`` (only the add-on switches; the frozen segmenter
    always stays in eval mode) or continue a run with ``rpl-train --resume``.
    """
    from rpl.wrapping import wrap

    meta = read_metadata(path)
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
    return model.eval()
