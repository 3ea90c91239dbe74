"""Commit the accepted draft tokens of a speculative verify to the lightning state (SPEC 2.1).

`lightning_verify` (ops/lightning_verify.py) leaves the state pool alone; once the sampler knows how
many drafts each request accepted, this op replays their keys and values, S <- exp(-slope) S +
k^T v per accepted step, for every lightning layer in one launch, and can write the state after a
given step into a second slot (the prefix cache's snapshot). The decay is a per-head constant, so
no query and no output is needed. Reference twin:
`sala_sglang.reference.lightning.lightning_commit_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala_sglang.ops.lightning import _check, _per_request, _track_pair
from sala_sglang.ops.lightning_plan import STEP_BLOCK_V


@triton.jit
def _commit_kernel(
    state_ptr, slots_ptr, k_ptr, v_ptr, slopes_ptr, accepted_ptr, track_slots_ptr,
    track_steps_ptr,
    stride_kl, stride_kb, stride_kt, stride_kh,  # k: [layers, B, T, H, D] contiguous in D
    stride_vl, stride_vb, stride_vt, stride_vh,  # v: likewise
    stride_sl, stride_ss, stride_sh, stride_sk,  # state: [layers, slots, H, Dk, Dv]
    D: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, T: tl.constexpr, TRACK: tl.constexpr,
):
    head = tl.program_id(0) // NV
    vb = tl.program_id(0) % NV
    layer = tl.program_id(1).to(tl.int64)
    req = tl.program_id(2)
    slot = tl.load(slots_ptr + req).to(tl.int64)
    steps = tl.minimum(tl.load(accepted_ptr + req), T)
    # padding rows (slot -1) and requests that accepted nothing leave every slot alone
    if (slot < 0) | (steps <= 0):
        return
    dk = tl.arange(0, D)
    dv = vb * BV + tl.arange(0, BV)
    layer_state = state_ptr + layer * stride_sl + head * stride_sh
    s_ptrs = layer_state + slot * stride_ss + dk[:, None] * stride_sk + dv[None, :]
    state = tl.load(s_ptrs)
    decay = tl.exp(-tl.load(slopes_ptr + head))
    if TRACK:
        track_step = tl.load(track_steps_ptr + req)
        track_slot = tl.load(track_slots_ptr + req).to(tl.int64)
        t_ptrs = layer_state + track_slot * stride_ss + dk[:, None] * stride_sk + dv[None, :]
        track_live = (track_step >= 0) & (track_slot >= 0)
    k_base = k_ptr + layer * stride_kl + req.to(tl.int64) * stride_kb + head * stride_kh
    v_base = v_ptr + layer * stride_vl + req.to(tl.int64) * stride_vb + head * stride_vh
    # only the accepted steps are read: the rejected drafts' keys and values are never loaded
    for t in range(0, steps):
        k = tl.load(k_base + t * stride_kt + dk).to(tl.float32)
        v = tl.load(v_base + t * stride_vt + dv).to(tl.float32)
        state = state * decay + k[:, None] * v[None, :]
        if TRACK:
            tl.store(t_ptrs, state, mask=track_live & (t == track_step))
    tl.store(s_ptrs, state)


def lightning_commit(
    state: torch.Tensor,
    state_slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    accepted: torch.Tensor,
    track_slots: torch.Tensor | None = None,
    track_steps: torch.Tensor | None = None,
) -> None:
    """Advance every lightning layer's state by each request's accepted drafts, in place. state
    [layers, slots, H, D, D] fp32 (all layers' pools); state_slots [B] (-1: padding, untouched);
    k, v [layers, B, T, H, D], any float dtype (views contiguous in D are read as they are);
    slopes [H]; accepted [B]: steps 0..accepted-1 are applied (clamped to T; 0: none).
    track_slots [B] and track_steps [B] (together or neither): where both are >= 0 and
    track_steps < accepted, the state after step track_steps (track_steps + 1 applied) also goes
    to state[:, track_slots]. No host sync: capturable in a CUDA graph."""
    if state.dim() != 5 or k.dim() != 5 or k.shape != v.shape:
        raise ValueError(f"lightning_commit: state {tuple(state.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}: expected state [layers, slots, H, D, D] and k, v "
                         "[layers, B, T, H, D]")
    layers, batch, draft_len, heads, dim = k.shape
    if state.shape[0] != layers:
        raise ValueError(f"lightning_commit: state has {state.shape[0]} layers, k and v "
                         f"{layers}: expected one pool per layer whose k and v are given")
    if not k.dtype.is_floating_point or not v.dtype.is_floating_point:
        raise ValueError(f"lightning_commit: k {k.dtype}, v {v.dtype}: expected float tensors")
    _check(k[0, 0], state[0])
    state_slots, accepted = (_per_request("lightning_commit", name, x, batch) for name, x
                             in (("state_slots", state_slots), ("accepted", accepted)))
    track = _track_pair("lightning_commit", track_slots, track_steps, "track_steps")
    if track is not None:
        track = tuple(_per_request("lightning_commit", name, x, batch)
                      for name, x in zip(("track_slots", "track_steps"), track))
    if slopes.shape != (heads,):
        raise ValueError(f"lightning_commit: slopes {tuple(slopes.shape)}: expected [{heads}]")
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    block_v = min(dim, STEP_BLOCK_V)
    nv = triton.cdiv(dim, block_v)
    _commit_kernel[(heads * nv, layers, batch)](
        state, state_slots, k, v, slopes, accepted,
        *(track or (state_slots, state_slots)),  # unread unless tracking
        *k.stride()[:4], *v.stride()[:4], *state.stride()[:4],
        D=dim, BV=block_v, NV=nv, T=draft_len, TRACK=track is not None,
    )
