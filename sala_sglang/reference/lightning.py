"""Lightning attention (SPEC 2.1): linear attention with a constant per-head decay.

Per head h, with state S [Dk, Dv]:
    S_t = exp(-slope_h) * S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t   (o_t includes token t).
`lightning_recurrent` is that loop, token by token; `lightning_chunked` is the same sum in the
chunked form fast kernels use, with only decay factors exp(-slope * d), d >= 0 (finite for any slope
and chunk size). One sequence per call; the state is accumulated in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math

import torch

from sala_sglang.reference.norms import compute_dtype


def _alibi_power_of_two(n: int) -> list[float]:
    # slope_h = 2^(-8 (h + 1) / n) for h = 0..n-1
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]


def lightning_slopes(num_heads: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ALiBi slopes [num_heads] (32 heads: 2^-(h+1)/4 = 0.8409 ... 0.0039), not scaled by layer."""
    if num_heads <= 0:
        raise ValueError(f"lightning_slopes: num_heads = {num_heads}: expected a positive integer")
    if num_heads & (num_heads - 1) == 0:
        slopes = _alibi_power_of_two(num_heads)
    else:
        # ALiBi rule for other head counts: the schedule of the largest power of two below n,
        # then every other slope of the schedule for twice that many heads.
        base = 2 ** math.floor(math.log2(num_heads))
        slopes = _alibi_power_of_two(base) + _alibi_power_of_two(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=dtype)


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[torch.dtype, torch.Tensor]:
    if q.dim() != 3 or q.shape != k.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"lightning attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
            "expected q, k [T, H, Dk] and v [T, H, Dv]"
        )
    _, h, dk = q.shape
    dv = v.shape[-1]
    if slopes.shape != (h,):
        raise ValueError(f"lightning attention: slopes {tuple(slopes.shape)}: expected [{h}]")
    dt = compute_dtype(q, k, v)
    if initial_state is None:
        state = torch.zeros(h, dk, dv, dtype=dt, device=q.device)
    else:
        if initial_state.shape != (h, dk, dv):
            raise ValueError(
                f"lightning attention: initial_state {tuple(initial_state.shape)}: "
                f"expected [{h}, {dk}, {dv}]"
            )
        state = initial_state.to(dt).clone()
    return dt, state


def lightning_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token loop: q, k [T, H, Dk], v [T, H, Dv] -> (o [T, H, Dv], state [H, Dk, Dv])."""
    dt, state = _prepare(q, k, v, slopes, initial_state)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    decay = torch.exp(-slopes.to(dt))[:, None, None]  # [H, 1, 1]
    out = torch.empty(v.shape, dtype=dt, device=q.device)
    for t in range(q.shape[0]):
        state = decay * state + kf[t][:, :, None] * vf[t][:, None, :]
        out[t] = scale * torch.einsum("hk,hkv->hv", qf[t], state)
    return out.to(q.dtype), state


def lightning_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form (intra-chunk decay mask + inter-chunk state); shapes as lightning_recurrent."""
    if chunk_size <= 0:
        raise ValueError(
            f"lightning_chunked: chunk_size = {chunk_size}: expected a positive integer"
        )
    dt, state = _prepare(q, k, v, slopes, initial_state)
    qf, kf, vf = (x.to(dt).transpose(0, 1) for x in (q, k, v))  # [H, T, D]
    s = slopes.to(dt)
    out = torch.empty(vf.shape, dtype=dt, device=q.device)  # [H, T, Dv]
    for start in range(0, q.shape[0], chunk_size):
        end = min(start + chunk_size, q.shape[0])
        n = end - start
        qc, kc, vc = qf[:, start:end], kf[:, start:end], vf[:, start:end]
        i = torch.arange(n, dtype=dt, device=q.device)
        dist = i[:, None] - i[None, :]  # [n, n], token i reads token j <= i
        causal = dist >= 0
        # exp(-slope * (i - j)) for j <= i, else 0: exponents are never positive.
        mask = torch.exp(-s[:, None, None] * dist.clamp(min=0)) * causal  # [H, n, n]
        intra = ((qc @ kc.transpose(1, 2)) * mask) @ vc  # [H, n, Dv]
        q_decay = torch.exp(-s[:, None] * (i + 1))[..., None]  # state decays i+1 times by token i
        inter = (qc * q_decay) @ state
        out[:, start:end] = scale * (intra + inter)
        k_decay = torch.exp(-s[:, None] * (n - 1 - i))[..., None]  # token j decays to the chunk end
        state = torch.exp(-s * n)[:, None, None] * state + (kc * k_decay).transpose(1, 2) @ vc
    return out.transpose(0, 1).to(q.dtype), state
