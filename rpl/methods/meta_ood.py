"""Meta-OoD (Chan, Rottmann and Gottschalk, ICCV 2021): entropy maximisation on outliers, then a meta
classifier that removes false-positive anomaly segments.

Facts from the reference code (robin-chan/meta-ood: ``ood_training.py``, ``config.py``,
``meta_classification.py``, ``src/metaseg/metrics.pyx``, ``src/helper.py``), with the choices made
here, are written out in docs/methods.md "Meta-OoD":

- soft targets per pixel: an inlier pixel of class ``y`` gets ``(1 - alpha)`` on class ``y`` and 0
  elsewhere, a pasted-outlier pixel (254) ``alpha / K`` on every class, a void pixel (255) zeros;
  the loss is the mean over every element (``B * K * H * W``) of ``-target * log_softmax(z)``. This
  is one tensor, not a sum of two separately normalised terms: ``(1 - alpha) * CE_in + alpha *
  CE_out`` holds only with both terms summed over pixels and divided by ``B * K * H * W`` together
  (``alpha = 0.9``; the reference tunes every parameter for one epoch with Adam at lr 1e-5);
- the reference's training set is its inlier images plus whole COCO images (one for every ten
  inlier images, drawn again each epoch) whose object pixels are 254 and whose background pixels
  keep the mask value 0, i.e. the first train id. Here those whole images are added to the shared
  outlier-exposure pipeline (pasted objects, ``data.paste_prob``); ``meta-ood.coco_images=0``
  leaves the pasted objects alone, ``data.paste_prob=0`` the reference's data alone;
- score: softmax entropy divided by ``log K`` (in [0, 1]);
- meta classifier: candidate segments are the 8-connected components (``cv2``) of ``entropy >=
  0.7``; per segment the statistics of :func:`segment_features` (names in
  :func:`feature_names`); features z-scored with the mean and standard deviation of the fitting
  segments (``+ 1e-10``); a segment's label is 1 (false positive) when none of its pixels is an
  outlier; an L2-regularised logistic regression with the intercept penalised like the weights
  (scikit-learn ``LogisticRegression(solver="liblinear")``, C = 1). The reference fits it
  leave-one-out on the test segments themselves; here it is fitted once on held-out validation data
  (the inlier val split with held-out outlier objects pasted in, as RPL's checkpoint selection) and
  never on a test set. ``meta-ood.solver=torch`` (default) minimises the same objective in torch
  (L-BFGS, float64); ``liblinear`` calls scikit-learn (``pip install 'rpl[meta]'``);
- removal: segments whose predicted probability of being a false positive exceeds 0.5 are
  removed: their pixels get score 0, the inlier end of the normalised entropy (the reference
  zeroes them in its binary prediction).

Checkpoints hold the whole tuned segmenter (``segmenter.*``) and, once fitted, the classifier
(``meta.mean``, ``meta.std``, ``meta.coef``, ``meta.intercept``: tensors, no pickle); the
metadata records the base segmenter it started from. A model with a classifier gives two rows:
``meta-ood`` (entropy) and ``meta-ood+meta`` (after removal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from rpl.conventions import OUTLIER, VOID
from rpl.errors import RPLInputError
from rpl.methods import register
from rpl.methods.base import FineTuneMethod, Scorer, TrainContext, load_tuned, save_tuned

NAME = "meta-ood"
META_ROW = NAME + "+meta"
TUNE_CHOICES = ("all", "last_block")
SOLVERS = ("torch", "liblinear")
COCO_BACKGROUND = ("first_class", "void")
REMOVED_SCORE = 0.0  # score of the pixels of a removed segment: the inlier end of entropy / log K
EPS = float(np.finfo(np.float32).eps)  # inside the log of the per-segment entropy, as the reference
HEATMAPS = ("E", "D", "V")
INSTALL_HINT = ("meta-ood.solver=liblinear needs scikit-learn: pip install 'rpl[meta]' (or pip install "
                "scikit-learn), or use meta-ood.solver=torch (the default), which fits the same objective in torch.")


@dataclass
class MetaOoDOptions:
    """Meta-OoD's options (config section ``meta-ood``); defaults are the reference's values."""

    alpha: float = 0.9  # weight of the outlier (uniform) targets; inliers get 1 - alpha
    tune: str = "all"  # all (reference) | last_block (the module holding the logit conv)
    layer: str | None = None  # the logit conv for tune=last_block (None: the last 1x1 conv with K outputs)
    coco_images: float = 0.1  # whole COCO images added per inlier image (reference 0.1; 0: pasted objects only)
    coco_background: str = "first_class"  # whole images' background: train id 0 (reference) | void
    threshold: float = 0.7  # candidate segments: normalised entropy >= threshold
    classifier: bool = True  # fit the meta classifier on held-out validation data after training
    solver: str = "torch"  # torch (same objective, no extra dependency) | liblinear (scikit-learn)
    C: float = 1.0  # inverse L2 strength of the logistic regression (scikit-learn's C)

    # config rules (rpl.config.rules)
    RANGES: ClassVar[dict] = {"alpha": "[0, 1]", "coco_images": ">= 0", "threshold": "[0, 1)", "C": "> 0"}
    CHOICES: ClassVar[dict] = {"tune": ("all", "last_block"), "solver": ("torch", "liblinear"),
                               "coco_background": ("first_class", "void")}


# -- the loss ----------------------------------------------------------------------------------------
def soft_targets(target: torch.Tensor, num_classes: int, alpha: float = 0.9) -> torch.Tensor:
    """``(B, K, H, W)`` targets: inliers ``(1 - alpha)`` one-hot, outliers (254) ``alpha / K``, void zeros."""
    inlier = (target != OUTLIER) & (target != VOID)
    safe = torch.where(inlier, target, torch.zeros_like(target))
    onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float() * (1.0 - alpha)
    onehot = onehot * inlier.unsqueeze(1)
    return onehot + (target == OUTLIER).unsqueeze(1).float() * (alpha / num_classes)


def entropy_max_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.9) -> torch.Tensor:
    """Mean over ``B * K * H * W`` of ``-soft_targets * log_softmax(logits)`` (the reference's loss)."""
    z = logits.float()
    return (-soft_targets(target, z.shape[1], alpha) * F.log_softmax(z, dim=1)).mean()


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` softmax entropy of ``(B, K, H, W)`` logits divided by ``log K`` (in [0, 1])."""
    z = logits.float()
    return -(torch.softmax(z, 1) * F.log_softmax(z, 1)).sum(1) / math.log(z.shape[1])


# -- per-segment features ------------------------------------------------------------------------------
def feature_names(num_classes: int) -> tuple[str, ...]:
    """The names of :func:`segment_features`' columns, in column order (sorted, as the reference).

    ``E`` entropy / log K, ``D`` = 1 - p1 + p2 (p1, p2 the two largest probabilities), ``V`` = 1 - p1;
    for each: ``X`` mean over the segment, ``X_in`` / ``X_bd`` over its interior / boundary,
    ``X_var*`` the variances, ``X_rel`` = ``X * S_rel``, ``X_rel_in`` = ``X_in * S_rel_in`` (and the
    same for the variances); ``S`` / ``S_in`` / ``S_bd`` pixel counts, ``S_rel`` = S / S_bd,
    ``S_rel_in`` = S_in / S_bd; ``cprobC`` mean probability of class C over the segment; ``ndistC``
    share of class C (argmax) among the segment's outside neighbours; ``mean_x`` / ``mean_y`` the
    centroid's row / column.
    """
    names = ["mean_x", "mean_y", "S", "S_in", "S_bd", "S_rel", "S_rel_in"]
    for h in HEATMAPS:
        names += [h, f"{h}_in", f"{h}_bd", f"{h}_rel", f"{h}_rel_in", f"{h}_var", f"{h}_var_in", f"{h}_var_bd",
                  f"{h}_var_rel", f"{h}_var_rel_in"]
    names += [f"cprob{c}" for c in range(num_classes)] + [f"ndist{c}" for c in range(num_classes)]
    return tuple(sorted(names))


@dataclass
class SegmentFeatures:
    components: np.ndarray  # (H, W) int32: 0 outside every candidate, 1..N the segments
    features: np.ndarray  # (N, F) float64, columns named by ``names``
    names: tuple[str, ...]

    def __len__(self) -> int:
        return self.features.shape[0]

    def column(self, name: str) -> np.ndarray:
        return self.features[:, self.names.index(name)]


_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def segment_features(probs: np.ndarray | torch.Tensor, threshold: float = 0.7) -> SegmentFeatures:
    """The candidate anomaly segments of one image and their Meta-OoD features.

    ``probs``: ``(K, H, W)`` softmax probabilities. Candidates are the 8-connected components of
    ``entropy / log K >= threshold``; a segment pixel is on the boundary when one of its 8
    neighbours inside the image lies outside every candidate, else interior. Column names:
    :func:`feature_names`. ``S_bd`` is taken as at least 1 in the ratios (a segment covering the whole
    image has no boundary).
    """
    import cv2

    p = probs.detach().double().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float64)
    if p.ndim != 3 or p.shape[0] < 2:
        raise RPLInputError(f"segment_features needs (K, H, W) probabilities with K >= 2, got shape {p.shape}.")
    k, h, w = p.shape
    heat = {"E": -(p * np.log(p + EPS)).sum(0) / math.log(k)}
    top = np.partition(p, k - 2, axis=0)[k - 2:]
    heat["D"], heat["V"] = 1.0 - top[1] + top[0], 1.0 - top[1]
    n, comp = cv2.connectedComponents((heat["E"] >= threshold).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    n -= 1
    names = feature_names(k)
    if n == 0:
        return SegmentFeatures(comp, np.zeros((0, len(names))), names)
    pred = p.argmax(0)
    padded = np.pad(comp, 1, constant_values=-1)  # -1: outside the image, never a neighbour
    padded_pred = np.pad(pred, 1)
    inside = comp > 0
    boundary = np.zeros_like(inside)
    neighbours = np.zeros((n + 1) * k)
    for dy, dx in _OFFSETS:
        nb = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        outside = inside & (nb == 0)
        boundary |= outside
        nb_pred = padded_pred[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        neighbours += np.bincount(comp[outside] * k + nb_pred[outside], minlength=(n + 1) * k)
    interior = inside & ~boundary

    def total(values: np.ndarray | None, where: np.ndarray) -> np.ndarray:
        return np.bincount(comp[where], weights=None if values is None else values[where], minlength=n + 1)[1:]

    n_in, n_bd = total(None, interior), total(None, boundary)
    size = n_in + n_bd
    bd = np.maximum(n_bd, 1)
    has_in = n_in > 0
    in_div = np.where(has_in, n_in, 1)
    f: dict[str, np.ndarray] = {"S": size, "S_in": n_in, "S_bd": n_bd, "S_rel": size / bd, "S_rel_in": n_in / bd}
    rows, cols = np.indices((h, w))
    f["mean_x"], f["mean_y"] = total(rows, inside) / size, total(cols, inside) / size
    for name, m in heat.items():
        s_in, s_bd = total(m, interior), total(m, boundary)
        q_in, q_bd = total(m * m, interior), total(m * m, boundary)
        mean = (s_in + s_bd) / size
        mean_in = np.where(has_in, s_in / in_div, 0.0)
        mean_bd = s_bd / bd
        var = (q_in + q_bd) / size - mean ** 2
        var_in = np.where(has_in, q_in / in_div - mean_in ** 2, 0.0)
        var_bd = q_bd / bd - mean_bd ** 2
        f |= {name: mean, f"{name}_in": mean_in, f"{name}_bd": mean_bd, f"{name}_var": var, f"{name}_var_in": var_in,
              f"{name}_var_bd": var_bd, f"{name}_rel": mean * f["S_rel"], f"{name}_rel_in": mean_in * f["S_rel_in"],
              f"{name}_var_rel": var * f["S_rel"], f"{name}_var_rel_in": var_in * f["S_rel_in"]}
    counts = neighbours.reshape(n + 1, k)[1:]
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    for c in range(k):
        f[f"cprob{c}"] = total(p[c], inside) / size
        f[f"ndist{c}"] = share[:, c]
    return SegmentFeatures(comp, np.stack([f[name] for name in names], 1).astype(np.float64), names)


def false_positive_labels(components: np.ndarray, outlier: np.ndarray) -> np.ndarray:
    """``(N,)`` 1 for each segment without any outlier pixel (``outlier`` a boolean ``(H, W)`` map), else 0."""
    n = int(components.max())
    hits = np.bincount(components[outlier], minlength=n + 1)[1:] if n else np.zeros(0, np.int64)
    return (hits == 0).astype(np.int64)


# -- the classifier ---------------------------------------------------------------------------------------
def fit_logistic_regression(x: np.ndarray, y: np.ndarray, C: float = 1.0, solver: str = "torch"
                            ) -> tuple[np.ndarray, float]:
    """``(coef, intercept)`` of ``min 0.5 * (|w|^2 + b^2) + C * sum log(1 + exp(-s (w.x + b)))``, ``s = 2y - 1``.

    That is scikit-learn's ``LogisticRegression(solver="liblinear", C=C)`` objective (its intercept
    is a feature of constant 1, penalised like the weights); ``solver="liblinear"`` calls it.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y)
    if solver == "liblinear":
        LogisticRegression = require_sklearn()
        if len(np.unique(y)) < 2:
            raise RPLInputError(f"the meta classifier's fitting segments all have label {int(y[0]) if len(y) else '-'}; "
                                "liblinear needs both classes (use meta-ood.solver=torch or more validation images).")
        model = LogisticRegression(solver="liblinear", C=C).fit(x, y)
        return model.coef_[0].astype(np.float64), float(model.intercept_[0])
    if solver != "torch":
        raise RPLInputError(f"meta-ood.solver={solver!r}; expected one of {', '.join(SOLVERS)}.")
    xt = torch.from_numpy(x)
    s = torch.from_numpy(2.0 * y.astype(np.float64) - 1.0)
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        margin = s * (xt @ params[:-1] + params[-1])
        value = 0.5 * params.pow(2).sum() + C * F.softplus(-margin).sum()
        value.backward()
        return value

    for _ in range(10):
        opt.step(objective)
        if params.grad is not None and float(params.grad.abs().max()) < 1e-9:
            break
    w = params.detach().numpy()
    return w[:-1].copy(), float(w[-1])


def require_sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise RPLInputError(INSTALL_HINT) from None
    return LogisticRegression


class MetaClassifier(nn.Module):
    """z-scoring and a logistic regression on :func:`segment_features`: the probability of a false positive."""

    def __init__(self, num_features: int):
        super().__init__()
        for name in ("mean", "coef"):
            self.register_buffer(name, torch.zeros(num_features, dtype=torch.float64))
        self.register_buffer("std", torch.ones(num_features, dtype=torch.float64))
        self.register_buffer("intercept", torch.zeros((), dtype=torch.float64))

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, C: float = 1.0, solver: str = "torch") -> "MetaClassifier":
        x = np.asarray(x, np.float64)
        if x.shape[0] == 0:
            raise RPLInputError("the meta classifier has no segment to fit on: no validation image had a pixel with "
                                "normalised entropy >= meta-ood.threshold (train longer, or lower the threshold).")
        mean, std = x.mean(0), x.std(0)
        coef, intercept = fit_logistic_regression((x - mean) / (std + 1e-10), y, C, solver)
        model = cls(x.shape[1])
        model.mean.copy_(torch.from_numpy(mean))
        model.std.copy_(torch.from_numpy(std))
        model.coef.copy_(torch.from_numpy(coef))
        model.intercept.fill_(intercept)
        return model

    def false_positive_probability(self, features: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(features, np.float64))
        z = (x - self.mean.double().cpu()) / (self.std.double().cpu() + 1e-10)
        return torch.sigmoid(z @ self.coef.double().cpu() + self.intercept.double().cpu()).numpy()


def remove_false_positives(score: torch.Tensor, probs: torch.Tensor, classifier: MetaClassifier,
                           threshold: float = 0.7) -> torch.Tensor:
    """``score`` ``(B, H, W)`` with the pixels of every segment classified as a false positive
    (probability > 0.5) set to :data:`REMOVED_SCORE`; ``probs`` ``(B, K, H, W)``."""
    out = score.clone()
    for i in range(score.shape[0]):
        seg = segment_features(probs[i], threshold)
        if len(seg) == 0:
            continue
        removed = np.flatnonzero(classifier.false_positive_probability(seg.features) > 0.5) + 1
        if removed.size:
            mask = torch.from_numpy(np.isin(seg.components, removed)).to(score.device)
            out[i][mask] = REMOVED_SCORE
    return out


# -- the model ---------------------------------------------------------------------------------------------
@dataclass
class MetaOoDOutput:
    logits: torch.Tensor  # closed-set logits (B, K, H, W)
    classifier: MetaClassifier | None = None
    threshold: float = 0.7
    _anomaly: torch.Tensor | None = field(default=None, repr=False)

    @property
    def anomaly(self) -> torch.Tensor:
        """``(B, H, W)`` softmax entropy / log K; higher = more anomalous."""
        if self._anomaly is None:
            with torch.no_grad():
                self._anomaly = normalised_entropy(self.logits.detach())
        return self._anomaly

    @property
    def meta_anomaly(self) -> torch.Tensor:
        """The entropy score after the meta classifier's removal of false-positive segments."""
        if self.classifier is None:
            raise RPLInputError("this Meta-OoD model has no meta classifier (meta-ood.classifier=false, or the "
                                "checkpoint was written before the classifier stage).")
        with torch.no_grad():
            return remove_false_positives(self.anomaly, torch.softmax(self.logits.detach().float(), 1),
                                          self.classifier, self.threshold)


class MetaOoDSegmenter(nn.Module):
    """A segmenter tuned by entropy maximisation, with its (optional) meta classifier."""

    def __init__(self, segmenter: nn.Module, num_classes: int, threshold: float = 0.7,
                 classifier: MetaClassifier | None = None):
        super().__init__()
        self.segmenter, self.num_classes, self.threshold = segmenter, int(num_classes), float(threshold)
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> MetaOoDOutput:
        from rpl.wrapping import extract_logits

        z = extract_logits(self.segmenter(images))
        if z.shape[1] != self.num_classes:
            raise RPLInputError(f"the segmenter gives {z.shape[1]} channels, expected {self.num_classes} classes "
                                "(segmenter.num_classes).")
        return MetaOoDOutput(z, self.classifier, self.threshold)


def last_conv(segmenter: nn.Module, num_classes: int) -> str:
    names = [n for n, m in segmenter.named_modules()
             if isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)]
    if not names:
        raise RPLInputError(f"meta-ood.tune=last_block needs the segmenter's last 1x1 conv with {num_classes} outputs, "
                            f"and {type(segmenter).__name__} has none; name it with meta-ood.layer=MODULE.")
    return names[-1]


def tuned_parameters(segmenter: nn.Module, tune: str, layer: str | None, num_classes: int) -> list[nn.Parameter]:
    """Every parameter (``all``) or those of the module holding the logit conv (``last_block``)."""
    if tune not in TUNE_CHOICES:
        raise RPLInputError(f"meta-ood.tune={tune!r}; expected one of {', '.join(TUNE_CHOICES)}.")
    if tune == "all":
        return list(segmenter.parameters())
    layer = layer or last_conv(segmenter, num_classes)
    parent = layer.rpartition(".")[0]
    try:
        return list(segmenter.get_submodule(parent or layer).parameters())
    except AttributeError:
        raise RPLInputError(f"meta-ood.layer {layer!r} does not exist in {type(segmenter).__name__}.") from None


# -- whole COCO images as extra samples -----------------------------------------------------------------------
class WithWholeOutlierImages(Dataset):
    """The outlier-exposure set plus ``round(fraction * len(base))`` whole outlier images per epoch.

    Extra item ``j`` of epoch ``e`` is a random crop (after upscaling an image smaller than the crop)
    and flip of outlier image ``draw(e)[j]``: object pixels 254, background 0 (the first train id, as
    the reference) or 255 (``background="void"``), padding 255. Randomness from ``(seed, e, index)``.
    """

    def __init__(self, base: Any, fraction: float, background: str = "first_class"):
        if background not in COCO_BACKGROUND:
            raise RPLInputError(f"meta-ood.coco_background={background!r}; expected one of "
                                f"{', '.join(COCO_BACKGROUND)}.")
        self.base, self.background = base, background
        self.n_extra = int(round(fraction * len(base)))

    def __len__(self) -> int:
        return len(self.base) + self.n_extra

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.base.epoch

    def drawn(self, epoch: int) -> np.ndarray:
        """The outlier image of each extra item in ``epoch``."""
        from rpl.data.training import draw_ood_assignment

        return draw_ood_assignment(self.n_extra, len(self.base.ood_pairs), self.base.seed + 104729, epoch)

    @property
    def inlier_pairs(self) -> list:
        """The image of every index (for messages about a batch)."""
        return list(self.base.inlier_pairs) + [self.base.ood_pairs[int(j)] for j in self.drawn(self.epoch)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import cv2

        from rpl.data.training import item_rng
        from rpl.data.transforms import context_image, hflip, normalize, random_crop

        if index < len(self.base):
            return self.base[index]
        if not 0 <= index < len(self):
            raise IndexError(index)
        b = self.base
        epoch = self.epoch
        rng = item_rng(b.seed + 104729, epoch, index)
        image, mask = b._read_ood(int(self.drawn(epoch)[index - len(b)]))
        ctx_image, ctx_label = context_image(image, mask, b.crop_size)
        ch, cw = b.crop_size
        scale = max(ch / image.shape[0], cw / image.shape[1])
        if scale > 1:
            size = (math.ceil(image.shape[1] * scale), math.ceil(image.shape[0] * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        target = np.where(mask == OUTLIER, OUTLIER, 0 if self.background == "first_class" else VOID).astype(np.uint8)
        image, target = random_crop(image, target, b.crop_size, rng, image_pad=0, label_pad=VOID)
        image, target = hflip(image, target, rng, b.flip_p)
        return {"image": normalize(image, b.mean, b.std), "target": torch.from_numpy(target.astype(np.int64)),
                "context_image": normalize(ctx_image, b.mean, b.std),
                "context_target": torch.from_numpy(ctx_label.astype(np.int64)), "index": torch.tensor(index)}


# -- fitting the classifier on validation data ------------------------------------------------------------------
@torch.no_grad()
def collect_segments(model: MetaOoDSegmenter, loader: Any, device: torch.device, threshold: float = 0.7,
                     autocast: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and false-positive labels of every candidate segment of ``loader``'s images (``image`` /
    ``target`` batches with 254 outliers), scored by ``model``."""
    import contextlib

    xs, ys = [], []
    model.eval()
    for batch in loader:
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(batch["image"].to(device)).logits
        probs = torch.softmax(logits.float(), 1).cpu()
        target = batch["target"].cpu().numpy()
        for i in range(probs.shape[0]):
            seg = segment_features(probs[i], threshold)
            if len(seg):
                xs.append(seg.features)
                ys.append(false_positive_labels(seg.components, target[i] == OUTLIER))
    if not xs:
        return np.zeros((0, len(feature_names(model.num_classes)))), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def fit_meta_classifier(model: MetaOoDSegmenter, loader: Any, device: torch.device,
                        opts: MetaOoDOptions | None = None, autocast: Any = None) -> dict[str, Any]:
    """Fit ``model.classifier`` on the segments of ``loader`` (held-out validation data); a summary."""
    o = opts or MetaOoDOptions()
    x, y = collect_segments(model, loader, device, o.threshold, autocast)
    model.classifier = MetaClassifier.fit(x, y, o.C, o.solver).to(device)
    p = model.classifier.false_positive_probability(x)
    return {"segments": int(len(y)), "false_positives": int(y.sum()), "solver": o.solver, "C": o.C,
            "removed": int((p > 0.5).sum()), "accuracy": float(((p > 0.5) == (y == 1)).mean())}


@register
class MetaOoD(FineTuneMethod):
    name = NAME
    summary = "entropy maximisation on outliers (fine-tuned segmenter) + a meta classifier removing false positives"
    Options = MetaOoDOptions

    def check_model(self, model: nn.Module) -> None:
        if not isinstance(model, MetaOoDSegmenter):
            raise RPLInputError("--methods meta-ood needs a Meta-OoD checkpoint (rpl-train --method meta-ood writes "
                                "one): pass --checkpoint FILE, or leave meta-ood out of --methods.")

    def row_scorers(self, model: nn.Module, options: Any) -> dict[str, Scorer]:
        """``meta-ood`` (entropy) and, with a fitted classifier, ``meta-ood+meta`` (after removal)."""
        rows = {self.name: self.scorer(model, options)}
        if model.classifier is not None:
            rows[META_ROW] = lambda x, logits, out: out.meta_anomaly
        return rows

    # -- training --------------------------------------------------------------------------------
    def build(self, segmenter: nn.Module, config: Any) -> nn.Module:
        opts = config.method_options(self.name)
        if not 0.0 <= opts.alpha <= 1.0:
            raise RPLInputError(f"meta-ood.alpha={opts.alpha}; expected a value in [0, 1].")
        if not 0.0 < opts.threshold < 1.0:
            raise RPLInputError(f"meta-ood.threshold={opts.threshold}; expected a value in (0, 1).")
        if opts.solver not in SOLVERS:
            raise RPLInputError(f"meta-ood.solver={opts.solver!r}; expected one of {', '.join(SOLVERS)}.")
        if opts.classifier and opts.solver == "liblinear":
            require_sklearn()  # refused now, not after training
        k = config.segmenter.num_classes
        tuned = {id(p) for p in tuned_parameters(segmenter, opts.tune, opts.layer, k)}
        for p in segmenter.parameters():
            p.requires_grad_(id(p) in tuned)
        return MetaOoDSegmenter(segmenter, k, opts.threshold)

    def training_set(self, train_set: Any, config: Any) -> Any:
        opts = config.method_options(self.name)
        if opts.coco_images < 0:
            raise RPLInputError(f"meta-ood.coco_images={opts.coco_images}; expected a number >= 0.")
        if opts.coco_images == 0:
            return train_set
        return WithWholeOutlierImages(train_set, opts.coco_images, opts.coco_background)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = ctx.images(batch["image"])
        target = batch["target"].to(ctx.device, non_blocking=True)
        with ctx.autocast():
            out = model(images)
        loss = entropy_max_loss(out.logits, target, ctx.config.method_options(self.name).alpha)
        return loss, {"total": loss.detach(), "outlier_pixels": (target == OUTLIER).sum().float()}

    def after_fit(self, trainer: Any) -> dict[str, Any]:
        """Fit the meta classifier for ``best.safetensors`` on the held-out validation set and rewrite it."""
        import copy

        from safetensors.torch import load_file

        from rpl.checkpoint import SEGMENTER_PREFIX, read_metadata

        opts = trainer.cfg.method_options(self.name)
        best = trainer.work_dir / "best.safetensors"
        if not opts.classifier or not trainer.d.main or not best.is_file():
            return {}
        model = copy.deepcopy(self.unwrap(trainer.model))
        state = load_file(str(best))
        model.segmenter.load_state_dict({k[len(SEGMENTER_PREFIX):]: v for k, v in state.items()
                                         if k.startswith(SEGMENTER_PREFIX)})
        summary = fit_meta_classifier(model, trainer.data.val_loader(), trainer.device, opts,
                                      lambda: torch.autocast(trainer.device.type, dtype=trainer.amp_dtype,
                                                             enabled=trainer.amp))
        meta = read_metadata(best, method=self.name)
        extra = dict(meta["extra"], meta_classifier=summary)
        self.save(best, model, extra=extra, base_fingerprint=meta["base_fingerprint"])
        if not trainer.quiet:
            print(f"meta classifier fitted on {summary['segments']} held-out validation segments "
                  f"({summary['false_positives']} false positives; it removes {summary['removed']}); "
                  f"written into {best}")
        return {"meta_classifier": summary}

    # -- checkpoints -----------------------------------------------------------------------------
    def metadata_fields(self, path: str | Path) -> tuple:
        from rpl.checkpoint import FieldError, MetadataField

        def check(value: Any) -> None:
            if not isinstance(value, dict):
                raise FieldError(f"is a JSON {type(value).__name__}; expected an object")
            k = value.get("num_classes")
            if not isinstance(k, int) or isinstance(k, bool) or not 1 < k < 254:
                raise FieldError(f"is {str(k)[:60]!r}; expected a class count 2..253", "num_classes")
            t = value.get("threshold")
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t < 1:
                raise FieldError(f"is {str(t)[:60]!r}; expected a number in (0, 1)", "threshold")
            if not isinstance(value.get("classifier"), bool):
                raise FieldError(f"is {str(value.get('classifier'))[:60]!r}; expected true or false", "classifier")
            n = value.get("num_features")
            if value["classifier"] and n != len(feature_names(k)):
                raise FieldError(f"is {str(n)[:60]!r}; expected {len(feature_names(k))} (the features of "
                                 f"{k} classes)", "num_features")

        return (MetadataField(NAME, json=True, check=check),)

    def save(self, path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None,
             base_fingerprint: str | None = None) -> Path:
        from rpl.checkpoint import fingerprint

        info = {"num_classes": model.num_classes, "threshold": model.threshold,
                "classifier": model.classifier is not None, "removed_score": REMOVED_SCORE,
                "tuned_fingerprint": fingerprint(model.segmenter)}
        tensors = {}
        if model.classifier is not None:
            tensors = {f"meta.{k}": v for k, v in model.classifier.state_dict().items()}
            info["num_features"] = int(model.classifier.coef.numel())
        return save_tuned(path, self.name, model.segmenter, tensors, {NAME: info}, extra, base_fingerprint)

    def load(self, path: str | Path, segmenter: nn.Module | None = None, check_base: bool = True,
             **kwargs: Any) -> nn.Module:
        """The Meta-OoD model of ``path``: ``segmenter`` (default: the recorded base) gets the tuned weights."""
        meta, state, segmenter = load_tuned(path, self.name, segmenter, check_base, kwargs)
        info = meta[NAME]
        classifier = None
        if info["classifier"]:
            classifier = MetaClassifier(info["num_features"])
            try:
                classifier.load_state_dict({k[len("meta."):]: v.double() for k, v in state.items()
                                            if k.startswith("meta.")})
            except RuntimeError as err:
                raise RPLInputError(f"checkpoint {path}: its meta classifier tensors do not fit "
                                    f"{info['num_features']} features: {str(err)[:300]}") from None
            device = next(segmenter.parameters(), torch.zeros(())).device
            classifier = classifier.to(device)
        return MetaOoDSegmenter(segmenter, info["num_classes"], info["threshold"], classifier).eval()

