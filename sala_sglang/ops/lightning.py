"""Lightning attention kernels (SPEC 2.1): varlen chunked prefill and a fused decode step.

Both read and write the per-request recurrent state in place in SGLang's state pool
(`state[slot, head, key, value]`, fp32). Reference twins: `sala_sglang.reference.lightning`.
Every decay factor is exp(-slope * d) with d >= 0, so the kernels stay finite for any slope.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, state_ptr, slots_ptr, cu_ptr, has_init_ptr, slopes_ptr,
    scale,
    stride_t, stride_h,  # q/k/v/o: [T, H, D] contiguous in D
    stride_ss, stride_sh, stride_sk,  # state: [slots, H, Dk, Dv] contiguous in Dv
    D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    vb = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    length = tl.load(cu_ptr + seq + 1) - start
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    slope = tl.load(slopes_ptr + head)

    dk = tl.arange(0, D)
    dv = vb * BV + tl.arange(0, BV)
    rows = tl.arange(0, C)
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + dk[:, None] * stride_sk + dv[None, :]
    init = tl.load(has_init_ptr + seq) != 0
    state = tl.load(s_ptrs, mask=init & (slot >= 0), other=0.0).to(tl.float32)

    # decay between query row i and key row j of one chunk: exp(-slope * (i - j)), i >= j
    diff = (rows[:, None] - rows[None, :]).to(tl.float32)
    intra_decay = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0.0)), 0.0)
    q_decay = tl.exp(-slope * (rows + 1).to(tl.float32))

    for c0 in range(0, length, C):
        n = tl.minimum(length - c0, C)
        valid = rows < n
        offs = (start + c0 + rows).to(tl.int64) * stride_t + head * stride_h
        q = tl.load(q_ptr + offs[:, None] + dk[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_ptr + offs[:, None] + dk[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs[:, None] + dv[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * intra_decay
        out = tl.dot(scores.to(v.dtype), v)
        out += tl.dot((q.to(tl.float32) * q_decay[:, None]), state)
        tl.store(o_ptr + offs[:, None] + dv[None, :], (out * scale).to(o_ptr.dtype.element_ty),
                 mask=valid[:, None])
        # keys decay to the chunk's last valid row: exp(-slope * (n - 1 - j))
        k_decay = tl.where(valid, tl.exp(-slope * tl.maximum(n - 1 - rows, 0).to(tl.float32)), 0.0)
        state = state * tl.exp(-slope * n.to(tl.float32))
        state += tl.dot(tl.trans(k.to(tl.float32) * k_decay[:, None]), v.to(tl.float32))

    tl.store(s_ptrs, state, mask=slot >= 0)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, state_ptr, slots_ptr, slopes_ptr,
    scale,
    stride_b, stride_h,
    stride_ss, stride_sh, stride_sk,
    D: tl.constexpr, BV: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    vb = tl.program_id(2)
    slot = tl.load(slots_ptr + req).to(tl.int64)
    dk = tl.arange(0, D)
    dv = vb * BV + tl.arange(0, BV)
    base = req.to(tl.int64) * stride_b + head * stride_h
    q = tl.load(q_ptr + base + dk).to(tl.float32)
    k = tl.load(k_ptr + base + dk).to(tl.float32)
    v = tl.load(v_ptr + base + dv).to(tl.float32)
    live = slot >= 0  # CUDA-graph padding rows carry slot -1 and must touch no state
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + dk[:, None] * stride_sk + dv[None, :]
    state = tl.load(s_ptrs, mask=live, other=0.0)
    state = state * tl.exp(-tl.load(slopes_ptr + head)) + k[:, None] * v[None, :]
    tl.store(s_ptrs, state, mask=live)
    out = tl.sum(q[:, None] * state, axis=0) * scale
    tl.store(o_ptr + base + dv, out.to(o_ptr.dtype.element_ty))


def _check(q: torch.Tensor, state: torch.Tensor) -> tuple[int, int]:
    _, heads, dim = q.shape
    if state.dtype != torch.float32 or state.shape[1:] != (heads, dim, dim):
        raise ValueError(
            f"lightning state must be float32 [slots, {heads}, {dim}, {dim}], "
            f"got {state.dtype} {tuple(state.shape)}"
        )
    if state.stride(-1) != 1:
        raise ValueError("lightning state must be contiguous in its last dimension")
    block_v = min(dim, 64)
    return dim, block_v


def lightning_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    state_slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Varlen prefill. q,k,v [T, H, D]; state [slots, H, D, D] fp32, updated in place at
    `state_slots` [B]; cu_seqlens [B+1] int32; has_initial_state [B] (False: start from zero).
    Returns o [T, H, D]."""
    dim, block_v = _check(q, state)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    batch = cu_seqlens.numel() - 1
    grid = (batch, q.shape[1], dim // block_v)
    _prefill_kernel[grid](
        q, k, v, out, state, state_slots, cu_seqlens, has_initial_state, slopes,
        scale,
        q.stride(0), q.stride(1),
        state.stride(0), state.stride(1), state.stride(2),
        D=dim, C=chunk_size, BV=block_v,
    )
    return out


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    state_slots: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One token per request. q,k,v [B, H, D]; state [slots, H, D, D] fp32 updated in place at
    `state_slots` [B] (-1: padding, left alone). Returns o [B, H, D]."""
    dim, block_v = _check(q, state)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    grid = (q.shape[0], q.shape[1], dim // block_v)
    _decode_kernel[grid](
        q, k, v, out, state, state_slots, slopes,
        scale,
        q.stride(0), q.stride(1),
        state.stride(0), state.stride(1), state.stride(2),
        D=dim, BV=block_v,
    )
    return out
