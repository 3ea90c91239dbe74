"""RMSNorm and RoPE of the reference (SPEC 2, 2.1 step 2)."""

from __future__ import annotations

import math

import torch

from sala_sglang.reference.norms import rms_norm
from sala_sglang.reference.rope import apply_rope


def test_rms_norm_divides_by_root_mean_square_and_scales_by_weight():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # rms = sqrt(12.5)
    out = rms_norm(x, torch.tensor([1.0, 2.0], dtype=torch.float64), eps=0.0)
    assert torch.allclose(out, torch.tensor([[3.0, 8.0]], dtype=torch.float64) / math.sqrt(12.5))


def test_rope_rotates_dim_i_with_dim_i_plus_half_by_position_times_inverse_frequency():
    d, theta = 8, 10000.0
    x = torch.randn(3, 2, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([0, 5, 1000])
    out = apply_rope(x, positions, theta)
    for t, p in enumerate(positions.tolist()):
        for i in range(d // 2):
            a = p * theta ** (-2 * i / d)
            x1, x2 = x[t, :, i], x[t, :, i + d // 2]
            assert torch.allclose(out[t, :, i], x1 * math.cos(a) - x2 * math.sin(a))
            assert torch.allclose(out[t, :, i + d // 2], x2 * math.cos(a) + x1 * math.sin(a))


def test_rope_dot_products_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    q, k = (
        torch.randn(1, 4, 16, generator=g, dtype=torch.float64),
        torch.randn(1, 4, 16, generator=g, dtype=torch.float64),
    )
    near = (apply_rope(q, torch.tensor([10]), 1e4) * apply_rope(k, torch.tensor([3]), 1e4)).sum(-1)
    far = (
        apply_rope(q, torch.tensor([500007]), 1e4) * apply_rope(k, torch.tensor([500000]), 1e4)
    ).sum(-1)
    assert torch.allclose(near, far, rtol=1e-6)
