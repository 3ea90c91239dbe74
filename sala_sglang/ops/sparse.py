"""InfLLM-v2 kernels over SGLang's paged KV cache (SPEC 2.2); reference twins in
`sala_sglang.reference.sparse`.

Layout. The KV pool is paged with page size = block_size, so block b of a request is one page:
`page = req_to_token[req, b * block_size] // block_size`, its tokens contiguous from
`page * block_size`. A compressed key whose window starts at token `stride * c` lives next to its
block's page: `compressed[page, (stride * c % block_size) // stride, kv_head, :]`. So compressed
keys are freed and reused with their pages, and cost 1/stride of K per token.

Queries are given per token: `token_req` (request slot, i.e. row of req_to_token) and
`token_pos` (absolute position); one program handles the query heads of one kv head together.

Each op runs its CUDA kernel from `sala_sglang._C` (csrc/sparse_*.cu) when the extension is built,
the tensors are on a GPU and the geometry is one the kernel compiles; else its Triton kernel here.
`impl="cuda"` / `impl="triton"` forces one (tests and benchmarks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala_sglang.ops import _cuda

# Which kernel each op runs when both can (impl=None), from one H100 run of
# benchmarks/kernels/sparse_attention.py and sparse_compress.py on the same inputs (bf16, released
# geometry; results/kernels_sparse_cuda2_h100.json, kernels_sparse_compress_h100.json):
#   compression: CUDA 7.4 vs Triton 20.9 us per 8192-token chunk, 3.5 vs 17.3 us per decode step.
#   attention: CUDA 13.1 / 15.0 / 15.2 vs Triton 6.4 / 7.1 / 10.0 ms per 8192-token chunk at
#   32K / 128K / 512K; decode 0.025 / 0.041 / 0.108 vs 0.031 / 0.047 / 0.104 ms at batch 1 / 8 / 32.
#   selection: see `_cuda_selection_faster`.
CUDA_FASTER = {"compress_new_windows": True, "block_sparse_attention": False}
# The fused CUDA selection wins where it scores 8 neighbouring tokens per CTA (prefill; its block
# scores kept 2048 blocks at a time): an 8192-token chunk 1.84 vs 3.28 ms at 32K, 7.61 vs 10.91
# at 128K, 31.16 vs 40.34 at 512K (results/kernels_sparse_cuda3_h100.json). A decode batch (one
# token per request, 1-32 tokens) takes 0.31-0.36 vs 0.07-0.18 ms on it.
CUDA_SELECT_TOKENS_PER_CTA = 8


def _cuda_selection_faster(tokens: int, groups: int, device: torch.device) -> bool:
    """Whether the batch fills every SM with 8-token CTAs (host-side only)."""
    ctas = -(-tokens // CUDA_SELECT_TOKENS_PER_CTA) * groups
    return ctas >= _multiprocessors(device)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30
    return _cuda.device_properties(device).multi_processor_count


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


# What csrc/sparse_compress.cu compiles; other geometries and dtypes take the Triton kernel.
_CUDA_COMPRESS_HEAD_DIMS = (64, 128)
_CUDA_COMPRESS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CUDA_COMPRESS_PIECE = 8  # keys summed per thread: stride and kernel_size are multiples of it
_CUDA_COMPRESS_MAX_KERNEL = 256  # keeps one run of windows within the kernel's shared memory
_INDEX_DTYPES = (torch.int32, torch.int64)


def _cuda_compress_unsupported(
    k_buffer: torch.Tensor, out: torch.Tensor, req_to_token: torch.Tensor,
    index: tuple[torch.Tensor, ...], kernel_size: int, stride: int, block_size: int,
) -> str | None:
    """Why the CUDA kernel cannot take these arguments, or None when it can (host metadata
    only: no device sync)."""
    piece, most = _CUDA_COMPRESS_PIECE, _CUDA_COMPRESS_MAX_KERNEL
    if kernel_size % stride or stride % piece or kernel_size > most:
        return (f"kernel_size {kernel_size} / stride {stride}: needs stride a multiple of "
                f"{piece} and kernel_size a multiple of stride, at most {most}")
    if k_buffer.dim() != 3 or k_buffer.shape[2] not in _CUDA_COMPRESS_HEAD_DIMS:
        return f"k_buffer {tuple(k_buffer.shape)}: head dim not in {_CUDA_COMPRESS_HEAD_DIMS}"
    if k_buffer.dtype not in _CUDA_COMPRESS_DTYPES or out.dtype != k_buffer.dtype:
        return f"k_buffer {k_buffer.dtype}, out {out.dtype}: need equal bf16, fp16 or fp32"
    if kernel_size < stride:
        return f"kernel_size {kernel_size} < stride {stride}"
    rows = -(-block_size // stride)
    if out.dim() != 4 or out.shape[1] != rows or out.shape[2:] != k_buffer.shape[1:]:
        return f"out {tuple(out.shape)}: expected [pages, ceil(block_size / stride), G, D]"
    vectors = ((k_buffer, (0, 1)), (out, (0, 1, 2)))
    if any(t.stride(-1) != 1 or t.data_ptr() % 16
           or any(t.stride(d) * t.element_size() % 16 for d in dims) for t, dims in vectors):
        return "k_buffer / out rows are not contiguous 16-byte aligned vectors"
    if req_to_token.dtype not in _INDEX_DTYPES or req_to_token.stride(1) != 1:
        return f"req_to_token {req_to_token.dtype}, strides {req_to_token.stride()}"
    if any(t.dtype not in _INDEX_DTYPES or not t.is_contiguous() for t in index):
        return "req_slots / old_lens / new_lens must be contiguous int32 or int64"
    return None


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
    impl: str | None = None,
) -> None:
    """Write the windows that complete as requests grow from old_lens to new_lens keys.

    k_buffer [slots, G, D]; out [pages, ceil(block_size / stride), G, D]; req_slots, old_lens,
    new_lens [B]; max_new_windows bounds the new windows of any request (grid size).
    impl: "cuda" (csrc/sparse_compress.cu; an error where it cannot run), "triton", or None
    (see `_cuda.choose_cuda`)."""
    use_cuda = _cuda.choose_cuda(
        "compress_new_windows", impl, k_buffer, CUDA_FASTER["compress_new_windows"],
        lambda: _cuda_compress_unsupported(k_buffer, out, req_to_token,
                                           (req_slots, old_lens, new_lens), kernel_size, stride,
                                           block_size),
    )
    if max_new_windows <= 0 or req_slots.numel() == 0:
        return
    if use_cuda:
        torch.ops.sala_sglang.compress_new_windows(
            k_buffer, out, req_to_token, req_slots, old_lens, new_lens, kernel_size, stride,
            block_size, max_new_windows,
        )
        return
    _compress_triton(k_buffer, out, req_to_token, req_slots, old_lens, new_lens, kernel_size,
                     stride, block_size, max_new_windows)


def _compress_triton(
    k_buffer: torch.Tensor, out: torch.Tensor, req_to_token: torch.Tensor,
    req_slots: torch.Tensor, old_lens: torch.Tensor, new_lens: torch.Tensor, kernel_size: int,
    stride: int, block_size: int, max_new_windows: int,
) -> None:
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
def _load_windows(k1_ptr, rt_row, c, live, g, stride_kp, stride_ks, stride_kg, KS: tl.constexpr,
                  BS: tl.constexpr, D: tl.constexpr):
    page, sub = _page_of_window(rt_row, c, KS, BS, live)
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
                                   stride_kg, KS, BS, D)
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
                                   stride_kg, KS, BS, D)
                s = tl.dot(q, tl.trans(k1)) * scale
                seen = mine[:, None] & (c[None, :] < visible[:, None])
                p_sum += tl.where(seen, tl.exp(s - m[:, None]) / l[:, None], 0.0)
    probs = tl.sum(tl.reshape(p_sum, (TM, HGP, WT)), axis=1)  # group score: sum over heads
    tok = t0 + tl.arange(0, TM)
    tl.store(w_ptr + tok.to(tl.int64)[:, None] * stride_wt + g * stride_wg + c[None, :], probs,
             mask=(tok < n_tokens)[:, None] & (c < n_windows)[None, :])


@triton.jit(do_not_specialize=["n_windows", "width"])
def _block_keys_kernel(
    w_ptr, tpos_ptr, key_ptr, n_windows, width,
    stride_wt, stride_wg, stride_kt, stride_kg,
    BS: tl.constexpr, RATIO: tl.constexpr, POOLP: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr, BB: tl.constexpr,
):
    """Sortable block keys: the pooled score's bits (non-negative floats order like their bits)
    above the inverted block index, so one descending top-k yields the best blocks with ties
    going to the lower index. Block b pools windows [RATIO * b - 1, RATIO * b + RATIO) (missing
    ones count 0); forced blocks score +inf; blocks after the query's own get no score bits."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2) * BB + tl.arange(0, BB)
    j = tl.arange(0, POOLP)
    c = b[:, None] * RATIO - 1 + j[None, :]
    pooled = (j[None, :] <= RATIO) & (c >= 0) & (c < n_windows)
    w = tl.load(w_ptr + t.to(tl.int64) * stride_wt + g * stride_wg + c, mask=pooled, other=0.0)
    score = tl.max(w, axis=1)
    qb = tl.load(tpos_ptr + t) // BS
    forced = (b < INIT) | ((b >= qb - LOCAL) & (b <= qb))
    score = tl.where(forced, float("inf"), score)
    inverted = tl.full([BB], 0xFFFFFFFF, tl.int64) - b.to(tl.int64)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(b <= qb, ((bits + 1) << 32) | inverted, inverted)
    tl.store(key_ptr + t.to(tl.int64) * stride_kt + g * stride_kg + b, key, mask=b < width)


# Stage-1 scoring tiles TOKEN_TILE tokens x the padded group heads into one tl.dot, so each K1
# tile is read once per TOKEN_TILE tokens (prefill, where neighbouring tokens share a request).
# Decode asks for split-K instead (num_splits > 1): its tokens belong to different requests, and
# a tile of them would sweep K1 once per request anyway. H100, 128K context, 8192-token chunk:
# 1 token 16.1 ms, 4 tokens (4 warps) 10.9 ms, 8 tokens (8 warps) 13.8 ms, 16 tokens 14.9 ms.
TOKEN_TILE = 4
WINDOW_TILE = 64
KEY_BLOCKS = 128
# Bytes of Triton selection scratch (window probabilities + block keys) one launch may use:
# longer batches are selected in pieces (the CUDA kernel needs none).
SELECTION_SCRATCH_BYTES = 512 << 20


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
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """InfLLM-v2 block selection per query token and kv head -> [T, G, num_selected] int32.

    q [T, Hq, D]; k1 [pages, R, G, D]; width >= blocks of the longest sequence (a fixed width
    keeps shapes static under CUDA graphs). Order: best first, ties to the lower block; -1 pads.
    Each window's probability is computed once, so equal block scores are exactly equal.

    impl: "cuda" (csrc/sparse_selection.cu, fused; ValueError where it cannot run), "triton", or
    None (see `_cuda.choose_cuda`).
    num_splits (split-K over windows) shapes the Triton kernels only; the CUDA kernel accepts and
    ignores it (it widens its CTAs to 8 warps instead when there are few (token, kv head) pairs,
    and scores 4 or 8 neighbouring tokens per CTA when there are many; SALA_SGLANG_SELECT_TILE=1/4/8
    forces one token, 4 or 8 per CTA, and SALA_SGLANG_SELECT_SEGMENT=n makes those keep block
    scores n blocks at a time, 2048 by default)."""
    if _cuda.choose_cuda(
        "select_blocks", impl, q, _cuda_selection_faster(q.shape[0], k1.shape[2], q.device),
        lambda: "scale must be positive" if scale <= 0 else cuda_selection_unsupported(
            q, k1, req_to_token, token_req, token_pos, kernel_size, kernel_stride, block_size,
            num_selected, max(width, num_selected)),
    ):
        return torch.ops.sala_sglang.select_blocks(
            q, k1, req_to_token, token_req, token_pos, kernel_size, kernel_stride, block_size,
            init_blocks, local_blocks, num_selected, max(width, num_selected), scale,
        )
    # fp32 window probabilities plus one int64 key per block, per token and kv head
    per_token = k1.shape[2] * max(width, num_selected) * (4 * (block_size // kernel_stride) + 8)
    # Pieces start on multiples of 16 tokens: the kernels are specialized on the alignment of
    # the per-token metadata slices, and a new alignment compiles them again mid-prefill.
    rows = max(16, SELECTION_SCRATCH_BYTES // per_token // 16 * 16)
    pieces = [
        _select_blocks_triton(q[s : s + rows], k1, req_to_token, token_req[s : s + rows],
                              token_pos[s : s + rows], kernel_size, kernel_stride, block_size,
                              init_blocks, local_blocks, num_selected, width, scale, num_splits)
        for s in range(0, q.shape[0], rows)
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# Geometry of csrc/sparse_selection.cu: head dims compiled, most query heads per kv head (one
# m16 tile), and the dynamic shared memory of its 8-warp per-token variant (kept in step with
# smem_bytes there), which grows with the width; the token-tiled variant keeps at most 2048
# blocks of scores per token (about 105 KB in all) and fits at any width.
_CUDA_SELECT_HEAD_DIMS = (64, 128)
_CUDA_SELECT_MAX_GROUP = 16


def _cuda_selection_smem_bytes(width: int, num_selected: int, dim: int) -> int:
    def align16(x: int) -> int:
        return -(-x // 16) * 16

    ring = 2 * 128 * (dim + 8) * 2  # stages x window tile x padded K1 row (bytes)
    return ring + align16(4 * width) + align16(8 * num_selected) + 8192


def _max_shared_memory(device: torch.device) -> int:
    props = _cuda.device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def cuda_selection_unsupported(
    q: torch.Tensor,
    k1: torch.Tensor,
    req_to_token: torch.Tensor,
    token_req: torch.Tensor,
    token_pos: torch.Tensor,
    kernel_size: int,
    kernel_stride: int,
    block_size: int,
    num_selected: int,
    width: int,
) -> str | None:
    """Why the fused CUDA selection cannot run these arguments, or None when it can (host-side
    checks only: no device sync, so it is safe while a CUDA graph is captured)."""
    if not (q.is_cuda and _cuda.available()):
        return "sala_sglang._C is not built or q is not on a CUDA device"
    tokens, hq, dim = q.shape
    groups = k1.shape[2]
    if dim not in _CUDA_SELECT_HEAD_DIMS:
        return f"head dim {dim} (compiled: {_CUDA_SELECT_HEAD_DIMS})"
    if q.dtype not in (torch.bfloat16, torch.float16) or k1.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k1 {k1.dtype} (need both bfloat16 or both float16)"
    if hq % groups or hq // groups > _CUDA_SELECT_MAX_GROUP:
        return f"{hq} query heads over {groups} kv heads (at most 16 per kv head)"
    if block_size % kernel_stride or kernel_size < kernel_stride:
        return f"block {block_size}, kernel {kernel_size}, stride {kernel_stride}"
    if k1.shape[1] < block_size // kernel_stride:
        return f"k1 holds {k1.shape[1]} rows per page, fewer than {block_size // kernel_stride}"
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
    need = _cuda_selection_smem_bytes(width, num_selected, dim)
    have = _max_shared_memory(q.device)
    if need > have:
        return f"width {width} needs {need} bytes of shared memory, the device allows {have}"
    return None


def _select_blocks_triton(
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
    tokens, hq, dim = q.shape
    groups = k1.shape[2]
    hg, hgp = _group_heads(hq, groups)
    width = max(width, num_selected)
    ratio = block_size // kernel_stride
    tm = 1 if num_splits > 1 else TOKEN_TILE
    warps = 8 if tm * hgp >= 128 else 4
    m = torch.empty(tokens, groups, num_splits, hgp, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    common = (q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), k1.stride(2),
              req_to_token.stride(0))
    geometry = dict(HG=hg, HGP=hgp, D=dim, KL=kernel_size, KS=kernel_stride, BS=block_size,
                    TM=tm, WT=WINDOW_TILE, NSPLIT=num_splits, num_warps=warps)
    tiles = triton.cdiv(tokens, tm)
    _stage1_stats_kernel[(tiles, groups, num_splits)](
        q, k1, req_to_token, token_req, token_pos, m, l, tokens, *common, scale, **geometry
    )
    n_windows = width * ratio
    probs = torch.empty(tokens, groups, n_windows, device=q.device, dtype=torch.float32)
    _window_probs_kernel[(tiles, groups, triton.cdiv(n_windows, WINDOW_TILE))](
        q, k1, req_to_token, token_req, token_pos, m, l, probs, tokens, *common,
        probs.stride(0), probs.stride(1), scale, n_windows, **geometry
    )
    keys = torch.empty(tokens, groups, width, device=q.device, dtype=torch.int64)
    _block_keys_kernel[(tokens, groups, triton.cdiv(width, KEY_BLOCKS))](
        probs, token_pos, keys, n_windows, width, probs.stride(0), probs.stride(1),
        keys.stride(0), keys.stride(1), BS=block_size, RATIO=ratio,
        POOLP=triton.next_power_of_2(ratio + 1), INIT=init_blocks, LOCAL=local_blocks,
        BB=KEY_BLOCKS,
    )
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
    # Branch-free body (a -1 entry is masked, not skipped) so the loads of later blocks can be
    # software-pipelined; exp2 with log2(e) folded into the scale.
    qk_scale = scale * 1.4426950408889634
    for i in range(split, n_items, NSPLIT):
        b = tl.where(sparse, tl.load(sel_row + i, mask=sparse, other=0), i)
        valid = b >= 0
        page = (tl.load(rt_row + tl.maximum(b, 0) * BS) // BS).to(tl.int64)
        slots = page * BS + offs
        k = tl.load(k_ptr + slots[:, None] * stride_kt + g * stride_kg + dims[None, :],
                    mask=valid, other=0.0)
        v = tl.load(v_ptr + slots[:, None] * stride_vt + g * stride_vg + dims[None, :],
                    mask=valid, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid & ((b * BS + offs)[None, :] <= pos), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
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
        lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("-inf"))
        tl.store(o_ptr + (row[:, None] * NSPLIT + split) * D + dims[None, :], out,
                 mask=live[:, None])
        tl.store(lse_ptr + row * NSPLIT + split, lse, mask=live)


# Launch shape of the attention kernel (H100 sweep: benchmarks/kernels/sparse_attention.py).
ATTENTION_WARPS = 4
ATTENTION_STAGES = 3


# What csrc/sparse_attention.cu compiles; any other geometry runs the Triton kernel.
CUDA_ATTENTION_HEAD_DIMS = (64, 128)
CUDA_ATTENTION_MAX_GROUP = 16
CUDA_ATTENTION_KEY_CHUNK = 16  # block_size must be a multiple of it


def cuda_attention_unsupported(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    token_req: torch.Tensor,
    token_pos: torch.Tensor,
    token_sparse: torch.Tensor,
    selected: torch.Tensor,
    block_size: int,
    num_splits: int,
) -> str | None:
    """Why torch.ops.sala_sglang.block_sparse_attention cannot take these arguments, or None.
    Mirrors the op's own checks (host-side attributes only: no device sync)."""
    tokens, hq, dim = q.shape
    groups = k_buffer.shape[1]
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"q dtype {q.dtype} (bfloat16 or float16 compiled)"
    if dim not in CUDA_ATTENTION_HEAD_DIMS:
        return f"head dim {dim} (compiled: {CUDA_ATTENTION_HEAD_DIMS})"
    if hq % groups or hq // groups > CUDA_ATTENTION_MAX_GROUP:
        return f"{hq} query heads over {groups} kv heads (group size <= {CUDA_ATTENTION_MAX_GROUP})"
    if block_size <= 0 or block_size % CUDA_ATTENTION_KEY_CHUNK:
        return f"block_size {block_size} (a multiple of {CUDA_ATTENTION_KEY_CHUNK})"
    if not 1 <= num_splits <= 65535:
        return f"num_splits {num_splits} (1..65535)"
    # Alignment from storage offsets (allocations are 256-byte aligned): no data_ptr(), which
    # torch.compile's fake tensors lack; the op itself checks the real pointers.
    if q.stride(2) != 1 or q.stride(0) % 2 or q.stride(1) % 2 or q.storage_offset() % 2:
        return f"q strides {q.stride()} (contiguous in dim, even strides)"
    for name, x in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if x.dtype != q.dtype or x.dim() != 3 or x.shape != k_buffer.shape or x.shape[2] != dim:
            return f"{name} {x.dtype} {tuple(x.shape)} (q's dtype, [slots, groups, {dim}])"
        if x.stride(2) != 1 or x.stride(0) % 8 or x.stride(1) % 8 or x.storage_offset() % 8:
            return f"{name} strides {x.stride()} (16-byte aligned rows)"
    if req_to_token.dtype != torch.int32 or req_to_token.dim() != 2:
        return f"req_to_token {req_to_token.dtype} {req_to_token.dim()}-d (int32 2-d)"
    for name, x in (("token_req", token_req), ("token_pos", token_pos),
                    ("token_sparse", token_sparse)):
        if x.dtype != torch.int32 or x.shape != (tokens,) or not x.is_contiguous():
            return f"{name} {x.dtype} {tuple(x.shape)} (contiguous int32 [{tokens}])"
    if selected.dtype != torch.int32 or selected.dim() != 3 or selected.shape[0] != tokens:
        return f"selected {selected.dtype} {tuple(selected.shape)} (int32 [{tokens}, G, n_sel])"
    return None


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
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Causal GQA attention of each query token over its selected blocks (sparse tokens) or over
    every block up to its own (dense tokens). q [T, Hq, D]; k/v_buffer [slots, G, D];
    selected [T, G, n_sel] (-1 = none) -> [T, Hq, D].

    num_splits > 1 splits each token's block list (decode occupancy); the CUDA op takes it as a
    floor and splits further when few tokens leave SMs idle. impl: "cuda"
    (csrc/sparse_attention.cu; ValueError where it cannot run), "triton", or None (see
    `_cuda.choose_cuda`)."""
    args = (q, k_buffer, v_buffer, req_to_token, token_req, token_pos, token_sparse, selected)
    if _cuda.choose_cuda("block_sparse_attention", impl, q, CUDA_FASTER["block_sparse_attention"],
                         lambda: cuda_attention_unsupported(*args, block_size, num_splits)):
        return torch.ops.sala_sglang.block_sparse_attention(*args, block_size, scale, num_splits)
    return _block_sparse_attention_triton(q, k_buffer, v_buffer, req_to_token, token_req,
                                          token_pos, token_sparse, selected, block_size, scale,
                                          num_splits)


def _block_sparse_attention_triton(
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
    """The Triton kernel of block_sparse_attention (same arguments and result)."""
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
        NSPLIT=num_splits, num_warps=ATTENTION_WARPS, num_stages=ATTENTION_STAGES,
    )
    if num_splits == 1:
        return out
    weights = torch.softmax(lse, dim=-1).nan_to_num_(0.0)
    return (out * weights[..., None]).sum(dim=2).to(q.dtype)
