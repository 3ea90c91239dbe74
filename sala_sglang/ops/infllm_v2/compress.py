"""K1 key compression over SGLang's paged KV cache (SPEC 2.2 step 1); reference twin
`sala_sglang.reference.sparse.compress_keys`.

Layout. The KV pool is paged with page size = block_size, so block b of a request is one page:
`page = req_to_token[req, b * block_size] // block_size`, its tokens contiguous from
`page * block_size`. Compressed key c (window `[stride * c, stride * c + kernel_size)`) lives beside
the page of its window's LAST token `e = stride * c + kernel_size - 1`:
`k1[req_to_token[req, (e // block_size) * block_size] // block_size, (e % block_size) // stride,
kv_head, :]` (`SparseConfig.k1_home`). Every row of a page then depends only on tokens of that page
and earlier ones, so a request that extends a shared (prefix-cached) page-aligned prefix writes only
into its own pages. Rows per page stay block_size / stride (kernel_size is a multiple of stride, so
`e % stride == stride - 1`); on the released config windows 4p-1 .. 4p+2 live in page p, and row 0
of a request's first page is never written. Compressed keys are freed and reused with their pages,
and cost 1/stride of K per token.

The CUDA kernel is csrc/sparse_compress.cu; the Triton one is below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala_sglang.config import SparseConfig
from sala_sglang.ops.infllm_v2._triton import dense_token_arrays, page_of_window
from sala_sglang.ops.infllm_v2.plan import SparsePlan, plan_for_call

OP = "compress_new_windows"


def compress_new_windows(
    k_buffer: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_slots: torch.Tensor,
    old_lens: torch.Tensor,
    new_lens: torch.Tensor,
    cfg: SparseConfig,
    max_new_windows: int,
    plan: SparsePlan | None = None,
    *,
    impl: str | None = None,
) -> None:
    """Write the K1 windows that complete as requests grow from old_lens to new_lens keys.

    k_buffer [slots, G, D]; out [pages, block_size / kernel_stride, G, D]; req_slots, old_lens,
    new_lens [B]; max_new_windows bounds the new windows of any request (grid size).
    plan: this forward's (`plan.make_plan`); without one, `impl` ("cuda": an error where it
    cannot run, "triton", or None: the measured choice) decides."""
    plan = plan_for_call(OP, plan, impl, cfg, k_buffer, groups=k_buffer.shape[1])
    index = dense_token_arrays(req_slots, old_lens, new_lens)
    use_cuda = plan.uses_cuda(OP, plan.compress, k_buffer,
                              lambda: cuda_unsupported(k_buffer, out, req_to_token, index, cfg))
    if max_new_windows <= 0 or req_slots.numel() == 0:
        return
    if use_cuda:
        torch.ops.sala_sglang.compress_new_windows(
            k_buffer, out, req_to_token, *index, cfg.kernel_size, cfg.kernel_stride,
            cfg.block_size, max_new_windows,
        )
    else:
        _compress_triton(k_buffer, out, req_to_token, index, cfg, max_new_windows)


def num_windows(lengths: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Complete windows over `lengths` keys (device tensor in, device tensor out)."""
    return torch.where(lengths >= kernel_size, (lengths - kernel_size) // stride + 1, 0)


# What csrc/sparse_compress.cu compiles; other geometries and dtypes take the Triton kernel.
_CUDA_HEAD_DIMS = (64, 128)
_CUDA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CUDA_PIECE = 8  # keys summed per thread: stride and kernel_size are multiples of it
_CUDA_MAX_KERNEL = 256  # keeps one run of windows within the kernel's shared memory
_INDEX_DTYPES = (torch.int32, torch.int64)


def cuda_unsupported(
    k_buffer: torch.Tensor, out: torch.Tensor, req_to_token: torch.Tensor,
    index: tuple[torch.Tensor, ...], cfg: SparseConfig,
) -> str | None:
    """Why the CUDA kernel cannot take these arguments, or None when it can (host metadata
    only: no device sync)."""
    kernel_size, stride = cfg.kernel_size, cfg.kernel_stride
    piece, most = _CUDA_PIECE, _CUDA_MAX_KERNEL
    if kernel_size % stride or stride % piece or kernel_size > most:
        return (f"kernel_size {kernel_size} / stride {stride}: needs stride a multiple of "
                f"{piece} and kernel_size a multiple of stride, at most {most}")
    if k_buffer.dim() != 3 or k_buffer.shape[2] not in _CUDA_HEAD_DIMS:
        return f"k_buffer {tuple(k_buffer.shape)}: head dim not in {_CUDA_HEAD_DIMS}"
    if k_buffer.dtype not in _CUDA_DTYPES or out.dtype != k_buffer.dtype:
        return f"k_buffer {k_buffer.dtype}, out {out.dtype}: need equal bf16, fp16 or fp32"
    if kernel_size < stride:
        return f"kernel_size {kernel_size} < stride {stride}"
    rows = -(-cfg.block_size // stride)
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
        page, sub = page_of_window(rt_row, c, KL, KS, BS, True)
        tl.store(out_ptr + page * stride_op + sub * stride_os + g * stride_og + dims,
                 mean.to(out_ptr.dtype.element_ty))


def _compress_triton(
    k_buffer: torch.Tensor, out: torch.Tensor, req_to_token: torch.Tensor,
    index: tuple[torch.Tensor, ...], cfg: SparseConfig, max_new_windows: int,
) -> None:
    req_slots, old_lens, new_lens = index
    kernel_size, stride = cfg.kernel_size, cfg.kernel_stride
    lo = num_windows(old_lens, kernel_size, stride).to(torch.int32)
    hi = num_windows(new_lens, kernel_size, stride).to(torch.int32)
    groups, dim = k_buffer.shape[1], k_buffer.shape[2]
    grid = (req_slots.numel(), max_new_windows, groups)
    _compress_kernel[grid](
        k_buffer, out, req_to_token, req_slots, lo, hi,
        k_buffer.stride(0), k_buffer.stride(1), out.stride(0), out.stride(1), out.stride(2),
        req_to_token.stride(0),
        KL=kernel_size, KS=stride, BS=cfg.block_size, D=dim,
        KLP=triton.next_power_of_2(kernel_size),
    )
