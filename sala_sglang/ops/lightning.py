"""Lightning attention kernels (SPEC 2.1): varlen chunked prefill and a fused decode step.

Both read and write the per-request recurrent state in place in SGLang's state pool
(`state[slot, head, key, value]`, fp32). Reference twins: `sala_sglang.reference.lightning`.
Every decay factor is exp(-slope * d) with d >= 0, so the kernels stay finite for any slope.

Decode has two kernels: CUDA (`sala_sglang._C`, csrc/lightning.cu) and Triton (below); `impl`
picks one (`_cuda.choose_cuda`), and the serving backend takes it from its `LightningPlan`
(ops/lightning_plan.py). Prefill is Triton only (tensor-core `tl.dot`); its segment length comes
from the plan, or from the same rule on this call's device when none is given.

Prefill parallelism: one program per (sequence, head, value block) walks its chunks in order,
which leaves most of the GPU idle for a single long prompt. So a long sequence is cut into
segments that run in parallel, in three launches: (1) each segment's own state contribution from
its keys and values, (2) a short scan over segments that turns those into each segment's initial
state, (3) the chunked attention of every segment from its initial state. Keys and values are
read twice instead of once; no per-chunk state is written to memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from sala_sglang.ops import _cuda
from sala_sglang.ops.lightning_plan import (
    CUDA_DECODE_FASTER,
    PREFILL_LAUNCH,
    STEP_BLOCK_V,
    decode_cuda_unsupported,
    prefill_segment_len,
)


@triton.jit
def _segment_kv_kernel(
    k_ptr, v_ptr, buf_ptr, cu_ptr, slopes_ptr,
    seg_len,
    stride_kt, stride_kh, stride_vt, stride_vh,  # k, v: [T, H, D] contiguous in D
    stride_bb, stride_bs, stride_bh, stride_bk,  # buf: [B, segments, H, Dk, Dv] contiguous in Dv
    D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
):
    head = tl.program_id(0) // NV
    vb = tl.program_id(0) % NV
    seg = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    length = tl.load(cu_ptr + seq + 1) - start
    if (seg + 1) * seg_len >= length:  # only segments with a successor hand a state on
        return
    slope = tl.load(slopes_ptr + head)
    dk = tl.arange(0, D)
    dv = vb * BV + tl.arange(0, BV)
    rows = tl.arange(0, C)
    # such a segment is whole chunks: key j of a chunk decays C - 1 - j times to the chunk end
    k_decay = tl.exp(-slope * (C - 1 - rows).to(tl.float32))
    chunk_decay = tl.exp(-slope * C)
    acc = tl.zeros((D, BV), dtype=tl.float32)
    first = start + seg * seg_len
    h = head.to(tl.int64)  # a head stride may span every token (a head-major layout)
    for c0 in range(0, seg_len, C):
        tok = (first + c0 + rows).to(tl.int64)
        k_offs = tok * stride_kt + h * stride_kh
        k_t = tl.load(k_ptr + k_offs[None, :] + dk[:, None])  # [D, C]: keys as columns
        v = tl.load(v_ptr + (tok * stride_vt + h * stride_vh)[:, None] + dv[None, :])
        # the decay goes on the rows of v (C x BV) rather than on k (C x D): fewer products
        acc = tl.dot(k_t, (v * k_decay[:, None]).to(v.dtype), acc * chunk_decay)
    b_ptrs = (buf_ptr + seq.to(tl.int64) * stride_bb + seg * stride_bs + head * stride_bh
              + dk[:, None] * stride_bk + dv[None, :])
    tl.store(b_ptrs, acc)


@triton.jit
def _segment_scan_kernel(
    state_ptr, buf_ptr, slots_ptr, cu_ptr, has_init_ptr, slopes_ptr,
    seg_len,
    stride_ss, stride_sh, stride_sk,
    stride_bb, stride_bs, stride_bh, stride_bk,
    D: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
):
    head = tl.program_id(0) // NV
    vb = tl.program_id(0) % NV
    seq = tl.program_id(1)
    length = tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)
    segments = tl.maximum(tl.cdiv(length, seg_len), 1)
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    init = tl.load(has_init_ptr + seq) != 0
    dk = tl.arange(0, D)
    dv = vb * BV + tl.arange(0, BV)
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + dk[:, None] * stride_sk + dv[None, :]
    state = tl.load(s_ptrs, mask=init & (slot >= 0), other=0.0)
    seg_decay = tl.exp(-tl.load(slopes_ptr + head) * seg_len)
    b_ptrs = (buf_ptr + seq.to(tl.int64) * stride_bb + head * stride_bh + dk[:, None] * stride_bk
              + dv[None, :])
    # buf holds each segment's own contribution; replace it by the segment's initial state
    for seg in range(0, segments - 1):
        own = tl.load(b_ptrs + seg * stride_bs)
        tl.store(b_ptrs + seg * stride_bs, state)
        state = state * seg_decay + own
    tl.store(b_ptrs + (segments - 1) * stride_bs, state)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, state_ptr, slots_ptr, cu_ptr, has_init_ptr, slopes_ptr, buf_ptr,
    track_slots_ptr, track_len_ptr,
    scale, seg_len,
    stride_qt, stride_qh, stride_kt, stride_kh,  # q, k, v, o: [T, H, D] contiguous in D
    stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ss, stride_sh, stride_sk,  # state: [slots, H, Dk, Dv] contiguous in Dv
    stride_bb, stride_bs, stride_bh, stride_bk,  # buf (SPLIT): segment initial states
    D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, SPLIT: tl.constexpr,
    TRACK: tl.constexpr,
):
    head = tl.program_id(0) // NV
    vb = tl.program_id(0) % NV
    seg = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    total = tl.load(cu_ptr + seq + 1) - start
    seg_start = seg * seg_len
    # segment 0 always runs, so an empty sequence still leaves its (initial or zero) state
    if (seg > 0) & (seg_start >= total):
        return
    length = tl.minimum(total - seg_start, seg_len)
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    slope = tl.load(slopes_ptr + head)

    dk = tl.arange(0, D)
    dv = vb * BV + tl.arange(0, BV)
    rows = tl.arange(0, C)
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + dk[:, None] * stride_sk + dv[None, :]
    if SPLIT:
        b_ptrs = (buf_ptr + seq.to(tl.int64) * stride_bb + seg * stride_bs + head * stride_bh
                  + dk[:, None] * stride_bk + dv[None, :])
        state = tl.load(b_ptrs)
    else:
        init = tl.load(has_init_ptr + seq) != 0
        state = tl.load(s_ptrs, mask=init & (slot >= 0), other=0.0).to(tl.float32)

    # decay between query row i and key row j of one chunk: exp(-slope * (i - j)), i >= j
    diff = (rows[:, None] - rows[None, :]).to(tl.float32)
    intra_decay = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0.0)), 0.0)
    q_decay = tl.exp(-slope * (rows + 1).to(tl.float32))

    if TRACK:
        # the state after `track_at` tokens of this extend (a multiple of C; -1: none) is also
        # written to the request's track slot, for the prefix cache
        track_at = tl.load(track_len_ptr + seq)
        track_slot = tl.load(track_slots_ptr + seq).to(tl.int64)
        t_ptrs = (state_ptr + track_slot * stride_ss + head * stride_sh + dk[:, None] * stride_sk
                  + dv[None, :])
        track_live = (track_at >= 0) & (track_slot >= 0)

    first = start + seg_start
    h = head.to(tl.int64)  # a head stride may span every token (a head-major layout)
    for c0 in range(0, length, C):
        if TRACK:
            tl.store(t_ptrs, state, mask=track_live & (seg_start + c0 == track_at))
        n = tl.minimum(length - c0, C)
        valid = rows < n
        tok = (first + c0 + rows).to(tl.int64)
        q_offs = tok * stride_qt + h * stride_qh
        k_offs = tok * stride_kt + h * stride_kh
        v_offs = tok * stride_vt + h * stride_vh
        q = tl.load(q_ptr + q_offs[:, None] + dk[None, :], mask=valid[:, None], other=0.0)
        k_t = tl.load(k_ptr + k_offs[None, :] + dk[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_ptr + v_offs[:, None] + dv[None, :], mask=valid[:, None], other=0.0)
        # Tensor-core products in the input precision, accumulated in fp32 (the running state
        # stays fp32; its copy in the product is rounded once per chunk). Row decays are
        # applied to the smaller side of each product: q's to the output rows, k's to v's rows.
        out = tl.dot(q, state.to(q.dtype)) * q_decay[:, None]
        scores = tl.dot(q, k_t) * intra_decay
        out = tl.dot(scores.to(v.dtype), v, out)
        o_offs = tok * stride_ot + h * stride_oh
        tl.store(o_ptr + o_offs[:, None] + dv[None, :], (out * scale).to(o_ptr.dtype.element_ty),
                 mask=valid[:, None])
        # keys decay to the chunk's last valid row: exp(-slope * (n - 1 - j))
        k_decay = tl.where(valid, tl.exp(-slope * tl.maximum(n - 1 - rows, 0).to(tl.float32)), 0.0)
        state = tl.dot(k_t, (v * k_decay[:, None]).to(v.dtype),
                       state * tl.exp(-slope * n.to(tl.float32)))

    last_segment = seg_start + seg_len >= total
    tl.store(s_ptrs, state, mask=(slot >= 0) & last_segment)
    if TRACK:
        # a later segment stores a state at its own start; only the end of the extend is left
        tl.store(t_ptrs, state, mask=track_live & last_segment & (track_at == total))


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, state_ptr, slots_ptr, slopes_ptr, track_slots_ptr, track_mask_ptr,
    scale,
    stride_qb, stride_qh, stride_kb, stride_kh,  # q, k, v, o: [B, H, D] contiguous in D
    stride_vb, stride_vh, stride_ob, stride_oh,
    stride_ss, stride_sh, stride_sk,
    D: tl.constexpr, BV: tl.constexpr, TRACK: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    vb = tl.program_id(2)
    slot = tl.load(slots_ptr + req).to(tl.int64)
    dk = tl.arange(0, D)
    dv = vb * BV + tl.arange(0, BV)
    row, h = req.to(tl.int64), head.to(tl.int64)
    q = tl.load(q_ptr + row * stride_qb + h * stride_qh + dk).to(tl.float32)
    k = tl.load(k_ptr + row * stride_kb + h * stride_kh + dk).to(tl.float32)
    v = tl.load(v_ptr + row * stride_vb + h * stride_vh + dv).to(tl.float32)
    live = slot >= 0  # CUDA-graph padding rows carry slot -1 and must touch no state
    s_ptrs = state_ptr + slot * stride_ss + head * stride_sh + dk[:, None] * stride_sk + dv[None, :]
    state = tl.load(s_ptrs, mask=live, other=0.0)
    state = state * tl.exp(-tl.load(slopes_ptr + head)) + k[:, None] * v[None, :]
    tl.store(s_ptrs, state, mask=live)
    if TRACK:
        track_slot = tl.load(track_slots_ptr + req).to(tl.int64)
        tracked = live & (tl.load(track_mask_ptr + req) != 0) & (track_slot >= 0)
        t_ptrs = (state_ptr + track_slot * stride_ss + head * stride_sh + dk[:, None] * stride_sk
                  + dv[None, :])
        tl.store(t_ptrs, state, mask=tracked)
    out = tl.sum(q[:, None] * state, axis=0) * scale
    tl.store(o_ptr + row * stride_ob + h * stride_oh + dv, out.to(o_ptr.dtype.element_ty))


def _check(q: torch.Tensor, state: torch.Tensor) -> int:
    _, heads, dim = q.shape
    if state.dtype != torch.float32 or state.shape[1:] != (heads, dim, dim):
        raise ValueError(
            f"lightning state must be float32 [slots, {heads}, {dim}, {dim}], "
            f"got {state.dtype} {tuple(state.shape)}"
        )
    if state.stride(-1) != 1:
        raise ValueError("lightning state must be contiguous in its last dimension")
    return dim


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
    segment_len: int | None = None,
    launch: Mapping[str, int] | None = None,
    impl: str | None = None,
    track_slots: torch.Tensor | None = None,
    track_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen prefill. q,k,v [T, H, D], each with its own row and head strides (unit stride along D:
    the layer passes v as a slice of its qkv projection); state [slots, H, D, D] fp32, updated in
    place at `state_slots` [B] (-1: no state kept); cu_seqlens [B+1] int32; has_initial_state [B]
    (False: start from zero). segment_len: tokens per parallel segment, a multiple of the chunk
    (`LightningPlan.segment_len`; default: `prefill_segment_len` on q's device). launch: entries
    replacing PREFILL_LAUNCH's (the chunk size in tests; the benchmark sweeps all four). impl:
    "triton" or None (there is no CUDA prefill kernel). track_slots [B] and track_len [B] (together
    or neither): sequence b also writes its state after its first track_len[b] tokens into slot
    track_slots[b] (the prefix cache's snapshot); track_len a multiple of the chunk or equal to the
    sequence's length, -1 (or slot -1) for none. Returns o [T, H, D]."""
    if impl not in (None, "triton"):
        raise ValueError(f"lightning_prefill: impl={impl!r}; expected 'triton' or None (there is "
                         "no CUDA prefill kernel)")
    unknown = set(launch or ()) - PREFILL_LAUNCH.keys()
    if unknown:
        raise ValueError(f"lightning_prefill: launch keys {sorted(unknown)}: expected some of "
                         f"{sorted(PREFILL_LAUNCH)}")
    shape = {**PREFILL_LAUNCH, **(launch or {})}
    chunk, block_v = shape["chunk"], shape["block_v"]
    dim = _check(q, state)
    if segment_len is not None and (segment_len <= 0 or segment_len % chunk):
        raise ValueError(f"lightning_prefill: segment_len = {segment_len}: expected a positive "
                         f"multiple of the chunk size {chunk}")
    track = _track_pair("lightning_prefill", track_slots, track_len, "track_len")
    q, k, v = _rows(q), _rows(k), _rows(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tokens, heads = q.shape[0], q.shape[1]
    batch = cu_seqlens.numel() - 1
    cu_seqlens = _per_request("lightning_prefill", "cu_seqlens", cu_seqlens, batch + 1)
    state_slots = _per_request("lightning_prefill", "state_slots", state_slots, batch)
    has_initial_state = has_initial_state.contiguous()  # int or bool, read as its dtype
    block_v = min(dim, block_v)
    nv = dim // block_v
    seg = segment_len or prefill_segment_len(
        tokens, batch, heads, dim, _cuda.DeviceFacts.of(q.device).multiprocessors, shape)
    segments = max(triton.cdiv(tokens, seg), 1)  # per sequence, at most
    split = segments > 1
    tuning = {"num_warps": shape["num_warps"], "num_stages": shape["num_stages"]}
    buf = state
    if split:
        buf = torch.empty(batch, segments, heads, dim, dim, device=q.device, dtype=torch.float32)
        _segment_kv_kernel[(heads * nv, segments - 1, batch)](
            k, v, buf, cu_seqlens, slopes,
            seg,
            *k.stride()[:2], *v.stride()[:2],
            *buf.stride()[:4],
            D=dim, C=chunk, BV=block_v, NV=nv, **tuning,
        )
        _segment_scan_kernel[(heads * nv, batch)](
            state, buf, state_slots, cu_seqlens, has_initial_state, slopes,
            seg,
            state.stride(0), state.stride(1), state.stride(2),
            *buf.stride()[:4],
            D=dim, BV=block_v, NV=nv,
        )
    _prefill_kernel[(heads * nv, segments, batch)](
        q, k, v, out, state, state_slots, cu_seqlens, has_initial_state, slopes, buf,
        *(track or (state_slots, state_slots)),  # unread unless tracking
        scale, seg,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        state.stride(0), state.stride(1), state.stride(2),
        *buf.stride()[:4],  # unused unless split (then buf is [B, segments, H, D, D])
        D=dim, C=chunk, BV=block_v, NV=nv, SPLIT=split, TRACK=track is not None, **tuning,
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
    impl: str | None = None,
    track_slots: torch.Tensor | None = None,
    track_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per request. q,k,v [B, H, D], each with its own row and head strides (unit stride
    along D); state [slots, H, D, D] fp32 updated in place at `state_slots` [B] (-1: padding, left
    alone). impl: "cuda" (csrc/lightning.cu; ValueError where it cannot run), "triton", or None (the
    faster one that can run; see `_cuda.choose_cuda`); the serving backend passes
    `LightningPlan.decode_impl`. track_slots [B] int and track_mask [B] bool (together or neither):
    where the mask is set, the new state is also written to the track slot (the prefix cache's
    decode snapshot). Returns o [B, H, D]."""
    dim = _check(q, state)
    track = _track_pair("lightning_decode", track_slots, track_mask, "track_mask")
    state_slots = _per_request("lightning_decode", "state_slots", state_slots, q.shape[0])
    q, k, v = _rows(q), _rows(k), _rows(v)
    if _cuda.choose_cuda("lightning_decode", impl, q, CUDA_DECODE_FASTER,
                         lambda: decode_cuda_unsupported(dim)):
        return torch.ops.sala_sglang.lightning_decode(q, k, v, state, state_slots, slopes, scale,
                                                      *(track or (None, None)))
    block_v = min(dim, STEP_BLOCK_V)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid = (q.shape[0], q.shape[1], dim // block_v)
    _decode_kernel[grid](
        q, k, v, out, state, state_slots, slopes,
        *(track or (state_slots, state_slots)),  # unread unless tracking
        scale,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        state.stride(0), state.stride(1), state.stride(2),
        D=dim, BV=block_v, TRACK=track is not None,
    )
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, H, D] as the kernels read it: any row and head strides, unit stride along D (a
    tensor without one is copied)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _track_pair(op: str, slots: torch.Tensor | None, where: torch.Tensor | None,
                where_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The track arguments, checked (both or neither) and dense (see `_per_request`)."""
    if (slots is None) != (where is None):
        raise ValueError(f"{op}: pass track_slots and {where_name} together, or neither")
    return None if slots is None else (slots.contiguous(), where.contiguous())


def _per_request(op: str, name: str, x: torch.Tensor, batch: int) -> torch.Tensor:
    """x, one integer per request ([batch]), as the kernels index it: element b at offset b (a
    strided view is copied; a dense array passes as it is)."""
    if x.shape != (batch,) or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{op}: {name} {x.dtype} {tuple(x.shape)}: expected integers [{batch}]")
    return x.contiguous()
