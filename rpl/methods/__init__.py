"""Anomaly methods as plug-ins: each module of this package defines and registers its methods.

    rpl.methods.available()              # ['energy', 'entropy', 'maxlogit', 'mcdropout', 'msp', 'pebal', 'real', 'rpl']
    method = rpl.methods.get("pebal")
    model = method.load("pebal.safetensors")   # forward -> .logits (B, K, H, W) and .anomaly (B, H, W)
    rpl.methods.method_of(model)               # 'pebal': the method a model belongs to (None: bare segmenter)

A method says how it is built on a segmenter (nothing, a frozen add-on, or a fine-tuned copy with
extra channels), which parameters train, its loss on a training batch, how it scores an image
(higher = more anomalous) and how it is saved and loaded (see :class:`rpl.methods.base.Method`).
Adding a method is one new module here (found by :func:`available` without being listed anywhere)
and its test. docs/methods.md describes every method and the facts its code relies on.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from rpl.errors import RPLInputError

if TYPE_CHECKING:
    from rpl.methods.base import Method

_REGISTRY: dict[str, "Method"] = {}
_INFRASTRUCTURE = {"base"}
_discovered = False


def register(cls: type) -> type:
    """Class decorator: instantiate ``cls`` and make it available under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ValueError(f"method name {name!r} is registered twice ({type(_REGISTRY[name]).__name__}, {cls.__name__})")
    _REGISTRY[name] = cls()
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def available() -> list[str]:
    """Names of every registered method, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> "Method":
    """The registered method ``name``; an unknown name is an input error listing the known ones."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RPLInputError(f"unknown method {name!r}; known methods: {', '.join(available())}.") from None


def trainable() -> list[str]:
    """Names of the methods ``rpl-train --method`` accepts."""
    return [n for n in available() if _REGISTRY[n].trainable]


def load(path, segmenter=None, **kwargs):
    """The model of any method's checkpoint: its forward returns ``.logits`` and ``.anomaly``.

    The method is read from the file's metadata (and recorded as ``model.method_name``, see
    :func:`method_of`); ``segmenter`` None builds the segmenter the checkpoint records (add-on
    methods) or its stored tuned copy (fine-tuned methods).
    """
    from rpl.checkpoint import read_metadata

    name = read_metadata(path)["method"]
    model = get(name).load(path, segmenter, **kwargs)
    model.method_name = name
    return model


def method_of(model) -> str | None:
    """The name of the method ``model`` belongs to, or None for a bare segmenter (post-hoc scores only).

    ``model.method_name`` when set: ``rpl.from_checkpoint`` and :func:`load` record the checkpoint's
    method there. Otherwise, for a model around a segmenter (it has ``.segmenter``, as the models of
    add-on and fine-tuned methods do, e.g. one just built by ``Method.build``), the one method that
    is not post-hoc whose ``check_model`` accepts it; none gives None, several an input error.
    """
    name = getattr(model, "method_name", None)
    if isinstance(name, str):
        return get(name).name
    if not hasattr(model, "segmenter"):
        return None
    accepted = []
    for n in available():
        method = _REGISTRY[n]
        if method.kind == "post-hoc":
            continue
        try:
            method.check_model(model)
        except RPLInputError:
            continue
        accepted.append(n)
    if len(accepted) > 1:
        raise RPLInputError(f"cannot tell which method the {type(model).__name__} model belongs to: "
                            f"{', '.join(accepted)} all accept it; set model.method_name = NAME (rpl.from_checkpoint "
                            "and rpl.methods.load record it).")
    return accepted[0] if accepted else None
