"""RPL + CoroCL losses (docs/method.md, section 3). Each returns a 0-d float32 tensor.

Masked means are written as ``sum(x * mask) / max(count, 1)`` so that an empty mask gives an exact
zero that is still connected to the graph: every rank of a DDP job then has the same autograd graph
whatever its batch holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rpl.conventions import OUTLIER, VOID
from rpl.errors import RPLInputError

ENERGY_LOSSES = ("hinge", "pebal")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _entropy(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    p = torch.softmax(logits, dim=1).clamp_min(eps)
    return -(p * p.log()).sum(dim=1)


def inlier_losses(z: torch.Tensor, z0: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inlier preservation on pixels with ``target not in {254, 255}``.

    Returns ``(L_ce, L_ent)``: cross-entropy of the perturbed logits ``z`` to the frozen model's
    pseudo-labels ``argmax z0`` (ground-truth classes are not used), and the mean squared difference
    of the per-pixel softmax entropies of ``z`` and ``z0``.
    """
    z, z0 = z.float(), z0.detach().float()
    inlier = (target != OUTLIER) & (target != VOID)
    ce = F.cross_entropy(z, z0.argmax(dim=1), reduction="none")
    ent = (_entropy(z) - _entropy(z0)) ** 2
    return _masked_mean(ce, inlier), _masked_mean(ent, inlier)


def outlier_energy_loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean relu(logsumexp z)`` over pasted-outlier pixels: pushes their free energy ``-lse`` up to >= 0.

    ``torch.logsumexp`` subtracts the max, so large logits do not overflow (the reference's does).
    """
    lse = torch.logsumexp(z.float(), dim=1)
    return _masked_mean(F.relu(lse), target == OUTLIER)


def pebal_energy_loss(z: torch.Tensor, target: torch.Tensor, m_in: float = -12.0, m_out: float = -6.0) -> torch.Tensor:
    """PEBAL's squared hinge on the free energy ``E = -lse(z)``: inliers below ``m_in``, outliers above ``m_out``."""
    e = -torch.logsumexp(z.float(), dim=1)
    inlier = (target != OUTLIER) & (target != VOID)
    return _masked_mean(F.relu(e - m_in) ** 2, inlier) + _masked_mean(F.relu(m_out - e) ** 2, target == OUTLIER)


def _sample(pool: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` rows of ``pool`` drawn uniformly without replacement."""
    idx = torch.randperm(pool.shape[0], device="cpu", generator=generator)[:n].to(pool.device)
    return pool[idx]


def corocl_loss(emb_city: torch.Tensor, target_city: torch.Tensor, emb_ctx: torch.Tensor, target_ctx: torch.Tensor,
                temperature: float = 0.10, max_samples: int = 512,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Context-robust contrastive loss (InfoNCE with binary labels shared by two contexts).

    ``emb_*``: embeddings ``(B, D, h, w)`` at the head resolution, L2-normalised over ``D`` here (the
    similarities of InfoNCE are cosines; unnormalised inputs would overflow ``exp``); ``target_*``: labels
    at any resolution (nearest-downsampled here). Pools over the whole batch: city-outlier (254),
    city-inlier (not 254/255), context-outlier (254), context-background (0). ``n = min(max_samples,
    pool sizes)`` from each; anchors are the 2n city samples, the contrast set adds the 2n context ones.
    An empty pool gives a graph-connected zero.
    """
    size = emb_city.shape[-2:]
    t_city = F.interpolate(target_city[:, None].float(), size=size, mode="nearest")[:, 0].long()
    t_ctx = F.interpolate(target_ctx[:, None].float(), size=emb_ctx.shape[-2:], mode="nearest")[:, 0].long()
    flat_city = F.normalize(emb_city.float().permute(0, 2, 3, 1).reshape(-1, emb_city.shape[1]), dim=1)
    flat_ctx = F.normalize(emb_ctx.float().permute(0, 2, 3, 1).reshape(-1, emb_ctx.shape[1]), dim=1)
    t_city, t_ctx = t_city.reshape(-1), t_ctx.reshape(-1)
    pools = [
        flat_city[t_city == OUTLIER],
        flat_city[(t_city != OUTLIER) & (t_city != VOID)],
        flat_ctx[t_ctx == OUTLIER],
        flat_ctx[t_ctx == 0],
    ]
    n = min([max_samples] + [p.shape[0] for p in pools])
    if n == 0:
        return (emb_city.float().sum() + emb_ctx.float().sum()) * 0.0
    city_out, city_in, ctx_out, ctx_bg = (_sample(p, n, generator) for p in pools)
    anchors = torch.cat([city_out, city_in])
    contrast = torch.cat([anchors, ctx_out, ctx_bg])
    ones, zeros = torch.ones(n, device=anchors.device), torch.zeros(n, device=anchors.device)
    a_lab = torch.cat([ones, zeros])
    c_lab = torch.cat([a_lab, ones, zeros])
    return info_nce(anchors, a_lab, contrast, c_lab, temperature)


def info_nce(anchors: torch.Tensor, anchor_labels: torch.Tensor, contrast: torch.Tensor,
             contrast_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised InfoNCE where the first ``len(anchors)`` contrast rows are the anchors themselves.

    ``L = -mean_i 1/|P_i| sum_{j in P_i} (s_ij - log(exp(s_ij) + N_i))`` with ``P_i`` the same-label
    entries other than ``i`` and ``N_i`` the summed ``exp(s)`` of the different-label entries.
    """
    s = anchors @ contrast.T / temperature
    s = s - s.max(dim=1, keepdim=True).values.detach()
    same = anchor_labels[:, None] == contrast_labels[None, :]
    self_mask = torch.zeros_like(same)
    self_mask[:, : anchors.shape[0]] = torch.eye(anchors.shape[0], dtype=torch.bool, device=s.device)
    positive = same & ~self_mask
    exp_s = s.exp()
    neg_sum = (exp_s * (~same)).sum(dim=1, keepdim=True)
    log_prob = s - torch.log(exp_s + neg_sum)
    per_anchor = (log_prob * positive).sum(dim=1) / positive.sum(dim=1).clamp_min(1)
    return -per_anchor.mean()


@dataclass
class LossWeights:
    """Weights of the total loss ``L = ce + ent + outlier * L_out + contrastive * L_cl``."""

    ce: float = 1.0
    entropy: float = 1.0
    outlier: float = 0.05
    contrastive: float = 1.0
    energy_loss: str = "hinge"  # "hinge" (RPL) or "pebal" (squared hinge, m_in -12, m_out -6)
    temperature: float = 0.10
    max_samples: int = 512

    def __post_init__(self) -> None:
        check_energy_loss(self.energy_loss)


def check_energy_loss(name: str) -> str:
    if name not in ENERGY_LOSSES:
        raise RPLInputError(f"loss.energy_loss is {name!r}; expected one of {', '.join(map(repr, ENERGY_LOSSES))} "
                            "('hinge': RPL's relu(lse) on outliers, 'pebal': PEBAL's squared hinges).")
    return name


def rpl_loss(z: torch.Tensor, z0: torch.Tensor, target: torch.Tensor, emb_city: torch.Tensor | None = None,
             emb_ctx: torch.Tensor | None = None, target_ctx: torch.Tensor | None = None,
             weights: LossWeights | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total loss and its detached parts (for logging)."""
    w = weights or LossWeights()
    ce, ent = inlier_losses(z, z0, target)
    kind = check_energy_loss(w.energy_loss)  # the dataclass may have been edited after construction
    out = outlier_energy_loss(z, target) if kind == "hinge" else pebal_energy_loss(z, target)
    total = w.ce * ce + w.entropy * ent + w.outlier * out
    parts = {"ce": ce.detach(), "entropy": ent.detach(), "outlier": out.detach()}
    if w.contrastive and emb_city is not None and emb_ctx is not None and target_ctx is not None:
        cl = corocl_loss(emb_city, target, emb_ctx, target_ctx, w.temperature, w.max_samples, generator)
        total = total + w.contrastive * cl
        parts["contrastive"] = cl.detach()
    parts["total"] = total.detach()
    return total, parts
