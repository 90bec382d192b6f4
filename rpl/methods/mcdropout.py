"""MC dropout (Gal & Ghahramani): the mean softmax entropy of several passes with dropout switched on.

The passes run on a copy of the segmenter whose dropout layers alone are in train mode, so the
evaluated model itself never leaves eval mode. Passes are seeded by the evaluation's ``seed``.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
from torch import nn

from rpl.errors import RPLInputError
from rpl.methods import register
from rpl.methods.base import Method, Scorer
from rpl.scores import entropy

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_SIDE_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _hook_owners(segmenter: nn.Module) -> list[nn.Module]:
    """Wrappers (RPL, PEBAL) that hooked methods of theirs onto modules of ``segmenter``."""
    inside = {id(m) for m in segmenter.modules()}
    owners: list[nn.Module] = []
    for m in segmenter.modules():
        for hooks in (getattr(m, d) for d in _HOOK_DICTS):
            for hook in hooks.values():
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, nn.Module) and id(owner) not in inside and all(owner is not o for o in owners):
                    owners.append(owner)
    return owners


def _owned_hooks(module: nn.Module, owners: list[nn.Module]) -> Iterator[tuple[dict, int]]:
    for hooks in (getattr(module, d) for d in _HOOK_DICTS):
        for key, hook in list(hooks.items()):
            if any(getattr(hook, "__self__", None) is o for o in owners):
                yield hooks, key


def dropout_copy(segmenter: nn.Module) -> nn.Module:
    """A copy of ``segmenter`` in eval mode except its dropout layers, for MC dropout.

    Hooks a wrapper (RPL add-on, PEBAL abstention) placed on the segmenter are left out of the
    copy, and the wrapper itself is not copied: an RPL-wrapped segmenter is copied by its wrapper
    (``RPLSegmenter.segmenter_copy``), other wrappers' hooks are dropped from a deep copy.
    """
    from rpl.wrapping import wrapper_of

    owner = wrapper_of(segmenter)
    if owner is not None and owner.segmenter is segmenter:
        clone = owner.segmenter_copy()
    else:
        clone = segmenter
    owners = _hook_owners(clone)
    clone = copy.deepcopy(clone, memo={id(o): o for o in owners})
    for m in clone.modules():
        for hooks, key in list(_owned_hooks(m, owners)):
            del hooks[key]
            for extra in _HOOK_SIDE_DICTS:
                getattr(m, extra, {}).pop(key, None)
    clone.eval()
    dropouts = [m for m in clone.modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]
    if not dropouts:
        raise RPLInputError(f"--methods mcdropout needs a segmenter with dropout layers, but "
                            f"{type(segmenter).__name__} has none with p > 0; remove mcdropout from --methods.")
    for m in dropouts:
        m.train()
    return clone


@register
class MCDropout(Method):
    name = "mcdropout"
    kind = "post-hoc"
    summary = "mean softmax entropy over passes with dropout on"
    one_forward = False  # rpl-eval only: rpl-predict and rpl-export score one forward

    def scorer(self, model: nn.Module, options: Any) -> Scorer:
        from rpl.wrapping import extract_logits

        mc_model = dropout_copy(getattr(model, "segmenter", model))
        samples = int(getattr(options, "mc_samples", 8))
        use_amp = bool(getattr(options, "amp", False))

        def score(x: torch.Tensor, logits: torch.Tensor, out: Any) -> torch.Tensor:
            dtype = torch.float16 if x.device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
            total = None
            for _ in range(samples):
                with torch.autocast(x.device.type, dtype=dtype, enabled=use_amp):
                    logits = extract_logits(mc_model(x))
                e = entropy(logits)
                total = e if total is None else total + e
            return total / samples

        return score
