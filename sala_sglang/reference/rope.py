"""Rotary position embedding, NeoX (rotate-half) layout over the full head dim (SPEC 2.1 step 2)."""

from __future__ import annotations

import torch

from sala_sglang.reference.norms import compute_dtype


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for absolute positions [T]; angles computed in `dtype` (fp32/fp64)."""
    if head_dim % 2:
        raise ValueError(f"RoPE head_dim = {head_dim}: expected an even number")
    even = torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device)
    inv_freq = 1.0 / (theta ** (even / head_dim))
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x [T, H, D] by absolute positions [T] (rotate-half layout) -> [T, H, D]."""
    dt = compute_dtype(x)
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, dt)
    xf = x.to(dt)
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)
