"""The Lightning layer's q and k (SPEC 2.1 step 2) in one launch: per-head RMSNorm, then RoPE.

q and k are read where the qkv projection left them (row-strided slices of its output) and
written once, contiguous [T, H, D], normalised and rotated (NeoX rotate-half over the whole head)
in fp32, the normalised value rounded to the model's dtype in between as a separate norm would
leave it, so the layer makes no copy, norm or rotation pass of its own.

The angles come from SGLang's RoPE table (`RotaryEmbedding.cos_sin_cache` [positions, D]: the
cosines of the D/2 frequencies, then their sines), the table SGLang's own RoPE kernel reads. On
CUDA SGLang keeps it in fp32, computed once by PyTorch in fp32 as SPEC 2.1 asks, so the served
rotation is the one SGLang applied before this op, and the kernel evaluates no trigonometry (an
fp32 sin/cos in the kernel would have to be exact for angles up to 5e5 radians).
Reference twin: `sala_sglang.reference.lightning.lightning_qk_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program (16 heads of 128, 32 of 64): a 32-head layer's token spreads over four
# programs (two for q, two for k), so a one-token decode step is not left to a single SM, and an
# 8192-token chunk still runs 32K programs of 4 KB (bf16) each.
_BLOCK_ELEMENTS = 2048


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, q_weight_ptr, k_weight_ptr, pos_ptr, cos_sin_ptr,
    eps,
    stride_q, stride_k,  # rows of q and k: [T, H * D], heads one after another, contiguous
    stride_cs,  # rows of the table: [positions, D], cos in [0, D/2), sin in [D/2, D)
    H: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    HALF: tl.constexpr = D // 2
    j = tl.arange(0, HALF)
    if tl.program_id(2) == 0:
        src = q_ptr + token * stride_q
        dst = q_out_ptr + token * (H * D)
        w_ptr = q_weight_ptr
    else:
        src = k_ptr + token * stride_k
        dst = k_out_ptr + token * (H * D)
        w_ptr = k_weight_ptr
    # the two halves of every head as separate tiles: rotate-half pairs element j with j + D/2
    offs = heads[:, None] * D + j[None, :]
    live = (heads < H)[:, None]
    x1 = tl.load(src + offs, mask=live, other=0.0).to(ACC)
    x2 = tl.load(src + offs + HALF, mask=live, other=0.0).to(ACC)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x1 * x1 + x2 * x2, axis=1) / D + eps)
    # the normalised head rounded to the output dtype before it turns, as the reference (SPEC
    # 2.1 step 2: a norm, then RoPE, each returning the model's dtype) and SGLang's separate norm
    # and RoPE kernels round it: skipped, a third of fp16 outputs differ from theirs by an ulp,
    # which 24 layers' recurrences carry to every later position
    out_ty = dst.dtype.element_ty
    x1 = (x1 * inv_rms[:, None] * tl.load(w_ptr + j).to(ACC)[None, :]).to(out_ty).to(ACC)
    x2 = (x2 * inv_rms[:, None] * tl.load(w_ptr + HALF + j).to(ACC)[None, :]).to(out_ty).to(ACC)
    row = cos_sin_ptr + tl.load(pos_ptr + token).to(tl.int64) * stride_cs
    cos = tl.load(row + j).to(ACC)[None, :]
    sin = tl.load(row + HALF + j).to(ACC)[None, :]
    tl.store(dst + offs, (x1 * cos - x2 * sin).to(out_ty), mask=live)
    tl.store(dst + offs + HALF, (x2 * cos + x1 * sin).to(out_ty), mask=live)


def lightning_qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [T, H*D] (any row stride, unit stride within a row); q_weight, k_weight [D]; positions
    [T] integers, each below the table's length; cos_sin_cache [positions, D] (SGLang's
    `rotary_emb.cos_sin_cache`). Returns q, k [T, H, D] contiguous in q's dtype: each head
    RMS-normalised with its weight (eps), then rotated by its token's position. Math in fp32
    (fp64 for fp64 inputs)."""
    dim = q_weight.shape[-1]
    if q_weight.shape != (dim,) or k_weight.shape != (dim,) or dim < 2 or dim & (dim - 1):
        raise ValueError(f"lightning_qk_norm_rope: q_weight {tuple(q_weight.shape)}, k_weight "
                         f"{tuple(k_weight.shape)}: expected both [D], D a power of two >= 2")
    if q.dim() != 2 or k.shape != q.shape or q.shape[1] % dim or k.dtype != q.dtype:
        raise ValueError(f"lightning_qk_norm_rope: q {q.dtype} {tuple(q.shape)}, k {k.dtype} "
                         f"{tuple(k.shape)}: expected both [T, H * {dim}] of one dtype")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"lightning_qk_norm_rope: q strides {q.stride()}, k strides "
                         f"{k.stride()}: expected unit stride in the last dimension")
    tokens, heads = q.shape[0], q.shape[1] // dim
    if positions.shape != (tokens,) or positions.dtype.is_floating_point:
        raise ValueError(f"lightning_qk_norm_rope: positions {positions.dtype} "
                         f"{tuple(positions.shape)}: expected integers [{tokens}]")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != dim or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"lightning_qk_norm_rope: cos_sin_cache {tuple(cos_sin_cache.shape)} "
                         f"strides {cos_sin_cache.stride()}: expected [positions, {dim}] with "
                         "unit stride in its last dimension")
    q_out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty_like(q_out)
    if tokens == 0:
        return q_out, k_out
    block = min(triton.next_power_of_2(heads), max(1, _BLOCK_ELEMENTS // dim))
    _qk_norm_rope_kernel[(tokens, triton.cdiv(heads, block), 2)](
        q, k, q_out, k_out, q_weight.contiguous(), k_weight.contiguous(), positions.contiguous(),
        cos_sin_cache,
        eps,
        q.stride(0), k.stride(0), cos_sin_cache.stride(0),
        H=heads, D=dim, BH=block, ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
    )
    return q_out, k_out
