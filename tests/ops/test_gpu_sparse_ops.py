"""InfLLM-v2 kernels on the GPU against the reference, with the released geometry (bf16).

Selection is discrete (SPEC section 4): every selected block must score at least the
reference's n_sel-th score minus a small tolerance; attention is compared given identical indices.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# the paged-cache builder is shared with benchmarks/kernels/sparse_attention.py
from sala_sglang.testing.paged_inputs import compressed_buffers, paged_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SCORE_TOL = 2e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


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


def test_token_tiles_spanning_two_requests_select_like_the_reference(released) -> None:
    """Prefill-shaped selection (no split-K, so tokens are tiled) over interleaved tokens of two
    requests: every tile that holds both must sweep each request's own compressed keys."""
    from sala_sglang.ops import sparse as ops
    from sala_sglang.reference import sparse as ref

    torch.manual_seed(1)
    cfg, dev, G, HQ, D = released, "cuda", 2, 32, 128
    lengths = [9000, 7001]
    rt, k_buf, _ = paged_cache(lengths, cfg.block_size, G, D, dev)
    k1, _ = compressed_buffers(k_buf, rt, lengths, cfg)
    treq = torch.tensor([1, 2, 1, 1, 2, 2, 2, 1, 2, 1, 1, 2, 1], dtype=torch.int32, device=dev)
    top = torch.tensor(lengths, device=dev)[treq.long() - 1]
    pos = (6144 + torch.rand(treq.numel(), device=dev) * (top - 6144)).int()
    q = torch.randn(treq.numel(), HQ, D, device=dev, dtype=torch.bfloat16)
    sel = ops.select_blocks(
        q, k1, rt, treq, pos, cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks,
        cfg.local_blocks, cfg.num_selected_blocks, max(lengths) // cfg.block_size + 1, D**-0.5,
    )
    assert (sel >= 0).all()
    for r, n in enumerate(lengths):
        mine = treq == r + 1
        # the reference scores the same stored (bf16) K1, so only the selection is under test
        start = torch.arange(cfg.num_k1(n), device=dev) * cfg.kernel_stride
        page = rt[r + 1, (start // cfg.block_size) * cfg.block_size].long() // cfg.block_size
        stored_k1 = k1[page, (start % cfg.block_size) // cfg.kernel_stride].double().cpu()
        scores = ref.block_scores(q[mine].double().cpu(), stored_k1, pos[mine].long().cpu(), cfg)
        nth = scores.sort(dim=-1, descending=True).values[..., cfg.num_selected_blocks - 1]
        chosen = scores.gather(-1, sel[mine].long().cpu())
        assert (chosen >= nth[..., None] * (1 - 1e-4)).all()


@pytest.mark.parametrize("sparse", [True, False])
def test_runs_of_tokens_sharing_blocks_attend_like_the_reference(released, sparse: bool) -> None:
    """Prefill-shaped attention (no split-K): neighbouring tokens' shared blocks go through the
    tiled kernel first; a run crossing block boundaries, plus a second request, must still match."""
    from sala_sglang.ops import sparse as ops
    from sala_sglang.reference import sparse as ref

    torch.manual_seed(2 + sparse)
    cfg, dev, G, HQ, D = released, "cuda", 2, 32, 128
    lengths = [9000, 7001]
    rt, k_buf, v_buf = paged_cache(lengths, cfg.block_size, G, D, dev)
    k1, _ = compressed_buffers(k_buf, rt, lengths, cfg)
    pos = torch.cat([torch.arange(8170, 8210), torch.arange(6990, 7001)]).int().to(dev)
    treq = torch.tensor([1] * 40 + [2] * 11, dtype=torch.int32, device=dev)
    q = torch.randn(pos.numel(), HQ, D, device=dev, dtype=torch.bfloat16)
    sel = ops.select_blocks(
        q, k1, rt, treq, pos, cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks,
        cfg.local_blocks, cfg.num_selected_blocks, max(lengths) // cfg.block_size + 1, D**-0.5,
    )
    mode = torch.full_like(pos, int(sparse))
    out = ops.block_sparse_attention(q, k_buf, v_buf, rt, treq, pos, mode, sel, cfg.block_size,
                                     D**-0.5)
    for r, n in enumerate(lengths):
        mine = (treq == r + 1).cpu()
        keys = k_buf[rt[r + 1, :n].long()].double().cpu()
        vals = v_buf[rt[r + 1, :n].long()].double().cpu()
        qs, ps = q.cpu()[mine].double(), pos.cpu()[mine].long()
        if sparse:
            expect = ref.sparse_attention(qs, keys, vals, ps, sel.cpu()[mine].long(),
                                          cfg.block_size, D**-0.5)
        else:
            expect = ref.dense_attention(qs, keys, vals, ps, D**-0.5)
        assert rel_err(out.cpu()[mine], expect) < 1e-2
