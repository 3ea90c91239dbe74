"""InfLLM-v2 kernels on the GPU against the reference, with the released geometry (bf16).

Selection is discrete (SPEC section 4): every selected block must score at least the
reference's n_sel-th score minus a small tolerance; attention is compared given identical indices.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SCORE_TOL = 2e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def paged_cache(lengths: list[int], block: int, groups: int, dim: int, dev: str):
    pages = sum(math.ceil(n / block) for n in lengths) + 3
    perm = torch.randperm(pages, device=dev) + 1
    rt = torch.zeros(len(lengths) + 1, max(lengths) + block, dtype=torch.int32, device=dev)
    used = 0
    for r, n in enumerate(lengths):
        own = perm[used : used + math.ceil(n / block)]
        used += own.numel()
        pos = torch.arange(n, device=dev)
        rt[r + 1, :n] = (own[pos // block] * block + pos % block).to(torch.int32)
    k = torch.randn((pages + 2) * block, groups, dim, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return rt, k, v


@pytest.fixture(scope="module")
def released():
    from sala_sglang.config import MiniCPMSALAConfig

    return MiniCPMSALAConfig().sparse


def test_compression_selection_and_attention_match_reference(released) -> None:
    from sala_sglang.ops import sparse as ops
    from sala_sglang.reference import sparse as ref

    torch.manual_seed(0)
    cfg, dev, G, HQ, D = released, "cuda", 2, 32, 128
    lengths = [9000, 7001]
    rt, k_buf, v_buf = paged_cache(lengths, cfg.block_size, G, D, dev)
    slots = torch.tensor([1, 2], dtype=torch.int32, device=dev)
    pages = k_buf.shape[0] // cfg.block_size
    k1 = torch.zeros(pages, cfg.windows_per_block, G, D, dtype=torch.bfloat16, device=dev)
    for old, new in (([0, 0], [5000, 3333]), ([5000, 3333], lengths)):
        ops.compress_new_windows(
            k_buf, k1, rt, slots, torch.tensor(old, device=dev), torch.tensor(new, device=dev),
            cfg.kernel_size, cfg.kernel_stride, cfg.block_size, max_new_windows=400,
        )
    keys = k_buf[rt[1, : lengths[0]].long()].double().cpu()
    vals = v_buf[rt[1, : lengths[0]].long()].double().cpu()
    ref_k1 = ref.compress_keys(keys, cfg.kernel_size, cfg.kernel_stride)
    c = torch.arange(ref_k1.shape[0])
    page = rt[1, (c * cfg.kernel_stride // cfg.block_size) * cfg.block_size].long().cpu() // cfg.block_size
    got_k1 = k1[page.to(dev), (c * cfg.kernel_stride % cfg.block_size) // cfg.kernel_stride]
    assert rel_err(got_k1.cpu(), ref_k1) < 1e-2

    pos = torch.tensor([6143, 6144, 6200, 7000, 8191, 8999], dtype=torch.int32, device=dev)
    q = torch.randn(pos.numel(), HQ, D, device=dev, dtype=torch.bfloat16)
    treq = torch.ones_like(pos)
    width = lengths[0] // cfg.block_size + 1
    sel = ops.select_blocks(
        q, k1, rt, treq, pos, cfg.kernel_size, cfg.kernel_stride, cfg.block_size,
        cfg.init_blocks, cfg.local_blocks, cfg.num_selected_blocks, width, D**-0.5, num_splits=4,
    )
    scores = ref.block_scores(q.double().cpu(), ref_k1, pos.long().cpu(), cfg)
    ref_sel = ref.select_blocks(scores, cfg.num_selected_blocks)
    nth = scores.sort(dim=-1, descending=True).values[..., cfg.num_selected_blocks - 1]
    chosen = scores.gather(-1, sel.long().cpu().clamp(min=0))
    assert (sel >= 0).all()
    assert (chosen >= nth[..., None] - SCORE_TOL).all()

    ones = torch.ones_like(pos)
    out = ops.block_sparse_attention(
        q, k_buf, v_buf, rt, treq, pos, ones, ref_sel.to(dev, torch.int32), cfg.block_size, D**-0.5
    )
    expect = ref.sparse_attention(q.double().cpu(), keys, vals, pos.long().cpu(), ref_sel,
                                  cfg.block_size, D**-0.5)
    assert rel_err(out.cpu(), expect) < 1e-2


@pytest.mark.parametrize("splits", [1, 8])
def test_dense_mode_attends_to_every_block(released, splits: int) -> None:
    from sala_sglang.ops import sparse as ops
    from sala_sglang.reference import sparse as ref

    torch.manual_seed(splits)
    cfg, dev, G, HQ, D = released, "cuda", 2, 32, 128
    rt, k_buf, v_buf = paged_cache([8000], cfg.block_size, G, D, dev)
    pos = torch.tensor([0, 63, 64, 5000, 7999], dtype=torch.int32, device=dev)
    q = torch.randn(pos.numel(), HQ, D, device=dev, dtype=torch.bfloat16)
    treq = torch.ones_like(pos)
    none = torch.full((pos.numel(), G, 1), -1, dtype=torch.int32, device=dev)
    out = ops.block_sparse_attention(q, k_buf, v_buf, rt, treq, pos, torch.zeros_like(pos), none,
                                     cfg.block_size, D**-0.5, num_splits=splits)
    keys = k_buf[rt[1, :8000].long()].double().cpu()
    vals = v_buf[rt[1, :8000].long()].double().cpu()
    expect = ref.dense_attention(q.double().cpu(), keys, vals, pos.long().cpu(), D**-0.5)
    assert rel_err(out.cpu(), expect) < 1e-2
