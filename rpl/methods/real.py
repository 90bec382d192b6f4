"""REAL (Cen et al., ECCV 2022): redundancy classifiers beside a frozen head predict an "unknown" class.

An image adaptation of a LiDAR method, written out with the choices made here in docs/methods.md
"REAL". Facts from the reference code (Jun-CEN/Open-world-3D-semantic-segmentation,
``train_cylinder_asym_ood_basic.py`` / ``..._final.py``, ``builder/loss_builder.py``):

- ``n`` redundancy classifiers (the reference's ``--dummynumber``, default 3) are one extra conv
  (3x3, with bias) on the same final feature as the closed-set classifier; the max of their ``n``
  outputs is one more logit, class ``K`` ("unknown"), after the ``K`` closed-set logits;
- loss ``CE_w(z, y) + lambda_1 * CE_w(z_cal, K)``: ``CE_w`` is cross-entropy over ``K+1`` with class
  weights 1 for the known classes and 0.1 for class K (PyTorch's weighted mean: ``sum_i w_{y_i}
  nll_i / sum_i w_{y_i}``), void pixels ignored; synthesised unknown objects (rescaled known
  instances) carry label K. ``z_cal`` is ``z`` with the ground-truth logit of each known-labelled
  pixel set to ``-1e9``; its target is K on every known-labelled pixel (unknown and void pixels are
  ignored), so that "unknown" becomes the runner-up everywhere (predictive-distribution
  calibration). ``lambda_1`` is a config value; 0.1 here, as the issue states;
- the reference trains every layer (Adam, lr 1e-3, 10 epochs); the score is the softmax
  probability of class K.

Here, on a frozen segmenter: the unknown-object synthesis is outlier exposure (pasted objects,
label 254 -> class K); only the redundancy classifiers train, the closed-set logits are the frozen
segmenter's own, bit for bit. They read the deep feature ``f`` through a small block
(``real.head=deep``, the default: 3x3 conv-BN-ReLU, upsampled to ``d``'s size, 3x3 conv) or the
frozen head's input ``d`` (``real.head=d``: one 3x3 conv, the reference's layout) at the attachment ``rpl.wrap`` finds for
RPL (:class:`rpl.wrapping.HookedSegmenter`). Their ``n`` maps leave the head as the second half of
the batch (cycled to ``K`` channels), so they get the segmenter's own upsampling; the max is taken
at the output resolution. ``real.calibration_labels=prediction`` masks ``argmax z0`` (the frozen
model's label) instead of the ground truth.

Checkpoints (``rpl-checkpoint/1``, method ``real``) hold the redundancy head's tensors only, with the
frozen base's fingerprint and the segmenter's spec; the metadata field ``real`` says how to rebuild it.
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
from rpl.methods.base import AddOnMethod, Scorer, TrainContext, recorded_segmenter
from rpl.scores import smooth
from rpl.wrapping import Attachment, HookedSegmenter

HEAD_CHOICES = ("d", "deep")
CALIBRATION_CHOICES = ("target", "prediction")
MASKED = -1e9  # the masked logit of the calibration term (the reference's value)
SMOOTHING = (7, 1.0)  # the blurred score (real.blur): RPL's kernel and sigma


@dataclass
class REALOptions:
    """REAL's options (config section ``real``)."""

    classifiers: int = 3  # redundancy classifiers n (reference --dummynumber 3)
    head: str = "deep"  # what they read: deep (the feature f, through a small block; the measured better
    # SynthStreets val AP, docs/methods.md) | d (the frozen head's input, one 3x3 conv: the reference's layout)
    width: int = 64  # channels of the deep block (head=deep)
    outlier_weight: float = 0.1  # lambda: CE weight of class K (reference 0.1)
    calibration_weight: float = 0.1  # weight of the calibration term
    calibration_labels: str = "target"  # the masked logit: target (ground truth) | prediction (argmax z0)
    blur: bool = False  # score: p(unknown) blurred 7x7 / sigma 1

    # config rules (rpl.config.rules)
    RANGES: ClassVar[dict] = {"classifiers": ">= 1", "width": ">= 1", "outlier_weight": ">= 0",
                              "calibration_weight": ">= 0"}
    CHOICES: ClassVar[dict] = {"head": ("d", "deep"), "calibration_labels": ("target", "prediction")}


# -- losses ----------------------------------------------------------------------------------------
def real_targets(target: torch.Tensor, k: int) -> torch.Tensor:
    """Train ids 0..K-1 kept, pasted outliers (254) -> K, void (255) stays 255 (ignored)."""
    return torch.where(target == OUTLIER, torch.full_like(target, k), target)


def open_set_ce(logits: torch.Tensor, target: torch.Tensor, outlier_weight: float) -> torch.Tensor:
    """CE over the K+1 logits ``(B, K+1, H, W)``, pasted outliers as class K weighted ``outlier_weight``.

    PyTorch's weighted mean (``sum w_y nll / sum w_y``) over the non-void pixels; no such pixel: a
    zero still connected to the graph.
    """
    k = logits.shape[1] - 1
    y = real_targets(target, k)
    weights = torch.ones(k + 1, device=logits.device, dtype=torch.float32)
    weights[k] = outlier_weight
    if not bool((y != VOID).any()) or float(weights[y[y != VOID]].sum()) == 0.0:
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), y, weight=weights, ignore_index=VOID)


def calibration_loss(logits: torch.Tensor, target: torch.Tensor, labels: str = "target") -> torch.Tensor:
    """Predictive-distribution calibration: on every known-labelled pixel (0..K-1) the logit of its
    class (``target``) or of ``argmax z0`` (``prediction``) is set to -1e9 and CE pushes towards K."""
    if labels not in CALIBRATION_CHOICES:
        raise RPLInputError(f"real.calibration_labels={labels!r}; expected one of {', '.join(CALIBRATION_CHOICES)}.")
    z = logits.float()
    k = z.shape[1] - 1
    known = (target >= 0) & (target < k)
    if not bool(known.any()):
        return z.sum() * 0.0
    masked_class = z[:, :k].detach().argmax(1) if labels == "prediction" else torch.where(known, target, 0)
    hide = F.one_hot(masked_class, k + 1).permute(0, 3, 1, 2).bool()
    z = z.masked_fill(hide, MASKED)
    y = torch.where(known, torch.full_like(target, k), torch.full_like(target, VOID))
    return F.cross_entropy(z, y, ignore_index=VOID)


def real_loss(closed: torch.Tensor, unknown: torch.Tensor, target: torch.Tensor, opts: REALOptions | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``open_set_ce + calibration_weight * calibration`` of the K closed-set and the unknown logits."""
    o = opts or REALOptions()
    logits = torch.cat([closed.float(), unknown.float()], dim=1)
    ce = open_set_ce(logits, target, o.outlier_weight)
    cal = calibration_loss(logits, target, o.calibration_labels)
    total = ce + o.calibration_weight * cal
    return total, {"ce": ce.detach(), "calibration": cal.detach(), "total": total.detach()}


# -- the model ---------------------------------------------------------------------------------------
@dataclass
class REALOutput:
    logits: torch.Tensor  # closed-set logits (B, K, H, W), identical to the segmenter's
    unknown: torch.Tensor  # the unknown logit: max of the redundancy classifiers (B, 1, H, W)
    raw: Any = None  # the segmenter's own output object for its closed-set half
    smoothing: tuple[int, float] | None = None
    _anomaly: torch.Tensor | None = field(default=None, repr=False)

    @property
    def all_logits(self) -> torch.Tensor:
        return torch.cat([self.logits, self.unknown.to(self.logits.dtype)], dim=1)

    @property
    def anomaly(self) -> torch.Tensor:
        """``(B, H, W)`` softmax probability of class K over the K+1 logits (blurred with ``real.blur``)."""
        if self._anomaly is None:
            with torch.no_grad():
                z = torch.cat([self.logits.detach().float(), self.unknown.detach().float()], dim=1)
                s = torch.softmax(z, dim=1)[:, -1]
                self._anomaly = smooth(s, *self.smoothing) if self.smoothing else s
        return self._anomaly


class RedundancyHead(nn.Module):
    """The ``n`` redundancy classifiers: a 3x3 conv on ``d`` (``d``), or on ``f`` through a block (``deep``)."""

    def __init__(self, source: str, classifiers: int, feature_channels: int, head_channels: int, width: int = 64):
        super().__init__()
        if source not in HEAD_CHOICES:
            raise RPLInputError(f"real.head={source!r}; expected one of {', '.join(HEAD_CHOICES)}.")
        self.source, self.classifiers, self.width = source, classifiers, width
        self.feature_channels, self.head_channels = feature_channels, head_channels
        if source == "deep":
            self.block = nn.Sequential(nn.Conv2d(feature_channels, width, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            self.classifier = nn.Conv2d(width, classifiers, 3, padding=1, bias=True)
        else:
            self.classifier = nn.Conv2d(head_channels, classifiers, 3, padding=1, bias=True)

    def forward(self, f: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``(B, n, h, w)`` redundancy logits at ``d``'s resolution."""
        if self.source == "d":
            return self.classifier(d)
        x = self.block(f)
        if x.shape[-2:] != d.shape[-2:]:
            x = F.interpolate(x, size=d.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(x)

    def arguments(self) -> dict[str, Any]:
        return {"source": self.source, "classifiers": self.classifiers, "width": self.width,
                "feature_channels": self.feature_channels, "head_channels": self.head_channels}


class REALSegmenter(HookedSegmenter):
    """A frozen segmenter plus REAL's redundancy classifiers; ``forward`` returns :class:`REALOutput`.

    The redundancy head runs on the hooked ``d`` (or ``f``); its ``n`` maps, cycled to the ``K``
    channels of the head's output, follow the closed-set logits through the segmenter's own
    upsampling as the second half of the batch; the unknown logit is their max over channels.
    """

    def _head_input(self, f: torch.Tensor, d: torch.Tensor) -> None:
        self._state["redundancy"] = self.addon(f, d)

    def _second_half(self, output: torch.Tensor) -> torch.Tensor:
        r = self._state.pop("redundancy")
        k, n = output.shape[1], r.shape[1]
        if n > k:
            raise RPLInputError(f"REAL has {n} redundancy classifiers but the head outputs {k} channels; use "
                                f"real.classifiers <= {k}.")
        if r.shape[-2:] != output.shape[-2:]:
            raise RPLInputError(f"the head {self.head_name!r} changes the resolution of its input (d {tuple(r.shape[-2:])}"
                                f", logits {tuple(output.shape[-2:])}); REAL needs a head whose output has d's size.")
        return r[:, torch.arange(k, device=r.device) % n]

    def _output(self, closed: torch.Tensor, second: torch.Tensor, raw: Any, state: dict[str, Any]) -> REALOutput:
        unknown = second.max(dim=1, keepdim=True).values
        return REALOutput(closed, unknown, raw, self.smoothing)

    def _check_probe_output(self, out: Any, reference: torch.Tensor) -> None:
        if out.unknown.shape != (reference.shape[0], 1, *reference.shape[2:]):
            raise RPLInputError(f"the unknown logit has shape {tuple(out.unknown.shape)}, expected "
                                f"{(reference.shape[0], 1, *reference.shape[2:])}.")

    def real_arguments(self) -> dict[str, Any]:
        """What :func:`real_wrap` needs to rebuild this model (stored in checkpoints)."""
        args = {"head": self.head_name, "feature": self.feature_name,
                "smoothing": list(self.smoothing) if self.smoothing else None, **self.bare_addon.arguments()}
        if isinstance(self.logits_option, str):
            args["logits"] = self.logits_option
        return args


def real_wrap(segmenter: nn.Module, source: str = "deep", classifiers: int = 3, width: int = 64,
              head: str | None = None, feature: str | None = None, smoothing: tuple[int, float] | None = None,
              logits: Any = None, **wrap_kwargs: Any) -> REALSegmenter:
    """Freeze ``segmenter`` and attach REAL's redundancy classifiers where ``rpl.wrap`` attaches RPL.

    ``head``/``feature``/``preset=``/``probe_size=`` as in :func:`rpl.wrap` (the family's preset when
    not given); the model comes back in eval mode, its closed-set output probed bit-identical.
    """
    from rpl.wrapping import _device_dtype, wrap

    if source not in HEAD_CHOICES:
        raise RPLInputError(f"real.head={source!r}; expected one of {', '.join(HEAD_CHOICES)}.")
    if not isinstance(classifiers, int) or isinstance(classifiers, bool) or classifiers < 1:
        raise RPLInputError(f"real.classifiers={classifiers!r}; expected an integer >= 1.")

    def build(at: Attachment) -> REALSegmenter:
        addon = RedundancyHead(source, classifiers, at.f.shape[1], at.d.shape[1], width)
        addon = addon.to(*_device_dtype(at.segmenter))
        return REALSegmenter(at.segmenter, at.head, at.feature, addon, at.smoothing, at.logits, at.snapshot)

    model = wrap(segmenter, head, feature, logits=logits, smoothing=smoothing, build=build, **wrap_kwargs)
    assert isinstance(model, REALSegmenter)
    return model


# -- metadata ------------------------------------------------------------------------------------------
def check_real_field(value: Any) -> None:
    """``real``: what :func:`real_wrap` needs to rebuild the redundancy head (``REALSegmenter.real_arguments``)."""
    from rpl.checkpoint import FieldError, check_smoothing

    if not isinstance(value, dict):
        raise FieldError(f"is a JSON {type(value).__name__}; expected an object")
    for key in ("head",) + (("feature",) if value.get("feature") is not None else ()):
        v = value.get(key)
        if not isinstance(v, str) or not v or len(v) > 1000:
            raise FieldError(f"is {str(v)[:60]!r}; expected a non-empty module name", key)
    if value.get("source") not in HEAD_CHOICES:
        raise FieldError(f"is {str(value.get('source'))[:60]!r}; expected one of {', '.join(HEAD_CHOICES)}", "source")
    for key in ("classifiers", "width", "feature_channels", "head_channels"):
        v = value.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 1_000_000:
            raise FieldError(f"is {str(v)[:60]!r}; expected a positive integer", key)
    check_smoothing(value.get("smoothing"))
    if value.get("logits") is not None and not isinstance(value["logits"], str):
        raise FieldError(f"is {str(value['logits'])[:60]!r}; expected a key name or null", "logits")


@register
class REAL(AddOnMethod):
    name = "real"
    summary = "redundancy classifiers (REAL, image adaptation): softmax probability of an unknown class K"
    Options = REALOptions

    def check_model(self, model: nn.Module) -> None:
        if not isinstance(model, REALSegmenter):
            raise RPLInputError("--methods real needs a REAL checkpoint (rpl-train --method real writes one): pass "
                                "--checkpoint FILE, or leave real out of --methods.")

    def export_scorer(self, model: nn.Module, options: Any) -> Scorer:
        """``out.anomaly`` with a blur the ONNX tracer exports at dynamic sizes (``real.blur``)."""
        from rpl.scores import exportable_smooth

        self.check_model(model)
        blur = exportable_smooth(model.smoothing)

        def score(x: torch.Tensor, logits: torch.Tensor, out: Any) -> torch.Tensor:
            z = torch.cat([out.logits.float(), out.unknown.float()], dim=1)
            return blur(torch.softmax(z, dim=1)[:, -1])

        return score

    # -- training --------------------------------------------------------------------------------
    def build(self, segmenter: nn.Module, config: Any) -> nn.Module:
        opts = config.method_options(self.name)
        w = config.wrap
        model = real_wrap(segmenter, opts.head, opts.classifiers, opts.width, head=w.head, feature=w.feature,
                          smoothing=SMOOTHING if opts.blur else None)
        return model.train()  # wrap returns eval mode; train() leaves the segmenter in eval

    def parameter_groups(self, model: nn.Module, optim: Any) -> list[dict[str, Any]]:
        return [{"params": self.trainable_parameters(model), "lr": optim.lr}]

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.trainable_parameters())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = ctx.images(batch["image"])
        target = batch["target"].to(ctx.device, non_blocking=True)
        with ctx.autocast():
            out = model(images)
        loss, parts = real_loss(out.logits, out.unknown, target, ctx.config.method_options(self.name))
        parts["outlier_pixels"] = (target == OUTLIER).sum().float()
        return loss, parts

    # -- checkpoints -----------------------------------------------------------------------------
    def metadata_fields(self, path: str | Path) -> tuple:
        from rpl.checkpoint import MetadataField

        return (MetadataField("real", json=True, check=check_real_field),)

    def save(self, path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None,
             base_fingerprint: str | None = None) -> Path:
        from rpl.checkpoint import fingerprint, write_checkpoint

        if not isinstance(model, REALSegmenter):
            raise RPLInputError(f"the REAL saver was given a {type(model).__name__}; expected a REAL model "
                                "(rpl.methods.get('real').build or .load).")
        return write_checkpoint(path, model.bare_addon.state_dict(), self.name,
                                base_fingerprint or fingerprint(model.segmenter), type(model.segmenter).__name__,
                                {"real": model.real_arguments()}, extra)

    def load(self, path: str | Path, segmenter: nn.Module | None = None, check_base: bool = True,
             **kwargs: Any) -> nn.Module:
        """The REAL model of ``path`` on ``segmenter`` (default: the recorded one), in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from rpl.checkpoint import fingerprint, read_metadata, strip_prefix

        unknown = set(kwargs) - {"head", "feature"}
        if unknown:
            raise RPLInputError(f"checkpoint {path} holds method 'real', which takes no {sorted(unknown)}.")
        meta = read_metadata(path, method=self.name)
        if segmenter is None:
            segmenter = recorded_segmenter(path, meta)
        if check_base and fingerprint(segmenter) != meta["base_fingerprint"]:
            raise RPLInputError(
                f"checkpoint {path} was trained on a different base model ({meta.get('base_class')}, fingerprint "
                f"{meta['base_fingerprint'][:12]}...) than the one given ({type(segmenter).__name__}); REAL's "
                "redundancy classifiers only fit the exact frozen weights they were trained on.")
        info = meta["real"]
        model = real_wrap(segmenter, info["source"], info["classifiers"], info["width"],
                          head=kwargs.get("head") or info["head"], feature=kwargs.get("feature") or info.get("feature"),
                          smoothing=tuple(info["smoothing"]) if info.get("smoothing") else None,
                          logits=info.get("logits"))
        try:  # all-or-nothing: a checkpoint that does not fit leaves the segmenter unwrapped
            addon = model.bare_addon
            got = (addon.feature_channels, addon.head_channels)
            if got != (info["feature_channels"], info["head_channels"]):
                raise RPLInputError(f"checkpoint {path} expects feature/head channels {info['feature_channels']}/"
                                    f"{info['head_channels']}, the given segmenter has {got[0]}/{got[1]}: it is for "
                                    "another model.")
            try:
                state = strip_prefix(load_file(str(path)))
            except (SafetensorError, OSError, ValueError) as err:
                raise RPLInputError(f"checkpoint {path}: its tensors could not be read ({type(err).__name__}: "
                                    f"{str(err)[:200]}).") from None
            expected = addon.state_dict()
            if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
                raise RPLInputError(f"checkpoint {path} does not fit REAL's redundancy head {info}: tensors "
                                    f"{sorted(state)[:6]}, expected {sorted(expected)[:6]}.")
            addon.load_state_dict(state)
        except BaseException:
            model.unwrap()
            raise
        return model.eval()
