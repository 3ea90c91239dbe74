"""InfLLM-v2 kernels over SGLang's paged KV cache (SPEC 2.2); reference twins in
`sala_sglang.reference.sparse`.

Layout. The KV pool is paged with page size = block_size, so block b of a request is one page:
`page = req_to_token[req, b * block_size] // block_size`, its tokens contiguous from
`page * block_size`. A compressed key whose window starts at token `stride * c` lives next to its
block's page: `compressed[page, (stride * c % block_size) // stride, kv_head, :]`. So compressed
keys are freed and reused with their pages, and cost 1/stride of K per token.

Queries are given per token: `token_req` (request slot, i.e. row of req_to_token) and
`token_pos` (absolute position); one program handles the query heads of one kv head together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _num_windows(length, KL: tl.constexpr, KS: tl.constexpr):
    return tl.where(length >= KL, (length - KL) // KS + 1, 0)


@triton.jit
def _page_of_window(rt_row_ptr, c, KS: tl.constexpr, BS: tl.constexpr, mask):
    """Page and slot-within-page of the compressed key whose window starts at KS * c."""
    start = c * KS
    page = tl.load(rt_row_ptr + (start // BS) * BS, mask=mask, other=0) // BS
    return page.to(tl.int64), (start % BS) // KS


@triton.jit
def _compress_kernel(
    k_ptr, out_ptr, rt_ptr, req_ptr, lo_ptr, hi_ptr,
    stride_kt, stride_kg, stride_op, stride_os, stride_og, stride_rt,
    KL: tl.constexpr, KS: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, KLP: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.load(lo_ptr + b) + tl.program_id(1)
    g = tl.program_id(2)
    if c < tl.load(hi_ptr + b):
        rt_row = rt_ptr + tl.load(req_ptr + b).to(tl.int64) * stride_rt
        offs = tl.arange(0, KLP)
        inside = offs < KL
        slots = tl.load(rt_row + c * KS + offs, mask=inside, other=0).to(tl.int64)
        dims = tl.arange(0, D)
        keys = tl.load(k_ptr + slots[:, None] * stride_kt + g * stride_kg + dims[None, :],
                       mask=inside[:, None], other=0.0)
        mean = tl.sum(keys.to(tl.float32), axis=0) / KL
        page, sub = _page_of_window(rt_row, c, KS, BS, True)
        tl.store(out_ptr + page * stride_op + sub * stride_os + g * stride_og + dims,
                 mean.to(out_ptr.dtype.element_ty))


def num_windows(lengths: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Complete windows over `lengths` keys (device tensor in, device tensor out)."""
    return torch.where(lengths >= kernel_size, (lengths - kernel_size) // stride + 1, 0)


def compress_new_windows(
    k_buffer: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_slots: torch.Tensor,
    old_lens: torch.Tensor,
    new_lens: torch.Tensor,
    kernel_size: int,
    stride: int,
    block_size: int,
    max_new_windows: int,
) -> None:
    """Write the windows that complete as requests grow from old_lens to new_lens keys.

    k_buffer [slots, G, D]; out [pages, ceil(block_size / stride), G, D]; req_slots, old_lens,
    new_lens [B]; max_new_windows bounds the new windows of any request (grid size)."""
    if max_new_windows <= 0 or req_slots.numel() == 0:
        return
    lo = num_windows(old_lens, kernel_size, stride).to(torch.int32)
    hi = num_windows(new_lens, kernel_size, stride).to(torch.int32)
    groups, dim = k_buffer.shape[1], k_buffer.shape[2]
    grid = (req_slots.numel(), max_new_windows, groups)
    _compress_kernel[grid](
        k_buffer, out, req_to_token, req_slots, lo, hi,
        k_buffer.stride(0), k_buffer.stride(1), out.stride(0), out.stride(1), out.stride(2),
        req_to_token.stride(0),
        KL=kernel_size, KS=stride, BS=block_size, D=dim, KLP=triton.next_power_of_2(kernel_size),
    )


def _group_heads(query_heads: int, groups: int) -> tuple[int, int]:
    """Query heads per kv head, and that count padded to a power of two of at least 16 (the
    smallest tl.dot tile), so one program packs a whole GQA group."""
    per_group = query_heads // groups
    return per_group, max(16, triton.next_power_of_2(per_group))


@triton.jit
def _load_group_queries(q_ptr, t, g, stride_qt, stride_qh, HG: tl.constexpr, HGP: tl.constexpr,
                        D: tl.constexpr):
    heads = tl.arange(0, HGP)
    return tl.load(q_ptr + t.to(tl.int64) * stride_qt + (g * HG + heads)[:, None] * stride_qh
                   + tl.arange(0, D)[None, :], mask=(heads < HG)[:, None], other=0.0)


@triton.jit
def _stage1_stats_kernel(
    q_ptr, k1_ptr, rt_ptr, treq_ptr, tpos_ptr, m_ptr, l_ptr,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kg, stride_rt,
    scale,
    HG: tl.constexpr, HGP: tl.constexpr, D: tl.constexpr, KL: tl.constexpr, KS: tl.constexpr,
    BS: tl.constexpr, TILE: tl.constexpr, NSPLIT: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    rt_row = rt_ptr + tl.load(treq_ptr + t).to(tl.int64) * stride_rt
    visible = _num_windows(tl.load(tpos_ptr + t) + 1, KL, KS)
    q = _load_group_queries(q_ptr, t, g, stride_qt, stride_qh, HG, HGP, D)
    m_i = tl.full([HGP], float("-inf"), tl.float32)
    l_i = tl.zeros([HGP], tl.float32)
    for tile in range(split, tl.cdiv(visible, TILE), NSPLIT):
        c = tile * TILE + tl.arange(0, TILE)
        live = c < visible
        page, sub = _page_of_window(rt_row, c, KS, BS, live)
        k1 = tl.load(k1_ptr + page[:, None] * stride_kp + sub[:, None] * stride_ks + g * stride_kg
                     + tl.arange(0, D)[None, :], mask=live[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k1)) * scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    heads = tl.arange(0, HGP)
    base = ((t.to(tl.int64) * tl.num_programs(1) + g) * NSPLIT + split) * HGP
    tl.store(m_ptr + base + heads, m_i)
    tl.store(l_ptr + base + heads, l_i)


@triton.jit
def _window_probs_kernel(
    q_ptr, k1_ptr, rt_ptr, treq_ptr, tpos_ptr, m_ptr, l_ptr, w_ptr,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kg, stride_rt, stride_wt, stride_wg,
    scale, n_windows,
    HG: tl.constexpr, HGP: tl.constexpr, D: tl.constexpr, KL: tl.constexpr, KS: tl.constexpr,
    BS: tl.constexpr, TILE: tl.constexpr, NSPLIT: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.program_id(2) * TILE + tl.arange(0, TILE)
    rt_row = rt_ptr + tl.load(treq_ptr + t).to(tl.int64) * stride_rt
    live = c < _num_windows(tl.load(tpos_ptr + t) + 1, KL, KS)
    heads = tl.arange(0, HGP)
    splits = tl.arange(0, NSPLIT)
    base = (t.to(tl.int64) * tl.num_programs(1) + g) * NSPLIT * HGP
    ms = tl.load(m_ptr + base + splits[:, None] * HGP + heads[None, :])  # [NSPLIT, HGP]
    ls = tl.load(l_ptr + base + splits[:, None] * HGP + heads[None, :])
    m = tl.max(ms, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(ls * tl.exp(ms - m[None, :]), axis=0)
    l = tl.where(l > 0, l, 1.0)  # no visible window: every probability is 0 anyway
    q = _load_group_queries(q_ptr, t, g, stride_qt, stride_qh, HG, HGP, D)
    page, sub = _page_of_window(rt_row, c, KS, BS, live)
    k1 = tl.load(k1_ptr + page[:, None] * stride_kp + sub[:, None] * stride_ks + g * stride_kg
                 + tl.arange(0, D)[None, :], mask=live[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k1)) * scale
    p = tl.where(live[None, :] & (heads < HG)[:, None], tl.exp(s - m[:, None]) / l[:, None], 0.0)
    tl.store(w_ptr + t.to(tl.int64) * stride_wt + g * stride_wg + c, tl.sum(p, axis=0),
             mask=c < n_windows)


def _block_keys(
    window_probs: torch.Tensor, token_pos: torch.Tensor, block_size: int, ratio: int,
    init_blocks: int, local_blocks: int, width: int,
) -> torch.Tensor:
    """Pool window probabilities [T, G, width * ratio] into sortable block keys [T, G, width].

    Block b takes the max over windows [ratio * b - 1, ratio * b + ratio) (missing ones count 0);
    forced blocks score +inf; blocks after the query's own are excluded. The key puts the score's
    bits (non-negative floats order like their bits) above the inverted block index, so one
    descending top-k yields the best blocks with ties going to the lower index."""
    main = window_probs.reshape(*window_probs.shape[:-1], width, ratio).amax(dim=-1)
    prev = torch.nn.functional.pad(window_probs[..., ratio - 1 :: ratio][..., : width - 1], (1, 0))
    score = torch.maximum(main, prev)
    blocks = torch.arange(width, device=score.device)
    qb = (token_pos // block_size)[:, None, None]
    forced = (blocks < init_blocks) | ((blocks >= qb - local_blocks) & (blocks <= qb))
    score = torch.where(forced, float("inf"), score)
    inverted = 0xFFFFFFFF - blocks.to(torch.int64)
    keys = ((score.view(torch.int32).to(torch.int64) + 1) << 32) | inverted
    return torch.where(blocks <= qb, keys, inverted)


def select_blocks(
    q: torch.Tensor,
    k1: torch.Tensor,
    req_to_token: torch.Tensor,
    token_req: torch.Tensor,
    token_pos: torch.Tensor,
    kernel_size: int,
    kernel_stride: int,
    block_size: int,
    init_blocks: int,
    local_blocks: int,
    num_selected: int,
    width: int,
    scale: float,
    num_splits: int = 1,
) -> torch.Tensor:
    """InfLLM-v2 block selection per query token and kv head -> [T, G, num_selected] int32.

    q [T, Hq, D]; k1 [pages, R, G, D]; width >= blocks of the longest sequence (a fixed width
    keeps shapes static under CUDA graphs). Order: best first, ties to the lower block; -1 pads.
    Each window's probability is computed once, so equal block scores are exactly equal."""
    tokens, hq, dim = q.shape
    groups = k1.shape[2]
    hg, hgp = _group_heads(hq, groups)
    width = max(width, num_selected)
    ratio = block_size // kernel_stride
    m = torch.empty(tokens, groups, num_splits, hgp, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    common = (q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), k1.stride(2),
              req_to_token.stride(0))
    geometry = dict(HG=hg, HGP=hgp, D=dim, KL=kernel_size, KS=kernel_stride, BS=block_size,
                    TILE=64, NSPLIT=num_splits)
    _stage1_stats_kernel[(tokens, groups, num_splits)](
        q, k1, req_to_token, token_req, token_pos, m, l, *common, scale, **geometry
    )
    n_windows = width * ratio
    probs = torch.empty(tokens, groups, n_windows, device=q.device, dtype=torch.float32)
    _window_probs_kernel[(tokens, groups, triton.cdiv(n_windows, 64))](
        q, k1, req_to_token, token_req, token_pos, m, l, probs, *common,
        probs.stride(0), probs.stride(1), scale, n_windows, **geometry
    )
    keys = _block_keys(probs, token_pos, block_size, ratio, init_blocks, local_blocks, width)
    top, idx = keys.topk(num_selected, dim=-1)
    return torch.where((top >> 32) > 0, idx, -1).to(torch.int32)


@triton.jit
def _block_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, rt_ptr, treq_ptr, tpos_ptr, tsparse_ptr, sel_ptr,
    stride_qt, stride_qh, stride_kt, stride_kg, stride_vt, stride_vg, stride_rt,
    stride_sel_t, stride_sel_g,
    scale,
    HG: tl.constexpr, HGP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, NSEL: tl.constexpr,
    NSPLIT: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(tpos_ptr + t)
    rt_row = rt_ptr + tl.load(treq_ptr + t).to(tl.int64) * stride_rt
    sparse = tl.load(tsparse_ptr + t) != 0
    n_items = tl.where(sparse, NSEL, pos // BS + 1)
    q = _load_group_queries(q_ptr, t, g, stride_qt, stride_qh, HG, HGP, D)
    offs = tl.arange(0, BS)
    dims = tl.arange(0, D)
    m_i = tl.full([HGP], float("-inf"), tl.float32)
    l_i = tl.zeros([HGP], tl.float32)
    acc = tl.zeros([HGP, D], tl.float32)
    sel_row = sel_ptr + t.to(tl.int64) * stride_sel_t + g * stride_sel_g
    for i in range(split, n_items, NSPLIT):
        b = tl.where(sparse, tl.load(sel_row + i, mask=sparse, other=0), i)
        if b >= 0:
            page = (tl.load(rt_row + b * BS) // BS).to(tl.int64)
            slots = page * BS + offs
            k = tl.load(k_ptr + slots[:, None] * stride_kt + g * stride_kg + dims[None, :])
            v = tl.load(v_ptr + slots[:, None] * stride_vt + g * stride_vg + dims[None, :])
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where((b * BS + offs)[None, :] <= pos, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    heads = tl.arange(0, HGP)
    live = heads < HG
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    row = (t.to(tl.int64) * tl.num_programs(1) + g) * HG + heads
    if NSPLIT == 1:
        tl.store(o_ptr + row[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=live[:, None])
    else:
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        tl.store(o_ptr + (row[:, None] * NSPLIT + split) * D + dims[None, :], out,
                 mask=live[:, None])
        tl.store(lse_ptr + row * NSPLIT + split, lse, mask=live)


def block_sparse_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    token_req: torch.Tensor,
    token_pos: torch.Tensor,
    token_sparse: torch.Tensor,
    selected: torch.Tensor,
    block_size: int,
    scale: float,
    num_splits: int = 1,
) -> torch.Tensor:
    """Causal GQA attention of each query token over its selected blocks (sparse tokens) or over
    every block up to its own (dense tokens). q [T, Hq, D]; k/v_buffer [slots, G, D];
    selected [T, G, n_sel] (-1 = none) -> [T, Hq, D]."""
    tokens, hq, dim = q.shape
    groups = k_buffer.shape[1]
    hg, hgp = _group_heads(hq, groups)
    n_sel = selected.shape[-1]
    if num_splits == 1:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = out  # unused
    else:
        out = torch.empty(tokens, hq, num_splits, dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(tokens, hq, num_splits, device=q.device, dtype=torch.float32)
    _block_attention_kernel[(tokens, groups, num_splits)](
        q, k_buffer, v_buffer, out, lse, req_to_token, token_req, token_pos, token_sparse,
        selected,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0),
        v_buffer.stride(1), req_to_token.stride(0), selected.stride(0), selected.stride(1),
        scale,
        HG=hg, HGP=hgp, D=dim, BS=block_size, NSEL=n_sel,
        NSPLIT=num_splits,
    )
    if num_splits == 1:
        return out
    weights = torch.softmax(lse, dim=-1).nan_to_num_(0.0)
    return (out * weights[..., None]).sum(dim=2).to(q.dtype)
