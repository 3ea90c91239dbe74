"""Block-sparse attention (`block_sparse_attention`) by implementation against the float64
reference (`sparse_attention`, `dense_attention` of sala_sglang.reference.sparse) on paged caches:
both geometries, awkward token counts, sparse and dense tokens of several requests in one batch,
-1 entries, decode shapes with split-K (the count the plan gives each implementation); CUDA also
against its Triton twin, in CUDA graphs and through the dispatch. Without a GPU the Triton kernel
runs in the CPU interpreter on short batches (fp16: the interpreter has no bf16 matmul).

A failure message names the worst tokens (request, position, mode, blocks) to diagnose from one run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_SPARSE, needs_extension

from sala_sglang.config import MiniCPMSALAConfig, SparseConfig
from sala_sglang.ops._cuda import DeviceFacts
from sala_sglang.ops.infllm_v2 import attention, make_plan, select_blocks
from sala_sglang.ops.infllm_v2 import plan as sparse_plan
from sala_sglang.ops.infllm_v2.plan import SparsePlan
from sala_sglang.ops.overrides import KernelOverrides
from sala_sglang.reference import sparse as ref
from sala_sglang.testing.paged_inputs import paged_batch, paged_cache, paged_k1

# Relative error against the float64 reference (SPEC section 4: bf16 inputs 1e-3 to 1e-2).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}

TINY_CFG = dataclasses.replace(TINY_SPARSE, topk=2)


@dataclass(frozen=True)
class Geometry:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    cfg: SparseConfig  # the op reads its block_size
    n_sel: int


RELEASED = Geometry("released", 32, 2, 128, MiniCPMSALAConfig().sparse, 96)
TINY = Geometry("tiny", 8, 2, 64, TINY_CFG, 6)
GEOMETRIES = [pytest.param(RELEASED, id="released", marks=pytest.mark.gpu),
              pytest.param(TINY, id="tiny")]
DTYPES = [pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
          pytest.param(torch.float16, id="fp16")]


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

    def plan(self, impl: str | None, num_splits: int = 1, **kwargs) -> SparsePlan:
        """The plan of this batch asking for `num_splits` (the CUDA op splits further where the
        plan's rule says so)."""
        kwargs = {"device": DeviceFacts.of(self.q.device), **kwargs}
        return make_plan(self.geo.cfg, tokens=self.q.shape[0], groups=self.geo.kv_heads,
                         head_dim=self.geo.head_dim, width=0, decode=False, impl=impl,
                         splits=num_splits, n_sel=self.selected.shape[-1], **kwargs)

    def run(self, impl: str | None, num_splits: int = 1, selected: torch.Tensor | None = None,
            **kwargs) -> torch.Tensor:
        sel = self.selected if selected is None else selected
        return attention.block_sparse_attention(
            self.q, self.k, self.v, self.rt, self.token_req, self.token_pos, self.token_sparse,
            sel, self.geo.cfg, self.scale, self.plan(impl, num_splits, **kwargs),
        )

    def reference(self) -> torch.Tensor:
        """Float64 on the CPU, token by token group of (request, mode)."""
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
                                                     self.geo.cfg.block_size, self.scale)
                else:
                    out[mine] = ref.dense_attention(q[mine], keys, vals, pos[mine], self.scale)
        return out

    def describe(self, t: int) -> str:
        blocks = self.selected[t].tolist() if self.token_sparse[t] else "all"
        return (f"token {t}: req {int(self.token_req[t])} pos {int(self.token_pos[t])} "
                f"{'sparse' if self.token_sparse[t] else 'dense'} blocks {blocks}")


def make_batch(geo: Geometry, lengths: list[int], token_req: list[int], token_pos: list[int],
               token_sparse: list[bool], dtype: torch.dtype, seed: int, device: str,
               n_sel: int | None = None) -> Batch:
    """Paged cache of `lengths`, tokens given by request (0-based) / position / mode. Each sparse
    (token, kv head) selects a random number of distinct blocks of its request, any of them
    possibly after its own block (masked by causality), in random order with -1 entries between."""
    torch.manual_seed(seed)
    bs = geo.cfg.block_size
    n_sel = n_sel or geo.n_sel
    rt, k, v = paged_cache(lengths, bs, geo.kv_heads, geo.head_dim, device, dtype=dtype)
    tokens = len(token_req)
    q = torch.randn(tokens, geo.q_heads, geo.head_dim, device=device, dtype=dtype)
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
        torch.tensor([r + 1 for r in token_req], dtype=torch.int32, device=device),
        torch.tensor(token_pos, dtype=torch.int32, device=device),
        torch.tensor([int(s) for s in token_sparse], dtype=torch.int32, device=device),
        selected.to(device),
    )


def assert_close(batch: Batch, out: torch.Tensor, want: torch.Tensor, tol: float, what: str,
                 relative_error: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
    out, want = out.double().cpu(), want.double().cpu()
    err = relative_error(out, want)
    if err < tol:
        return
    per_token = (out - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1).clamp_min(1e-30)
    per_token = torch.where(torch.isfinite(out).flatten(1).all(1), per_token, float("inf"))
    worst = per_token.argsort(descending=True)[:5].tolist()
    lines = [f"  {batch.describe(t)}: rel err {float(per_token[t]):.3g}" for t in worst]
    heads = (out - want).abs().amax(dim=(0, 2))
    pytest.fail(f"{what}: rel err {err:.4g} >= {tol} ({batch.geo.name}, {out.shape[0]} tokens, "
                f"lengths {batch.lengths}); max |diff| per head {heads.tolist()}; worst:\n"
                + "\n".join(lines))


def check_against_reference(batch: Batch, impl: str, relative_error, num_splits: int = 1,
                            what: str = "") -> torch.Tensor:
    """`impl` against the float64 reference, and CUDA also against Triton (same split request)."""
    out = batch.run(impl, num_splits=num_splits)
    dtype = batch.q.dtype
    assert out.shape == batch.q.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    assert_close(batch, out, batch.reference(), tol, f"{what}{impl} vs float64 reference",
                 relative_error)
    if impl == "cuda":
        assert_close(batch, out, batch.run("triton", num_splits=num_splits), tol,
                     f"{what}cuda vs triton", relative_error)
    return out


def prefill_batch(geo: Geometry, tokens: int, dtype: torch.dtype, seed: int,
                  device: str) -> Batch:
    """Tokens of three requests (lengths not multiples of the block size, one shorter than a
    block), positions anywhere in their request, interleaved, ~2/3 sparse (shorter requests in
    the CPU interpreter)."""
    bs = geo.cfg.block_size
    if geo is RELEASED:
        lengths = [37 * bs + 5, 9 * bs + 1, bs - 3]
    else:
        lengths = [(150 if device == "cuda" else 20) * bs + 7, 61, 11]
    gen = torch.Generator().manual_seed(seed + 1)
    req = torch.randint(0, len(lengths), (tokens,), generator=gen).tolist()
    pos = [int(torch.randint(0, lengths[r], (1,), generator=gen)) for r in req]
    if tokens >= 7:  # the edges: a request's first and last key, a block's first and last key
        pos[:4] = [0, lengths[req[1]] - 1, bs - 1, bs]
        for i, p in enumerate(pos[:4]):
            if p >= lengths[req[i]]:
                pos[i] = lengths[req[i]] - 1
    sparse = (torch.rand(tokens, generator=gen) < 0.67).tolist()
    return make_batch(geo, lengths, req, pos, sparse, dtype, seed, device)


# ---- every implementation against the reference ------------------------------------------------
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_sparse_and_dense_tokens_match_the_reference_in_fp32(
    device: str, splits: int, relative_error
) -> None:
    """fp32, blocks chosen by the selection op: sparse tokens over them, dense tokens over every
    block, both to 1e-5 (on a GPU Triton's fp32 dot rounds to tf32: 1e-3), and the selection
    really drops blocks."""
    torch.manual_seed(0)
    cfg, scale = dataclasses.replace(TINY_CFG, topk=4), 32**-0.5
    inp = paged_batch(cfg, [300, 180], [1] * 9, [0, 15, 31, 100, 127, 128, 200, 255, 299], 8, 2,
                      32, device, torch.float32)
    args = (inp.q, inp.k, inp.v, inp.rt, inp.token_req, inp.token_pos)
    sel = select_blocks(inp.q, inp.k1, inp.rt, inp.token_req, inp.token_pos, cfg,
                        300 // cfg.block_size + 1, scale)
    p = make_plan(cfg, tokens=inp.q.shape[0], groups=2, head_dim=32, width=0, decode=False,
                  device=DeviceFacts.of(device), impl="triton", splits=splits)
    keys, vals = (x.double().cpu() for x in inp.request_keys(0))
    qd, posd = inp.q.double().cpu(), inp.token_pos.long().cpu()
    ones = inp.token_sparse
    sparse = attention.block_sparse_attention(*args, ones, sel, cfg, scale, p)
    ref_sparse = ref.sparse_attention(qd, keys, vals, posd, sel.long().cpu(), cfg.block_size,
                                      scale)
    dense = attention.block_sparse_attention(*args, torch.zeros_like(ones), sel, cfg, scale, p)
    ref_dense = ref.dense_attention(qd, keys, vals, posd, scale)
    tol = 1e-5 if device == "cpu" else 1e-3
    assert relative_error(sparse, ref_sparse) < tol
    assert relative_error(dense, ref_dense) < tol
    assert relative_error(ref_sparse, ref_dense) > 1e-2  # selection really dropped blocks


@pytest.mark.parametrize("tokens", [1, 7, pytest.param(333, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_prefill_batch_matches_the_reference(impl: str, geo: Geometry, dtype: torch.dtype,
                                             tokens: int, device: str, relative_error) -> None:
    check_against_reference(prefill_batch(geo, tokens, dtype, tokens, device), impl,
                            relative_error)


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("batch_size", [1, pytest.param(8, marks=pytest.mark.gpu),
                                        pytest.param(32, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_decode_with_splits_matches_the_reference(impl: str, geo: Geometry, dtype: torch.dtype,
                                                  batch_size: int, splits: int, device: str,
                                                  relative_error) -> None:
    """One query per request at its last position (its own key cached), as decode runs."""
    gen = torch.Generator().manual_seed(batch_size * 10 + splits)
    top = 8000 if geo is RELEASED else 1500
    lengths = torch.randint(1, top, (batch_size,), generator=gen).tolist()
    sparse = [i % 4 != 3 for i in range(batch_size)]  # every fourth request still dense
    batch = make_batch(geo, lengths, list(range(batch_size)), [n - 1 for n in lengths], sparse,
                       dtype, batch_size + splits, device)
    check_against_reference(batch, impl, relative_error, num_splits=splits)


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_split_count_changes_nothing_but_rounding(impl: str, geo: Geometry, device: str,
                                                  relative_error) -> None:
    """More splits than a token has blocks leaves empty splits, which must weigh nothing."""
    batch = prefill_batch(geo, 40 if device == "cuda" else 3, torch.float16, 5, device)
    one = batch.run(impl, num_splits=1)
    for splits in (2, 8, 200):
        assert_close(batch, batch.run(impl, num_splits=splits), one, 2e-3,
                     f"{impl}: {splits} splits vs 1", relative_error)


@pytest.mark.parametrize("splits", [1, 4])
def test_tokens_that_see_no_key_output_zeros(impl: str, splits: int, device: str,
                                             relative_error) -> None:
    """Every entry -1, or every selected block after the query's: zeros."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    batch = make_batch(TINY, [300, 300], [0, 1, 0], [40, 299, 15], [True, True, True], dtype, 3,
                       device)
    selected = batch.selected.clone()
    selected[0] = -1
    selected[2] = -1
    selected[2, :, 0] = 5  # block 5 starts at key 80 > position 15
    out = batch.run(impl, num_splits=splits, selected=selected)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    if impl == "cuda":
        triton = batch.run("triton", num_splits=splits, selected=selected)
        assert torch.equal(triton[0], out[0]) and torch.equal(triton[2], out[2])
        assert relative_error(out[1], triton[1]) < TOLERANCE[torch.bfloat16]


def test_token_arrays_may_be_strided_views(impl: str, device: str, relative_error) -> None:
    """One request's verify chain: its slot expanded to the chain (stride 0, as the backend once
    passed it), positions and modes strided views. Kernels that read token t at offset t read
    past the slot: the op must attend as with dense arrays."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    batch = make_batch(TINY, [200], [0] * 4, [40, 90, 150, 199], [True, False, True, False],
                       dtype, 7, device)
    dense = batch.run(impl, num_splits=4)
    other = torch.zeros_like(batch.token_pos)  # what a dense read of the views would see
    batch.token_req = batch.token_req[:1].clone().expand(4)
    batch.token_pos = torch.stack([batch.token_pos, other], 1)[:, 0]
    batch.token_sparse = torch.stack([other, batch.token_sparse], 1)[:, 1]
    assert batch.token_req.stride() == (0,) and batch.token_pos.stride() == (2,)
    assert torch.equal(batch.run(impl, num_splits=4), dense)


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_dense_batch_with_placeholder_selection(impl: str, geo: Geometry, device: str,
                                                relative_error) -> None:
    """The backend passes a [T, 1, 1] all -1 selection when no token is sparse."""
    bs = geo.cfg.block_size
    lengths = [20 * bs + 3, 2 * bs]
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    batch = make_batch(geo, lengths, [0, 0, 1, 0], [0, 20 * bs + 2, 2 * bs - 1, 7 * bs],
                       [False] * 4, dtype, 4, device)
    batch.selected = torch.full((4, 1, 1), -1, dtype=torch.int32, device=device)
    for splits in (1, 8):
        check_against_reference(batch, impl, relative_error, num_splits=splits,
                                what=f"dense, {splits} splits: ")


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2])
def test_long_block_lists_span_several_table_fills(impl: str, splits: int,
                                                   relative_error) -> None:
    """The CUDA op resolves at most 256 blocks per split at a time (kItemCap in
    csrc/sparse_attention.cu): dense tokens far into a long request and sparse tokens with a
    long selection need several fills; positions sit on either side of a fill's edge."""
    bs = TINY.cfg.block_size
    lengths = [600 * bs + 9]
    # 70 tokens x 2 kv heads leave the plan no room to raise 2 splits (2 CTAs per SM at most)
    pos = [256 * bs - 1, 256 * bs, 512 * bs + 3, 600 * bs + 8, 600 * bs + 8, 300 * bs, 5] * 10
    sparse = [False, False, False, False, True, True, True] * 10
    batch = make_batch(TINY, lengths, [0] * len(pos), pos, sparse, torch.bfloat16, 11, "cuda",
                       n_sel=700)
    assert batch.plan("cuda", splits).cuda_attention_splits == splits
    check_against_reference(batch, impl, relative_error, num_splits=splits,
                            what=f"long lists, {splits} splits, ")


@pytest.mark.gpu
def test_strided_query_view_reads_like_a_contiguous_one(impl: str) -> None:
    batch = prefill_batch(RELEASED, 9, torch.bfloat16, 6, "cuda")
    fused = torch.randn(9, 3 * RELEASED.q_heads, RELEASED.head_dim, device="cuda",
                        dtype=torch.bfloat16)
    view = fused[:, RELEASED.q_heads : 2 * RELEASED.q_heads]
    assert not view.is_contiguous()
    batch.q = view
    strided = batch.run(impl)
    batch.q = view.contiguous()
    assert torch.equal(strided, batch.run(impl))


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 8])
def test_dense_mode_attends_to_every_block(impl: str, splits: int, relative_error) -> None:
    cfg, dim = RELEASED.cfg, RELEASED.head_dim
    torch.manual_seed(splits)
    rt, k, v = paged_cache([8000], cfg.block_size, 2, dim, "cuda")
    pos = torch.tensor([0, 63, 64, 5000, 7999], dtype=torch.int32, device="cuda")
    q = torch.randn(pos.numel(), RELEASED.q_heads, dim, device="cuda", dtype=torch.bfloat16)
    none = torch.full((pos.numel(), 2, 1), -1, dtype=torch.int32, device="cuda")
    batch = Batch(RELEASED, [8000], rt, k, v, q, torch.ones_like(pos), pos,
                  torch.zeros_like(pos), none)
    check_against_reference(batch, impl, relative_error, num_splits=splits)


@pytest.mark.gpu
def test_released_geometry_attends_like_the_reference(impl: str, relative_error) -> None:
    """Given the reference's own selection (identical indices, SPEC section 4)."""
    cfg, dim = RELEASED.cfg, RELEASED.head_dim
    torch.manual_seed(0)
    lengths = [9000, 7001]
    rt, k, v = paged_cache(lengths, cfg.block_size, 2, dim, "cuda")
    pos = torch.tensor([6143, 6144, 6200, 7000, 8191, 8999], dtype=torch.int32, device="cuda")
    q = torch.randn(pos.numel(), RELEASED.q_heads, dim, device="cuda", dtype=torch.bfloat16)
    keys = k[rt[1, : lengths[0]].long()].double().cpu()
    scores = ref.block_scores(q.double().cpu(), ref.compress_keys(keys, cfg.kernel_size,
                                                                  cfg.kernel_stride),
                              pos.long().cpu(), cfg)
    ref_sel = ref.select_blocks(scores, cfg.num_selected_blocks)
    batch = Batch(RELEASED, lengths, rt, k, v, q, torch.ones_like(pos), pos, torch.ones_like(pos),
                  ref_sel.to("cuda", torch.int32))
    check_against_reference(batch, impl, relative_error)


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [True, False])
def test_runs_of_tokens_sharing_blocks_attend_like_the_reference(impl: str, sparse: bool,
                                                                 relative_error) -> None:
    """Prefill-shaped: neighbouring tokens share blocks; a run crossing block boundaries, plus a
    second request, with the blocks the selection op chose."""
    cfg, dim = RELEASED.cfg, RELEASED.head_dim
    torch.manual_seed(2 + sparse)
    lengths = [9000, 7001]
    rt, k, v = paged_cache(lengths, cfg.block_size, 2, dim, "cuda")
    k1 = paged_k1(k, rt, lengths, cfg)
    pos = torch.cat([torch.arange(8170, 8210), torch.arange(6990, 7001)]).int().to("cuda")
    treq = torch.tensor([1] * 40 + [2] * 11, dtype=torch.int32, device="cuda")
    q = torch.randn(pos.numel(), RELEASED.q_heads, dim, device="cuda", dtype=torch.bfloat16)
    sel = select_blocks(q, k1, rt, treq, pos, cfg, max(lengths) // cfg.block_size + 1, dim**-0.5)
    batch = Batch(RELEASED, lengths, rt, k, v, q, treq, pos, torch.full_like(pos, int(sparse)),
                  sel)
    check_against_reference(batch, impl, relative_error)


# ---- the CUDA op and its dispatch --------------------------------------------------------------
@pytest.mark.gpu
@needs_extension
def test_auto_dispatch_takes_cuda_where_supported_and_triton_elsewhere(monkeypatch) -> None:
    batch = prefill_batch(TINY, 7, torch.bfloat16, 7, "cuda")
    monkeypatch.setitem(sparse_plan.CUDA_FASTER, "attention", True)
    assert torch.equal(batch.run(None), batch.run("cuda"))
    monkeypatch.setitem(sparse_plan.CUDA_FASTER, "attention", False)
    assert torch.equal(batch.run(None), batch.run("triton"))
    forced = KernelOverrides(impl="cuda")  # SALA_SGLANG_KERNELS=cuda, as a backend reads it
    assert torch.equal(batch.run(None, overrides=forced), batch.run("cuda"))
    # a group of 32 query heads is not compiled: auto falls back, "cuda" refuses
    wide = Geometry("wide", 64, 2, 64, TINY_CFG, 6)
    wide_batch = make_batch(wide, [100], [0, 0], [50, 99], [True, False], torch.bfloat16, 8,
                            "cuda")
    assert torch.equal(wide_batch.run(None, overrides=forced), wide_batch.run("triton"))
    with pytest.raises(ValueError, match="group size"):
        wide_batch.run("cuda")
    with pytest.raises(ValueError, match="impl="):
        attention.block_sparse_attention(
            batch.q, batch.k, batch.v, batch.rt, batch.token_req, batch.token_pos,
            batch.token_sparse, batch.selected, TINY_CFG, batch.scale, impl="cutlass")
    why = attention.cuda_unsupported((batch.q, batch.k, batch.v, batch.rt, batch.token_req,
                                      batch.token_pos, batch.token_sparse, batch.selected), 24, 1)
    assert why is not None and "block_size" in why


@pytest.mark.gpu
@needs_extension
def test_decode_replays_in_a_cuda_graph() -> None:
    lengths = [4000, 130, 7777, 64]
    batch = make_batch(RELEASED, lengths, [0, 1, 2, 3], [n - 1 for n in lengths], [True] * 4,
                       torch.bfloat16, 9, "cuda")
    op = torch.ops.sala_sglang.block_sparse_attention
    splits = batch.plan("cuda", sparse_plan.DECODE_SPLITS).cuda_attention_splits

    def call():
        return op(batch.q, batch.k, batch.v, batch.rt, batch.token_req, batch.token_pos,
                  batch.token_sparse, batch.selected, RELEASED.cfg.block_size, batch.scale,
                  splits)

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


@pytest.mark.gpu
@needs_extension
def test_op_registration_passes_opcheck() -> None:
    batch = prefill_batch(TINY, 7, torch.bfloat16, 10, "cuda")
    args = (batch.q, batch.k, batch.v, batch.rt, batch.token_req, batch.token_pos,
            batch.token_sparse, batch.selected, TINY_CFG.block_size, batch.scale, 3)
    torch.library.opcheck(torch.ops.sala_sglang.block_sparse_attention.default, args)
