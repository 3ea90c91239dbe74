"""What our InfLLM-v2 ops are measured against, each behind one function that returns a
zero-argument callable (timed as is) or raises with the reason it is unavailable.

- Selection, OpenBMB's path as sgl_kernel 0.4.5 ships it: stage-1 scores (`infllm_ops` CUDA
  extension, or torch matmul + softmax + group sum, the path OpenBMB takes for decode), block
  max-pooling with forced blocks (`sgl_kernel.max_pooling_1d_varlen`), then `torch.topk`.
  sgl_kernel 0.4.5 has no InfLLM-v2 block-sparse attention kernel, only those two.
- Attention over the same selected blocks: FlashInfer's paged prefill kernel with one
  (token, kv head) pair per "request" whose page table lists exactly its selected pages.
- Dense attention on the same context ("no sparsity"): FlashInfer paged (fa2, fa3) and PyTorch's
  flash SDPA on a contiguous copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from sala_sglang.testing.paged_inputs import SparseInputs, request_k1

Runner = Callable[[], torch.Tensor]


# ---- selection -------------------------------------------------------------------------------
def contiguous_windows(inp: SparseInputs) -> torch.Tensor:
    """K1 of each request in window order, gathered out of the per-page buffer:
    [requests, n, G, D], the layout OpenBMB's kernels take."""
    n = inp.cfg.num_k1(inp.lengths[0])
    if any(inp.cfg.num_k1(length) != n for length in inp.lengths):
        raise ValueError("the selection anchors take requests of equal length")
    return torch.stack([request_k1(inp.k1, inp.rt, r + 1, length, inp.cfg)
                        for r, length in enumerate(inp.lengths)])


# OpenBMB's stage-1 also takes K2: windows this many times longer and further apart than K1's,
# which it uses to approximate the softmax normaliser. We keep no K2 (selection never reads it),
# so the anchor pools its own from the cached keys.
K2_SCALE = 4


def k2_windows(inp: SparseInputs) -> torch.Tensor:
    """OpenBMB's K2 of each request, [requests, n2, G, D] in the keys' dtype."""
    size, stride = K2_SCALE * inp.cfg.kernel_size, K2_SCALE * inp.cfg.kernel_stride
    return torch.stack([
        inp.request_keys(r)[0].unfold(0, size, stride).float().mean(-1).to(inp.k.dtype)
        for r in range(len(inp.lengths))
    ])


def infllm_stage1(inp: SparseInputs, k1c: torch.Tensor, k2c: torch.Tensor) -> Runner:
    """sgl_kernel's `infllmv2_attn_stage1` (prefill of one request) -> [G, T, n1] scores."""
    from sgl_kernel.infllm_v2 import infllmv2_attn_stage1
    from sgl_kernel.infllm_v2._loader import load_infllm_ops

    load_infllm_ops()  # raises with the loader's reason (e.g. a Python ABI mismatch)
    tokens, hq, _ = inp.q.shape
    hg = hq // k1c.shape[2]
    dev = inp.q.device
    cu = lambda n: torch.tensor([0, n], dtype=torch.int32, device=dev)  # noqa: E731
    return lambda: infllmv2_attn_stage1(
        inp.q, k1c[0], k2c[0], cu(tokens * hg), cu(k1c.shape[1]), cu(k2c.shape[1]),
        tokens * hg, inp.lengths[0] // inp.cfg.kernel_stride, causal=True,
    )


def torch_stage1(inp: SparseInputs, k1c: torch.Tensor, scale: float) -> Runner:
    """Stage-1 in torch: bf16 q . K1, fp32 softmax over visible windows, summed over the group's
    heads -> [G, T, context // stride] bf16, the input layout of the max-pooling kernel."""
    cfg = inp.cfg
    tokens, hq, dim = inp.q.shape
    requests, n1, groups, _ = k1c.shape
    hg = hq // groups
    cols = max(inp.lengths) // cfg.kernel_stride
    ends = cfg.kernel_stride * torch.arange(n1, device=inp.q.device) + cfg.kernel_size - 1
    rows = max(1, (1 << 27) // (hq * n1))  # bounds the fp32 [G, rows, hg, n1] temporaries
    decode = requests > 1  # one query per request

    def run() -> torch.Tensor:
        out = torch.zeros(groups, tokens, cols, dtype=torch.bfloat16, device=inp.q.device)
        for s in range(0, tokens, rows):
            qs = inp.q[s : s + rows].view(-1, groups, hg, dim)
            if decode:
                logits = torch.einsum("tghd,tcgd->gthc", qs, k1c[s : s + rows])
            else:
                logits = torch.einsum("tghd,cgd->gthc", qs, k1c[0])
            logits = logits.float().mul_(scale)
            hidden = ends[None, :] > inp.token_pos[s : s + rows, None]
            logits.masked_fill_(hidden[None, :, None, :], float("-inf"))
            probs = logits.softmax(dim=-1).nan_to_num_(0.0)
            out[:, s : s + rows, :n1] = probs.sum(dim=2)
        return out

    return run


def pool_and_topk(inp: SparseInputs, scores: Runner) -> Runner:
    """sgl_kernel's InfLLM-v2 block max-pooling (forced init + local blocks) and torch.topk,
    blocks after the query's own dropped afterwards as OpenBMB does -> [T, G, n_sel] int32."""
    from sgl_kernel.infllm_v2 import max_pooling_1d_varlen

    cfg = inp.cfg
    dev = inp.q.device
    tokens = inp.q.shape[0]
    requests = len(inp.lengths)
    n1 = cfg.num_k1(inp.lengths[0])
    if requests == 1:
        cu_q = torch.tensor([0, tokens], dtype=torch.int32, device=dev)
        cache = torch.tensor([inp.lengths[0] - tokens], dtype=torch.int32, device=dev)
        max_q = tokens
    else:
        cu_q = torch.arange(requests + 1, dtype=torch.int32, device=dev)
        cache = torch.tensor(inp.lengths, dtype=torch.int32, device=dev) - 1
        max_q = 1
    cu_k = torch.arange(requests + 1, dtype=torch.int32, device=dev) * n1
    qb = (inp.token_pos // cfg.block_size).long()

    def run() -> torch.Tensor:
        pooled = max_pooling_1d_varlen(
            scores(), cu_q, cu_k, cache, max_q, max(inp.lengths), cfg.local_blocks,
            cfg.init_blocks, cfg.block_size, cfg.kernel_stride,
        )
        idx = pooled.topk(cfg.num_selected_blocks, dim=-1).indices.transpose(0, 1)
        return torch.where(idx > qb[:, None, None], -1, idx).to(torch.int32)

    return run


# ---- attention -------------------------------------------------------------------------------
def use_prebuilt_flashinfer(aot_dir: Path | None) -> None:
    """Load FlashInfer kernels built ahead (`<dir>/<module>/<module>.so`) instead of compiling
    them on the GPU machine; never JIT-compile here (it would eat the benchmark's time)."""
    import os

    os.environ["FLASHINFER_DISABLE_JIT"] = "1"
    if aot_dir is not None:
        import flashinfer.jit.env as jit_env

        jit_env.FLASHINFER_AOT_DIR = aot_dir


def _flashinfer(backend: str, qo_indptr, kv_indptr, kv_indices, last_len, hq: int, hkv: int,
                dim: int, page: int, causal: bool, scale: float, q, cache) -> Runner:
    import flashinfer

    workspace = torch.empty(512 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, last_len, hq, hkv, dim, page, causal=causal,
                 sm_scale=scale, q_data_type=q.dtype, kv_data_type=cache[0].dtype)
    return lambda: wrapper.run(q, cache)


def flashinfer_sparse(inp: SparseInputs, selected: torch.Tensor, scale: float,
                      backend: str) -> Runner:
    """FlashInfer over exactly the selected blocks: (token, kv head) pair i is request i with its
    selected pages in ascending order (the query's own block last, partly visible)."""
    cfg = inp.cfg
    bs = cfg.block_size
    tokens, hq, dim = inp.q.shape
    groups = inp.k.shape[1]
    n_sel = selected.shape[-1]
    if (selected < 0).any():
        raise ValueError("the FlashInfer sparse anchor needs n_sel valid blocks per token")
    pages = inp.k.shape[0] // bs
    # one page per (page, kv head): [pages * G, bs, 1, D]
    cache = tuple(x.view(pages, bs, groups, dim).transpose(1, 2).reshape(pages * groups, bs, 1, dim)
                  for x in (inp.k, inp.v))
    blocks = selected.sort(dim=-1).values.long()
    page = inp.rt[inp.token_req.long()[:, None, None], blocks * bs].long() // bs
    indices = (page * groups + torch.arange(groups, device=page.device)[None, :, None])
    pairs = tokens * groups
    dev = inp.q.device
    indptr = torch.arange(pairs + 1, dtype=torch.int32, device=dev)
    last = (inp.token_pos % bs + 1).repeat_interleave(groups).to(torch.int32)
    q = inp.q.reshape(pairs, hq // groups, dim)
    run = _flashinfer(backend, indptr, indptr * n_sel, indices.reshape(-1).to(torch.int32), last,
                      hq // groups, 1, dim, bs, False, scale, q, cache)
    return lambda: run().view(tokens, hq, dim)


def flashinfer_dense(inp: SparseInputs, scale: float, backend: str) -> Runner:
    """FlashInfer paged attention of every query over its whole request (causal)."""
    bs = inp.cfg.block_size
    tokens, hq, dim = inp.q.shape
    groups = inp.k.shape[1]
    dev = inp.q.device
    requests = len(inp.lengths)
    n_pages = [-(-n // bs) for n in inp.lengths]
    indices = torch.cat([inp.rt[r + 1, : n_pages[r] * bs : bs] // bs for r in range(requests)])
    kv_indptr = torch.tensor([0] + n_pages, device=dev).cumsum(0).to(torch.int32)
    per_req = tokens // requests
    qo_indptr = torch.arange(requests + 1, dtype=torch.int32, device=dev) * per_req
    last = torch.tensor([n - bs * (p - 1) for n, p in zip(inp.lengths, n_pages)],
                        dtype=torch.int32, device=dev)
    pages = inp.k.shape[0] // bs
    cache = (inp.k.view(pages, bs, groups, dim), inp.v.view(pages, bs, groups, dim))
    return _flashinfer(backend, qo_indptr, kv_indptr, indices.to(torch.int32), last, hq, groups,
                       dim, bs, True, scale, inp.q, cache)


def sdpa_dense(inp: SparseInputs, scale: float) -> Runner:
    """PyTorch's flash SDPA (FlashAttention-2) on contiguous K/V, causal aligned to the last key
    (aten's flash op aligns bottom-right), GQA native where the build allows."""
    tokens, hq, dim = inp.q.shape
    requests = len(inp.lengths)
    kv = [torch.stack([inp.request_keys(r)[i] for r in range(requests)]).transpose(1, 2)
          for i in (0, 1)]  # [R, G, L, D]
    q = inp.q.view(requests, tokens // requests, hq, dim).transpose(1, 2)

    def run() -> torch.Tensor:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, kv[0], kv[1], 0.0, True, False, scale=scale
        )[0]
        return out.transpose(1, 2).reshape(tokens, hq, dim)

    try:
        run()
    except RuntimeError:  # no native GQA in this build: give every query head its own K/V copy
        if kv[0].numel() * kv[0].element_size() * hq // kv[0].shape[1] > 8 << 30:
            raise
        kv = [x.repeat_interleave(hq // x.shape[1], dim=1) for x in kv]
    return run
