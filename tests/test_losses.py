"""Every loss against a straightforward implementation written here from the formulas of docs/method.md, section 3."""
from __future__ import annotations

import math

import pytest
import torch

import rpl
from rpl import losses, scores


def _rand(b=2, k=5, h=6, w=7, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, h, w, generator=g) * scale
    z0 = torch.randn(b, k, h, w, generator=g) * scale
    t = torch.randint(0, k, (b, h, w), generator=g)
    t[0, :2] = 255
    t[1, 2:4, 3:6] = 254
    return z, z0, t


def _pixels(z, t, keep):
    """(logit vector, label) for every pixel where ``keep(label)``, by plain loops."""
    out = []
    for b in range(z.shape[0]):
        for i in range(z.shape[2]):
            for j in range(z.shape[3]):
                if keep(int(t[b, i, j])):
                    out.append((b, i, j))
    return out


def _entropy_vec(v):
    p = [max(x, 1e-7) for x in torch.softmax(v.double(), 0).tolist()]
    return -sum(x * math.log(x) for x in p)


def test_inlier_losses_match_loops():
    z, z0, t = _rand()
    ce, ent = losses.inlier_losses(z, z0, t)
    pix = _pixels(z, t, lambda y: y not in (254, 255))
    ce_ref = ent_ref = 0.0
    for b, i, j in pix:
        v, v0 = z[b, :, i, j].double(), z0[b, :, i, j].double()
        pseudo = int(torch.argmax(v0))
        ce_ref += -(v[pseudo] - torch.logsumexp(v, 0)).item()
        ent_ref += (_entropy_vec(v) - _entropy_vec(v0)) ** 2
    assert ce.item() == pytest.approx(ce_ref / len(pix), rel=1e-5)
    assert ent.item() == pytest.approx(ent_ref / len(pix), rel=1e-4)
    assert ce.dim() == 0 and ent.dim() == 0


def test_outlier_energy_hinge_matches_loops_and_is_stable():
    z, _, t = _rand(scale=200.0)  # the reference's unstable lse overflows in fp32 at such scales... ours not
    z = z.half().float() * 10  # logits up to ~1e4
    loss = losses.outlier_energy_loss(z, t)
    pix = _pixels(z, t, lambda y: y == 254)
    ref = sum(max(0.0, torch.logsumexp(z[b, :, i, j].double(), 0).item()) for b, i, j in pix) / len(pix)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_pebal_energy_matches_loops():
    z, _, t = _rand(scale=8.0)
    loss = losses.pebal_energy_loss(z, t)
    e = lambda b, i, j: -torch.logsumexp(z[b, :, i, j].double(), 0).item()
    inl = _pixels(z, t, lambda y: y not in (254, 255))
    out = _pixels(z, t, lambda y: y == 254)
    ref = sum(max(0.0, e(*p) + 12) ** 2 for p in inl) / len(inl) + sum(max(0.0, -6 - e(*p)) ** 2 for p in out) / len(out)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def _info_nce_loops(anchors, a_lab, contrast, c_lab, tau):
    """Direct transcription: L = -mean_i 1/|P_i| sum_{j in P_i} (s_ij - log(exp(s_ij) + N_i))."""
    total = 0.0
    n_anchor = anchors.shape[0]
    for i in range(n_anchor):
        s = [(anchors[i].double() @ contrast[j].double()).item() / tau for j in range(contrast.shape[0])]
        m = max(s)
        s = [x - m for x in s]
        neg = sum(math.exp(s[j]) for j in range(len(s)) if c_lab[j] != a_lab[i])
        pos = [j for j in range(len(s)) if c_lab[j] == a_lab[i] and j != i]
        total += sum(s[j] - math.log(math.exp(s[j]) + neg) for j in pos) / len(pos)
    return -total / n_anchor


def test_info_nce_matches_loops():
    g = torch.Generator().manual_seed(3)
    n = 6
    anchors = torch.nn.functional.normalize(torch.randn(2 * n, 8, generator=g), dim=1)
    extra = torch.nn.functional.normalize(torch.randn(2 * n, 8, generator=g), dim=1)
    a_lab = torch.tensor([1.0] * n + [0.0] * n)
    contrast = torch.cat([anchors, extra])
    c_lab = torch.cat([a_lab, a_lab])
    ours = losses.info_nce(anchors, a_lab, contrast, c_lab, 0.1)
    assert ours.item() == pytest.approx(_info_nce_loops(anchors, a_lab, contrast, c_lab, 0.1), rel=1e-5)


def _emb(b, d, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, d, h, w, generator=g), dim=1).requires_grad_(True)


def test_corocl_pools_sampling_and_formula():
    emb_city, emb_ctx = _emb(2, 8, 4, 4, 1), _emb(2, 8, 4, 4, 2)
    t_city = torch.zeros(2, 8, 8, dtype=torch.long)
    t_city[0, :4, :4] = 254  # 4 outlier pixels at 4x4 after nearest downsampling
    t_city[1, 4:, :] = 255
    t_ctx = torch.zeros(2, 8, 8, dtype=torch.long)
    t_ctx[:, 2:6, 2:6] = 254
    t_ctx[:, :, -2:] = 255
    # the pools at 4x4: city-outlier 4, city-inlier 16 + 8 - 4 = 20, ctx-outlier 8, ctx-background 32 - 8 - 8 = 16
    gen = torch.Generator().manual_seed(7)
    ours = losses.corocl_loss(emb_city, t_city, emb_ctx, t_ctx, temperature=0.1, max_samples=512, generator=gen)

    # replay the sampling with the same generator to build the reference from the formula
    gen = torch.Generator().manual_seed(7)
    small_c = t_city[:, ::2, ::2].reshape(-1)
    small_x = t_ctx[:, ::2, ::2].reshape(-1)
    fc = emb_city.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    fx = emb_ctx.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    pools = [fc[small_c == 254], fc[(small_c != 254) & (small_c != 255)], fx[small_x == 254], fx[small_x == 0]]
    assert [len(p) for p in pools] == [4, 20, 8, 16]
    n = 4
    picked = [p[torch.randperm(len(p), generator=gen)[:n]] for p in pools]
    anchors = torch.cat(picked[:2])
    a_lab = [1] * n + [0] * n
    ref = _info_nce_loops(anchors, a_lab, torch.cat(picked), a_lab + [1] * n + [0] * n, 0.1)
    assert ours.item() == pytest.approx(ref, rel=1e-5)
    ours.backward()
    assert emb_city.grad.abs().sum() > 0 and emb_ctx.grad.abs().sum() > 0


def test_corocl_caps_samples_at_max():
    emb_city, emb_ctx = _emb(1, 4, 8, 8, 1), _emb(1, 4, 8, 8, 2)
    t = torch.zeros(1, 8, 8, dtype=torch.long)
    t[:, :4] = 254
    seen = {}

    def recording(anchors, anchor_labels, contrast, contrast_labels, temperature):
        seen.update(anchors=anchors.shape[0], contrast=contrast.shape[0])
        return original(anchors, anchor_labels, contrast, contrast_labels, temperature)

    original = losses.info_nce
    losses.info_nce = recording
    try:
        loss = losses.corocl_loss(emb_city, t, emb_ctx, t.clone(), max_samples=3,
                                  generator=torch.Generator().manual_seed(3))
    finally:
        losses.info_nce = original
    assert seen == {"anchors": 6, "contrast": 12}  # 32 pixels in each pool, 3 drawn from each of the four
    # the same 3 + 3 + 3 + 3 rows drawn again by hand give the same value
    g = torch.Generator().manual_seed(3)
    fc, fx = emb_city.detach().permute(0, 2, 3, 1).reshape(-1, 4), emb_ctx.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    flat = t.reshape(-1)
    picked = [p[torch.randperm(len(p), generator=g)[:3]] for p in (fc[flat == 254], fc[flat != 254], fx[flat == 254],
                                                                   fx[flat == 0])]
    ref = _info_nce_loops(torch.cat(picked[:2]), [1] * 3 + [0] * 3, torch.cat(picked), [1] * 3 + [0] * 3 + [1] * 3 + [0] * 3,
                          0.1)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_corocl_normalises_its_input():
    emb_city, emb_ctx = _emb(2, 8, 4, 4, 1), _emb(2, 8, 4, 4, 2)
    t = torch.zeros(2, 4, 4, dtype=torch.long)
    t[:, :2] = 254
    unit = losses.corocl_loss(emb_city, t, emb_ctx, t.clone(), generator=torch.Generator().manual_seed(0))
    scaled = losses.corocl_loss(emb_city * 50.0, t, emb_ctx * 50.0, t.clone(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(scaled) and scaled.item() == pytest.approx(unit.item(), rel=1e-5)


def test_energy_loss_name_is_checked():
    with pytest.raises(rpl.RPLInputError, match="energy_loss.*'pebl'.*'hinge', 'pebal'"):
        losses.LossWeights(energy_loss="pebl")
    weights = losses.LossWeights()
    weights.energy_loss = "Hinge"
    z = torch.randn(1, 3, 4, 4)
    with pytest.raises(rpl.RPLInputError, match="'Hinge'"):
        losses.rpl_loss(z, z, torch.zeros(1, 4, 4, dtype=torch.long), weights=weights)


@pytest.mark.parametrize("empty", ["city_outlier", "ctx_outlier", "all_void"])
def test_empty_cases_give_connected_zero(empty):
    emb_city, emb_ctx = _emb(2, 8, 4, 4, 1), _emb(2, 8, 4, 4, 2)
    t_city = torch.zeros(2, 4, 4, dtype=torch.long)
    t_city[0, :2, :2] = 254
    t_ctx = torch.zeros(2, 4, 4, dtype=torch.long)
    t_ctx[:, 1:3, 1:3] = 254
    if empty == "city_outlier":
        t_city[t_city == 254] = 0
    elif empty == "ctx_outlier":
        t_ctx[:] = 0
    else:
        t_city[:] = 255
        t_ctx[:] = 255
    loss = losses.corocl_loss(emb_city, t_city, emb_ctx, t_ctx)
    assert loss.item() == 0.0 and loss.dim() == 0
    loss.backward()  # same graph: both embeddings receive (zero) gradients
    assert emb_city.grad is not None and emb_ctx.grad is not None and emb_city.grad.abs().sum() == 0

    z = torch.randn(2, 5, 4, 4, requires_grad=True)
    z0 = torch.randn(2, 5, 4, 4)
    out = losses.outlier_energy_loss(z, t_city)
    ce, ent = losses.inlier_losses(z, z0, t_city)
    for value in (out, ce, ent):
        assert torch.isfinite(value)
    if empty == "city_outlier":
        assert out.item() == 0.0  # no outlier pixel: exact zero
    elif empty == "all_void":
        assert ce.item() == 0.0 and ent.item() == 0.0
    (out + ce + ent).backward()
    assert z.grad is not None


def test_total_is_weighted_sum_of_parts():
    z, z0, t = _rand()
    emb_city, emb_ctx = _emb(2, 8, 6, 7, 1), _emb(2, 8, 6, 7, 2)
    t_ctx = torch.zeros(2, 6, 7, dtype=torch.long)
    t_ctx[:, 2:5, 2:5] = 254
    w = losses.LossWeights(ce=0.5, entropy=2.0, outlier=0.05, contrastive=1.5)
    total, parts = losses.rpl_loss(z, z0, t, emb_city, emb_ctx, t_ctx, w, generator=torch.Generator().manual_seed(0))
    expected = 0.5 * parts["ce"] + 2.0 * parts["entropy"] + 0.05 * parts["outlier"] + 1.5 * parts["contrastive"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    _, parts_pebal = losses.rpl_loss(z, z0, t, weights=losses.LossWeights(energy_loss="pebal"))
    assert parts_pebal["outlier"].item() == pytest.approx(losses.pebal_energy_loss(z, t).item())
    assert "contrastive" not in parts_pebal


def test_scores_conventions():
    z = torch.randn(2, 4, 5, 6, dtype=torch.bfloat16)
    zf = z.float()
    assert torch.allclose(scores.energy(z), -torch.logsumexp(zf, 1))
    assert torch.allclose(scores.msp(z), 1 - torch.softmax(zf, 1).max(1).values)
    assert torch.allclose(scores.maxlogit(z), -zf.max(1).values)
    p = torch.softmax(zf, 1)
    assert torch.allclose(scores.entropy(z), -(p * p.log()).sum(1), atol=1e-5)
    for fn in scores.SCORES.values():
        assert fn(z).dtype == torch.float32 and fn(z).shape == (2, 5, 6)
    # higher = more anomalous: a confident pixel scores lower than a flat one
    confident = torch.tensor([10.0, 0, 0, 0]).view(1, 4, 1, 1)
    flat = torch.zeros(1, 4, 1, 1)
    for fn in scores.SCORES.values():
        assert fn(confident).item() < fn(flat).item()


def test_smoothing_is_gaussian_7_sigma_1():
    s = torch.zeros(1, 15, 15)
    s[0, 7, 7] = 1.0
    out = scores.smooth(s)
    k1 = torch.tensor([math.exp(-(i ** 2) / 2) for i in range(-3, 4)])
    k1 = k1 / k1.sum()
    assert torch.allclose(out[0, 4:11, 4:11], k1[:, None] * k1[None, :], atol=1e-6)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
