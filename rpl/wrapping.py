"""``rpl.wrap``: attach a trainable residual block to a frozen segmenter without changing its output.

How it works, in one segmenter forward (the backbone runs once):
1. a forward hook on the ``feature`` module keeps the deep feature ``f``;
2. a pre-hook on the first module of the ``head`` block computes ``r = R(f)`` and ``d + r``;
3. the head runs as usual on ``d`` (closed-set); a forward hook on its last module runs the head
   block again on ``d + r`` and hands ``cat([z0, z])`` (batch 2B) to whatever follows the head
   (the segmenter's own upsampling, dict or HF outputs), so both get the same spatial treatment;
4. the batch is split again: the first half is bit-for-bit the segmenter's own output.
A probe at wrap time checks 4 on a dummy batch and refuses models for which it does not hold.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from rpl import presets
from rpl.blocks import BlockConfig, RPLAddon
from rpl.errors import RPLInputError
from rpl.scores import energy, smooth

_INDEXED = re.compile(r"^(?P<path>.*?)\[(?P<start>-?\d*)(?P<colon>:?)(?P<stop>-?\d*)\]$")


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


def resolve_chain(model: nn.Module, name: str) -> list[nn.Module]:
    """Modules of a head block given as ``a.b``, ``a.b[i]`` or a slice ``a.b[i:]`` of an ``nn.Sequential``."""
    match = _INDEXED.match(name)
    path = match.group("path") if match else name
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        raise RPLInputError(f"module {path!r} (from {name!r}) does not exist in {type(model).__name__}; "
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


def _names_hint(model: nn.Module, limit: int = 25) -> str:
    names = [n for n, _ in model.named_children()]
    return f"its top-level modules are: {', '.join(names[:limit])}"


def extract_logits(output: Any) -> torch.Tensor:
    """The logits tensor in a segmenter's output: a tensor, ``{"out": ...}``, ``.logits`` or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "out" in output:
        return output["out"]
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RPLInputError(f"cannot find logits in the segmenter's output of type {type(output).__name__}; expected a "
                        "tensor, a dict with 'out', an object with .logits, or a tuple whose first item is the logits.")


def _split_raw(output: Any, batch: int) -> Any:
    """The segmenter's output object with its logits cut back to the closed-set half."""
    if isinstance(output, torch.Tensor):
        return output[:batch]
    if isinstance(output, Mapping) and "out" in output:
        new = type(output)(output) if not isinstance(output, dict) or type(output) is not dict else dict(output)
        new["out"] = output["out"][:batch]
        return new
    if hasattr(output, "logits"):
        try:
            output.logits = output.logits[:batch]
        except AttributeError:
            pass
        return output
    if isinstance(output, (tuple, list)):
        return type(output)([output[0][:batch], *output[1:]])
    return output


def feature_tensor(output: Any, name: str) -> torch.Tensor:
    """The feature map in a module's output: a tensor, ``{"out": ...}``, or the last of a list (deepest)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "out" in output:
            return output["out"]
        if len(output) == 1:
            return next(iter(output.values()))
    if isinstance(output, (tuple, list)) and output and isinstance(output[-1], torch.Tensor):
        return output[-1]
    raise RPLInputError(f"feature module {name!r} returns {type(output).__name__}; expected a 4-D tensor, a dict "
                        "with 'out', or a list of feature maps (the last one is read).")


class RPLSegmenter(nn.Module):
    """A frozen segmenter plus the RPL add-on. Build it with :func:`wrap`."""

    def __init__(self, segmenter: nn.Module, head: str, feature: str | None, addon: RPLAddon,
                 smoothing: tuple[int, float] | None = (7, 1.0)):
        super().__init__()
        self.segmenter = segmenter
        self.addon = addon
        self.head_name, self.feature_name, self.smoothing = head, feature, smoothing
        self.return_embedding: bool | None = None  # None: embeddings exactly when the add-on trains
        chain = resolve_chain(segmenter, head)
        object.__setattr__(self, "_chain", chain)  # plain list: the modules already live in segmenter
        self._state: dict[str, Any] = {}
        self._reentrant = False
        self._active = False  # hooks act only inside our forward: the bare segmenter still works alone
        self._freeze()
        chain[0].register_forward_pre_hook(self._head_pre_hook)
        chain[-1].register_forward_hook(self._head_post_hook)
        if feature is not None:
            try:
                fmod = segmenter.get_submodule(feature)
            except AttributeError:
                raise RPLInputError(f"feature module {feature!r} does not exist in {type(segmenter).__name__}; "
                                    f"{_names_hint(segmenter)}") from None
            fmod.register_forward_hook(self._feature_hook)

    # -- frozen guarantee ---------------------------------------------------------------------
    def _freeze(self) -> None:
        self.segmenter.eval()
        for p in self.segmenter.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "RPLSegmenter":
        super().train(mode)
        self.segmenter.eval()  # BatchNorm statistics and dropout of the frozen model never change
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "RPLSegmenter":
        self.addon.requires_grad_(requires_grad)
        return self

    @property
    def bare_addon(self) -> RPLAddon:
        """The add-on without a DDP wrapper (a trainer may replace ``addon`` by ``DDP(addon)``)."""
        return getattr(self.addon, "module", self.addon)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters an optimiser should see: the add-on's only."""
        return self.addon.parameters()

    # -- hooks --------------------------------------------------------------------------------
    def _feature_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active and not self._reentrant:
            self._state["f"] = feature_tensor(output, self.feature_name or "")

    def _head_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self._reentrant or not self._active:
            return
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise RPLInputError(f"head block {self.head_name!r} is called with {len(args)} positional inputs; RPL "
                                "needs a head whose only input is the feature map d.")
        d = args[0]
        f = self._state.get("f", d if self.feature_name is None else None)
        if f is None:
            raise RPLInputError(f"feature module {self.feature_name!r} had not run when head {self.head_name!r} was "
                                "called; choose a feature computed before the head.")
        with_emb = self.addon.training if self.return_embedding is None else self.return_embedding
        r, emb = self.addon(f, d.shape[-2:], with_embedding=with_emb)
        self._state["d_perturbed"] = d + r.to(d.dtype)
        self._state["embedding"] = emb
        self._state["head_calls"] = self._state.get("head_calls", 0) + 1

    def _head_post_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._reentrant or not self._active:
            return None
        x = self._state.pop("d_perturbed")
        self._reentrant = True
        try:
            for m in self._chain:
                x = m(x)
        finally:
            self._reentrant = False
        return torch.cat([output, x.to(output.dtype)], dim=0)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> RPLOutput:
        if not torch.compiler.is_compiling():
            if self.segmenter.training:
                self.segmenter.eval()
        self._state = {}
        self._active = True
        try:
            raw = self.segmenter(images)
        finally:
            self._active = False
        calls = self._state.get("head_calls", 0)
        if calls != 1:
            raise RuntimeError(f"head block {self.head_name!r} ran {calls} times in one forward; RPL needs exactly "
                               "one call per forward (multi-scale or shared heads are not supported).")
        both = extract_logits(raw)
        batch = images.shape[0]
        if both.shape[0] != 2 * batch:
            raise RuntimeError(f"the segmenter's output has batch {both.shape[0]}, expected {2 * batch}: something "
                               f"after head {self.head_name!r} mixes the batch.")
        emb = self._state.pop("embedding", None)
        self._state = {}
        return RPLOutput(both[:batch].detach(), both[batch:], emb, _split_raw(raw, batch), self.smoothing)

    def wrap_arguments(self) -> dict[str, Any]:
        """What :func:`wrap` needs to rebuild this model (stored in checkpoints)."""
        addon = self.bare_addon
        return {"head": self.head_name, "feature": self.feature_name,
                "smoothing": list(self.smoothing) if self.smoothing else None,
                "feature_channels": addon.feature_channels, "head_channels": addon.head_channels,
                "stride": addon.stride, "block": addon.config.to_dict()}


# -- wrap: presets, probe, candidates ----------------------------------------------------------
def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def _dummy(model: nn.Module, size: Sequence[int], channels: int) -> torch.Tensor:
    device, dtype = _device_dtype(model)
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, *size, generator=g).to(device=device, dtype=dtype)


def _candidates(model: nn.Module, x: torch.Tensor) -> str:
    """Module names that could serve as head (output has the logit channels) or feature (deep 4-D maps)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name:
            def hook(m, a, o, name=name):
                if isinstance(o, torch.Tensor) and o.dim() == 4:
                    shapes[name] = tuple(o.shape)
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(x)
        k = extract_logits(out).shape[1]
    except Exception as err:  # the listing is best effort; the caller's error says what is wrong
        return f"(could not run the model to list candidates: {err})"
    finally:
        for h in hooks:
            h.remove()
    heads = [n for n, s in shapes.items() if s[1] == k]
    maps = [n for n in shapes if shapes[n][2] * shapes[n][3] > 1 and n not in heads]
    feats = sorted(maps, key=lambda n: (shapes[n][2] * shapes[n][3], -shapes[n][1]))[:6]
    fmt = lambda ns: ", ".join(f"{n} {list(shapes[n][1:])}" for n in ns) or "none found"
    return f"head candidates (output has {k} channels): {fmt(heads[:8])}; feature candidates (deepest maps): {fmt(feats)}"


def wrap(segmenter: nn.Module, head: str | None = None, feature: str | None = None, *,
         block: BlockConfig | dict | None = None, probe_size: Sequence[int] = (64, 64), in_channels: int = 3,
         smoothing: tuple[int, float] | None = (7, 1.0), aspp: str | None = None) -> RPLSegmenter:
    """Freeze ``segmenter`` and attach an RPL add-on.

    ``head`` names the frozen head block (``"classifier"``, ``"decode_head.classifier"`` or a slice
    ``"classifier[1:]"``); ``feature`` the module whose output the block reads (default: the head's
    input). Known families (torchvision DeepLabV3/FCN, ``rpl.models.DeepLabV3Plus``, HF SegFormer)
    need neither. A probe on a dummy batch of ``probe_size`` checks that the closed-set output is
    bit-identical to the bare segmenter's and refuses the model otherwise.
    """
    if isinstance(segmenter, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        segmenter = segmenter.module
    config = block if isinstance(block, BlockConfig) else BlockConfig.from_dict(block)
    segmenter.eval()
    x = _dummy(segmenter, probe_size, in_channels)
    bottleneck = None
    if head is None:
        preset = presets.detect(segmenter)
        if preset is None:
            reason = presets.unsupported_reason(segmenter) or f"{type(segmenter).__name__} is not a known family"
            raise RPLInputError(f"cannot wrap the model automatically: {reason}. Pass head= (the frozen block mapping "
                                f"features to logits) and feature= (the deep map to read). {_candidates(segmenter, x)}")
        head, feature = preset.head, (feature if feature is not None else preset.feature)
        aspp, bottleneck = aspp or preset.aspp, preset.bottleneck

    # discovery: shapes of f and d, and the bare output to compare against
    chain = resolve_chain(segmenter, head)
    seen: dict[str, Any] = {"d": []}
    hooks = [chain[0].register_forward_pre_hook(lambda m, a: seen["d"].append(a[0] if a else None))]
    if feature is not None:
        try:
            fmod = segmenter.get_submodule(feature)
        except AttributeError:
            raise RPLInputError(f"feature module {feature!r} does not exist in {type(segmenter).__name__}; "
                                f"{_candidates(segmenter, x)}") from None
        def keep_feature(module: nn.Module, args: Any, output: Any) -> None:
            seen.setdefault("f", feature_tensor(output, feature))

        hooks.append(fmod.register_forward_hook(keep_feature))
    try:
        with torch.no_grad():
            reference = extract_logits(segmenter(x)).clone()
    finally:
        for h in hooks:
            h.remove()
    if len(seen["d"]) != 1 or not isinstance(seen["d"][0], torch.Tensor) or seen["d"][0].dim() != 4:
        raise RPLInputError(f"head block {head!r} ran {len(seen['d'])} times with a 4-D tensor input in one forward; "
                            f"RPL needs exactly one. {_candidates(segmenter, x)}")
    d = seen["d"][0]
    f = seen.get("f", d)
    if f.dim() != 4:
        raise RPLInputError(f"feature {feature!r} is not a 4-D feature map (shape {tuple(f.shape)}).")
    stride = max(1, round(x.shape[-2] / f.shape[-2]))
    addon = RPLAddon(f.shape[1], d.shape[1], stride, config).to(*_device_dtype(segmenter))
    if aspp is not None and config.init_from_aspp:
        addon.init_from_aspp(segmenter.get_submodule(aspp),
                             segmenter.get_submodule(bottleneck) if bottleneck else None)
    model = RPLSegmenter(segmenter, head, feature, addon, smoothing)
    _probe(model, x, reference)
    return model


def _probe(model: RPLSegmenter, x: torch.Tensor, reference: torch.Tensor) -> None:
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
    if out.anomaly_logits.shape != reference.shape:
        raise RPLInputError(f"perturbed logits have shape {tuple(out.anomaly_logits.shape)}, expected "
                            f"{tuple(reference.shape)}; the head {model.head_name!r} cannot be re-run as a block.")
