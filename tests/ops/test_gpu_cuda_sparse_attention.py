"""The CUDA block-sparse attention op (`sala_sglang._C`, csrc/sparse_attention.cu) against the
float64 reference (`sala_sglang.reference.sparse`) and its Triton twin, on paged caches: both
geometries, bf16 and fp16, awkward token counts, sparse and dense tokens of several requests in
one batch, -1 entries, decode shapes with split-K, CUDA graphs, and the Python dispatch.

A failure message names the worst tokens (request, position, mode, blocks) to diagnose from one run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cuda_extension import ON_GPU, needs_extension

# the paged-cache builder is shared with benchmarks/kernels/sparse_attention.py
from sala_sglang.testing.paged_inputs import paged_cache

pytestmark = ON_GPU

# Relative error against the float64 reference (SPEC section 4: bf16 inputs 1e-3 to 1e-2).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Geometry:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    n_sel: int


RELEASED = Geometry("released", 32, 2, 128, 64, 96)
TINY = Geometry("tiny", 8, 2, 64, 16, 6)
GEOMETRIES = [RELEASED, TINY]


@dataclass
class Batch:
    geo: Geometry
    lengths: list[int]  # request r (0-based) is row r + 1 of rt
    rt: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor
    token_req: torch.Tensor
    token_pos: torch.Tensor
    token_sparse: torch.Tensor
    selected: torch.Tensor

    @property
    def scale(self) -> float:
        return self.geo.head_dim**-0.5

    def run(self, impl: str, num_splits: int = 1, selected: torch.Tensor | None = None):
        from sala_sglang.ops.sparse import block_sparse_attention

        return block_sparse_attention(
            self.q, self.k, self.v, self.rt, self.token_req, self.token_pos, self.token_sparse,
            self.selected if selected is None else selected, self.geo.block_size, self.scale,
            num_splits=num_splits, impl=impl,
        )

    def reference(self) -> torch.Tensor:
        """Float64 on the CPU, token by token group of (request, mode)."""
        from sala_sglang.reference import sparse as ref

        q = self.q.double().cpu()
        req = self.token_req.cpu().long()
        pos = self.token_pos.cpu().long()
        mode = self.token_sparse.cpu().bool()
        sel = self.selected.cpu().long()
        out = torch.zeros(q.shape, dtype=torch.float64)
        for r, n in enumerate(self.lengths):
            idx = self.rt[r + 1, :n].long()
            keys, vals = self.k[idx].double().cpu(), self.v[idx].double().cpu()
            for sparse in (True, False):
                mine = (req == r + 1) & (mode == sparse)
                if not mine.any():
                    continue
                if sparse:
                    out[mine] = ref.sparse_attention(q[mine], keys, vals, pos[mine], sel[mine],
                                                     self.geo.block_size, self.scale)
                else:
                    out[mine] = ref.dense_attention(q[mine], keys, vals, pos[mine], self.scale)
        return out

    def describe(self, t: int) -> str:
        blocks = self.selected[t].tolist() if self.token_sparse[t] else "all"
        return (f"token {t}: req {int(self.token_req[t])} pos {int(self.token_pos[t])} "
                f"{'sparse' if self.token_sparse[t] else 'dense'} blocks {blocks}")


def make_batch(geo: Geometry, lengths: list[int], token_req: list[int], token_pos: list[int],
               token_sparse: list[bool], dtype: torch.dtype, seed: int,
               n_sel: int | None = None) -> Batch:
    """Paged cache of `lengths`, tokens given by request (0-based) / position / mode. Each sparse
    (token, kv head) selects a random number of distinct blocks of its request, any of them
    possibly after its own block (masked by causality), in random order with -1 entries between."""
    torch.manual_seed(seed)
    dev = "cuda"
    bs = geo.block_size
    n_sel = n_sel or geo.n_sel
    rt, k, v = paged_cache(lengths, bs, geo.kv_heads, geo.head_dim, dev, dtype=dtype)
    tokens = len(token_req)
    q = torch.randn(tokens, geo.q_heads, geo.head_dim, device=dev, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    selected = torch.full((tokens, geo.kv_heads, n_sel), -1, dtype=torch.int32)
    for t, (r, p) in enumerate(zip(token_req, token_pos)):
        blocks = -(-lengths[r] // bs)
        for g in range(geo.kv_heads):
            # mostly blocks at or before the query's own, which is what selection produces
            own = p // bs + 1
            pool = own if torch.rand(1, generator=gen).item() < 0.7 else blocks
            chosen = torch.randperm(pool, generator=gen)[: min(n_sel, pool)]
            count = int(torch.randint(1, chosen.numel() + 1, (1,), generator=gen))
            where = torch.randperm(n_sel, generator=gen)[:count]
            selected[t, g, where] = chosen[:count].int()
    return Batch(
        geo, lengths, rt, k, v, q,
        torch.tensor([r + 1 for r in token_req], dtype=torch.int32, device=dev),
        torch.tensor(token_pos, dtype=torch.int32, device=dev),
        torch.tensor([int(s) for s in token_sparse], dtype=torch.int32, device=dev),
        selected.to(dev),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close(batch: Batch, out: torch.Tensor, ref: torch.Tensor, tol: float, what: str):
    err = rel_err(out, ref)
    if err < tol:
        return
    out, ref = out.double().cpu(), ref.double().cpu()
    per_token = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-30)
    per_token = torch.where(torch.isfinite(out).flatten(1).all(1), per_token, float("inf"))
    worst = per_token.argsort(descending=True)[:5].tolist()
    lines = [f"  {batch.describe(t)}: rel err {float(per_token[t]):.3g}" for t in worst]
    heads = (out - ref).abs().amax(dim=(0, 2))
    pytest.fail(f"{what}: rel err {err:.4g} >= {tol} ({batch.geo.name}, {out.shape[0]} tokens, "
                f"lengths {batch.lengths}); max |diff| per head {heads.tolist()}; worst:\n"
                + "\n".join(lines))


def prefill_batch(geo: Geometry, tokens: int, dtype: torch.dtype, seed: int) -> Batch:
    """Tokens of three requests (lengths not multiples of the block size, one shorter than a
    block), positions anywhere in their request, interleaved, ~2/3 sparse."""
    bs = geo.block_size
    lengths = [37 * bs + 5, 9 * bs + 1, bs - 3] if geo is RELEASED else [150 * bs + 7, 61, 11]
    gen = torch.Generator().manual_seed(seed + 1)
    req = torch.randint(0, len(lengths), (tokens,), generator=gen).tolist()
    pos = [int(torch.randint(0, lengths[r], (1,), generator=gen)) for r in req]
    if tokens >= 7:  # the edges: a request's first and last key, a block's first and last key
        pos[:4] = [0, lengths[req[1]] - 1, bs - 1, bs]
        for i, p in enumerate(pos[:4]):
            if p >= lengths[req[i]]:
                pos[i] = lengths[req[i]] - 1
    sparse = (torch.rand(tokens, generator=gen) < 0.67).tolist()
    return make_batch(geo, lengths, req, pos, sparse, dtype, seed)


@needs_extension
@pytest.mark.parametrize("tokens", [1, 7, 333])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g.name for g in GEOMETRIES])
def test_prefill_batch_matches_reference_and_triton(geo: Geometry, dtype: torch.dtype,
                                                    tokens: int) -> None:
    batch = prefill_batch(geo, tokens, dtype, seed=tokens)
    out = batch.run("cuda")
    assert out.shape == batch.q.shape and out.dtype == dtype
    ref = batch.reference()
    assert_close(batch, out, ref, TOLERANCE[dtype], "cuda vs float64 reference")
    assert_close(batch, out, batch.run("triton"), TOLERANCE[dtype], "cuda vs triton")


@needs_extension
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("batch_size", [1, 8, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g.name for g in GEOMETRIES])
def test_decode_with_splits_matches_reference_and_triton(geo: Geometry, dtype: torch.dtype,
                                                         batch_size: int, splits: int) -> None:
    """One query per request at its last position (its own key cached), as decode runs."""
    gen = torch.Generator().manual_seed(batch_size * 10 + splits)
    top = 8000 if geo is RELEASED else 1500
    lengths = torch.randint(1, top, (batch_size,), generator=gen).tolist()
    sparse = [i % 4 != 3 for i in range(batch_size)]  # every fourth request still dense
    batch = make_batch(geo, lengths, list(range(batch_size)), [n - 1 for n in lengths], sparse,
                       dtype, seed=batch_size + splits)
    out = batch.run("cuda", num_splits=splits)
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert_close(batch, out, batch.reference(), TOLERANCE[dtype], "cuda vs float64 reference")
    assert_close(batch, out, batch.run("triton", num_splits=splits), TOLERANCE[dtype],
                 "cuda vs triton")


@needs_extension
@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g.name for g in GEOMETRIES])
def test_split_count_changes_nothing_but_rounding(geo: Geometry) -> None:
    """More splits than a token has blocks leaves empty splits, which must weigh nothing."""
    batch = prefill_batch(geo, 40, torch.float16, seed=5)
    one = batch.run("cuda", num_splits=1)
    for splits in (2, 8, 200):
        assert_close(batch, batch.run("cuda", num_splits=splits), one, 2e-3,
                     f"{splits} splits vs 1")


@needs_extension
@pytest.mark.parametrize("splits", [1, 4])
def test_tokens_that_see_no_key_output_zeros(splits: int) -> None:
    """Every entry -1, or every selected block after the query's: zeros, as Triton writes."""
    geo = TINY
    batch = make_batch(geo, [300, 300], [0, 1, 0], [40, 299, 15], [True, True, True],
                       torch.bfloat16, seed=3)
    selected = batch.selected.clone()
    selected[0] = -1
    selected[2] = -1
    selected[2, :, 0] = 5  # block 5 starts at key 80 > position 15
    out = batch.run("cuda", num_splits=splits, selected=selected)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    triton = batch.run("triton", num_splits=splits, selected=selected)
    assert torch.equal(triton[0], out[0]) and torch.equal(triton[2], out[2])
    assert rel_err(out[1], triton[1]) < TOLERANCE[torch.bfloat16]


@needs_extension
@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g.name for g in GEOMETRIES])
def test_dense_batch_with_placeholder_selection(geo: Geometry) -> None:
    """The backend passes a [T, 1, 1] all -1 selection when no token is sparse."""
    bs = geo.block_size
    lengths = [20 * bs + 3, 2 * bs]
    batch = make_batch(geo, lengths, [0, 0, 1, 0], [0, 20 * bs + 2, 2 * bs - 1, 7 * bs],
                       [False] * 4, torch.bfloat16, seed=4)
    none = torch.full((4, 1, 1), -1, dtype=torch.int32, device="cuda")
    for splits in (1, 8):
        out = batch.run("cuda", num_splits=splits, selected=none)
        assert_close(batch, out, batch.reference(), TOLERANCE[torch.bfloat16],
                     f"dense, {splits} splits")


@needs_extension
@pytest.mark.parametrize("splits", [1, 2])
def test_long_block_lists_span_several_table_fills(splits: int) -> None:
    """The op resolves at most 256 blocks per split at a time (kItemCap in
    csrc/sparse_attention.cu): dense tokens far into a long request and sparse tokens with a
    long selection need several fills; positions sit on either side of a fill's edge."""
    geo = TINY
    bs = geo.block_size
    lengths = [600 * bs + 9]
    # 70 tokens x 2 kv heads leave the op no room to raise 2 splits (it targets 2 CTAs per SM)
    pos = [256 * bs - 1, 256 * bs, 512 * bs + 3, 600 * bs + 8, 600 * bs + 8, 300 * bs, 5] * 10
    sparse = [False, False, False, False, True, True, True] * 10
    batch = make_batch(geo, lengths, [0] * len(pos), pos, sparse, torch.bfloat16, seed=11,
                       n_sel=700)
    out = batch.run("cuda", num_splits=splits)
    assert_close(batch, out, batch.reference(), TOLERANCE[torch.bfloat16],
                 f"long lists, {splits} splits, cuda vs float64 reference")
    assert_close(batch, out, batch.run("triton", num_splits=splits), TOLERANCE[torch.bfloat16],
                 f"long lists, {splits} splits, cuda vs triton")


@needs_extension
def test_strided_query_view_reads_like_a_contiguous_one() -> None:
    geo = RELEASED
    batch = prefill_batch(geo, 9, torch.bfloat16, seed=6)
    fused = torch.randn(9, 3 * geo.q_heads, geo.head_dim, device="cuda", dtype=torch.bfloat16)
    view = fused[:, geo.q_heads : 2 * geo.q_heads]
    assert not view.is_contiguous()
    batch.q = view
    strided = batch.run("cuda")
    batch.q = view.contiguous()
    assert torch.equal(strided, batch.run("cuda"))


@needs_extension
def test_auto_dispatch_takes_cuda_where_supported_and_triton_elsewhere(monkeypatch) -> None:
    from sala_sglang.ops import sparse as ops

    batch = prefill_batch(TINY, 7, torch.bfloat16, seed=7)
    monkeypatch.setitem(ops.CUDA_FASTER, "block_sparse_attention", True)
    assert torch.equal(batch.run(None), batch.run("cuda"))
    monkeypatch.setitem(ops.CUDA_FASTER, "block_sparse_attention", False)
    assert torch.equal(batch.run(None), batch.run("triton"))
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda")
    assert torch.equal(batch.run(None), batch.run("cuda"))
    monkeypatch.delenv("SALA_SGLANG_KERNELS")
    # a group of 32 query heads is not compiled: auto falls back, "cuda" refuses
    wide = Geometry("wide", 64, 2, 64, 16, 6)
    wide_batch = make_batch(wide, [100], [0, 0], [50, 99], [True, False], torch.bfloat16, seed=8)
    assert torch.equal(wide_batch.run(None), wide_batch.run("triton"))
    with pytest.raises(ValueError, match="group size"):
        wide_batch.run("cuda")
    with pytest.raises(ValueError, match="impl="):
        batch.run("cutlass")
    why = ops.cuda_attention_unsupported(batch.q, batch.k, batch.v, batch.rt, batch.token_req,
                                         batch.token_pos, batch.token_sparse, batch.selected,
                                         24, 1)
    assert why is not None and "block_size" in why


@needs_extension
def test_decode_replays_in_a_cuda_graph() -> None:
    geo = RELEASED
    lengths = [4000, 130, 7777, 64]
    batch = make_batch(geo, lengths, [0, 1, 2, 3], [n - 1 for n in lengths], [True] * 4,
                       torch.bfloat16, seed=9)
    op = torch.ops.sala_sglang.block_sparse_attention

    def call():
        return op(batch.q, batch.k, batch.v, batch.rt, batch.token_req, batch.token_pos,
                  batch.token_sparse, batch.selected, geo.block_size, batch.scale, 8)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for seed in (1, 2):
        torch.manual_seed(seed)
        batch.q.copy_(torch.randn_like(batch.q))
        graph.replay()
        assert torch.equal(out, call())


@needs_extension
def test_op_registration_passes_opcheck() -> None:
    batch = prefill_batch(TINY, 7, torch.bfloat16, seed=10)
    args = (batch.q, batch.k, batch.v, batch.rt, batch.token_req, batch.token_pos,
            batch.token_sparse, batch.selected, TINY.block_size, batch.scale, 3)
    torch.library.opcheck(torch.ops.sala_sglang.block_sparse_attention.default, args)
