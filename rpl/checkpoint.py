"""Checkpoints of every method: safetensors tensors + metadata naming the method (one format).

Metadata keys: ``format`` (:data:`FORMAT`), ``method`` (a name from ``rpl.methods.available()``),
``base_fingerprint`` / ``base_class`` (the segmenter the method was built on), ``extra`` (JSON: the
segmenter's spec, training config, metrics, ...) and the method's own JSON fields (RPL: ``wrap``;
PEBAL: ``pebal``; REAL: ``real``), each checked field by field (:class:`MetadataSchema`) before anything is used.
Add-on methods store only their add-on (the segmenter stays the user's), and the SHA-256
fingerprint of the frozen base makes loading onto another segmenter fail loudly instead of giving
silent garbage. Fine-tuned methods store the tuned segmenter under ``segmenter.*`` keys, so such a
file can also serve as the weights of a frozen base (``rpl.models.read_state_dict``). Files of the
older add-on format (``rpl-addon/1``) read as method ``rpl``. Files are written to a temporary
name and renamed, so a kill while saving never corrupts the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rpl.blocks import BlockConfig
from rpl.errors import RPLInputError

FORMAT = "rpl-checkpoint/1"
ADDON_FORMAT = "rpl-addon/1"  # RPL add-ons written before methods were plug-ins: method rpl
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
    """Keys without a *leading* DDP/DataParallel ``module.`` (repeated for nested wrappers).

    Only the start of a key is touched: ``encoder.submodule.weight`` keeps its name. Uses
    ``torch.nn.modules.utils.consume_prefix_in_state_dict_if_present``; returns a new dict.
    """
    from collections import OrderedDict

    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    out = OrderedDict(state)
    while any(k.startswith(prefix) for k in out):
        consume_prefix_in_state_dict_if_present(out, prefix)
    return dict(out)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; a checkpoint is as shareable as any output
    os.replace(tmp, path)


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], method: str, base_fingerprint: str,
                     base_class: str, fields: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` with the metadata of method ``method`` (``fields``: its own JSON fields)."""
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


# -- metadata: bounded, validated, never evaluated -------------------------------------------------
MAX_HEADER_BYTES = 64 * 2**20  # safetensors header (tensor table + metadata); ours are a few KB
MAX_FIELD_BYTES = 2**20  # one metadata value


class FieldError(ValueError):
    """What is wrong with one metadata field (``subfield``: the key path inside a JSON field)."""

    def __init__(self, problem: str, subfield: str = ""):
        super().__init__(problem)
        self.problem, self.subfield = problem, subfield


@dataclass(frozen=True)
class MetadataField:
    """One metadata entry of a checkpoint kind: its name, whether it holds JSON, and its check."""

    name: str
    required: bool = True
    json: bool = False  # the value is JSON text (decoded before ``check``)
    default: Any = None  # when missing and not required
    check: Callable[[Any], None] | None = None  # raises FieldError (or RPLInputError)
    max_bytes: int = MAX_FIELD_BYTES


@dataclass(frozen=True)
class MetadataSchema:
    """A checkpoint kind: its ``format`` string, fields, and what to call it in messages."""

    format: str
    fields: tuple[MetadataField, ...]
    what: str = "an RPL add-on written by rpl-train or rpl.save"


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The raw ``__metadata__`` of a safetensors file, its size checked before anything is parsed."""
    path = Path(path)
    if not path.is_file():
        raise RPLInputError(f"checkpoint {path} does not exist (or is not a regular file); expected a .safetensors "
                            "checkpoint from rpl-train or rpl.save.")
    def bad(problem: str) -> RPLInputError:
        return RPLInputError(f"checkpoint {path} is not a readable safetensors file ({problem}); expected a "
                             "checkpoint written by rpl-train or rpl.save.")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"its header claims {n} bytes; the file has {size} and at most {MAX_HEADER_BYTES} are read")
            raw = fh.read(n)
    except OSError as err:
        raise bad(f"{type(err).__name__}: {err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"its header is not JSON: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise RPLInputError(f"checkpoint {path}: metadata field __metadata__ is a JSON {type(meta).__name__}; "
                            "safetensors metadata is an object of strings.")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise RPLInputError(f"checkpoint {path}: metadata field {str(key)[:100]} is a JSON {type(value).__name__}; "
                                "safetensors metadata values are strings.")
    return meta


def decode_metadata(path: str | os.PathLike, raw: dict[str, str], schema: MetadataSchema) -> dict[str, Any]:
    """``raw`` metadata checked against ``schema``: format, presence, size, JSON, each field's check.

    Every problem is an ``RPLInputError`` naming the file and the field; fields not in the schema are
    kept as text (unchecked, unused).
    """
    def bad(name: str, problem: str) -> RPLInputError:
        return RPLInputError(f"checkpoint {path}: metadata field {name} {problem}; expected {schema.what}.")

    fmt = raw.get("format")
    if fmt != schema.format:
        shown = "missing" if fmt is None else f"is {fmt[:100]!r}"
        raise bad("format", f"{shown}, not {schema.format!r}")
    out: dict[str, Any] = dict(raw)
    for f in schema.fields:
        if f.name not in raw:
            if f.required:
                raise bad(f.name, "is missing")
            out[f.name] = f.default() if callable(f.default) else f.default
            continue
        text = raw[f.name]
        if len(text) > f.max_bytes:
            raise bad(f.name, f"holds {len(text)} characters, more than the {f.max_bytes} allowed")
        value: Any = text
        if f.json:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as err:
                raise bad(f.name, f"is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
        if f.check is not None:
            try:
                f.check(value)
            except FieldError as err:
                raise bad(f"{f.name}.{err.subfield}" if err.subfield else f.name, err.problem) from None
        out[f.name] = value
    return out


# -- checks of the add-on's fields -------------------------------------------------------------------
def _text(value: Any, subfield: str, optional: bool = False, max_len: int = 1000) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise FieldError(f"is {str(value)[:60]!r}; expected a non-empty string of at most {max_len} characters"
                         + (" or null" if optional else ""), subfield)


def _count(value: Any, subfield: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1_000_000:
        raise FieldError(f"is {str(value)[:60]!r}; expected a positive integer", subfield)


def _object(value: Any, subfield: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldError(f"is a JSON {type(value).__name__}; expected an object", subfield)
    return value


def check_fingerprint(value: str) -> None:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise FieldError(f"is {value[:80]!r}; expected the 64 hex digits of a SHA-256")


def check_smoothing(smoothing: Any) -> None:
    """A recorded score blur: null, or ``[kernel size 1..1001, finite sigma > 0]``."""
    if smoothing is not None and not (
            isinstance(smoothing, list) and len(smoothing) == 2
            and isinstance(smoothing[0], int) and not isinstance(smoothing[0], bool) and 0 < smoothing[0] <= 1001
            and isinstance(smoothing[1], (int, float)) and not isinstance(smoothing[1], bool)
            and math.isfinite(smoothing[1]) and smoothing[1] > 0):
        raise FieldError(f"is {str(smoothing)[:60]}; expected null or [kernel size, sigma > 0]", "smoothing")


def check_wrap(value: Any) -> None:
    """``wrap``: what :func:`rpl.wrap` needs to rebuild the add-on (see ``RPLSegmenter.wrap_arguments``)."""
    w = _object(value)
    _text(w.get("head"), "head")
    _text(w.get("feature"), "feature", optional=True)
    for key in ("feature_channels", "head_channels"):
        _count(w.get(key), key)
    _count(w.get("stride"), "stride", optional=True)
    check_smoothing(w.get("smoothing"))
    block = _object(w.get("block", {}), "block")
    from rpl.models.factories import FactoryArgumentError, check_signature

    try:
        check_signature(BlockConfig, block, "BlockConfig")
    except FactoryArgumentError as err:
        raise FieldError(str(err), "block") from None
    for key in ("width", "projection_dim"):  # types checked above; here the ranges
        _count(block.get(key), f"block.{key}", optional=True)
    rates = block.get("rates")
    if rates is not None and not (isinstance(rates, list) and 0 < len(rates) <= 16 and all(
            isinstance(r, int) and not isinstance(r, bool) and 0 < r <= 1000 for r in rates)):
        raise FieldError(f"is {str(rates)[:60]}; expected null or a list of positive dilations", "block.rates")


def check_extra(path: str | os.PathLike) -> Callable[[Any], None]:
    """``extra``: a JSON object; its ``segmenter`` entry, when present, a valid segmenter spec."""
    def check(value: Any) -> None:
        extra = _object(value)
        if extra.get("segmenter") is not None:
            from rpl.models.loading import SegmenterSpec

            SegmenterSpec.from_dict(extra["segmenter"], where="extra.segmenter", source=path)
    return check


def common_fields(path: str | os.PathLike) -> tuple[MetadataField, ...]:
    """The fields every method's checkpoint has."""
    return (MetadataField("base_fingerprint", check=check_fingerprint),
            MetadataField("base_class", required=False, default="", check=lambda v: _text(v, "", max_len=200)),
            MetadataField("extra", required=False, json=True, default=dict, check=check_extra(path)))


def addon_schema(path: str | os.PathLike, fmt: str = ADDON_FORMAT) -> MetadataSchema:
    return MetadataSchema(fmt, (MetadataField("wrap", json=True, check=check_wrap), *common_fields(path)))


def method_schema(path: str | os.PathLike, method: str) -> MetadataSchema:
    """The schema of ``method``'s checkpoints: the common fields plus the method's own
    (``Method.metadata_fields``)."""
    from rpl.methods import get

    own = get(method).metadata_fields(path)
    return MetadataSchema(FORMAT, (MetadataField("method"), *own, *common_fields(path)),
                          what=f"a {method!r} checkpoint written by rpl-train")


def read_metadata(path: str | os.PathLike, method: str | None = None) -> dict[str, Any]:
    """The metadata of a checkpoint, every field checked; ``method`` given: it must be that method's."""
    raw = read_header(path)
    fmt = raw.get("format")
    if fmt == ADDON_FORMAT:
        out = decode_metadata(path, raw, addon_schema(path))
        out["method"] = "rpl"
    else:
        if fmt != FORMAT:
            shown = "missing" if fmt is None else f"is {str(fmt)[:100]!r}"
            raise RPLInputError(f"checkpoint {path}: metadata field format {shown}, not {FORMAT!r}; expected a "
                                "checkpoint written by rpl-train or rpl.save.")
        from rpl.methods import available

        name = raw.get("method")
        if name not in available():
            raise RPLInputError(f"checkpoint {path}: metadata field method is {str(name)[:100]!r}; expected one of "
                                f"{', '.join(available())}.")
        out = decode_metadata(path, raw, method_schema(path, name))
    if method is not None and out["method"] != method:
        raise RPLInputError(f"checkpoint {path} holds method {out['method']!r}, but it was given to the loader of "
                            f"method {method!r}. Load it with its own method (rpl.methods.load(path), or "
                            f"rpl-eval --checkpoint {path}, which picks the method from the file).")
    return out


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file carrying rpl checkpoint metadata (format only; not validated)."""
    try:
        fmt = read_header(path).get("format")
    except RPLInputError:
        return False
    return fmt in (FORMAT, ADDON_FORMAT)


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
    try:
        state = strip_prefix(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as err:
        raise RPLInputError(f"checkpoint {path}: its tensors could not be read ({type(err).__name__}: "
                            f"{str(err)[:200]}); the file is damaged or not an add-on checkpoint.") from None
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

    meta = read_metadata(path, method="rpl")
    w = meta["wrap"]
    kwargs = dict(head=w["head"], feature=w.get("feature"), block=BlockConfig.from_dict(w.get("block")),
                  smoothing=tuple(w["smoothing"]) if w.get("smoothing") else None)
    for key in ("adapter", "logits"):
        if w.get(key) is not None:
            kwargs[key] = w[key]
    kwargs.update(wrap_kwargs)
    model = wrap(segmenter, **kwargs)
    try:  # all-or-nothing, as wrap: a checkpoint that does not fit leaves the segmenter unwrapped
        got = (model.bare_addon.feature_channels, model.bare_addon.head_channels)
        if got != (w["feature_channels"], w["head_channels"]):
            raise RPLInputError(f"checkpoint {path} expects feature/head channels {w['feature_channels']}/"
                                f"{w['head_channels']}, the given segmenter has {got[0]}/{got[1]}: it is for another "
                                "model.")
        load_addon(path, model, check_base=check_base)
    except BaseException:
        model.unwrap()
        raise
    return model.eval()


def from_checkpoint(path: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                    trust_checkpoint: bool = False, device: str | torch.device = "cpu") -> Any:
    """The model of checkpoint ``path`` (any method), on the segmenter it records, in eval mode.

    ``out = model(images)`` then gives ``out.logits`` and ``out.anomaly`` (the method's score map);
    images are normalised with ``model.segmenter_spec.mean/std`` (the recorded normalisation) first.
    ``model.method_name`` is the checkpoint's method (``rpl.methods.method_of``).
    The recorded factory must be a listed one (``rpl.models.factories``) and its weights file must lie
    next to the checkpoint: ``weights`` names the segmenter weights yourself, ``trust_checkpoint=True``
    allows an unlisted factory after you have read it (the refusal message prints the call).
    """
    from rpl.methods import get
    from rpl.models.loading import SegmenterSpec, build_segmenter

    path = Path(path)
    meta = read_metadata(path)
    recorded = meta["extra"].get("segmenter")
    if recorded is None:
        raise RPLInputError(f"checkpoint {path} records no segmenter (metadata field extra.segmenter is missing); "
                            "build the segmenter it was trained on yourself and use rpl.methods.get(method)"
                            ".load(path, segmenter).")
    spec = SegmenterSpec.from_dict(recorded, where="extra.segmenter", source=path)
    segmenter = build_segmenter(spec, recorded_in=path, trust_checkpoint=trust_checkpoint, weights=weights)
    model = get(meta["method"]).load(path, segmenter.to(device)).to(device).eval()
    model.segmenter_spec = spec
    model.method_name = meta["method"]  # rpl.methods.method_of: what rpl-predict / rpl-export score by default
    return model


def pretrained(device: str | torch.device = "cpu") -> Any:
    """The shipped SynthStreets model (``weights/rpl_synthstreets.safetensors``), as :func:`from_checkpoint`."""
    from rpl.models.loading import SHIPPED_WEIGHTS

    path = SHIPPED_WEIGHTS / "rpl_synthstreets.safetensors"
    if not path.is_file():
        raise RPLInputError(f"the shipped checkpoint {path} is missing (an install without the weights/ folder?); "
                            "reinstall from the repository, or use rpl.from_checkpoint(FILE).")
    return from_checkpoint(path, device=device)
