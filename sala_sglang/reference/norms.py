"""RMSNorm, computed in at least float32 (SPEC 2)."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, else float32: the precision the reference accumulates in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., n], weight [n] -> [..., n] (dtype of x)."""
    dt = compute_dtype(x, weight)
    xf = x.to(dt)
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * inv_rms * weight.to(dt)).to(x.dtype)
