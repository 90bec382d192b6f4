"""Mask-classification segmenters (HF Mask2Former): per-pixel class scores, and where RPL perturbs them.

These models predict ``Q`` queries, each a class distribution (``K`` classes + "no object") and a
mask. The field (RbA, ICCV 2023) defines their per-pixel class scores as

    l_k(x) = sum_q softmax(class_q)[k] * sigmoid(mask_q(x)),   k < K

and that is what :func:`mask_classification_logits` returns, at the mask resolution (1/4 of the
input). For RPL, the residual block reads the deep backbone map, its residual ``r`` is added to the
pixel decoder's mask features ``F`` (the head input ``d`` of a dense model), and the final masks are
recomputed from the *frozen* last-layer queries: ``mask_q = MLP(query_q) . (F + r)``. The class
predictions and the queries are not recomputed (the transformer decoder runs once, on ``F``).

What is the same as for dense heads: the closed-set scores are bit-identical to the frozen model's
(computed from its own output), the perturbed scores have the same shape and feed the same losses
and anomaly scores (energy ``-lse`` over the K scores). What differs: the scores are bounded
(sums of probabilities, not unbounded logits), so their energy lives in a narrow range; ``r`` acts
on the masks only, not on the classes. Note that HF Mask2Former's output changes in its last bits
when its parameters stop requiring grad (``nn.MultiheadAttention`` takes another kernel), so
"identical" means identical to the frozen bare model, which is what ``rpl.wrap`` compares with.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from rpl.blocks import BlockConfig, RPLAddon
from rpl.errors import RPLInputError
from rpl.wrapping import (RPLOutput, RPLSegmenter, _describe, _device_dtype, _ModelFailed, _Snapshot,
                          parse_feature, select_feature)


def rba_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """``(B, Q, K+1)`` class logits and ``(B, Q, h, w)`` mask logits -> ``(B, K, h, w)`` per-pixel scores."""
    return torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(dim=-1)[..., :-1], mask_logits.sigmoid())


def mask_classification_logits(output: Any) -> torch.Tensor:
    """The per-pixel scores of an HF Mask2Former/MaskFormer output (``class_queries_logits``, ``masks_queries_logits``)."""
    try:
        return rba_scores(output["class_queries_logits"], output["masks_queries_logits"])
    except (KeyError, TypeError):
        raise RPLInputError(f"a mask-classification output needs class_queries_logits and masks_queries_logits; got "
                            f"{_describe(output)}.") from None


class MaskClassificationSegmenter(RPLSegmenter):
    """A frozen Mask2Former plus the add-on; ``head`` names its mask predictor (``...decoder.mask_predictor``)."""

    adapter = "mask-classification"

    def __init__(self, segmenter: nn.Module, head: str, feature: str | None, addon: RPLAddon,
                 smoothing: tuple[int, float] | None = (7, 1.0), snapshot: _Snapshot | None = None):
        super().__init__(segmenter, head, feature, addon, smoothing, mask_classification_logits, snapshot)

    def _resolve_head(self) -> list[nn.Module]:
        return [_mask_predictor(self.segmenter, self.head_name)]

    def _hooks(self) -> list[tuple[nn.Module, str, Callable]]:
        hooks = [(self._chain[0], "post", self._mask_call_hook)]
        if self._feature_path is not None:
            hooks.append((self.segmenter.get_submodule(self._feature_path), "post", self._feature_hook))
        return hooks

    def _mask_call_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._active:
            self._state["mask_call"] = args[:2]  # (queries (Q, B, C), mask features (B, C, h, w)); the last call wins

    def recompute_masks(self, queries: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """The mask predictor's own computation, on features that may carry the residual."""
        embeddings = self._chain[0].mask_embedder(queries.transpose(0, 1))
        return torch.einsum("bqc, bchw -> bqhw", embeddings, mask_features)

    def forward(self, images: torch.Tensor) -> RPLOutput:
        raw = self._run(images)
        state, self._state = self._state, {}
        if "mask_call" not in state:
            raise RPLInputError(f"mask predictor {self.head_name!r} did not run in the segmenter's forward.")
        queries, d = state["mask_call"]
        f = state.get("f", d if self.feature_name is None else None)
        if f is None:
            raise RPLInputError(f"feature module {self.feature_name!r} did not run in the segmenter's forward.")
        with_emb = self.addon.training if self.return_embedding is None else self.return_embedding
        r, emb = self.addon(f, d.shape[-2:], with_embedding=with_emb)
        masks = self.recompute_masks(queries.detach(), d.detach() + r.to(d.dtype))
        classes = raw["class_queries_logits"].detach()
        closed = mask_classification_logits(raw).detach()
        return RPLOutput(closed, rba_scores(classes, masks), emb, raw, self.smoothing)


def _mask_predictor(segmenter: nn.Module, head: str) -> nn.Module:
    try:
        module = segmenter.get_submodule(head)
    except AttributeError:
        raise RPLInputError(f"mask predictor {head!r} does not exist in {type(segmenter).__name__}.") from None
    if not hasattr(module, "mask_embedder"):
        raise RPLInputError(f"{head!r} is a {type(module).__name__}, not a Mask2Former mask predictor (a module with "
                            "mask_embedder whose forward takes (queries, mask features)).")
    return module


def probe_mask_classification(segmenter: nn.Module, head: str, feature: str | None, config: BlockConfig,
                              x: torch.Tensor, smoothing: tuple[int, float] | None,
                              snapshot: _Snapshot) -> MaskClassificationSegmenter:
    """Discovery and probe for :class:`MaskClassificationSegmenter` (called by ``rpl.wrap``)."""
    predictor = _mask_predictor(segmenter, head)
    path, selectors = parse_feature(feature) if feature is not None else (None, [])
    try:
        fmod = segmenter.get_submodule(path) if path is not None else None
    except AttributeError:
        raise RPLInputError(f"feature module {path!r} does not exist in {type(segmenter).__name__}.") from None
    segmenter.eval()
    for p in segmenter.parameters():
        p.requires_grad_(False)
    seen: dict[str, Any] = {}
    hooks = [predictor.register_forward_hook(lambda m, a, o: seen.__setitem__("call", a[:2]))]
    if fmod is not None:
        hooks.append(fmod.register_forward_hook(lambda m, a, o: seen.setdefault("f", o)))
    try:
        with torch.no_grad():
            out = segmenter(x)
    except Exception as err:
        raise _ModelFailed(err, head, feature) from err
    finally:
        for h in hooks:
            h.remove()
    reference = mask_classification_logits(out).clone()
    if "call" not in seen or len(seen["call"]) < 2:
        raise RPLInputError(f"mask predictor {head!r} was not called with (queries, mask features).")
    d = seen["call"][1]
    f = d if fmod is None else select_feature(seen.get("f"), selectors, feature or "")
    if f.dim() != 4 or d.dim() != 4:
        raise RPLInputError(f"feature {feature!r} ({tuple(f.shape)}) and mask features ({tuple(d.shape)}) must be "
                            "4-D maps.")
    stride = max(1, round(x.shape[-2] / f.shape[-2]))
    addon = RPLAddon(f.shape[1], d.shape[1], stride, config).to(*_device_dtype(segmenter))
    model = MaskClassificationSegmenter(segmenter, head, feature, addon, smoothing, snapshot)
    try:
        _probe_masks(model, x, out, reference)
    except BaseException as err:
        model._detach()
        if isinstance(err, Exception) and not isinstance(err, RPLInputError):
            raise _ModelFailed(err, head, feature) from err
        raise
    return model


def _probe_masks(model: MaskClassificationSegmenter, x: torch.Tensor, bare: Any, reference: torch.Tensor) -> None:
    was_training = model.addon.training
    model.addon.eval()
    try:
        with torch.no_grad():
            out = model(x)
            queries, d = _last_call(model, x)
            recomputed = model.recompute_masks(queries, d)
    finally:
        model.addon.train(was_training)
    if not torch.equal(out.logits, reference):
        raise RPLInputError(f"wrapping changed the per-pixel scores of {type(model.segmenter).__name__}, so it was "
                            "refused.")
    if not torch.equal(recomputed, bare["masks_queries_logits"]):
        raise RPLInputError(f"the masks recomputed from the last queries and the mask features differ from "
                            f"{type(model.segmenter).__name__}'s own masks: {model.head_name!r} is not the mask "
                            "predictor of the final masks.")


def _last_call(model: MaskClassificationSegmenter, x: torch.Tensor) -> Sequence[torch.Tensor]:
    seen: dict[str, Any] = {}
    handle = model._chain[0].register_forward_hook(lambda m, a, o: seen.__setitem__("call", a[:2]))
    try:
        model.segmenter(x)
    finally:
        handle.remove()
    return seen["call"]
