"""Block-sparse GQA attention over SGLang's paged KV cache (SPEC 2.2 step 5, and dense mode);
reference twins `sparse_attention` and `dense_attention` in `sala_sglang.reference.sparse`.

A block of a request is one KV page (page size = block_size). The CUDA kernel is
csrc/sparse_attention.cu; the Triton one is below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala_sglang.config import SparseConfig
from sala_sglang.ops.infllm_v2._triton import dense_token_arrays, group_heads
from sala_sglang.ops.infllm_v2.plan import SparsePlan, plan_for_call

OP = "block_sparse_attention"


def block_sparse_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    token_req: torch.Tensor,
    token_pos: torch.Tensor,
    token_sparse: torch.Tensor,
    selected: torch.Tensor,
    cfg: SparseConfig,
    scale: float,
    plan: SparsePlan | None = None,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Causal GQA attention of each query token over its selected blocks (sparse tokens) or over
    every block up to its own (dense tokens). q [T, Hq, D]; k/v_buffer [slots, G, D];
    selected [T, G, n_sel] (-1 = none) -> [T, Hq, D].

    plan: this forward's (`plan.make_plan`: kernel and split-K count); without one, `impl`
    ("cuda": an error where it cannot run, "triton", or None) and no split."""
    plan = plan_for_call(OP, plan, impl, cfg, q, tokens=q.shape[0], groups=k_buffer.shape[1],
                         n_sel=selected.shape[-1])
    token_req, token_pos, token_sparse = dense_token_arrays(token_req, token_pos, token_sparse)
    args = (q, k_buffer, v_buffer, req_to_token, token_req, token_pos, token_sparse, selected)
    splits = plan.cuda_attention_splits
    if plan.uses_cuda(OP, plan.attention, q,
                      lambda: cuda_unsupported(args, cfg.block_size, splits)):
        return torch.ops.sala_sglang.block_sparse_attention(*args, cfg.block_size, scale, splits)
    return _attention_triton(args, cfg, scale, plan.attention_splits)


# What csrc/sparse_attention.cu compiles; any other geometry runs the Triton kernel.
_CUDA_HEAD_DIMS = (64, 128)
_CUDA_MAX_GROUP = 16
_CUDA_KEY_CHUNK = 16  # block_size must be a multiple of it


def cuda_unsupported(tensors: tuple[torch.Tensor, ...], block_size: int,
                     num_splits: int) -> str | None:
    """Why torch.ops.sala_sglang.block_sparse_attention cannot take these arguments (`tensors`:
    block_sparse_attention's, q to selected, in order), or None. Mirrors the op's own checks
    (host-side attributes only: no device sync)."""
    q, k_buffer, v_buffer, req_to_token, token_req, token_pos, token_sparse, selected = tensors
    tokens, hq, dim = q.shape
    groups = k_buffer.shape[1]
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"q dtype {q.dtype} (bfloat16 or float16 compiled)"
    if dim not in _CUDA_HEAD_DIMS:
        return f"head dim {dim} (compiled: {_CUDA_HEAD_DIMS})"
    if hq % groups or hq // groups > _CUDA_MAX_GROUP:
        return f"{hq} query heads over {groups} kv heads (group size <= {_CUDA_MAX_GROUP})"
    if block_size <= 0 or block_size % _CUDA_KEY_CHUNK:
        return f"block_size {block_size} (a multiple of {_CUDA_KEY_CHUNK})"
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


# Launch shape of the Triton kernel (H100 sweep: benchmarks/kernels/sparse_attention.py).
ATTENTION_WARPS = 4
ATTENTION_STAGES = 3


@triton.jit
def _load_group_queries(q_ptr, t, g, stride_qt, stride_qh, HG: tl.constexpr, HGP: tl.constexpr,
                        D: tl.constexpr):
    heads = tl.arange(0, HGP)
    return tl.load(q_ptr + t.to(tl.int64) * stride_qt + (g * HG + heads)[:, None] * stride_qh
                   + tl.arange(0, D)[None, :], mask=(heads < HG)[:, None], other=0.0)


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


def _attention_triton(tensors: tuple[torch.Tensor, ...], cfg: SparseConfig, scale: float,
                      num_splits: int) -> torch.Tensor:
    q, k_buffer, v_buffer, req_to_token, token_req, token_pos, token_sparse, selected = tensors
    tokens, hq, dim = q.shape
    groups = k_buffer.shape[1]
    hg, hgp = group_heads(hq, groups)
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
        HG=hg, HGP=hgp, D=dim, BS=cfg.block_size, NSEL=n_sel,
        NSPLIT=num_splits, num_warps=ATTENTION_WARPS, num_stages=ATTENTION_STAGES,
    )
    if num_splits == 1:
        return out
    weights = torch.softmax(lse, dim=-1).nan_to_num_(0.0)
    return (out * weights[..., None]).sum(dim=2).to(q.dtype)
