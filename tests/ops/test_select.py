"""Block selection (`select_blocks`) by implementation against the float64 reference
(`block_scores`, `select_blocks` of sala_sglang.reference.sparse) over paged caches.

Selection is discrete (SPEC section 4): every chosen block must score at least the reference's
n_sel-th block score, up to a near-tie; the -1 padding, the forced blocks first in index order
and the absence of repeated or future blocks are exact. The fused CUDA kernel is also held to its
Triton twin: the two sum a window's head probabilities in different orders, so blocks whose
scores (nearly) tie may swap, nothing else; its variants (per-token or 4 / 8 tokens per CTA,
segments of block scores) come from the plan and must give bit-identical blocks. The Triton
top-k is exact: its blocks are those one top-k over the whole width takes from the same window
probabilities (the tail the Triton path had before its chunked top-k), bit for bit. Each check
prints the rows it disagrees on with their reference scores, so one GPU run is enough to
diagnose a failure. Without a GPU the Triton kernels run in the CPU interpreter on short batches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_SPARSE, needs_extension

from sala_sglang.config import MiniCPMSALAConfig, SparseConfig
from sala_sglang.ops._cuda import DeviceFacts
from sala_sglang.ops.infllm_v2 import make_plan, select
from sala_sglang.ops.infllm_v2.plan import DECODE_SPLITS, SparsePlan
from sala_sglang.ops.overrides import KernelOverrides
from sala_sglang.reference import sparse as ref
from sala_sglang.testing.paged_inputs import paged_batch, paged_cache, paged_k1, request_k1

# Two reference scores count as a near-tie within this fraction of the larger (plus a floor for
# scores near 0): fp32 with bf16/fp16 inputs is ~1e-6 relative off the float64 reference.
REL_TOL = 1e-3
ABS_TOL = 1e-6

TINY = TINY_SPARSE
# fp32 exactness case: 2 windows per block, 4 local blocks, 8 selected; two requests, awkward
# positions (no window yet, block edges, past the dense span)
FP32_CASE = dataclasses.replace(TINY_SPARSE, topk=4)
FP32_POSITIONS = [0, 15, 31, 100, 127, 128, 200, 255, 299]
# (sparse config, query heads, kv heads, head dim)
SHAPES = {"released": (MiniCPMSALAConfig().sparse, 32, 2, 128), "tiny": (TINY, 8, 2, 64)}
GEOMETRIES = [pytest.param("released", marks=pytest.mark.gpu), "tiny"]
# What make_plan reads of an H100 (the plan's split counts follow its 132 SMs)
H100_FACTS = DeviceFacts(name="cuda:0", multiprocessors=132, compiled=False)
# The CPU interpreter has no bf16 matmul (it multiplies the raw bits): fp16 runs there.
DTYPES = [pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
          pytest.param(torch.float16, id="fp16")]
# the implementation and, for CUDA, the forced tile: 1 the per-token kernel, 4 / 8 tokens per CTA
IMPL_TILES = [("triton", None), ("cuda", 1), ("cuda", 4), ("cuda", 8)]


class Case:
    """Requests of `lengths` keys in a shuffled paged cache, and batches of query tokens."""

    def __init__(self, geometry: str, dtype: torch.dtype, lengths: list[int], seed: int,
                 device: str) -> None:
        torch.manual_seed(seed)
        self.cfg, self.hq, self.groups, self.dim = SHAPES[geometry]
        self.lengths, self.dtype, self.device = lengths, dtype, device
        self.rt, k, _ = paged_cache(lengths, self.cfg.block_size, self.groups, self.dim, device,
                                    dtype=dtype)
        self.k1 = paged_k1(k, self.rt, lengths, self.cfg)

    def queries(self, token_req: list[int], token_pos: list[int]):
        q = torch.randn(len(token_req), self.hq, self.dim, device=self.device, dtype=self.dtype)
        treq = torch.tensor(token_req, dtype=torch.int32, device=self.device)
        pos = torch.tensor(token_pos, dtype=torch.int32, device=self.device)
        return q, treq, pos

    def plan(self, tokens: int, width: int, impl: str | None, tile: int | None = None,
             segment: int | None = None, decode: bool = False,
             device: DeviceFacts | None = None) -> SparsePlan:
        """A plan for `tokens` tokens (`tile` / `segment` forced as the environment would)."""
        return make_plan(self.cfg, tokens=tokens, groups=self.groups, head_dim=self.dim,
                         width=width, decode=decode, impl=impl,
                         device=device or DeviceFacts.of(self.device),
                         overrides=KernelOverrides(select_tile=tile, select_segment=segment))

    def select(self, q, treq, pos, width: int, impl: str | None = None, **plan) -> torch.Tensor:
        """Selection under the plan of `impl` and `plan`'s keywords (see `plan`)."""
        return select.select_blocks(q, self.k1, self.rt, treq, pos, self.cfg, width,
                                    self.dim**-0.5, self.plan(q.shape[0], width, impl, **plan))

    def stored_k1(self, r: int) -> torch.Tensor:
        """K1 of request r (0-based) in window order, as stored (float64, CPU)."""
        return request_k1(self.k1, self.rt, r + 1, self.lengths[r], self.cfg).double().cpu()

    def reference_scores(self, q, treq, pos) -> list[torch.Tensor]:
        """Float64 block scores of each token over the stored K1: [G, blocks] per token."""
        out: list[torch.Tensor | None] = [None] * q.shape[0]
        for r in sorted(set(treq.tolist())):
            rows = (treq == r).nonzero().flatten().tolist()
            scores = ref.block_scores(q[rows].double().cpu(), self.stored_k1(r - 1),
                                      pos[rows].long().cpu(), self.cfg)
            for i, row in enumerate(rows):
                out[row] = scores[i]
        return out  # type: ignore[return-value]


def _forced(cfg: SparseConfig, pos: int, width: int) -> list[int]:
    qb = pos // cfg.block_size
    return [b for b in range(min(qb + 1, width))
            if b < cfg.init_blocks or b >= qb - cfg.local_blocks]


def _near(a: float, b: float) -> bool:
    if a == b:
        return True
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b)) + ABS_TOL


def top_before(probs: torch.Tensor, token_pos: torch.Tensor, cfg: SparseConfig,
               width: int) -> torch.Tensor:
    """The Triton path's tail as it was before the chunked top-k: one int64 key per block (pooled
    score bits + 1 above the inverted block index; forced blocks +inf; blocks after the query's
    own without score bits), torch.topk over the whole width, -1 where a key has no score bits.
    The expectation, bit for bit."""
    r, n_windows = cfg.windows_per_block, probs.shape[-1]
    b = torch.arange(width)
    c = r * b[:, None] - 1 + torch.arange(r + 1)  # [width, r + 1]
    w = probs[..., c.clamp(0, n_windows - 1)]
    score = torch.where((c >= 0) & (c < n_windows), w, torch.zeros_like(w)).amax(-1)
    qb = (token_pos.long() // cfg.block_size)[:, None, None]
    forced = (b < cfg.init_blocks) | ((b >= qb - cfg.local_blocks) & (b <= qb))
    score = torch.where(forced, float("inf"), score)
    inverted = 0xFFFFFFFF - b
    key = torch.where(b <= qb, ((score.view(torch.int32).long() + 1) << 32) | inverted, inverted)
    top, idx = key.topk(cfg.num_selected_blocks, dim=-1)
    return torch.where((top >> 32) > 0, idx, -1).int()


def check_selection(case: Case, q, treq, pos, width: int, impl: str, label: str,
                    decode: bool = False, **plan) -> None:
    """`impl`'s selection under `plan`'s keywords against the reference; Triton also bit for bit
    against the whole-width top-k of its own window probabilities; CUDA also against Triton
    (split as the plan of the same batch splits it)."""
    cfg, n_sel = case.cfg, case.cfg.num_selected_blocks
    got = case.select(q, treq, pos, width, impl, decode=decode, **plan)
    assert got.shape == (q.shape[0], case.groups, n_sel) and got.dtype == torch.int32
    if impl == "triton":
        wide = max(width, n_sel)
        probs = select._window_probabilities(
            q, case.k1, case.rt, treq, pos, cfg, wide, case.dim**-0.5,
            case.plan(q.shape[0], width, impl, decode=decode, **plan))
        assert torch.equal(got.cpu(), top_before(probs.cpu(), pos.cpu(), cfg, wide)), label
    twin = case.select(q, treq, pos, width, "triton", decode=decode) if impl == "cuda" else None
    scores = case.reference_scores(q, treq, pos)
    got_l = got.cpu().tolist()
    twin_l = twin.cpu().tolist() if twin is not None else got_l
    problems: list[str] = []
    mismatched_rows = 0
    for t in range(q.shape[0]):
        p = int(pos[t])
        qb = p // cfg.block_size
        forced = _forced(cfg, p, width)
        eligible = min(qb + 1, width)
        for g in range(case.groups):
            mine, theirs = got_l[t][g], twin_l[t][g]
            scores_tg = scores[t][g]  # [max(pos of its request) // bs + 1]
            where = f"{label} token {t} (req {int(treq[t])}, pos {p}) group {g}"
            valid = [b for b in mine if b >= 0]
            if mine[len(valid):] != [-1] * (n_sel - len(valid)) or len(valid) != min(eligible,
                                                                                   n_sel):
                problems.append(f"{where}: {min(eligible, n_sel)} blocks expected then -1 "
                                f"padding, got {mine}")
                continue
            if len(set(valid)) != len(valid) or any(b > qb for b in valid):
                problems.append(f"{where}: repeated or future blocks in {mine}")
                continue
            if valid[: len(forced)] != forced:
                problems.append(f"{where}: forced blocks {forced} must come first, got {mine}")
                continue
            # against the reference: every chosen block scores at least the n_sel-th best
            ordered = scores_tg[: qb + 1].sort(descending=True).values
            nth = float(ordered[min(n_sel, qb + 1) - 1])
            low = [(b, float(scores_tg[b])) for b in valid if not float(scores_tg[b]) >= nth
                   and not _near(float(scores_tg[b]), nth)]
            if low:
                problems.append(f"{where}: chosen blocks below the reference's n_sel-th score "
                                f"{nth:.6g}: {low}; reference top: "
                                f"{scores_tg[: qb + 1].topk(min(n_sel, qb + 1)).indices.tolist()}")
            # against Triton: identical but for swaps of near-tied blocks
            if mine != theirs:
                mismatched_rows += 1
                bad = [(i, a, b, float(scores_tg[a]), float(scores_tg[b])) for i, (a, b) in
                       enumerate(zip(mine, theirs)) if a != b and
                       (a < 0 or b < 0 or not _near(float(scores_tg[a]), float(scores_tg[b])))]
                if bad:
                    problems.append(
                        f"{where}: CUDA and Triton differ beyond near-ties at (position, cuda "
                        f"block, triton block, ref score cuda, ref score triton) {bad[:8]}\n"
                        f"    cuda   {mine}\n    triton {theirs}")
    rows = q.shape[0] * case.groups
    print(f"{label}: {rows} rows, {mismatched_rows} differ from Triton (near-ties)")
    assert not problems, f"{len(problems)} bad rows of {rows}:\n" + "\n".join(problems[:20])


def _interleaved_tokens(case: Case, count: int, seed: int) -> tuple[list[int], list[int]]:
    """`count` tokens of all the case's requests in a random order: most tiles of 4 or 8 mix
    requests, and positions within a tile are far apart."""
    gen = torch.Generator().manual_seed(seed)
    treq = torch.randint(1, len(case.lengths) + 1, (count,), generator=gen).tolist()
    pos = [int(torch.randint(0, case.lengths[r - 1], (1,), generator=gen)) for r in treq]
    return treq, pos


def _prefill_runs(lengths: list[int], last: int) -> tuple[list[int], list[int]]:
    """The last `last` positions of each request in order, as a prefill chunk has them."""
    treq, pos = [], []
    for r, n in enumerate(lengths):
        start = max(0, n - last)
        treq += [r + 1] * (n - start)
        pos += list(range(start, n))
    return treq, pos


# ---- every implementation against the reference ------------------------------------------------
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_selection_equals_the_reference_in_fp32(device: str, splits: int) -> None:
    """fp32 leaves no near-tie to excuse: the blocks and their order are the reference's, with
    tokens tiled (no split) or the windows split."""
    torch.manual_seed(0)
    inp = paged_batch(FP32_CASE, [300, 180], [1] * 9, FP32_POSITIONS, 8, 2, 32, device,
                      torch.float32)
    cfg, dim = inp.cfg, inp.q.shape[-1]
    width = 300 // cfg.block_size + 1
    plan = make_plan(cfg, tokens=inp.q.shape[0], groups=2, head_dim=dim, width=width,
                     decode=False, device=DeviceFacts.of(device), impl="triton", splits=splits)
    sel = select.select_blocks(inp.q, inp.k1, inp.rt, inp.token_req, inp.token_pos, cfg, width,
                               dim**-0.5, plan)
    keys = inp.request_keys(0)[0].double().cpu()
    expect = ref.select_blocks(
        ref.block_scores(inp.q.double().cpu(), ref.compress_keys(keys, 16, 8),
                         inp.token_pos.long().cpu(), cfg), cfg.num_selected_blocks)
    assert torch.equal(sel.long().cpu(), expect)


def test_decode_with_many_splits_equals_the_reference_in_fp32(device: str) -> None:
    """Decode on a GPU of 132 SMs splits stage-1 until there are about 2 programs per SM: 32
    splits for 4 tokens of 2 kv heads over a static width of 1024 blocks, the requests' windows
    in the first 8 of them. fp32 leaves no near-tie to excuse."""
    torch.manual_seed(0)
    cfg, width = FP32_CASE, 1024
    lengths, treq, pos = [4100, 2500], [1, 2, 1, 2], [4099, 2499, 1000, 63]
    inp = paged_batch(cfg, lengths, treq, pos, 8, 2, 32, device, torch.float32)
    plan = make_plan(cfg, tokens=4, groups=2, head_dim=32, width=width, decode=True,
                     device=H100_FACTS, impl="triton")
    assert (plan.triton_select_splits, plan.attention_splits) == (32, DECODE_SPLITS)
    sel = select.select_blocks(inp.q, inp.k1, inp.rt, inp.token_req, inp.token_pos, cfg, width,
                               32**-0.5, plan)
    for t, r in enumerate(treq):
        keys = ref.compress_keys(inp.request_keys(r - 1)[0].double().cpu(), 16, 8)
        scores = ref.block_scores(inp.q[t : t + 1].double().cpu(), keys,
                                  inp.token_pos[t : t + 1].long().cpu(), cfg)
        expect = ref.select_blocks(scores, cfg.num_selected_blocks)
        assert torch.equal(sel[t : t + 1].long().cpu(), expect), t


@pytest.mark.parametrize("impl,tile", IMPL_TILES, indirect=["impl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_prefill_runs_of_one_request(impl: str, tile: int | None, geometry: str,
                                     dtype: torch.dtype, device: str) -> None:
    """Many neighbouring tokens of one request: a run from position 0 (no window visible yet,
    then fewer blocks than n_sel) and a run far past n_sel * block_size."""
    cfg = SHAPES[geometry][0]
    far = 20 * cfg.num_selected_blocks * cfg.block_size // 7 + 5  # ~2.9x n_sel blocks, unaligned
    case = Case(geometry, dtype, [far], seed=1, device=device)
    early, late = (200, 250) if device == "cuda" else (48, 40)
    early = list(range(0, early))
    late = list(range(far - late, far))
    q, treq, pos = case.queries([1] * (len(early) + len(late)), early + late)
    check_selection(case, q, treq, pos, far // cfg.block_size + 1, impl,
                    f"{geometry} {dtype} {impl} tile {tile} prefill one request", tile=tile)


@pytest.mark.parametrize("impl,tile", IMPL_TILES, indirect=["impl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_prefill_several_requests(impl: str, tile: int | None, geometry: str,
                                  dtype: torch.dtype, device: str) -> None:
    """Runs of three requests (lengths not multiples of the block size), one batch, positions
    around block boundaries, below and above n_sel * block_size."""
    cfg = SHAPES[geometry][0]
    bs, span = cfg.block_size, cfg.num_selected_blocks * cfg.block_size
    lengths = [3 * span + 7, span // 2 + 3, span + bs + 1]
    case = Case(geometry, dtype, lengths, seed=2, device=device)
    drawn = 40 if device == "cuda" else 10
    treq, pos = [], []
    for r, n in enumerate(lengths):
        run = sorted({n - 1, n - 2, bs - 1, bs, 2 * bs - 1, min(n - 1, span - 1),
                      min(n - 1, span), *torch.randint(0, n, (drawn,)).tolist()})
        treq += [r + 1] * len(run)
        pos += run
    q, treq_t, pos_t = case.queries(treq, pos)
    check_selection(case, q, treq_t, pos_t, max(lengths) // bs + 3, impl,
                    f"{geometry} {dtype} {impl} tile {tile} prefill 3 requests", tile=tile)


@pytest.mark.parametrize("impl,tile", [("triton", None), ("cuda", 4), ("cuda", 8)],
                         indirect=["impl"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tiles_mixing_requests(impl: str, tile: int | None, geometry: str, device: str) -> None:
    """Tiles whose tokens belong to different requests (swept one request at a time), token
    counts that are not a multiple of the tile (the last tile runs past the end), and a batch
    smaller than one tile."""
    cfg = SHAPES[geometry][0]
    bs, span = cfg.block_size, cfg.num_selected_blocks * cfg.block_size
    lengths = [3 * span + 7, span // 2 + 3, span + bs + 1, 2 * bs + 5]
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    case = Case(geometry, dtype, lengths, seed=8, device=device)
    width = max(lengths) // bs + 2
    counts = (8 * 37 + 3, 4 * 9 + 1, 5, 1) if device == "cuda" else (4 * 9 + 1, 5, 1)
    for count in counts:
        treq, pos = _interleaved_tokens(case, count, seed=count)
        q, treq_t, pos_t = case.queries(treq, pos)
        check_selection(case, q, treq_t, pos_t, width, impl,
                        f"{geometry} {impl} tile {tile} {count} interleaved tokens", tile=tile)


@pytest.mark.parametrize("batch", [1, pytest.param(8, marks=pytest.mark.gpu),
                                   pytest.param(32, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_decode_batches_with_a_wide_static_width(impl: str, geometry: str, dtype: torch.dtype,
                                                 batch: int, device: str) -> None:
    """One token per request at its last position, the width far beyond every sequence (CUDA
    graphs fix it), split as decode splits; batch 8 uses the 1M-context width (16384 blocks of
    scores in the CUDA kernel's shared memory)."""
    cfg = SHAPES[geometry][0]
    span = cfg.num_selected_blocks * cfg.block_size
    gen = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 4 * span, (batch,), generator=gen).tolist()
    lengths[0] = 3 * span + 11  # one well past n_sel blocks, whatever the draw
    case = Case(geometry, dtype, lengths, seed=3 + batch, device=device)
    q, treq, pos = case.queries(list(range(1, batch + 1)), [n - 1 for n in lengths])
    width = 16384 if batch == 8 else 8 * (max(lengths) // cfg.block_size + 1)
    check_selection(case, q, treq, pos, width, impl, f"{geometry} {dtype} {impl} decode b{batch}",
                    decode=True)


@pytest.mark.parametrize("impl", ["triton", "cuda"], indirect=True)
def test_token_arrays_may_be_strided_views(impl: str, device: str) -> None:
    """One request's verify chain: its slot expanded to the chain (stride 0, as the backend once
    passed it) and a strided view of positions select what dense arrays select."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    case = Case("tiny", dtype, [300], seed=11, device=device)
    q, treq, pos = case.queries([1] * 4, [120, 180, 250, 299])
    width = 8 * (300 // case.cfg.block_size + 1)
    dense = case.select(q, treq, pos, width, impl, decode=True)
    # a dense read of the views would see slot 0 after the one slot, and position 0
    views = treq[:1].clone().expand(4), torch.stack([pos, torch.zeros_like(pos)], 1)[:, 0]
    assert views[0].stride() == (0,) and views[1].stride() == (2,)
    assert torch.equal(case.select(q, *views, width, impl, decode=True), dense)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"], indirect=True)
def test_released_geometry_chooses_blocks_the_reference_ranks_high(impl: str) -> None:
    """Two long requests; tokens around n_sel * block_size, the Triton windows split 4 ways:
    every chosen block scores at least the reference's n_sel-th minus 2e-2."""
    cfg, hq, groups, dim = SHAPES["released"]
    torch.manual_seed(0)
    lengths = [9000, 7001]
    rt, k, _ = paged_cache(lengths, cfg.block_size, groups, dim, "cuda")
    k1 = paged_k1(k, rt, lengths, cfg)
    pos = torch.tensor([6143, 6144, 6200, 7000, 8191, 8999], dtype=torch.int32, device="cuda")
    q = torch.randn(pos.numel(), hq, dim, device="cuda", dtype=torch.bfloat16)
    width = lengths[0] // cfg.block_size + 1
    plan = make_plan(cfg, tokens=pos.numel(), groups=groups, head_dim=dim, width=width,
                     decode=False, splits=4, device=DeviceFacts.of("cuda"), impl=impl)
    sel = select.select_blocks(q, k1, rt, torch.ones_like(pos), pos, cfg, width, dim**-0.5, plan)
    keys = k[rt[1, : lengths[0]].long()].double().cpu()
    scores = ref.block_scores(q.double().cpu(), ref.compress_keys(keys, cfg.kernel_size,
                                                                  cfg.kernel_stride),
                              pos.long().cpu(), cfg)
    nth = scores.sort(dim=-1, descending=True).values[..., cfg.num_selected_blocks - 1]
    chosen = scores.gather(-1, sel.long().cpu().clamp(min=0))
    assert (sel >= 0).all()
    assert (chosen >= nth[..., None] - 2e-2).all()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"], indirect=True)
def test_token_tiles_spanning_two_requests_select_like_the_reference(impl: str) -> None:
    """Prefill-shaped selection over interleaved tokens of two requests: every tile that holds
    both must sweep each request's own compressed keys."""
    case = Case("released", torch.bfloat16, [9000, 7001], seed=1, device="cuda")
    cfg = case.cfg
    treq = torch.tensor([1, 2, 1, 1, 2, 2, 2, 1, 2, 1, 1, 2, 1], dtype=torch.int32, device="cuda")
    top = torch.tensor(case.lengths, device="cuda")[treq.long() - 1]
    pos = (6144 + torch.rand(treq.numel(), device="cuda") * (top - 6144)).int()
    q = torch.randn(treq.numel(), case.hq, case.dim, device="cuda", dtype=torch.bfloat16)
    sel = case.select(q, treq, pos, max(case.lengths) // cfg.block_size + 1, impl)
    assert (sel >= 0).all()
    scores = case.reference_scores(q, treq, pos)
    for t in range(q.shape[0]):
        # the reference scores the same stored (bf16) K1, so only the selection is under test
        nth = scores[t].sort(dim=-1, descending=True).values[..., cfg.num_selected_blocks - 1]
        chosen = scores[t].gather(-1, sel[t].long().cpu())
        assert (chosen >= nth[..., None] * (1 - 1e-4)).all()


def test_triton_pieces_give_the_blocks_of_one_launch(device: str) -> None:
    """A batch longer than the Triton scratch allows is selected in pieces of 16 tokens: the
    pieces' blocks are the whole batch's."""
    case = Case("tiny", torch.float32, [400, 250], seed=12, device=device)
    treq, pos = _prefill_runs(case.lengths, 20)
    q, treq_t, pos_t = case.queries(treq, pos)
    width = 400 // case.cfg.block_size + 1
    plan = case.plan(q.shape[0], width, "triton")
    args = (q, case.k1, case.rt, treq_t, pos_t, case.cfg, width, case.dim**-0.5)
    whole = select.select_blocks(*args, plan)
    assert plan.triton_piece_rows >= q.shape[0]
    pieces = select.select_blocks(*args, dataclasses.replace(plan, triton_piece_rows=16))
    assert torch.equal(pieces, whole)


def test_selection_kernels_are_not_specialized_on_per_batch_counts() -> None:
    # A new divisibility class of these counts compiled the kernels again in the middle of a
    # long prefill (seconds of TTFT at 128K on an H100).
    for kernel, counts in ((select._stage1_stats_kernel, {"n_tokens"}),
                           (select._window_probs_kernel, {"n_tokens", "n_windows"}),
                           (select._block_topk_kernel, {"n_windows", "width"}),
                           (select._merge_topk_kernel, {"n_chunks"})):
        # the CPU interpreter's kernels keep the decorator's arguments in kwargs
        names = getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"]
        names = {kernel.arg_names[i] if isinstance(i, int) else i for i in names}
        assert counts <= names, (kernel.fn.__name__, names)


# ---- the Triton top-k over window probabilities ------------------------------------------------
def top_reference(probs: torch.Tensor, token_pos: torch.Tensor, cfg: SparseConfig,
                  width: int) -> torch.Tensor:
    """The reference's pooling, forced blocks and selection over the same probabilities."""
    scores = ref.pool_block_scores(probs.double(), width, cfg.windows_per_block)
    b = torch.arange(width)[None, :]
    qb = (token_pos.long() // cfg.block_size)[:, None]
    forced = (b < cfg.init_blocks) | ((b >= qb - cfg.local_blocks) & (b <= qb))
    scores = scores.masked_fill(forced[:, None, :], float("inf"))
    scores = scores.masked_fill((b > qb)[:, None, :], float("-inf"))
    return ref.select_blocks(scores, cfg.num_selected_blocks).int()


def tied_probabilities(cfg: SparseConfig, width: int, positions: list[int],
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window probabilities of 2 kv heads on 4 levels, half of them 0, so that many blocks tie
    exactly (and many of a token's visible blocks score 0), with the tokens' positions."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 8, (len(positions), 2, width * cfg.windows_per_block), generator=gen)
    probs = torch.where(levels < 4, 0.0, (levels - 3) / 4.0).float()
    return probs, torch.tensor(positions, dtype=torch.int32)


def _positions(cfg: SparseConfig, width: int) -> list[int]:
    """Tokens near the start (fewer eligible blocks than n_sel: -1 padding), on block edges, past
    n_sel blocks, halfway (a query block in a middle chunk: the later chunks are skipped) and in
    the last block of the width."""
    bs, last = cfg.block_size, width * cfg.block_size - 1
    n_sel_span = cfg.num_selected_blocks * bs
    wanted = [0, bs, 3 * bs + 5, n_sel_span - 1, n_sel_span + bs // 2, last // 2, last]
    return sorted({p for p in wanted if p <= last})


# (geometry, width, chunk): widths below, equal to and above one chunk, several chunks with the
# last one partial; n_sel = 10 (tiny, the best 16 per chunk) and 96 (released, 128 per chunk:
# at width 96 fewer blocks than a chunk keeps)
TOPK_CASES = [("tiny", 10, 32), ("tiny", 20, 32), ("tiny", 32, 32), ("tiny", 96, 32),
              ("tiny", 139, 32), ("released", 96, 256), ("released", 700, 256),
              pytest.param("released", 2052, 1024, id="released-128K-server",
                           marks=pytest.mark.gpu)]


@pytest.mark.parametrize("geometry,width,chunk", TOPK_CASES)
def test_chunked_top_k_equals_the_whole_width_top_k(geometry: str, width: int, chunk: int,
                                                    device: str) -> None:
    """The chunks' top-k and their merge give exactly the blocks one top-k over the whole width
    gave, in its order: exact ties to the lower block, forced blocks first, -1 padding where
    fewer than n_sel blocks are eligible; and the reference's selection."""
    cfg = SHAPES[geometry][0]
    probs, pos = tied_probabilities(cfg, width, _positions(cfg, width), seed=width)
    got = select._top_blocks(probs.to(device), pos.to(device), cfg, width, chunk).cpu()
    want = top_before(probs, pos, cfg, width)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got, want), (got - want).abs().sum(-1)
    assert torch.equal(got, top_reference(probs, pos, cfg, width))
    assert (want == -1).any() and (want[-1] >= 0).all()  # the case has -1 padding and full rows


def test_top_k_ties_go_to_the_lower_block(device: str) -> None:
    """Every window equal: the order is forced blocks, then the others by index, in every chunk."""
    cfg = TINY
    width, chunk = 150, 32
    pos = torch.tensor([width * cfg.block_size - 1, 40 * cfg.block_size], dtype=torch.int32)
    probs = torch.full((2, 2, width * cfg.windows_per_block), 0.5)
    got = select._top_blocks(probs.to(device), pos.to(device), cfg, width, chunk).cpu()
    for t, p in enumerate(pos.tolist()):
        forced = _forced(cfg, p, width)
        rest = [b for b in range(width) if b not in forced]
        assert got[t].tolist() == [(forced + rest)[: cfg.num_selected_blocks]] * 2


def test_key_chunks_give_the_blocks_of_one_chunk(device: str) -> None:
    """Selection through the whole Triton path over a static width beyond every request (decode),
    its top-k in one chunk or in chunks of 32 or 64 blocks (the last partial): bit-identical, and
    the whole-width top-k's."""
    case = Case("tiny", torch.float32, [700, 300, 90], seed=13, device=device)
    q, treq, pos = case.queries([1, 2, 3, 1], [699, 299, 89, 250])
    width = 200
    plan = case.plan(4, width, "triton", decode=True)
    assert plan.triton_key_chunk == 256
    args = (q, case.k1, case.rt, treq, pos, case.cfg, width, case.dim**-0.5)
    whole = select.select_blocks(*args, plan)
    probs = select._window_probabilities(*args, plan)
    assert torch.equal(whole.cpu(), top_before(probs.cpu(), pos.cpu(), case.cfg, width))
    for chunk in (32, 64):
        got = select.select_blocks(*args, dataclasses.replace(plan, triton_key_chunk=chunk))
        assert torch.equal(got, whole), chunk


# ---- the CUDA kernel's variants and dispatch ---------------------------------------------------
@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("geometry", ["released", "tiny"])
def test_tiled_kernel_is_exact_under_regrouping(geometry: str) -> None:
    """The tiled kernel scores a token the same way whatever shares its tile: each warp sweeps
    all of its token's windows in the same order. So 4 or 8 tokens per CTA, on the tokens in
    request order or shuffled so that every tile mixes requests, give bit-identical blocks."""
    cfg = SHAPES[geometry][0]
    bs, span = cfg.block_size, cfg.num_selected_blocks * cfg.block_size
    lengths = [4 * span + 3, span + 5, 3 * bs]
    case = Case(geometry, torch.float16, lengths, seed=9, device="cuda")
    width = max(lengths) // bs + 1
    q, treq_t, pos_t = case.queries(*_prefill_runs(lengths, 150))
    results = {}
    for tile in (4, 8):
        results[tile] = case.select(q, treq_t, pos_t, width, "cuda", tile=tile)
        perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(10)).cuda()
        shuffled = case.select(q[perm], treq_t[perm], pos_t[perm], width, "cuda", tile=tile)
        unshuffled = torch.empty_like(shuffled)
        unshuffled[perm] = shuffled
        diff = (unshuffled != results[tile]).any(-1).any(-1).nonzero().flatten().tolist()
        assert not diff, f"tile {tile}: shuffling changed tokens {diff[:20]}"
    diff = (results[4] != results[8]).any(-1).any(-1).nonzero().flatten().tolist()
    assert not diff, f"tiles of 4 and of 8 differ at tokens {diff[:20]}"
    check_selection(case, q, treq_t, pos_t, width, "cuda", f"{geometry} tiled runs", tile=8)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("tile", [4, 8])
@pytest.mark.parametrize("geometry", ["released", "tiny"])
def test_tiled_segments_give_the_same_blocks(geometry: str, tile: int) -> None:
    """The tiled kernel keeps block scores a segment at a time and merges each segment into the
    running best (the plan's segment, 2048 blocks by default): any segment length, down to one
    block, and segments that split a tile of windows, must give bit-identical blocks, in tiles of
    one request and in tiles that mix requests."""
    cfg = SHAPES[geometry][0]
    bs, span = cfg.block_size, cfg.num_selected_blocks * cfg.block_size
    lengths = [4 * span + 3, span + 5, 3 * bs, 2 * span + bs // 2]
    case = Case(geometry, torch.bfloat16, lengths, seed=11, device="cuda")
    width = max(lengths) // bs + 1
    batches = {"runs": _prefill_runs(lengths, 120),
               "mixed": _interleaved_tokens(case, 8 * 29 + 5, seed=12)}
    for label, (treq_l, pos_l) in batches.items():
        q, treq_t, pos_t = case.queries(treq_l, pos_l)
        whole = case.select(q, treq_t, pos_t, width, "cuda", tile=tile)
        for segment in (1, 3, 5, cfg.num_selected_blocks + 1, width // 2):
            got = case.select(q, treq_t, pos_t, width, "cuda", tile=tile, segment=segment)
            diff = (got != whole).any(-1).any(-1).nonzero().flatten().tolist()
            assert not diff, f"{label}, segments of {segment} blocks: tokens {diff[:20]} differ"
        check_selection(case, q, treq_t, pos_t, width, "cuda",
                        f"{geometry} tile {tile} {label}, segments of {width // 2} blocks",
                        tile=tile, segment=width // 2)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("tile", [None, 8])
def test_cuda_selection_replays_in_a_cuda_graph(tile: int | None) -> None:
    """The plan is built once on the host; the captured launch replays with new queries and
    positions (tile 8: the tiled kernel, its 4 tokens of 3 requests in one CTA)."""
    case = Case("released", torch.bfloat16, [9001, 20000, 333], seed=4, device="cuda")
    q, treq, pos = case.queries([1, 2, 3, 2], [9000, 19999, 332, 7000])
    width = 20000 // case.cfg.block_size + 1
    plan = case.plan(4, width, "cuda", tile=tile)
    args = (case.k1, case.rt, treq, pos, case.cfg, width, case.dim**-0.5, plan)
    select.select_blocks(q, *args)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select.select_blocks(q, *args)
    for step in range(2):
        q2, _, _ = case.queries([1, 2, 3, 2], [0, 0, 0, 0])
        q.copy_(q2)
        pos.copy_(torch.tensor([8000 + step, 19000 - step, 300, 6500], device="cuda"))
        graph.replay()
        assert torch.equal(out, select.select_blocks(q, *args))


@pytest.mark.gpu
@needs_extension
def test_unsupported_geometry_falls_back_to_triton() -> None:
    case = Case("released", torch.bfloat16, [5000], seed=5, device="cuda")
    q, treq, pos = case.queries([1, 1], [4000, 4999])
    huge = 1 << 16  # 256 KiB of block scores: more shared memory than any GPU gives a CTA
    forced = make_plan(case.cfg, tokens=2, groups=case.groups, head_dim=case.dim, width=huge,
                       decode=False, device=DeviceFacts.of("cuda"),
                       overrides=KernelOverrides(impl="cuda"))
    assert forced.select == "triton" and "shared memory" in forced.select_unfit
    auto = case.select(q, treq, pos, huge)
    assert torch.equal(auto, case.select(q, treq, pos, huge, "triton"))
    with pytest.raises(ValueError, match="shared memory"):
        case.select(q, treq, pos, huge, "cuda")
    # 20 query heads per kv head: more than one m16 tile
    wide_q = torch.randn(2, 40, 128, device="cuda", dtype=torch.bfloat16)
    assert select.cuda_unsupported((wide_q, case.k1, case.rt, treq, pos), case.cfg, 0.1) is not None
    with pytest.raises(ValueError, match="impl"):
        select.select_blocks(q, case.k1, case.rt, treq, pos, case.cfg, 100, 0.1, impl="cutlass")


@pytest.mark.gpu
@needs_extension
def test_auto_dispatch_follows_the_plan(monkeypatch) -> None:
    calls: list[str] = []
    piece = select._select_piece

    def spy(*args, **kwargs):
        calls.append("triton")
        return piece(*args, **kwargs)

    monkeypatch.setattr(select, "_select_piece", spy)
    case = Case("tiny", torch.float16, [700, 90], seed=6, device="cuda")
    q, treq, pos = case.queries([1, 2, 1], [699, 89, 300])
    # on a device of one SM, 3 tokens fill it: CUDA's 8-token tiles
    one_sm = dataclasses.replace(DeviceFacts.of("cuda"), multiprocessors=1)
    assert torch.equal(case.select(q, treq, pos, 64, device=one_sm),
                       case.select(q, treq, pos, 64, "cuda", tile=8))
    assert calls == []
    case.select(q, treq, pos, 64)  # the real device: too few tokens, Triton
    assert calls == ["triton"]
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda")  # read by backends only, never by an op
    case.select(q, treq, pos, 64)
    assert calls == ["triton", "triton"]
    empty = case.select(q[:0], treq[:0], pos[:0], 64, "cuda")
    assert empty.shape == (0, case.groups, case.cfg.num_selected_blocks)


@pytest.mark.gpu
@needs_extension
def test_cuda_selection_op_registration_passes_opcheck() -> None:
    case = Case("tiny", torch.bfloat16, [500], seed=7, device="cuda")
    cfg = case.cfg
    q, treq, pos = case.queries([1, 1, 1], [10, 250, 499])
    for tile_tokens, warps in ((0, 4), (0, 8), (4, 4), (8, 4)):
        torch.library.opcheck(
            torch.ops.sala_sglang.select_blocks.default,
            (q, case.k1, case.rt, treq, pos, cfg.kernel_size, cfg.kernel_stride, cfg.block_size,
             cfg.init_blocks, cfg.local_blocks, cfg.num_selected_blocks, 40, 0.125, tile_tokens,
             warps, 2048),
        )
