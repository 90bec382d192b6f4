"""PEBAL (Tian et al., ECCV 2022): fine-tune the segmenter with an abstention channel and energy losses.

Facts from the reference code (tianyu0207/PEBAL, ``code/losses.py``, ``code/engine/trainer.py``),
written out with the choices made here in docs/methods.md "PEBAL":

- the segmenter's last 1x1 conv gets a (K+1)-th output row, the abstention channel; rows 0..K-1
  are the pretrained ones and the new row is Kaiming-normal (its bias, where the conv has one, 0).
  Here the new row is a separate 1x1 conv on the same input, concatenated after the original
  conv: the K original logits of the untrained model are then bit-for-bit the segmenter's own;
- reward per pixel ``(logsumexp of the K class logits)^2``, Gaussian-blurred (7x7, sigma 1);
- gambler loss with ``p = softmax over K+1`` and ``a = p_K / reward``: inlier pixels (not 254/255)
  give ``-mean log(p_y + a)``; images with pasted outliers (254) add, over their outlier pixels
  and every class ``c < K``, ``-ood_reg * mean log(max(p_c + a, 1e-7))`` (``ood_reg = 0.1``). The
  batch is split into images without and with outlier pixels, each part getting its own call;
- energy loss on ``E = -logsumexp over K`` for the whole batch: with outlier pixels
  ``0.5 * (mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2) + 5e-4 * ||E_out||_2``, without
  ``mean relu(E_in - m_in)^2`` (``m_in = -12``, ``m_out = -6``); always ``+ 3e-6 *`` the sum of
  squared vertical and horizontal neighbour differences of ``E``, halved;
- total ``gambler(no-outlier images) + gambler(outlier images) + 0.1 * energy``;
- the whole model trains in train mode (BatchNorm statistics move, which is why PEBAL's
  closed-set mIoU changes); the code tunes every parameter (``tune="all"``), the paper the last
  block only (``tune="last_block"``: the module holding the last conv, plus the abstention row);
- score: ``-logsumexp`` of the K class logits, blurred 7x7 / sigma 1. Closed-set logits are the
  first K channels of the tuned model.

Checkpoints hold the whole tuned segmenter (``segmenter.*``) and the abstention row
(``abstention.*``); the metadata records the base segmenter it started from (spec and fingerprint).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rpl.conventions import OUTLIER, VOID
from rpl.errors import RPLInputError
from rpl.methods import register
from rpl.methods.base import FineTuneMethod, Scorer, TrainContext, load_tuned, save_tuned
from rpl.scores import energy, smooth

TUNE_CHOICES = ("all", "last_block")


@dataclass
class PEBALOptions:
    """PEBAL's options (config section ``pebal``); defaults are the reference's constants."""

    tune: str = "all"  # all (reference code) | last_block (paper: the block holding the last 1x1 conv)
    layer: str | None = None  # the last 1x1 conv producing the K logits (None: found automatically)
    ood_reg: float = 0.1  # weight of the outlier term inside the gambler loss
    energy_weight: float = 0.1  # total = gambler_in + gambler_out + energy_weight * energy
    m_in: float = -12.0  # inlier energy margin
    m_out: float = -6.0  # outlier energy margin
    sparsity: float = 5e-4  # weight of ||E_out||_2
    smoothness: float = 3e-6  # weight of the squared neighbour differences of E

    # config rules (rpl.config.rules): meaningful ranges, allowed values, numeric keys free of any rule
    RANGES: ClassVar[dict] = {"ood_reg": ">= 0", "energy_weight": ">= 0", "sparsity": ">= 0", "smoothness": ">= 0"}
    CHOICES: ClassVar[dict] = {"tune": TUNE_CHOICES}
    FREE: ClassVar[tuple] = ("m_in", "m_out")  # energy margins: energies, of any sign


# -- losses ----------------------------------------------------------------------------------------
def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask``; an empty mask gives a zero still connected to the graph (DDP-safe)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def energy_reward(logits: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` reward ``lse(z_0..z_{K-1})^2`` blurred 7x7 / sigma 1 (``logits`` has K+1 channels)."""
    return smooth(torch.logsumexp(logits[:, :-1].float(), dim=1).pow(2))


def gambler_loss(logits: torch.Tensor, target: torch.Tensor, with_outliers: bool, ood_reg: float = 0.1
                 ) -> torch.Tensor:
    """The gambler loss of one part of the batch; ``logits`` ``(B, K+1, H, W)``, channel K = abstention.

    ``with_outliers`` (the part of images holding pasted outliers) adds the outlier term.
    """
    z = logits.float()
    if z.shape[0] == 0:
        return z.sum() * 0.0
    p = torch.softmax(z, dim=1)
    classes, abstain = p[:, :-1], p[:, -1]
    a = abstain / energy_reward(z)
    inlier = (target != OUTLIER) & (target != VOID)
    safe_target = torch.where(inlier, target, torch.zeros_like(target))
    p_true = classes.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = -_masked_mean(torch.log(p_true + a), inlier)
    if with_outliers:
        outlier = (target == OUTLIER).unsqueeze(1).expand_as(classes)
        boosted = torch.log(torch.clamp(classes + a.unsqueeze(1), min=1e-7))
        loss = loss - ood_reg * _masked_mean(boosted, outlier)
    return loss


def neighbour_smoothness(e: torch.Tensor) -> torch.Tensor:
    """Half the sum of squared vertical and horizontal neighbour differences of ``(B, H, W)`` ``e``."""
    return ((e[:, 1:] - e[:, :-1]).pow(2).sum() + (e[:, :, 1:] - e[:, :, :-1]).pow(2).sum()) / 2


def pebal_energy_loss(logits: torch.Tensor, target: torch.Tensor, opts: PEBALOptions | None = None) -> torch.Tensor:
    """PEBAL's energy loss of the whole batch on the K class logits of ``(B, K+1, H, W)`` ``logits``."""
    o = opts or PEBALOptions()
    e = -torch.logsumexp(logits[:, :-1].float(), dim=1)
    inlier = (target != OUTLIER) & (target != VOID)
    outlier = target == OUTLIER
    inlier_term = _masked_mean(F.relu(e - o.m_in).pow(2), inlier)
    if bool(outlier.any()):
        outlier_term = _masked_mean(F.relu(o.m_out - e).pow(2), outlier)
        loss = 0.5 * (inlier_term + outlier_term) + o.sparsity * torch.linalg.vector_norm(e[outlier])
    else:
        loss = inlier_term
    return loss + o.smoothness * neighbour_smoothness(e)


def pebal_loss(logits: torch.Tensor, target: torch.Tensor, opts: PEBALOptions | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``gambler(images without outliers) + gambler(images with outliers) + energy_weight * energy``."""
    o = opts or PEBALOptions()
    has_outliers = (target == OUTLIER).flatten(1).any(1)
    g_in = gambler_loss(logits[~has_outliers], target[~has_outliers], False, o.ood_reg)
    g_out = gambler_loss(logits[has_outliers], target[has_outliers], True, o.ood_reg)
    e = pebal_energy_loss(logits, target, o)
    total = g_in + g_out + o.energy_weight * e
    return total, {"gambler_in": g_in.detach(), "gambler_out": g_out.detach(), "energy": e.detach(),
                   "total": total.detach()}


# -- the model ---------------------------------------------------------------------------------------
@dataclass
class PEBALOutput:
    logits: torch.Tensor  # closed-set logits: the first K channels (B, K, H, W)
    abstention: torch.Tensor  # the abstention logit (B, 1, H, W)
    smoothing: tuple[int, float] | None = (7, 1.0)
    _anomaly: torch.Tensor | None = field(default=None, repr=False)

    @property
    def all_logits(self) -> torch.Tensor:
        return torch.cat([self.logits, self.abstention], dim=1)

    @property
    def anomaly(self) -> torch.Tensor:
        """``(B, H, W)`` free energy of the K class logits, blurred; higher = more anomalous."""
        if self._anomaly is None:
            with torch.no_grad():
                s = energy(self.logits.detach())
                self._anomaly = smooth(s, *self.smoothing) if self.smoothing else s
        return self._anomaly


def find_classifier(segmenter: nn.Module, num_classes: int) -> str:
    """The name of the last 1x1 ``nn.Conv2d`` with ``num_classes`` outputs (the logit layer)."""
    names = [n for n, m in segmenter.named_modules()
             if isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)]
    if not names:
        raise RPLInputError(f"PEBAL needs the segmenter's last 1x1 conv with {num_classes} outputs, and "
                            f"{type(segmenter).__name__} has none; name it with pebal.layer=MODULE.")
    return names[-1]


class PEBALSegmenter(nn.Module):
    """A segmenter with PEBAL's abstention channel; ``forward`` returns :class:`PEBALOutput`.

    A hook on the logit conv appends the abstention row's output inside this model's forward only,
    so ``self.segmenter`` called alone stays a plain K-class segmenter (the base of ``pebal+rpl``).
    """

    def __init__(self, segmenter: nn.Module, layer: str, smoothing: tuple[int, float] | None = (7, 1.0)):
        super().__init__()
        self.segmenter, self.layer, self.smoothing = segmenter, layer, smoothing
        try:
            conv = segmenter.get_submodule(layer)
        except AttributeError:
            raise RPLInputError(f"pebal.layer {layer!r} does not exist in {type(segmenter).__name__}.") from None
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
            raise RPLInputError(f"pebal.layer {layer!r} is a {type(conv).__name__}; expected the 1x1 nn.Conv2d that "
                                "produces the logits.")
        self.num_classes = conv.out_channels
        self.abstention = nn.Conv2d(conv.in_channels, 1, 1, bias=conv.bias is not None).to(
            device=conv.weight.device, dtype=conv.weight.dtype)
        nn.init.kaiming_normal_(self.abstention.weight)
        if self.abstention.bias is not None:
            nn.init.zeros_(self.abstention.bias)
        self._active = False
        conv.register_forward_hook(self._append_abstention)

    def _append_abstention(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        return torch.cat([output, self.abstention(args[0]).to(output.dtype)], dim=1)

    def forward(self, images: torch.Tensor) -> PEBALOutput:
        from rpl.wrapping import extract_logits

        self._active = True
        try:
            z = extract_logits(self.segmenter(images))
        finally:
            self._active = False
        if z.shape[1] != self.num_classes + 1:
            raise RuntimeError(f"the segmenter's output has {z.shape[1]} channels, expected {self.num_classes + 1}: "
                               f"something after {self.layer!r} changes the channels.")
        k = self.num_classes
        return PEBALOutput(z[:, :k], z[:, k:], self.smoothing)


def tuned_parameters(model: PEBALSegmenter, tune: str) -> list[nn.Parameter]:
    """The parameters ``tune`` names: every one (``all``) or the block holding the logit conv
    (``last_block``), the abstention row always."""
    if tune not in TUNE_CHOICES:
        raise RPLInputError(f"pebal.tune={tune!r}; expected one of {', '.join(TUNE_CHOICES)}.")
    if tune == "all":
        base = list(model.segmenter.parameters())
    else:
        parent = model.layer.rpartition(".")[0]
        base = list(model.segmenter.get_submodule(parent).parameters()) if parent else list(
            model.segmenter.get_submodule(model.layer).parameters())
    return base + list(model.abstention.parameters())


@register
class PEBAL(FineTuneMethod):
    name = "pebal"
    summary = "pixel-wise energy-biased abstention learning: fine-tuned segmenter + abstention channel"
    Options = PEBALOptions

    def check_model(self, model: nn.Module) -> None:
        if not isinstance(model, PEBALSegmenter):
            raise RPLInputError("--methods pebal needs a PEBAL checkpoint (rpl-train --method pebal writes one): pass "
                                "--checkpoint FILE, or leave pebal out of --methods.")

    def export_scorer(self, model: nn.Module, options: Any) -> Scorer:
        """``out.anomaly`` (energy of the K class logits, blurred) with a blur the ONNX tracer exports."""
        from rpl.scores import exportable_smooth

        self.check_model(model)
        blur = exportable_smooth(model.smoothing)
        return lambda x, logits, out: blur(energy(out.logits))

    # -- training --------------------------------------------------------------------------------
    def build(self, segmenter: nn.Module, config: Any) -> nn.Module:
        opts = config.method_options(self.name)
        layer = opts.layer or find_classifier(segmenter, config.segmenter.num_classes)
        model = PEBALSegmenter(segmenter, layer)
        tuned = {id(p) for p in tuned_parameters(model, opts.tune)}
        for p in model.parameters():
            p.requires_grad_(id(p) in tuned)
        return model

    def parameter_groups(self, model: nn.Module, optim: Any) -> list[dict[str, Any]]:
        return [{"params": self.trainable_parameters(model), "lr": optim.lr}]

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = ctx.images(batch["image"])
        target = batch["target"].to(ctx.device, non_blocking=True)
        with ctx.autocast():
            out = model(images)
        loss, parts = pebal_loss(out.all_logits, target, ctx.config.method_options(self.name))
        parts["outlier_pixels"] = (target == OUTLIER).sum().float()
        return loss, parts

    # -- checkpoints -----------------------------------------------------------------------------
    def metadata_fields(self, path: str | Path) -> tuple:
        from rpl.checkpoint import FieldError, MetadataField

        def check(value: Any) -> None:
            if not isinstance(value, dict):
                raise FieldError(f"is a JSON {type(value).__name__}; expected an object")
            layer = value.get("layer")
            if not isinstance(layer, str) or not layer or len(layer) > 200 or not all(
                    part.isidentifier() or part.isdigit() for part in layer.split(".")):
                raise FieldError(f"is {str(layer)[:60]!r}; expected a module path such as final.6", "layer")
            k = value.get("num_classes")
            if not isinstance(k, int) or isinstance(k, bool) or not 0 < k < 254:
                raise FieldError(f"is {str(k)[:60]!r}; expected a class count 1..253", "num_classes")
            smoothing = value.get("smoothing")
            if smoothing is not None and not (isinstance(smoothing, list) and len(smoothing) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1001 for v in smoothing)):
                raise FieldError(f"is {str(smoothing)[:60]}; expected null or [kernel size, sigma]", "smoothing")

        return (MetadataField("pebal", json=True, check=check),)

    def save(self, path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None,
             base_fingerprint: str | None = None) -> Path:
        from rpl.checkpoint import fingerprint

        fields = {"pebal": {"layer": model.layer, "num_classes": model.num_classes,
                            "smoothing": list(model.smoothing) if model.smoothing else None,
                            "tuned_fingerprint": fingerprint(model.segmenter)}}
        tensors = {f"abstention.{k}": v for k, v in model.abstention.state_dict().items()}
        return save_tuned(path, self.name, model.segmenter, tensors, fields, extra, base_fingerprint)

    def load(self, path: str | Path, segmenter: nn.Module | None = None, check_base: bool = True,
             **kwargs: Any) -> nn.Module:
        """The PEBAL model of ``path``: ``segmenter`` (default: the recorded base) gets the tuned weights."""
        meta, state, segmenter = load_tuned(path, self.name, segmenter, check_base, kwargs)
        info = meta["pebal"]
        model = PEBALSegmenter(segmenter, info["layer"], tuple(info["smoothing"]) if info.get("smoothing") else None)
        model.abstention.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("abstention.")})
        return model.eval()
