"""``rpl.wrap``: attach a trainable residual block to a frozen segmenter without changing its output.

How it works, in one segmenter forward (the backbone runs once):
1. a forward hook on the ``feature`` module keeps the deep feature ``f``;
2. a pre-hook on the first module of the ``head`` block computes ``r = R(f)`` and ``d + r``;
3. the head runs as usual on ``d`` (closed-set); a forward hook on its last module runs the head
   block again on ``d + r`` and hands ``cat([z0, z])`` (batch 2B) to whatever follows the head
   (the segmenter's own upsampling, dict or HF outputs), so both get the same spatial treatment;
4. the batch is split again: the first half is bit-for-bit the segmenter's own output.
A probe at wrap time checks 4 on a dummy batch and refuses models for which it does not hold.
Mask-classification models (Mask2Former) use another attachment, see :mod:`rpl.adapters`.

The same hooks (:class:`HookedSegmenter`) carry other add-ons: ``wrap(..., build=...)`` attaches
one that makes the second half from ``d`` or ``f`` directly (REAL's redundancy classifiers,
``rpl.methods.real``), with the same probe and the same guarantees.

A wrap is all-or-nothing: if anything fails, the segmenter is left exactly as it was given
(``requires_grad``, train/eval mode of every module, hooks). ``model.unwrap()`` gives it back too.
"""
from __future__ import annotations

import ast
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from rpl import presets
from rpl.blocks import BlockConfig, RPLAddon
from rpl.errors import RPLInputError
from rpl.scores import energy, smooth

_INDEXED = re.compile(r"^(?P<path>.*?)\[(?P<start>-?\d*)(?P<colon>:?)(?P<stop>-?\d*)\]$")
_SELECTOR = re.compile(r"\[\s*(-?\d+|'[^']*'|\"[^\"]*\")\s*\]")
LOGIT_KEYS = ("out", "logits", "seg_logits", "pred")  # dict keys (or attributes) that hold the logits
DEFAULT_PROBE = (64, 64)
LogitsOption = str | Callable[[Any], torch.Tensor] | None


@dataclass
class RPLOutput:
    """What the wrapped model returns. ``logits`` is exactly the frozen segmenter's output."""

    logits: torch.Tensor  # closed-set logits (B, K, H, W), identical to the segmenter's
    anomaly_logits: torch.Tensor  # perturbed logits z, same shape and spatial treatment
    embedding: torch.Tensor | None = None  # CoroCL projection at the head resolution (training only)
    raw: Any = None  # the segmenter's own output object (dict, HF output, ...) for its closed-set half
    smoothing: tuple[int, float] | None = (7, 1.0)  # Gaussian blur of the anomaly map (kernel, sigma)
    _anomaly: torch.Tensor | None = field(default=None, repr=False)

    @property
    def anomaly(self) -> torch.Tensor:
        """``(B, H, W)`` free energy ``-lse(z)`` of the perturbed logits, blurred; higher = more anomalous."""
        if self._anomaly is None:
            with torch.no_grad():
                s = energy(self.anomaly_logits.detach())
                self._anomaly = smooth(s, *self.smoothing) if self.smoothing else s
        return self._anomaly


# -- names: head chains and feature selectors ----------------------------------------------------
def resolve_chain(model: nn.Module, name: str) -> list[nn.Module]:
    """Modules of a head block given as ``a.b``, ``a.b[i]`` or a slice ``a.b[i:]`` of an ``nn.Sequential``."""
    match = _INDEXED.match(name)
    path = match.group("path") if match else name
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        raise RPLInputError(f"head module {path!r} (from {name!r}) does not exist in {type(model).__name__}; "
                            f"{_names_hint(model)}") from None
    if not match:
        return [module]
    if not isinstance(module, (nn.Sequential, nn.ModuleList)):
        raise RPLInputError(f"{name!r}: indexing needs an nn.Sequential or nn.ModuleList, but {path!r} is a "
                            f"{type(module).__name__}.")
    start = int(match.group("start") or 0)
    if match.group("colon"):
        stop = int(match.group("stop")) if match.group("stop") else len(module)
        chain = list(module)[start:stop]
    else:
        chain = [module[start]]
    if not chain:
        raise RPLInputError(f"{name!r} selects no module ({path!r} has {len(module)}).")
    return chain


def parse_feature(name: str) -> tuple[str, list[int | str]]:
    """``"encoder[-1]"`` -> ``("encoder", [-1])``; ``"backbone['out']"`` -> ``("backbone", ["out"])``.

    Brackets in a feature name select from the module's *output* (a list, tuple or dict of maps);
    submodules are named with dots (``stem.2``).
    """
    bracket = name.find("[")
    path, rest = (name, "") if bracket < 0 else (name[:bracket], name[bracket:])
    selectors: list[int | str] = []
    pos = 0
    for m in _SELECTOR.finditer(rest):
        if m.start() != pos:
            break
        selectors.append(ast.literal_eval(m.group(1)))
        pos = m.end()
    if pos != len(rest) or not path.strip():
        raise RPLInputError(f"feature {name!r} is not of the form module.path, module.path[-1] or "
                            "module.path['key'] (brackets select an item of the module's output).")
    return path, selectors


def _describe(value: Any, depth: int = 0) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if depth > 1:
        return type(value).__name__
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}[" + ", ".join(_describe(v, depth + 1) for v in value[:6]) + "]"
    return type(value).__name__


def select_feature(output: Any, selectors: Sequence[int | str], name: str) -> torch.Tensor:
    """The map ``name`` reads from a module's output: the explicit selectors, then the default rule.

    Default rule, applied until a tensor is reached: a dict (or HF output) gives ``out`` or its only
    entry; a list/tuple gives its last item (the deepest stage of a backbone).
    """
    value = output
    for s in selectors:
        try:
            value = value[s]
        except (KeyError, IndexError, TypeError):
            raise RPLInputError(f"feature {name!r}: cannot take [{s!r}] from {_describe(value)} (the output of the "
                                "feature module).") from None
    for _ in range(4):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, Mapping):
            present = {k: v for k, v in value.items() if v is not None}
            if "out" in present:
                value = present["out"]
            elif len(present) == 1:
                value = next(iter(present.values()))
            else:
                break
        elif isinstance(value, (tuple, list)) and value:
            value = value[-1]
        else:
            break
    raise RPLInputError(f"feature {name!r} gives {_describe(value)}; expected a 4-D map. Select one with brackets, "
                        "e.g. feature='encoder[-1]' for a list output or feature=\"backbone['out']\" for a dict.")


def _names_hint(model: nn.Module, limit: int = 25) -> str:
    names = [n for n, _ in model.named_children()]
    return f"its top-level modules are: {', '.join(names[:limit])}"


# -- outputs ---------------------------------------------------------------------------------------
def extract_logits(output: Any, logits: LogitsOption = None) -> torch.Tensor:
    """The logits in a segmenter's output: a tensor, a dict/HF output under ``out``/``logits``/
    ``seg_logits``/``pred``, a tuple's first item; or what ``logits`` (a key or a callable) says."""
    if callable(logits):
        value = logits(output)
        if not isinstance(value, torch.Tensor):
            raise RPLInputError(f"the logits= callable returned {type(value).__name__}, expected a tensor.")
        return value
    if isinstance(logits, str):
        value = output.get(logits) if isinstance(output, Mapping) else getattr(output, logits, None)
        if not isinstance(value, torch.Tensor):
            raise RPLInputError(f"logits={logits!r}: the segmenter's output {_describe(output)} has no tensor "
                                f"under {logits!r}.")
        return value
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in LOGIT_KEYS:
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
    for key in LOGIT_KEYS[1:]:
        if not isinstance(output, Mapping) and isinstance(getattr(output, key, None), torch.Tensor):
            return getattr(output, key)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hint = ""
    if isinstance(output, Mapping) and ("pred_masks" in output or "masks_queries_logits" in output):
        hint = (" It looks like a mask-classification output (masks + classes): such models need per-pixel "
                "scores, see rpl.adapters (Mask2Former has the preset 'hf-mask2former').")
    raise RPLInputError(f"cannot find logits in the segmenter's output {_describe(output)}; looked for a tensor, the "
                        f"keys {', '.join(LOGIT_KEYS)}, a .logits attribute and a tuple's first item. Pass "
                        f"logits='KEY' or logits=callable(output) -> tensor.{hint}")


def _split_raw(output: Any, batch: int) -> Any:
    """The segmenter's output object with every tensor of batch ``2 * batch`` cut to its closed-set half."""
    if isinstance(output, torch.Tensor):
        return output[:batch] if output.dim() and output.shape[0] == 2 * batch else output
    if isinstance(output, Mapping):
        items = {k: _split_raw(v, batch) for k, v in output.items()}
        try:
            return type(output)(**items) if hasattr(output, "to_tuple") else type(output)(items)
        except TypeError:
            return items
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(_split_raw(v, batch) for v in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_split_raw(v, batch) for v in output)
    return output


# -- the wrapped model -----------------------------------------------------------------------------
class _Snapshot:
    """What a wrap changes on the caller's segmenter, to put back on failure or ``unwrap()``."""

    def __init__(self, segmenter: nn.Module):
        self.requires_grad = [(p, p.requires_grad) for p in segmenter.parameters()]
        self.training = [(m, m.training) for m in segmenter.modules()]

    def restore(self) -> None:
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag


def wrapper_of(segmenter: nn.Module) -> "HookedSegmenter | None":
    """The wrapper (``RPLSegmenter`` or another add-on's :class:`HookedSegmenter`) whose hooks sit on ``segmenter``."""
    for m in segmenter.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for hook in hooks.values():
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, HookedSegmenter):
                    return owner
    return None


class HookedSegmenter(nn.Module):
    """A frozen segmenter plus a trainable add-on that reads the head's input ``d`` (and the feature ``f``).

    The hooks and guarantees every add-on shares: the frozen segmenter (eval mode, no gradients),
    the head chain and feature module, one head call per forward, the hooks acting only inside this
    model's forward, and the batch doubled after the head (the first half the segmenter's own,
    bit-for-bit; the second half what the add-on makes of the head's output, :meth:`_second_half`),
    so that both halves get the segmenter's own upsampling. Subclasses: :class:`RPLSegmenter`,
    ``rpl.methods.real.REALSegmenter``. Build them with :func:`wrap` (its ``build=`` argument).
    """

    adapter = "dense"

    def __init__(self, segmenter: nn.Module, head: str, feature: str | None, addon: nn.Module,
                 smoothing: tuple[int, float] | None = (7, 1.0), logits: LogitsOption = None,
                 snapshot: _Snapshot | None = None):
        super().__init__()
        self.segmenter = segmenter
        self.addon = addon
        self.head_name, self.feature_name, self.smoothing = head, feature, smoothing
        self.logits_option = logits
        self._feature_path, self._selectors = parse_feature(feature) if feature is not None else (None, [])
        object.__setattr__(self, "_chain", self._resolve_head())  # plain list: the modules live in segmenter
        object.__setattr__(self, "_snapshot", snapshot or _Snapshot(segmenter))
        self._state: dict[str, Any] = {}
        self._reentrant = False
        self._active = False  # hooks act only inside our forward: the bare segmenter still works alone
        self._handles: list[Any] = []
        self._freeze()
        self._attach()

    def _resolve_head(self) -> list[nn.Module]:
        return resolve_chain(self.segmenter, self.head_name)

    def _hooks(self) -> list[tuple[nn.Module, str, Callable]]:
        hooks = [(self._chain[0], "pre", self._head_pre_hook), (self._chain[-1], "post", self._head_post_hook)]
        if self._feature_path is not None:
            hooks.append((self.segmenter.get_submodule(self._feature_path), "post", self._feature_hook))
        return hooks

    def _attach(self) -> None:
        for module, kind, fn in self._hooks():
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            self._handles.append(register(fn))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def unwrap(self) -> nn.Module:
        """Remove every hook and give the segmenter back as it was passed to :func:`wrap`."""
        self._detach()
        self._snapshot.restore()
        segmenter = self.segmenter
        self._chain.clear()
        return segmenter

    def segmenter_copy(self) -> nn.Module:
        """A deep copy of the bare segmenter, without this wrapper's hooks (for MC dropout)."""
        self._detach()
        try:
            return copy.deepcopy(self.segmenter)
        finally:
            self._attach()

    def __deepcopy__(self, memo: dict) -> "HookedSegmenter":
        """A copy with its own segmenter, add-on and hooks (hook handles are not copyable as they are)."""
        self._detach()
        try:
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                new.__dict__[key] = [] if key == "_handles" else copy.deepcopy(value, memo)
            new._attach()
        finally:
            self._attach()
        return new

    # -- frozen guarantee ---------------------------------------------------------------------
    def _freeze(self) -> None:
        self.segmenter.eval()
        for p in self.segmenter.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "HookedSegmenter":
        super().train(mode)
        self.segmenter.eval()  # BatchNorm statistics and dropout of the frozen model never change
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "HookedSegmenter":
        self.addon.requires_grad_(requires_grad)
        return self

    @property
    def bare_addon(self) -> nn.Module:
        """The add-on without a DDP wrapper (a trainer may replace ``addon`` by ``DDP(addon)``)."""
        return getattr(self.addon, "module", self.addon)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters an optimiser should see: the add-on's only."""
        return self.addon.parameters()

    def closed_set_logits(self, output: Any) -> torch.Tensor:
        """The logits in an output of the *bare* segmenter, read as this wrapper reads them."""
        return extract_logits(output, self.logits_option)

    # -- hooks --------------------------------------------------------------------------------
    def _feature_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active and not self._reentrant and "f" not in self._state:
            self._state["f"] = select_feature(output, self._selectors, self.feature_name or "")

    def _head_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self._reentrant or not self._active:
            return
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise RPLInputError(f"head block {self.head_name!r} is called with {len(args)} input(s) {_describe(args)}; "
                                "RPL needs a head "
                                "whose only input is the feature map d.")
        d = args[0]
        f = self._state.get("f", d if self.feature_name is None else None)
        if f is None:
            raise RPLInputError(f"feature module {self.feature_name!r} had not run when head {self.head_name!r} was "
                                "called; choose a feature computed before the head.")
        self._head_input(f, d)
        self._state["head_calls"] = self._state.get("head_calls", 0) + 1

    def _head_post_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._reentrant or not self._active:
            return None
        return torch.cat([output, self._second_half(output).to(output.dtype)], dim=0)

    # what an add-on does at the hooks (subclasses) ---------------------------------------------
    def _head_input(self, f: torch.Tensor, d: torch.Tensor) -> None:
        """Called before the frozen head runs on ``d``: keep in ``self._state`` what the add-on needs."""
        raise NotImplementedError

    def _second_half(self, output: torch.Tensor) -> torch.Tensor:
        """The add-on's map at the head's output (same shape as ``output``), batch-concatenated after it."""
        raise NotImplementedError

    def _output(self, closed: torch.Tensor, second: torch.Tensor, raw: Any, state: dict[str, Any]) -> Any:
        """What ``forward`` returns from the closed-set logits, the second half and the segmenter's own output."""
        raise NotImplementedError

    def _check_probe_output(self, out: Any, reference: torch.Tensor) -> None:
        """Refuse, at wrap time, a model whose add-on output does not fit (closed-set identity is checked already)."""

    # -- forward ------------------------------------------------------------------------------
    def _run(self, images: torch.Tensor) -> Any:
        if not self._handles:
            raise RPLInputError("this wrapper was unwrapped; wrap the segmenter again with rpl.wrap.")
        if not torch.compiler.is_compiling() and self.segmenter.training:
            self.segmenter.eval()
        self._state = {}
        self._active = True
        try:
            return self.segmenter(images)
        except BaseException:
            self._state = {}
            raise
        finally:
            self._active = False

    def forward(self, images: torch.Tensor) -> RPLOutput:
        raw = self._run(images)
        calls = self._state.get("head_calls", 0)
        if calls != 1:
            self._state = {}
            raise RPLInputError(f"head block {self.head_name!r} ran {calls} times in one forward; RPL needs exactly "
                                "one call per forward (multi-scale or shared heads are not supported).")
        both = extract_logits(raw, self.logits_option)
        batch = images.shape[0]
        state, self._state = self._state, {}
        if both.shape[0] != 2 * batch:
            raise RPLInputError(f"the segmenter's output has batch {both.shape[0]}, expected {2 * batch}: something "
                                f"after head {self.head_name!r} mixes the batch.")
        return self._output(both[:batch].detach(), both[batch:], _split_raw(raw, batch), state)


class RPLSegmenter(HookedSegmenter):
    """A frozen segmenter plus the RPL add-on. Build it with :func:`wrap`."""

    def __init__(self, segmenter: nn.Module, head: str, feature: str | None, addon: RPLAddon,
                 smoothing: tuple[int, float] | None = (7, 1.0), logits: LogitsOption = None,
                 snapshot: _Snapshot | None = None):
        super().__init__(segmenter, head, feature, addon, smoothing, logits, snapshot)
        self.return_embedding: bool | None = None  # None: embeddings exactly when the add-on trains

    def _head_input(self, f: torch.Tensor, d: torch.Tensor) -> None:
        with_emb = self.addon.training if self.return_embedding is None else self.return_embedding
        r, emb = self.addon(f, d.shape[-2:], with_embedding=with_emb)
        self._state["d_perturbed"] = d + r.to(d.dtype)
        self._state["embedding"] = emb

    def _second_half(self, output: torch.Tensor) -> torch.Tensor:
        """The frozen head block run again on ``d + r``: the perturbed logits ``z``."""
        x = self._state.pop("d_perturbed")
        self._reentrant = True
        try:
            for m in self._chain:
                x = m(x)
        finally:
            self._reentrant = False
        return x

    def _output(self, closed: torch.Tensor, second: torch.Tensor, raw: Any, state: dict[str, Any]) -> RPLOutput:
        return RPLOutput(closed, second, state.get("embedding"), raw, self.smoothing)

    def _check_probe_output(self, out: Any, reference: torch.Tensor) -> None:
        if out.anomaly_logits.shape != reference.shape:
            raise RPLInputError(f"perturbed logits have shape {tuple(out.anomaly_logits.shape)}, expected "
                                f"{tuple(reference.shape)}; the head {self.head_name!r} cannot be re-run as a block.")

    def wrap_arguments(self) -> dict[str, Any]:
        """What :func:`wrap` needs to rebuild this model (stored in checkpoints)."""
        addon = self.bare_addon
        args = {"head": self.head_name, "feature": self.feature_name,
                "smoothing": list(self.smoothing) if self.smoothing else None,
                "feature_channels": addon.feature_channels, "head_channels": addon.head_channels,
                "stride": addon.stride, "block": addon.config.to_dict()}
        if self.adapter != "dense":
            args["adapter"] = self.adapter
        if isinstance(self.logits_option, str):
            args["logits"] = self.logits_option
        return args


# -- wrap: presets, discovery, probe, candidates ---------------------------------------------------
def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def _dummy(model: nn.Module, size: Sequence[int], channels: int) -> torch.Tensor:
    device, dtype = _device_dtype(model)
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, *size, generator=g).to(device=device, dtype=dtype)


def _maps(name: str, output: Any) -> list[tuple[str, tuple[int, ...]]]:
    """The 4-D maps in a module's output with the feature selector that reads each."""
    found: list[tuple[str, tuple[int, ...]]] = []

    def visit(value: Any, sel: str, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() == 4:
                found.append((name + sel, tuple(value.shape)))
        elif depth < 2 and isinstance(value, Mapping):
            for k, v in value.items():
                visit(v, f"{sel}[{k!r}]", depth + 1)
        elif depth < 2 and isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                visit(v, f"{sel}[{i - len(value)}]", depth + 1)

    visit(output, "", 0)
    return found


def candidates(model: nn.Module, x: torch.Tensor, logits: LogitsOption = None) -> str:
    """Where the head and the feature could be: modules whose output has the logit channels, and the
    maps of every module (list/dict outputs included, with their selector), grouped by stage, deepest
    first. Best effort: the model is run once on ``x``; every hook is removed afterwards."""
    records: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(lambda m, a, o, name=name: records.extend(_maps(name, o))))
    try:
        with torch.no_grad():
            k = extract_logits(model(x), logits).shape[1]
    except Exception as err:  # the listing is best effort; the caller's error says what is wrong
        return f"(could not run the model to list candidates: {type(err).__name__}: {str(err)[:200]})"
    finally:
        for h in hooks:
            h.remove()
    shapes = dict(records)
    heads = [n for n, s in shapes.items() if s[1] == k and "[" not in n]
    stages: dict[tuple[int, int], list[str]] = {}
    for n, s in shapes.items():
        if n not in heads and s[2] * s[3] > 1:
            stages.setdefault((s[2], s[3]), []).append(n)
    text = [f"head candidates (output has {k} channels): "
            + (", ".join(f"{n} {list(shapes[n][1:])}" for n in heads[:8]) or "none found")]
    groups = []
    for (h, w) in sorted(stages, key=lambda hw: hw[0] * hw[1])[:3]:
        names = sorted(stages[(h, w)], key=lambda n: (n.count(".") + n.count("["), ))[:5]
        stride = max(1, round(x.shape[-2] / h))
        groups.append(f"stride {stride} ({h}x{w}): " + ", ".join(f"{n} [{shapes[n][1]}]" for n in names))
    text.append("feature candidates, deepest stage first: " + ("; ".join(groups) or "none found"))
    preset = presets.detect(model)
    if preset is not None:
        text.append(f"preset {preset.name!r} picks head={preset.head!r}, feature={preset.feature!r}")
    return ". ".join(text)


def wrap(segmenter: nn.Module, head: str | None = None, feature: str | None = None, *,
         preset: str | None = None, logits: LogitsOption = None, adapter: str | None = None,
         block: BlockConfig | dict | None = None, probe_size: Sequence[int] | None = None, in_channels: int = 3,
         smoothing: tuple[int, float] | None = (7, 1.0), aspp: str | None = None,
         build: "Callable[[Attachment], HookedSegmenter] | None" = None) -> HookedSegmenter:
    """Freeze ``segmenter`` and attach an RPL add-on; returns the wrapped model in eval mode.

    With no names, the family's preset (``rpl.presets.list_presets()``) says where to attach;
    ``preset=`` picks one by name (e.g. ``"smp-decoder"``). Otherwise ``head`` names the frozen head
    block (``"classifier"``, ``"decode_head.classifier"`` or a slice ``"classifier[1:]"``) and
    ``feature`` the map the block reads (a module, with ``[i]``/``['key']`` to pick from a list or
    dict output; default: the head's input). ``logits`` (a key or a callable) says where the logits
    are when the output is not a tensor, ``out``/``logits``/``seg_logits``/``pred`` or a tuple.

    A probe on a dummy batch of ``probe_size`` (default 64x64, retried once at 128x128 if the model
    fails on it) checks that the closed-set output is bit-identical to the frozen segmenter's and
    refuses the model otherwise. On any failure the segmenter is left exactly as it was.

    ``build`` makes another add-on than RPL's on the same attachment (dense heads only): it gets the
    :class:`Attachment` found (head, feature, the probe's ``f`` and ``d``) and returns a
    :class:`HookedSegmenter`, which is probed in the same way (``rpl.methods.real`` uses it).
    """
    if isinstance(segmenter, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        segmenter = segmenter.module
    if isinstance(segmenter, HookedSegmenter):
        raise RPLInputError(f"this model is already wrapped (a {type(segmenter).__name__}); use it as it is, or wrap "
                            "model.unwrap() to attach a new add-on.")
    if wrapper_of(segmenter) is not None:
        raise RPLInputError(f"{type(segmenter).__name__} already carries the hooks of an RPL wrapper; call unwrap() on "
                            "that wrapper before wrapping the segmenter again.")
    config = block if isinstance(block, BlockConfig) else BlockConfig.from_dict(block)
    snapshot = _Snapshot(segmenter)
    sizes = [tuple(probe_size)] if probe_size is not None else [DEFAULT_PROBE, (2 * DEFAULT_PROBE[0], 2 * DEFAULT_PROBE[1])]
    model: HookedSegmenter | None = None
    try:
        for i, size in enumerate(sizes):
            try:
                model = _wrap(segmenter, head, feature, preset, logits, adapter, config, size, in_channels,
                              smoothing, aspp, snapshot, build)
                break
            except _ModelFailed as failed:
                snapshot.restore()
                if i + 1 < len(sizes):
                    continue
                tried = " and ".join(f"{s[0]}x{s[1]}" for s in sizes[: i + 1])
                raise RPLInputError(
                    f"{type(segmenter).__name__} failed on the dummy probe batch (head {failed.head!r}, feature "
                    f"{failed.feature!r}, probe size {tried}): {type(failed.error).__name__}: "
                    f"{str(failed.error)[:400]}. If the model needs a particular input size or channel count, pass "
                    "probe_size=(H, W) (e.g. its training crop) and in_channels=.") from failed.error
    except RPLInputError:
        snapshot.restore()
        raise
    except Exception as err:  # torch errors while attaching or probing: the model is the user's to check
        snapshot.restore()
        raise RPLInputError(f"wrapping {type(segmenter).__name__} (head {head!r}, feature {feature!r}, probe size "
                            f"{sizes[-1]}) failed: {type(err).__name__}: {str(err)[:400]}") from err
    assert model is not None
    return model.eval()


@dataclass
class Attachment:
    """Where :func:`wrap` found an add-on's attachment point on a segmenter (given to ``build=``).

    ``f`` and ``d`` are the deep feature and the head's input of the probe batch (their shapes and
    dtype size the add-on); ``stride`` is the input size over ``f``'s.
    """

    segmenter: nn.Module
    head: str
    feature: str | None
    f: torch.Tensor
    d: torch.Tensor
    stride: int
    smoothing: tuple[int, float] | None
    logits: LogitsOption
    snapshot: _Snapshot


class _ModelFailed(Exception):
    """The bare segmenter raised on the probe batch (maybe too small): retried or reported by wrap."""

    def __init__(self, error: Exception, head: str | None, feature: str | None):
        super().__init__(str(error))
        self.error, self.head, self.feature = error, head, feature


def _wrap(segmenter: nn.Module, head: str | None, feature: str | None, preset_name: str | None,
          logits: LogitsOption, adapter: str | None, config: BlockConfig, probe_size: Sequence[int],
          in_channels: int, smoothing: tuple[int, float] | None, aspp: str | None,
          snapshot: _Snapshot, build: "Callable[[Attachment], HookedSegmenter] | None" = None) -> HookedSegmenter:
    x = _dummy(segmenter, probe_size, in_channels)
    bottleneck = None
    chosen = presets.get_preset(preset_name) if preset_name else None
    if chosen is None and head is None:
        chosen = presets.detect(segmenter)
        if chosen is None:
            segmenter.eval()
            reason = presets.unsupported_reason(segmenter) or (
                f"{type(segmenter).__name__} is not a known family (presets: {', '.join(presets.list_presets())})")
            raise RPLInputError(f"cannot wrap the model automatically: {reason}. Pass head= (the frozen block mapping "
                                f"features to logits) and feature= (the deep map to read). "
                                f"{candidates(segmenter, x, logits)}")
    if chosen is not None:
        head = head or chosen.head
        feature = feature if feature is not None else chosen.feature
        aspp, bottleneck = aspp or chosen.aspp, chosen.bottleneck
        adapter = adapter or chosen.adapter
    elif adapter is None:
        match = presets.detect(segmenter)
        adapter = match.adapter if match is not None and match.head == head else "dense"
    assert head is not None
    if adapter == "mask-classification" and build is not None:
        raise RPLInputError(f"{type(segmenter).__name__} is a mask-classification model (adapter "
                            "'mask-classification'); only RPL attaches to it, other add-ons need a dense head "
                            "whose output is the per-pixel logits.")
    if adapter == "mask-classification":
        from rpl.adapters import probe_mask_classification

        return probe_mask_classification(segmenter, head, feature, config, x, smoothing, snapshot)
    if adapter != "dense":
        raise RPLInputError(f"adapter {adapter!r} is not known; expected 'dense' or 'mask-classification'.")

    # discovery: shapes of f and d, and the bare output of the frozen model to compare against
    chain = resolve_chain(segmenter, head)
    fmod, selectors = _feature_module(segmenter, feature, x, logits)
    segmenter.eval()
    for p in segmenter.parameters():
        p.requires_grad_(False)  # the reference is the *frozen* model's output (some kernels depend on it)
    seen: dict[str, Any] = {"d": []}

    def keep_head_input(module: nn.Module, args: tuple) -> None:
        seen["d"].append(args)
        seen.setdefault("f_before_head", "f" in seen)

    def keep_feature(module: nn.Module, args: Any, output: Any) -> None:
        seen.setdefault("f", output)

    hooks = [chain[0].register_forward_pre_hook(keep_head_input)]
    if fmod is not None:
        hooks.append(fmod.register_forward_hook(keep_feature))
    try:
        with torch.no_grad():
            out = segmenter(x)
    except Exception as err:
        raise _ModelFailed(err, head, feature) from err
    finally:
        for h in hooks:
            h.remove()
    reference = extract_logits(out, logits).clone()
    d = _check_head_input(seen["d"], head, segmenter, x, logits)
    if fmod is None:
        f = d
    else:
        if "f" not in seen or not seen["f_before_head"]:
            raise RPLInputError(f"feature module {feature!r} had not run when head {head!r} was called; choose a "
                                f"feature computed before the head. {candidates(segmenter, x, logits)}")
        f = select_feature(seen["f"], selectors, feature or "")
        if f.dim() != 4:
            raise RPLInputError(f"feature {feature!r} is not a 4-D feature map (shape {tuple(f.shape)}). "
                                f"{candidates(segmenter, x, logits)}")
    stride = max(1, round(x.shape[-2] / f.shape[-2]))
    if build is not None:
        model = build(Attachment(segmenter, head, feature, f, d, stride, smoothing, logits, snapshot))
    else:
        addon = RPLAddon(f.shape[1], d.shape[1], stride, config).to(*_device_dtype(segmenter))
        if aspp is not None and config.init_from_aspp:
            addon.init_from_aspp(segmenter.get_submodule(aspp),
                                 segmenter.get_submodule(bottleneck) if bottleneck else None)
        model = RPLSegmenter(segmenter, head, feature, addon, smoothing, logits, snapshot)
    try:
        _probe(model, x, reference)
    except BaseException as err:
        model._detach()
        if isinstance(err, Exception) and not isinstance(err, RPLInputError):
            raise _ModelFailed(err, head, feature) from err  # a torch error in the wrapped forward
        raise
    return model


def _feature_module(segmenter: nn.Module, feature: str | None, x: torch.Tensor,
                    logits: LogitsOption) -> tuple[nn.Module | None, list[int | str]]:
    if feature is None:
        return None, []
    path, selectors = parse_feature(feature)
    try:
        return segmenter.get_submodule(path), selectors
    except AttributeError:
        raise RPLInputError(f"feature module {path!r} (from {feature!r}) does not exist in "
                            f"{type(segmenter).__name__}; {candidates(segmenter, x, logits)}") from None


def _check_head_input(calls: list[tuple], head: str, segmenter: nn.Module, x: torch.Tensor,
                      logits: LogitsOption) -> torch.Tensor:
    """The head's single 4-D input ``d``, or an error that says what the head got instead."""
    if not calls:
        raise RPLInputError(f"head block {head!r} did not run in the segmenter's forward; name the block that maps "
                            f"features to logits. {candidates(segmenter, x, logits)}")
    if len(calls) > 1:
        raise RPLInputError(f"head block {head!r} ran {len(calls)} times in one forward; RPL needs exactly one call "
                            f"(multi-scale or shared heads are not supported). {candidates(segmenter, x, logits)}")
    args = calls[0]
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        inner = [n for n, _ in segmenter.get_submodule(_INDEXED.sub(r"\g<path>", head)).named_children()][:6]
        hint = f" Its submodules are: {', '.join(inner)}." if inner else ""
        got = _describe(args[0]) if len(args) == 1 else f"{len(args)} positional inputs {_describe(args)}"
        raise RPLInputError(f"head block {head!r} receives {got}; RPL needs a head block whose only input "
                            f"is one 4-D feature map (B, C, h, w), so that it can be re-run on d + r. Name a block "
                            f"inside it that takes a single map.{hint} {candidates(segmenter, x, logits)}")
    return args[0]


def _probe(model: HookedSegmenter, x: torch.Tensor, reference: torch.Tensor) -> None:
    was_training = model.addon.training
    model.addon.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.addon.train(was_training)
    if out.logits.shape != reference.shape or not torch.equal(out.logits, reference):
        raise RPLInputError(
            f"wrapping changed the closed-set output of {type(model.segmenter).__name__} (head {model.head_name!r}, "
            f"feature {model.feature_name!r}), so it was refused. Usual causes: an in-place operation on the head's "
            "input or output, code after the head that mixes images of the batch, or a head that is not the "
            "block producing the logits.")
    model._check_probe_output(out, reference)
