"""RPL (+ CoroCL): a trainable residual block on a frozen segmenter; its score is the blurred free
energy of the perturbed logits (``rpl.wrapping``, ``rpl.losses.rpl_loss``, docs/methods.md "RPL").

Only the add-on trains and only the add-on is saved, with a fingerprint of the frozen base. The
base can be any segmenter, including the tuned segmenter of a fine-tuned method's checkpoint
(``segmenter.weights`` naming e.g. a PEBAL checkpoint): that is the ``pebal+rpl`` model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rpl.errors import RPLInputError
from rpl.methods import register
from rpl.methods.base import AddOnMethod, Scorer, TrainContext, recorded_segmenter


@register
class RPL(AddOnMethod):
    name = "rpl"
    summary = "residual pattern learning (+ CoroCL): blurred energy of the perturbed logits"

    def check_model(self, model: nn.Module) -> None:
        from rpl.wrapping import RPLSegmenter

        if not isinstance(model, RPLSegmenter):
            raise RPLInputError("--methods rpl needs an RPL add-on: pass --checkpoint FILE (a checkpoint written by "
                                "rpl-train), or leave rpl out to evaluate the post-hoc baselines of the bare "
                                "segmenter.")

    def export_scorer(self, model: nn.Module, options: Any) -> Scorer:
        """``out.anomaly`` (energy of the perturbed logits, blurred) with a blur the ONNX tracer exports."""
        from rpl.scores import energy, exportable_smooth

        self.check_model(model)
        blur = exportable_smooth(model.smoothing)
        return lambda x, logits, out: blur(energy(out.anomaly_logits))

    # -- training --------------------------------------------------------------------------------
    def build(self, segmenter: nn.Module, config: Any) -> nn.Module:
        from rpl.blocks import BlockConfig
        from rpl.wrapping import wrap

        w = config.wrap
        block = BlockConfig(**{k: getattr(w, k) for k in BlockConfig.__dataclass_fields__})
        model = wrap(segmenter, head=w.head, feature=w.feature, block=block).train()  # wrap returns eval mode
        if config.loss.contrastive == 0:
            model.return_embedding = False
        return model

    def parameter_groups(self, model: nn.Module, optim: Any) -> list[dict[str, Any]]:
        """Adam groups as the reference: the block at ``lr``, its last 1x1 at ``last_layer_lr_mult * lr``."""
        addon = model.addon
        last = list(addon_of(addon).block.residual.parameters())
        last_ids = {id(p) for p in last}
        rest = [p for p in addon.parameters() if id(p) not in last_ids]
        return [{"params": rest, "lr": optim.lr}, {"params": last, "lr": optim.lr * optim.last_layer_lr_mult}]

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.trainable_parameters())

    def find_unused_parameters(self, model: nn.Module) -> bool:
        return model.return_embedding is False  # the CoroCL projection then gets no gradient

    def images_per_step(self, config: Any) -> int:
        return 2 if config.loss.contrastive > 0 else 1

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from rpl.conventions import OUTLIER
        from rpl.losses import rpl_loss

        weights = ctx.config.loss
        use_ctx = weights.contrastive > 0
        images = ctx.images(torch.cat([batch["image"], batch["context_image"]]) if use_ctx else batch["image"])
        target = batch["target"].to(ctx.device, non_blocking=True)
        b = target.shape[0]
        with ctx.autocast():
            out = model(images)
        emb = out.embedding
        ctx_target = batch["context_target"].to(ctx.device, non_blocking=True) if use_ctx else None
        loss, parts = rpl_loss(out.anomaly_logits[:b], out.logits[:b], target,
                               emb[:b] if emb is not None else None, emb[b:] if emb is not None else None,
                               ctx_target, weights, ctx.generator)
        parts["outlier_pixels"] = (target == OUTLIER).sum().float()
        return loss, parts

    # -- checkpoints -----------------------------------------------------------------------------
    def metadata_fields(self, path: str | Path) -> tuple:
        from rpl.checkpoint import MetadataField, check_wrap

        return (MetadataField("wrap", json=True, check=check_wrap),)

    def save(self, path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None,
             base_fingerprint: str | None = None) -> Path:
        from rpl.checkpoint import save

        return save(path, model, extra=extra, base_fingerprint=base_fingerprint)

    def load(self, path: str | Path, segmenter: nn.Module | None = None, **kwargs: Any) -> nn.Module:
        from rpl.checkpoint import load, read_metadata

        if segmenter is None:
            segmenter = recorded_segmenter(path, read_metadata(path, method=self.name))
        return load(path, segmenter, **kwargs)


def addon_of(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)
