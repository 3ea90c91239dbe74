"""Lightning attention (SPEC 2.1): linear attention with a constant per-head decay.

Per head h, with state S [Dk, Dv]:
    S_t = exp(-slope_h) * S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t   (o_t includes token t).
`lightning_recurrent` is that loop, token by token; `lightning_chunked` is the same sum in the
chunked form fast kernels use, with only decay factors exp(-slope * d), d >= 0 (finite for any slope
and chunk size). One sequence per call; the state is accumulated in fp32 (fp64 for fp64 inputs).
`lightning_qk_reference` is the layer's q and k before the recurrence (per-head norm, RoPE).
"""

from __future__ import annotations

import math

import torch

from sala_sglang.reference.norms import compute_dtype, rms_norm
from sala_sglang.reference.rope import apply_rope
from sala_sglang.reference.sparse import sigmoid_gate_reference


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


def lightning_qk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    theta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Lightning layer's q and k before the recurrence (SPEC 2.1 step 2; ops/lightning_qk.py):
    q, k [T, H*D] -> per-head RMSNorm (weights [D]), then RoPE at positions [T] -> [T, H, D]."""
    dim = q_weight.shape[-1]
    return tuple(apply_rope(rms_norm(x.unflatten(-1, (-1, dim)), w, eps), positions, theta)
                 for x, w in ((q, q_weight), (k, k_weight)))


def lightning_output_gate_reference(
    o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """A Lightning layer's output before o_proj (SPEC 2.1 step 4; ops/lightning_output.py):
    o, z [T, N], weight [N] -> RMSNorm(o) * weight, times sigmoid(z), in o's dtype."""
    return sigmoid_gate_reference(rms_norm(o, weight, eps), z)


def lightning_verify_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    state_slots: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    draft_len: int,
) -> torch.Tensor:
    """Speculative verify (ops/lightning_verify.py): q,k,v [B*T, H, D], request b's T = draft_len
    draft tokens in rows b*T..b*T+T-1, decoded in order from state[state_slots[b]] (slot -1: from
    zero); state [slots, H, D, D] is only read. Returns o [B*T, H, D]."""
    if draft_len <= 0 or q.shape[0] % draft_len:
        raise ValueError(f"lightning_verify_reference: draft_len = {draft_len} does not divide "
                         f"{q.shape[0]} rows")
    out = torch.empty_like(q)
    for b, slot in enumerate(state_slots.tolist()):
        rows = slice(b * draft_len, (b + 1) * draft_len)
        initial = state[slot] if slot >= 0 else None
        out[rows] = lightning_recurrent(q[rows], k[rows], v[rows], slopes, scale, initial)[0]
    return out


def lightning_commit_reference(
    state: torch.Tensor,
    state_slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    accepted: torch.Tensor,
    track_slots: torch.Tensor | None = None,
    track_steps: torch.Tensor | None = None,
) -> None:
    """Commit accepted drafts (ops/lightning_commit.py), in place: state [layers, slots, H, D, D];
    k, v [layers, B, T, H, D]. Request b (slot -1: skipped) applies its first accepted[b] steps
    (at most T; 0: none) to state[:, state_slots[b]]; where track_slots[b] and track_steps[b]
    are >= 0 and track_steps[b] < accepted[b], the state after step track_steps[b] also goes to
    state[:, track_slots[b]]."""
    if (track_slots is None) != (track_steps is None):
        raise ValueError("lightning_commit_reference: pass track_slots and track_steps together, "
                         "or neither")

    def advanced(layer: int, b: int, slot: int, steps: int) -> torch.Tensor:
        # the keys stand in for the queries: only the final state is kept
        kb, vb = k[layer, b, :steps], v[layer, b, :steps]
        return lightning_recurrent(kb, kb, vb, slopes, 1.0, state[layer, slot])[1]

    for b, (slot, n) in enumerate(zip(state_slots.tolist(), accepted.tolist())):
        if slot < 0 or n <= 0:
            continue
        track_slot, track_step = (-1, -1) if track_slots is None else (
            int(track_slots[b]), int(track_steps[b]))
        tracked = track_slot >= 0 and 0 <= track_step < n
        for layer in range(k.shape[0]):
            if tracked:  # from the state before this commit, so before the slot is written
                state[layer, track_slot] = advanced(layer, b, slot, track_step + 1)
            state[layer, slot] = advanced(layer, b, slot, n)
