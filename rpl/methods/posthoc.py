"""Post-hoc scores of any segmenter's closed-set logits: energy, MSP, MaxLogit, entropy.

Nothing trains and nothing is saved: each scores the logits of the forward the evaluator already
ran (``rpl.scores``), unblurred unless the evaluation asks for ``smooth_baselines`` (the field
blurs only RPL's and PEBAL's own energy maps).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from rpl.methods import register
from rpl.methods.base import Method, Scorer
from rpl.scores import SCORES, smooth


class PostHoc(Method):
    kind = "post-hoc"
    score_fn: Callable[[torch.Tensor], torch.Tensor]

    def scorer(self, model: nn.Module, options: Any) -> Scorer:
        fn, blur = SCORES[self.name], bool(getattr(options, "smooth_baselines", False))

        def score(x: torch.Tensor, logits: torch.Tensor, out: Any) -> torch.Tensor:
            s = fn(logits)
            return smooth(s) if blur else s

        return score


@register
class Energy(PostHoc):
    name = "energy"
    summary = "free energy -logsumexp of the closed-set logits"


@register
class MSP(PostHoc):
    name = "msp"
    summary = "1 - maximum softmax probability"


@register
class MaxLogit(PostHoc):
    name = "maxlogit"
    summary = "negative maximum logit"


@register
class Entropy(PostHoc):
    name = "entropy"
    summary = "softmax entropy (natural log)"
