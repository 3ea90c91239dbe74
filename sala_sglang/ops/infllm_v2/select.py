"""InfLLM-v2 stage-1 block selection over the paged K1 cache (SPEC 2.2 steps 2-4); reference twins
`block_scores` and `select_blocks` in `sala_sglang.reference.sparse`.

Queries are given per token: `token_req` (request slot, i.e. row of req_to_token) and
`token_pos` (absolute position); one program handles the query heads of one kv head together.
K1 lives beside the KV pages (see `compress`). The CUDA kernel is csrc/sparse_selection.cu
(fused, one launch); the Triton path below is stage-1 in two kernels, then a top-k per chunk of
blocks and a merge of the chunks'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala_sglang.config import SparseConfig
from sala_sglang.ops.infllm_v2._triton import dense_token_arrays, group_heads, page_of_window
from sala_sglang.ops.infllm_v2.plan import WINDOW_TILE, SparsePlan, plan_for_call

OP = "select_blocks"


def select_blocks(
    q: torch.Tensor,
    k1: torch.Tensor,
    req_to_token: torch.Tensor,
    token_req: torch.Tensor,
    token_pos: torch.Tensor,
    cfg: SparseConfig,
    width: int,
    scale: float,
    plan: SparsePlan | None = None,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Block selection per query token and kv head -> [T, G, num_selected_blocks] int32.

    q [T, Hq, D]; k1 [pages, block_size / kernel_stride, G, D]; width >= blocks of the longest
    sequence (a fixed width keeps shapes static under CUDA graphs). Order: best first, ties to
    the lower block; -1 pads. Each window's probability is computed once, so equal block scores
    are exactly equal. plan: this forward's (`plan.make_plan`: kernel, CUDA variant, Triton
    tiling); without one, `impl` ("cuda": an error where it cannot run, "triton", or None)."""
    plan = plan_for_call(OP, plan, impl, cfg, q, tokens=q.shape[0], groups=k1.shape[2],
                         width=width)
    width = max(width, cfg.num_selected_blocks)
    token_req, token_pos = dense_token_arrays(token_req, token_pos)
    args = (q, k1, req_to_token, token_req, token_pos)
    if plan.uses_cuda(OP, plan.select, q,
                      lambda: cuda_unsupported(args, cfg, scale) or plan.select_unfit):
        return torch.ops.sala_sglang.select_blocks(
            *args, cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks,
            cfg.local_blocks, cfg.num_selected_blocks, width, scale, plan.select_tile_tokens,
            plan.select_warps, plan.select_segment,
        )
    if q.shape[0] == 0:
        return torch.empty(0, k1.shape[2], cfg.num_selected_blocks, dtype=torch.int32,
                           device=q.device)
    rows = plan.triton_piece_rows
    pieces = [
        _select_piece(q[s : s + rows], k1, req_to_token, token_req[s : s + rows],
                      token_pos[s : s + rows], cfg, width, scale, plan)
        for s in range(0, q.shape[0], rows)
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# What csrc/sparse_selection.cu compiles: head dims, and at most one m16 tile of query heads per
# kv head. Which variant fits shared memory is the plan's question.
_CUDA_HEAD_DIMS = (64, 128)
_CUDA_MAX_GROUP = 16


def cuda_unsupported(tensors: tuple[torch.Tensor, ...], cfg: SparseConfig,
                     scale: float) -> str | None:
    """Why the fused CUDA selection cannot run these arguments (`tensors`: select_blocks', q to
    token_pos, in order), or None when it can (host-side checks only: no device sync, so it is
    safe while a CUDA graph is captured)."""
    q, k1, req_to_token, token_req, token_pos = tensors
    if scale <= 0:
        return "scale must be positive"
    tokens, hq, dim = q.shape
    groups = k1.shape[2]
    if dim not in _CUDA_HEAD_DIMS:
        return f"head dim {dim} (compiled: {_CUDA_HEAD_DIMS})"
    if q.dtype not in (torch.bfloat16, torch.float16) or k1.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k1 {k1.dtype} (need both bfloat16 or both float16)"
    if hq % groups or hq // groups > _CUDA_MAX_GROUP:
        return f"{hq} query heads over {groups} kv heads (at most 16 per kv head)"
    if (cfg.block_size % cfg.kernel_stride or cfg.kernel_size % cfg.kernel_stride
            or cfg.kernel_size < cfg.kernel_stride):
        return f"block {cfg.block_size}, kernel {cfg.kernel_size}, stride {cfg.kernel_stride}"
    if k1.shape[1] < cfg.windows_per_block:
        return f"k1 holds {k1.shape[1]} rows per page, fewer than {cfg.windows_per_block}"
    if q.stride(-1) != 1 or k1.stride(-1) != 1 or req_to_token.stride(-1) != 1:
        return "q, k1 and req_to_token must be contiguous in their last dim"
    if any(st % 8 for st in k1.stride()[:3]) or k1.data_ptr() % 16:
        return f"k1 rows not 16-byte aligned (strides {k1.stride()})"
    for name, x in (("req_to_token", req_to_token), ("token_req", token_req),
                    ("token_pos", token_pos)):
        if x.dtype != torch.int32 or x.device != q.device:
            return f"{name} must be int32 on {q.device}, got {x.dtype} on {x.device}"
    if not (token_req.is_contiguous() and token_pos.is_contiguous()):
        return "token_req and token_pos must be contiguous"
    return None


@triton.jit
def _num_windows(length, KL: tl.constexpr, KS: tl.constexpr):
    return tl.where(length >= KL, (length - KL) // KS + 1, 0)


@triton.jit
def _tile_rows(t0, n_tokens, treq_ptr, tpos_ptr, HG: tl.constexpr, HGP: tl.constexpr,
               TM: tl.constexpr):
    """Row r of a token tile is (padded) head r % HGP of token t0 + r // HGP."""
    r = tl.arange(0, TM * HGP)
    t = t0 + r // HGP
    h = r % HGP
    inside = t < n_tokens
    req = tl.load(treq_ptr + t, mask=inside, other=-1)
    pos = tl.load(tpos_ptr + t, mask=inside, other=-1)
    return t, h, inside & (h < HG), req, pos


@triton.jit
def _load_tile_queries(q_ptr, t, h, live, g, stride_qt, stride_qh, HG: tl.constexpr,
                       D: tl.constexpr):
    return tl.load(q_ptr + t.to(tl.int64)[:, None] * stride_qt + (g * HG + h)[:, None] * stride_qh
                   + tl.arange(0, D)[None, :], mask=live[:, None], other=0.0)


@triton.jit
def _first_of_request(treq_ptr, t0, j: tl.constexpr, n_tokens, TM: tl.constexpr):
    """Request of the tile's j-th token, and whether j is its first token in the tile: a tile
    holding several requests is swept once per request (K1 pages differ between requests)."""
    req_j = tl.load(treq_ptr + t0 + j, mask=t0 + j < n_tokens, other=-1)
    i = tl.arange(0, TM)
    earlier = tl.load(treq_ptr + t0 + i, mask=(i < j) & (t0 + i < n_tokens), other=-1)
    seen = tl.sum(tl.where((i < j) & (earlier == req_j), 1, 0))
    return req_j, (req_j >= 0) & (seen == 0)


@triton.jit
def _load_windows(k1_ptr, rt_row, c, live, g, stride_kp, stride_ks, stride_kg, KL: tl.constexpr,
                  KS: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    page, sub = page_of_window(rt_row, c, KL, KS, BS, live)
    return tl.load(k1_ptr + page[:, None] * stride_kp + sub[:, None] * stride_ks + g * stride_kg
                   + tl.arange(0, D)[None, :], mask=live[:, None], other=0.0)


# Token and window counts change with every batch; specializing on their divisibility by 16
# would compile each kernel again mid-request, a multi-second stall in a long prefill.
@triton.jit(do_not_specialize=["n_tokens"])
def _stage1_stats_kernel(
    q_ptr, k1_ptr, rt_ptr, treq_ptr, tpos_ptr, m_ptr, l_ptr, n_tokens,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kg, stride_rt,
    scale,
    HG: tl.constexpr, HGP: tl.constexpr, D: tl.constexpr, KL: tl.constexpr, KS: tl.constexpr,
    BS: tl.constexpr, TM: tl.constexpr, WT: tl.constexpr, NSPLIT: tl.constexpr,
):
    t0 = tl.program_id(0) * TM
    g = tl.program_id(1)
    split = tl.program_id(2)
    t, h, live, req, pos = _tile_rows(t0, n_tokens, treq_ptr, tpos_ptr, HG, HGP, TM)
    visible = _num_windows(pos + 1, KL, KS)
    q = _load_tile_queries(q_ptr, t, h, live, g, stride_qt, stride_qh, HG, D)
    m_i = tl.full([TM * HGP], float("-inf"), tl.float32)
    l_i = tl.zeros([TM * HGP], tl.float32)
    for j in tl.static_range(TM):
        req_j, first = _first_of_request(treq_ptr, t0, j, n_tokens, TM)
        if first:
            mine = live & (req == req_j)
            n_j = tl.max(tl.where(mine, visible, 0))
            rt_row = rt_ptr + req_j.to(tl.int64) * stride_rt
            for tile in range(split, tl.cdiv(n_j, WT), NSPLIT):
                c = tile * WT + tl.arange(0, WT)
                k1 = _load_windows(k1_ptr, rt_row, c, c < n_j, g, stride_kp, stride_ks,
                                   stride_kg, KL, KS, BS, D)
                s = tl.dot(q, tl.trans(k1)) * scale
                s = tl.where(mine[:, None] & (c[None, :] < visible[:, None]), s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
                m_i = m_new
    row = ((t.to(tl.int64) * tl.num_programs(1) + g) * NSPLIT + split) * HGP + h
    tl.store(m_ptr + row, m_i, mask=t < n_tokens)
    tl.store(l_ptr + row, l_i, mask=t < n_tokens)


@triton.jit(do_not_specialize=["n_tokens", "n_windows"])
def _window_probs_kernel(
    q_ptr, k1_ptr, rt_ptr, treq_ptr, tpos_ptr, m_ptr, l_ptr, w_ptr, n_tokens,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kg, stride_rt, stride_wt, stride_wg,
    scale, n_windows,
    HG: tl.constexpr, HGP: tl.constexpr, D: tl.constexpr, KL: tl.constexpr, KS: tl.constexpr,
    BS: tl.constexpr, TM: tl.constexpr, WT: tl.constexpr, NSPLIT: tl.constexpr,
):
    t0 = tl.program_id(0) * TM
    g = tl.program_id(1)
    c0 = tl.program_id(2) * WT
    c = c0 + tl.arange(0, WT)
    t, h, live, req, pos = _tile_rows(t0, n_tokens, treq_ptr, tpos_ptr, HG, HGP, TM)
    visible = _num_windows(pos + 1, KL, KS)
    # softmax statistics: merge the splits' (max, sum) per row
    row = (t.to(tl.int64) * tl.num_programs(1) + g) * NSPLIT * HGP + h
    at = row[None, :] + (tl.arange(0, NSPLIT) * HGP)[:, None]
    inside = (t < n_tokens)[None, :]
    ms = tl.load(m_ptr + at, mask=inside, other=float("-inf"))  # [NSPLIT, rows]
    ls = tl.load(l_ptr + at, mask=inside, other=0.0)
    m = tl.max(ms, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(ls * tl.exp(ms - m[None, :]), axis=0)
    l = tl.where(l > 0, l, 1.0)  # no visible window: every probability is 0 anyway
    q = _load_tile_queries(q_ptr, t, h, live, g, stride_qt, stride_qh, HG, D)
    p_sum = tl.zeros([TM * HGP, WT], tl.float32)
    for j in tl.static_range(TM):
        req_j, first = _first_of_request(treq_ptr, t0, j, n_tokens, TM)
        if first:
            mine = live & (req == req_j)
            n_j = tl.max(tl.where(mine, visible, 0))
            if c0 < n_j:
                rt_row = rt_ptr + req_j.to(tl.int64) * stride_rt
                k1 = _load_windows(k1_ptr, rt_row, c, c < n_j, g, stride_kp, stride_ks,
                                   stride_kg, KL, KS, BS, D)
                s = tl.dot(q, tl.trans(k1)) * scale
                seen = mine[:, None] & (c[None, :] < visible[:, None])
                p_sum += tl.where(seen, tl.exp(s - m[:, None]) / l[:, None], 0.0)
    probs = tl.sum(tl.reshape(p_sum, (TM, HGP, WT)), axis=1)  # group score: sum over heads
    tok = t0 + tl.arange(0, TM)
    tl.store(w_ptr + tok.to(tl.int64)[:, None] * stride_wt + g * stride_wg + c[None, :], probs,
             mask=(tok < n_tokens)[:, None] & (c < n_windows)[None, :])


@triton.jit
def _store_blocks(out_row, top, KP: tl.constexpr, NSEL: tl.constexpr):
    """The first NSEL of the keys `top` (sorted, best first) as blocks: the block index where the
    key holds score bits, -1 where it does not (a block after the query's own)."""
    i = tl.arange(0, KP)
    low = tl.full([KP], 0xFFFFFFFF, tl.int64)
    block = tl.where((top >> 32) > 0, low - (top & low), -1)
    tl.store(out_row + i, block.to(tl.int32), mask=i < NSEL)


@triton.jit(do_not_specialize=["n_windows", "width"])
def _block_topk_kernel(
    w_ptr, tpos_ptr, out_ptr, n_windows, width,
    stride_wt, stride_wg, stride_ot, stride_og,
    BS: tl.constexpr, RATIO: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    CHUNK: tl.constexpr, KP: tl.constexpr, NSEL: tl.constexpr, FINAL: tl.constexpr,
):
    """The best KP blocks of one chunk of CHUNK blocks, as sortable keys: the pooled score's bits
    (non-negative floats order like their bits) plus 1 above the inverted block index, so one
    descending top-k yields the best blocks with ties going to the lower index, and each key
    names its block. Block b pools windows [RATIO * b - 1, RATIO * b + RATIO) (missing ones count
    0); forced blocks score +inf; blocks after the query's own get no score bits (key = inverted
    index >= 1), blocks past the width key 0, below every block. FINAL (the width is one chunk):
    the blocks themselves, else the chunk's keys best first for `_merge_topk_kernel`. A chunk
    wholly after the query's block holds no scored block: the merge never reads it, so it is
    skipped (decode in a server started for far more tokens than the request has)."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    chunk = tl.program_id(2)
    qb = tl.load(tpos_ptr + t) // BS
    if (chunk == 0) | (chunk * CHUNK <= qb):
        b = chunk * CHUNK + tl.arange(0, CHUNK)
        w_row = w_ptr + t.to(tl.int64) * stride_wt + g * stride_wg
        score = tl.zeros([CHUNK], tl.float32)
        for j in tl.static_range(RATIO + 1):
            c = b * RATIO - 1 + j
            score = tl.maximum(score, tl.load(w_row + c, mask=(c >= 0) & (c < n_windows),
                                              other=0.0))
        forced = (b < INIT) | ((b >= qb - LOCAL) & (b <= qb))
        score = tl.where(forced, float("inf"), score)
        inverted = tl.full([CHUNK], 0xFFFFFFFF, tl.int64) - b.to(tl.int64)
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(b <= qb, ((bits + 1) << 32) | inverted, inverted)
        top = tl.topk(tl.where(b < width, key, 0), KP)
        out_row = out_ptr + t.to(tl.int64) * stride_ot + g * stride_og
        if FINAL:
            _store_blocks(out_row, top, KP, NSEL)
        else:
            tl.store(out_row + chunk * KP + tl.arange(0, KP), top)


@triton.jit(do_not_specialize=["n_chunks"])
def _merge_topk_kernel(
    cand_ptr, tpos_ptr, out_ptr, n_chunks, stride_ct, stride_cg, stride_ot, stride_og,
    BS: tl.constexpr, CHUNK: tl.constexpr, KP: tl.constexpr, NSEL: tl.constexpr,
):
    """The best KP of every chunk's best KP keys (each list sorted, best first): the best KP of
    two sorted lists are the elementwise max of one and the other reversed, a bitonic sequence
    that one bitonic merge sorts. Only the chunks up to the query's block's: every block of a
    later one is after the query's, keyed below every scored block, so its place in the list
    would be padding (-1) all the same, and `_block_topk_kernel` did not write it."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    qb = tl.load(tpos_ptr + t) // BS
    last = tl.minimum(n_chunks, tl.maximum(qb // CHUNK + 1, 1))
    row = cand_ptr + t.to(tl.int64) * stride_ct + g * stride_cg
    i = tl.arange(0, KP)
    best = tl.load(row + i)
    # each next list is loaded a merge ahead, its latency hidden behind the merge (launched for 2
    # chunks or more, so the second list's memory is there, written or not)
    nxt = tl.load(row + KP + (KP - 1 - i))
    for c in range(1, last):
        rising = nxt
        nxt = tl.load(row + (c + 1) * KP + (KP - 1 - i), mask=c + 1 < last, other=0)
        best = tl.bitonic_merge(tl.maximum(best, rising), descending=True)
    _store_blocks(out_ptr + t.to(tl.int64) * stride_ot + g * stride_og, best, KP, NSEL)


def _select_piece(
    q: torch.Tensor, k1: torch.Tensor, req_to_token: torch.Tensor, token_req: torch.Tensor,
    token_pos: torch.Tensor, cfg: SparseConfig, width: int, scale: float, plan: SparsePlan,
) -> torch.Tensor:
    """The Triton path on one piece of the batch (its scratch within the plan's bound)."""
    probs = _window_probabilities(q, k1, req_to_token, token_req, token_pos, cfg, width, scale,
                                 plan)
    return _top_blocks(probs, token_pos, cfg, width, plan.triton_key_chunk)


def _window_probabilities(
    q: torch.Tensor, k1: torch.Tensor, req_to_token: torch.Tensor, token_req: torch.Tensor,
    token_pos: torch.Tensor, cfg: SparseConfig, width: int, scale: float, plan: SparsePlan,
) -> torch.Tensor:
    """Stage-1 of the Triton path (`select_blocks`' arguments, token arrays dense): each window's
    softmax probability summed over the kv head's query heads -> [T, G, width * r] float32, 0
    for windows a token does not see."""
    tokens, hq, dim = q.shape
    groups = k1.shape[2]
    hg, hgp = group_heads(hq, groups)
    tm, num_splits = plan.triton_token_tile, plan.triton_select_splits
    warps = 8 if tm * hgp >= 128 else 4
    m = torch.empty(tokens, groups, num_splits, hgp, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    common = (q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), k1.stride(2),
              req_to_token.stride(0))
    geometry = dict(HG=hg, HGP=hgp, D=dim, KL=cfg.kernel_size, KS=cfg.kernel_stride,
                    BS=cfg.block_size, TM=tm, WT=WINDOW_TILE, NSPLIT=num_splits, num_warps=warps)
    tiles = triton.cdiv(tokens, tm)
    _stage1_stats_kernel[(tiles, groups, num_splits)](
        q, k1, req_to_token, token_req, token_pos, m, l, tokens, *common, scale, **geometry
    )
    n_windows = width * cfg.windows_per_block
    probs = torch.empty(tokens, groups, n_windows, device=q.device, dtype=torch.float32)
    _window_probs_kernel[(tiles, groups, triton.cdiv(n_windows, WINDOW_TILE))](
        q, k1, req_to_token, token_req, token_pos, m, l, probs, tokens, *common,
        probs.stride(0), probs.stride(1), scale, n_windows, **geometry
    )
    return probs


def _top_blocks(probs: torch.Tensor, token_pos: torch.Tensor, cfg: SparseConfig, width: int,
                chunk: int) -> torch.Tensor:
    """The best blocks of each token and kv head from its window probabilities [T, G, width * r]
    -> [T, G, num_selected_blocks] int32 (`select_blocks`' order and -1 padding; width >= n_sel):
    each chunk of `chunk` blocks (a power of two, at least next_power_of_2(n_sel)) keeps its best,
    a second kernel merges the chunks' where there are several."""
    tokens, groups, n_windows = probs.shape
    n_sel = cfg.num_selected_blocks
    kp = triton.next_power_of_2(n_sel)
    chunks = triton.cdiv(width, chunk)
    # compiled for sm_90: 1024 keys at 4 warps take 56 registers, 2048 at 8 warps 48, no spills
    warps = 4 if chunk <= 1024 else 8
    out = torch.empty(tokens, groups, n_sel, device=probs.device, dtype=torch.int32)
    cand = out if chunks == 1 else torch.empty(tokens, groups, chunks * kp, device=probs.device,
                                               dtype=torch.int64)
    _block_topk_kernel[(tokens, groups, chunks)](
        probs, token_pos, cand, n_windows, width, probs.stride(0), probs.stride(1),
        cand.stride(0), cand.stride(1), BS=cfg.block_size, RATIO=cfg.windows_per_block,
        INIT=cfg.init_blocks, LOCAL=cfg.local_blocks, CHUNK=chunk, KP=kp, NSEL=n_sel,
        FINAL=chunks == 1, num_warps=warps,
    )
    if chunks > 1:
        _merge_topk_kernel[(tokens, groups)](
            cand, token_pos, out, chunks, cand.stride(0), cand.stride(1), out.stride(0),
            out.stride(1), BS=cfg.block_size, CHUNK=chunk, KP=kp, NSEL=n_sel, num_warps=1,
        )
    return out
