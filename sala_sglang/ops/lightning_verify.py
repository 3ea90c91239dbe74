"""Lightning attention over a speculative chain of draft tokens (SPEC 2.1), without writing state.

In a verify forward every request carries T draft tokens in a chain. Their outputs are those of T
decode steps from the request's state, but the state pool must not move: the sampler accepts only
a prefix of the chain, and `lightning_commit` (ops/lightning_commit.py) then replays the accepted
keys and values, which is cheap because the decay is a per-head constant. Reference twin:
`sala_sglang.reference.lightning.lightning_verify_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala_sglang.ops.lightning import _check, _per_request
from sala_sglang.ops.lightning_plan import STEP_BLOCK_V


@triton.jit
def _verify_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, state_ptr, slots_ptr, slopes_ptr,
    scale,
    stride_t, stride_h,  # q/k/v/o: [B*T, H, D] contiguous in D
    stride_ss, stride_sh, stride_sk,  # state: [slots, H, Dk, Dv] contiguous in Dv
    D: tl.constexpr, BV: tl.constexpr, T: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    vb = tl.program_id(2)
    slot = tl.load(slots_ptr + req).to(tl.int64)
    dk = tl.arange(0, D)
    dv = vb * BV + tl.arange(0, BV)
    # CUDA-graph padding rows carry slot -1: they read no state and decode from zero
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + dk[:, None] * stride_sk + dv[None, :]
    state = tl.load(s_ptrs, mask=slot >= 0, other=0.0)
    decay = tl.exp(-tl.load(slopes_ptr + head))
    # the running state lives in registers only: rejected drafts must leave the pool untouched
    for t in range(T):
        base = (req * T + t).to(tl.int64) * stride_t + head * stride_h
        q = tl.load(q_ptr + base + dk).to(tl.float32)
        k = tl.load(k_ptr + base + dk).to(tl.float32)
        v = tl.load(v_ptr + base + dv).to(tl.float32)
        state = state * decay + k[:, None] * v[None, :]
        out = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(o_ptr + base + dv, out.to(o_ptr.dtype.element_ty))


def lightning_verify(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    state_slots: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    draft_len: int,
    impl: str | None = None,
) -> torch.Tensor:
    """Chain verify. q,k,v [B*T, H, D] with T = draft_len, request b's drafts in rows
    b*T..b*T+T-1 in chain order; state [slots, H, D, D] fp32, only read, at `state_slots` [B]
    (-1: a padding row, decoded from zero); slopes [H]. Row b*T+j gets the output of decoding
    drafts 0..j one after another. No host sync: capturable in a CUDA graph. impl: "triton" or
    None (there is no CUDA verify kernel). Returns o [B*T, H, D] in q's dtype."""
    if impl not in (None, "triton"):
        raise ValueError(f"lightning_verify: impl={impl!r}; expected 'triton' or None (there is "
                         "no CUDA verify kernel)")
    if draft_len <= 0 or q.shape[0] % draft_len:
        raise ValueError(f"lightning_verify: draft_len = {draft_len}: expected a positive divisor "
                         f"of the {q.shape[0]} rows of q (T draft tokens per request)")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"lightning_verify: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}: expected all three [B*T, H, D]")
    dim = _check(q, state)
    batch, heads = q.shape[0] // draft_len, q.shape[1]
    state_slots = _per_request("lightning_verify", "state_slots", state_slots, batch)
    if slopes.shape != (heads,):
        raise ValueError(f"lightning_verify: slopes {tuple(slopes.shape)}: expected [{heads}]")
    block_v = min(dim, STEP_BLOCK_V)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    _verify_kernel[(batch, heads, triton.cdiv(dim, block_v))](
        q, k, v, out, state, state_slots, slopes,
        scale,
        q.stride(0), q.stride(1),
        state.stride(0), state.stride(1), state.stride(2),
        D=dim, BV=block_v, T=draft_len,
    )
    return out
