"""HF SegFormer preset (optional dependency: skipped without transformers)."""
from __future__ import annotations

import pytest
import torch

import rpl

transformers = pytest.importorskip("transformers")


def test_segformer_preset_keeps_logits_identical():
    config = transformers.SegformerConfig(num_labels=19, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                                          decoder_hidden_size=32, num_attention_heads=[1, 1, 1, 1])
    base = transformers.SegformerForSemanticSegmentation(config).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = base(pixel_values=x).logits.clone()
    model = rpl.wrap(base, block={"width": 16})
    assert model.head_name == "decode_head.classifier"
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        out = model(x)
        out.anomaly_logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out.logits, expected)
    assert out.anomaly_logits.shape == expected.shape == (2, 19, 16, 16)
    assert out.raw.logits.shape == expected.shape  # HF output object keeps the closed-set half
