"""The fused CUDA stage-1 selection (`torch.ops.sala_sglang.select_blocks`, csrc/
sparse_selection.cu) against its Triton twin and the float64 reference, over paged caches.

Selection is discrete: CUDA and Triton sum each window's head probabilities in different orders,
so their block scores may differ in the last bits and two blocks whose scores (nearly) tie may
swap. Everything else must agree exactly: the -1 padding, the forced blocks first in index order,
and every other position up to such a near-tie. Each check prints the rows it disagrees on with
their reference block scores, so one run on a GPU is enough to diagnose a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cuda_extension import ON_GPU, needs_extension

from sala_sglang.testing.paged_inputs import compressed_buffers, paged_cache

from sala_sglang.config import MiniCPMSALAConfig, SparseConfig  # noqa: E402

pytestmark = ON_GPU

# Two reference scores count as a near-tie within this fraction of the larger (plus a floor for
# scores near 0): fp32 with bf16/fp16 inputs is ~1e-6 relative off the float64 reference.
REL_TOL = 1e-3
ABS_TOL = 1e-6


def _geometry(name: str) -> tuple[SparseConfig, int, int, int]:
    """(sparse config, query heads, kv heads, head dim)."""
    if name == "released":
        return MiniCPMSALAConfig().sparse, 32, 2, 128
    tiny = SparseConfig(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=16,
                        window_size=64, topk=6, use_nope=False, dense_len=256)
    return tiny, 8, 2, 64


class Case:
    """Requests of `lengths` keys in a shuffled paged cache, and a batch of query tokens."""

    def __init__(self, geometry: str, dtype: torch.dtype, lengths: list[int], seed: int) -> None:
        torch.manual_seed(seed)
        self.cfg, self.hq, self.groups, self.dim = _geometry(geometry)
        self.lengths = lengths
        self.rt, k, _ = paged_cache(lengths, self.cfg.block_size, self.groups, self.dim, "cuda",
                                    dtype=dtype)
        self.k1, _ = compressed_buffers(k, self.rt, lengths, self.cfg)
        self.dtype = dtype

    def queries(self, token_req: list[int], token_pos: list[int]):
        q = torch.randn(len(token_req), self.hq, self.dim, device="cuda", dtype=self.dtype)
        treq = torch.tensor(token_req, dtype=torch.int32, device="cuda")
        pos = torch.tensor(token_pos, dtype=torch.int32, device="cuda")
        return q, treq, pos

    def stored_k1(self, r: int) -> torch.Tensor:
        """K1 of request r (0-based) in window order, as stored (float64, CPU)."""
        cfg = self.cfg
        start = torch.arange(cfg.num_k1(self.lengths[r]), device="cuda") * cfg.kernel_stride
        page = self.rt[r + 1, (start // cfg.block_size) * cfg.block_size].long() // cfg.block_size
        return self.k1[page, (start % cfg.block_size) // cfg.kernel_stride].double().cpu()

    def select(self, q, treq, pos, width: int, impl: str, splits: int = 1) -> torch.Tensor:
        from sala_sglang.ops import sparse as ops

        cfg = self.cfg
        return ops.select_blocks(
            q, self.k1, self.rt, treq, pos, cfg.kernel_size, cfg.kernel_stride, cfg.block_size,
            cfg.init_blocks, cfg.local_blocks, cfg.num_selected_blocks, width, self.dim**-0.5,
            num_splits=splits, impl=impl,
        )

    def reference_scores(self, q, treq, pos) -> list[torch.Tensor]:
        """Float64 block scores of each token over the stored K1: [G, blocks] per token."""
        from sala_sglang.reference.sparse import block_scores

        out: list[torch.Tensor | None] = [None] * q.shape[0]
        for r in sorted(set(treq.tolist())):
            rows = (treq == r).nonzero().flatten().tolist()
            scores = block_scores(q[rows].double().cpu(), self.stored_k1(r - 1),
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


def check_selection(case: Case, q, treq, pos, width: int, splits: int, label: str) -> None:
    cfg, n_sel = case.cfg, case.cfg.num_selected_blocks
    cuda = case.select(q, treq, pos, width, "cuda")
    triton = case.select(q, treq, pos, width, "triton", splits)
    assert cuda.shape == triton.shape == (q.shape[0], case.groups, n_sel)
    assert cuda.dtype == torch.int32
    scores = case.reference_scores(q, treq, pos)
    cuda_l, triton_l = cuda.cpu().tolist(), triton.cpu().tolist()
    problems: list[str] = []
    mismatched_rows = 0
    for t in range(q.shape[0]):
        p = int(pos[t])
        qb = p // cfg.block_size
        forced = _forced(cfg, p, width)
        eligible = min(qb + 1, width)
        for g in range(case.groups):
            mine, theirs = cuda_l[t][g], triton_l[t][g]
            ref = scores[t][g]  # [max(pos of its request) // bs + 1]
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
            ordered = ref[: qb + 1].sort(descending=True).values
            nth = float(ordered[min(n_sel, qb + 1) - 1])
            low = [(b, float(ref[b])) for b in valid if not float(ref[b]) >= nth
                   and not _near(float(ref[b]), nth)]
            if low:
                problems.append(f"{where}: chosen blocks below the reference's n_sel-th score "
                                f"{nth:.6g}: {low}; reference top: "
                                f"{ref[: qb + 1].topk(min(n_sel, qb + 1)).indices.tolist()}")
            # against Triton: identical but for swaps of near-tied blocks
            if mine != theirs:
                mismatched_rows += 1
                bad = [(i, a, b, float(ref[a]), float(ref[b])) for i, (a, b) in
                       enumerate(zip(mine, theirs)) if a != b and
                       (a < 0 or b < 0 or not _near(float(ref[a]), float(ref[b])))]
                if bad:
                    problems.append(
                        f"{where}: CUDA and Triton differ beyond near-ties at (position, cuda "
                        f"block, triton block, ref score cuda, ref score triton) {bad[:8]}\n"
                        f"    cuda   {mine}\n    triton {theirs}")
    rows = q.shape[0] * case.groups
    print(f"{label}: {rows} rows, {mismatched_rows} differ from Triton (near-ties)")
    assert not problems, f"{len(problems)} bad rows of {rows}:\n" + "\n".join(problems[:20])


GEOMETRIES = ["released", "tiny"]
DTYPES = [torch.bfloat16, torch.float16]


# SALA_SGLANG_SELECT_TILE: "1" the per-token kernel, "4" / "8" tokens per CTA (the tiled one)
TILES = ["1", "4", "8"]


@needs_extension
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_prefill_runs_of_one_request(geometry: str, dtype: torch.dtype, tile: str,
                                     monkeypatch) -> None:
    """Many neighbouring tokens of one request: a run from position 0 (no window visible yet,
    then fewer blocks than n_sel) and a run far past n_sel * block_size."""
    monkeypatch.setenv("SALA_SGLANG_SELECT_TILE", tile)
    cfg = _geometry(geometry)[0]
    far = 20 * cfg.num_selected_blocks * cfg.block_size // 7 + 5  # ~2.9x n_sel blocks, unaligned
    case = Case(geometry, dtype, [far], seed=1)
    early = list(range(0, 200))
    late = list(range(far - 250, far))
    q, treq, pos = case.queries([1] * (len(early) + len(late)), early + late)
    width = far // cfg.block_size + 1
    check_selection(case, q, treq, pos, width, 1,
                    f"{geometry} {dtype} tile {tile} prefill one request")


@needs_extension
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_prefill_several_requests(geometry: str, dtype: torch.dtype, tile: str,
                                  monkeypatch) -> None:
    """Runs of three requests (lengths not multiples of the block size), one batch, positions
    around block boundaries, below and above n_sel * block_size."""
    monkeypatch.setenv("SALA_SGLANG_SELECT_TILE", tile)
    cfg = _geometry(geometry)[0]
    bs, span = cfg.block_size, cfg.num_selected_blocks * cfg.block_size
    lengths = [3 * span + 7, span // 2 + 3, span + bs + 1]
    case = Case(geometry, dtype, lengths, seed=2)
    treq, pos = [], []
    for r, n in enumerate(lengths):
        run = sorted({n - 1, n - 2, bs - 1, bs, 2 * bs - 1, min(n - 1, span - 1),
                      min(n - 1, span), *torch.randint(0, n, (40,)).tolist()})
        treq += [r + 1] * len(run)
        pos += run
    q, treq_t, pos_t = case.queries(treq, pos)
    width = max(lengths) // bs + 3
    check_selection(case, q, treq_t, pos_t, width, 1,
                    f"{geometry} {dtype} tile {tile} prefill 3 requests")


def _interleaved_tokens(case: Case, count: int, seed: int) -> tuple[list[int], list[int]]:
    """`count` tokens of all the case's requests in a random order: most tiles of 4 or 8 mix
    requests, and positions within a tile are far apart."""
    gen = torch.Generator().manual_seed(seed)
    treq = torch.randint(1, len(case.lengths) + 1, (count,), generator=gen).tolist()
    pos = [int(torch.randint(0, case.lengths[r - 1], (1,), generator=gen)) for r in treq]
    return treq, pos


@needs_extension
@pytest.mark.parametrize("tile", ["4", "8"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tiled_tiles_mixing_requests(geometry: str, tile: str, monkeypatch) -> None:
    """Tiles whose tokens belong to different requests (swept one request at a time), token
    counts that are not a multiple of the tile (the last tile runs past the end), and a batch
    smaller than one tile."""
    monkeypatch.setenv("SALA_SGLANG_SELECT_TILE", tile)
    cfg = _geometry(geometry)[0]
    bs, span = cfg.block_size, cfg.num_selected_blocks * cfg.block_size
    lengths = [3 * span + 7, span // 2 + 3, span + bs + 1, 2 * bs + 5]
    case = Case(geometry, torch.bfloat16, lengths, seed=8)
    width = max(lengths) // bs + 2
    for count in (8 * 37 + 3, 4 * 9 + 1, 5, 1):
        treq, pos = _interleaved_tokens(case, count, seed=count)
        q, treq_t, pos_t = case.queries(treq, pos)
        check_selection(case, q, treq_t, pos_t, width, 1,
                        f"{geometry} tile {tile} {count} interleaved tokens")


def _prefill_runs(lengths: list[int], last: int) -> tuple[list[int], list[int]]:
    """The last `last` positions of each request in order, as a prefill chunk has them."""
    treq, pos = [], []
    for r, n in enumerate(lengths):
        start = max(0, n - last)
        treq += [r + 1] * (n - start)
        pos += list(range(start, n))
    return treq, pos


@needs_extension
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tiled_kernel_is_exact_under_regrouping(geometry: str, monkeypatch) -> None:
    """The tiled kernel scores a token the same way whatever shares its tile: each warp sweeps
    all of its token's windows in the same order. So 4 or 8 tokens per CTA, on the tokens in
    request order or shuffled so that every tile mixes requests, give bit-identical blocks."""
    cfg = _geometry(geometry)[0]
    bs, span = cfg.block_size, cfg.num_selected_blocks * cfg.block_size
    lengths = [4 * span + 3, span + 5, 3 * bs]
    case = Case(geometry, torch.float16, lengths, seed=9)
    width = max(lengths) // bs + 1
    q, treq_t, pos_t = case.queries(*_prefill_runs(lengths, 150))
    results = {}
    for tile in ("4", "8"):
        monkeypatch.setenv("SALA_SGLANG_SELECT_TILE", tile)
        results[tile] = case.select(q, treq_t, pos_t, width, "cuda")
        perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(10)).cuda()
        shuffled = case.select(q[perm], treq_t[perm], pos_t[perm], width, "cuda")
        unshuffled = torch.empty_like(shuffled)
        unshuffled[perm] = shuffled
        diff = (unshuffled != results[tile]).any(-1).any(-1).nonzero().flatten().tolist()
        assert not diff, f"tile {tile}: shuffling changed tokens {diff[:20]}"
    diff = (results["4"] != results["8"]).any(-1).any(-1).nonzero().flatten().tolist()
    assert not diff, f"tiles of 4 and of 8 differ at tokens {diff[:20]}"
    check_selection(case, q, treq_t, pos_t, width, 1, f"{geometry} tiled runs")


@needs_extension
@pytest.mark.parametrize("tile", ["4", "8"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tiled_segments_give_the_same_blocks(geometry: str, tile: str, monkeypatch) -> None:
    """The tiled kernel keeps block scores a segment at a time and merges each segment into the
    running best (SALA_SGLANG_SELECT_SEGMENT, 2048 blocks by default): any segment length, down
    to one block, and segments that split a tile of windows, must give bit-identical blocks, in
    tiles of one request and in tiles that mix requests."""
    monkeypatch.setenv("SALA_SGLANG_SELECT_TILE", tile)
    cfg = _geometry(geometry)[0]
    bs, span = cfg.block_size, cfg.num_selected_blocks * cfg.block_size
    lengths = [4 * span + 3, span + 5, 3 * bs, 2 * span + bs // 2]
    case = Case(geometry, torch.bfloat16, lengths, seed=11)
    width = max(lengths) // bs + 1
    batches = {"runs": _prefill_runs(lengths, 120),
               "mixed": _interleaved_tokens(case, 8 * 29 + 5, seed=12)}
    for label, (treq_l, pos_l) in batches.items():
        q, treq_t, pos_t = case.queries(treq_l, pos_l)
        monkeypatch.delenv("SALA_SGLANG_SELECT_SEGMENT", raising=False)
        whole = case.select(q, treq_t, pos_t, width, "cuda")
        for segment in ("1", "3", "5", str(cfg.num_selected_blocks + 1), str(width // 2)):
            monkeypatch.setenv("SALA_SGLANG_SELECT_SEGMENT", segment)
            got = case.select(q, treq_t, pos_t, width, "cuda")
            diff = (got != whole).any(-1).any(-1).nonzero().flatten().tolist()
            assert not diff, f"{label}, segments of {segment} blocks: tokens {diff[:20]} differ"
        check_selection(case, q, treq_t, pos_t, width, 1,
                        f"{geometry} tile {tile} {label}, segments of {width // 2} blocks")


@needs_extension
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_decode_batches_with_a_wide_static_width(geometry: str, dtype: torch.dtype,
                                                 batch: int) -> None:
    """One token per request at its last position, the width far beyond every sequence (CUDA
    graphs fix it); batch 8 uses the 1M-context width (16384 blocks of scores in shared memory)."""
    cfg = _geometry(geometry)[0]
    span = cfg.num_selected_blocks * cfg.block_size
    gen = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 4 * span, (batch,), generator=gen).tolist()
    lengths[0] = 3 * span + 11  # one well past n_sel blocks, whatever the draw
    case = Case(geometry, dtype, lengths, seed=3 + batch)
    q, treq, pos = case.queries(list(range(1, batch + 1)), [n - 1 for n in lengths])
    width = 16384 if batch == 8 else 8 * (max(lengths) // cfg.block_size + 1)
    check_selection(case, q, treq, pos, width, 8, f"{geometry} {dtype} decode b{batch}")


@needs_extension
@pytest.mark.parametrize("tile", ["auto", "8"])
def test_cuda_selection_replays_in_a_cuda_graph(tile: str, monkeypatch) -> None:
    if tile != "auto":  # the tiled kernel, its 4 tokens of 3 requests in one CTA
        monkeypatch.setenv("SALA_SGLANG_SELECT_TILE", tile)
    case = Case("released", torch.bfloat16, [9001, 20000, 333], seed=4)
    cfg = case.cfg
    q, treq, pos = case.queries([1, 2, 3, 2], [9000, 19999, 332, 7000])
    width = 20000 // cfg.block_size + 1
    case.select(q, treq, pos, width, "cuda")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = case.select(q, treq, pos, width, "cuda")
    for step in range(2):
        q2, _, _ = case.queries([1, 2, 3, 2], [0, 0, 0, 0])
        q.copy_(q2)
        pos.copy_(torch.tensor([8000 + step, 19000 - step, 300, 6500], device="cuda"))
        graph.replay()
        assert torch.equal(out, case.select(q, treq, pos, width, "cuda"))


@needs_extension
def test_unsupported_geometry_falls_back_to_triton() -> None:
    from sala_sglang.ops import sparse as ops

    case = Case("released", torch.bfloat16, [5000], seed=5)
    cfg = case.cfg
    q, treq, pos = case.queries([1, 1], [4000, 4999])
    huge = 1 << 16  # 256 KiB of block scores: more shared memory than any GPU gives a CTA
    why = ops.cuda_selection_unsupported(q, case.k1, case.rt, treq, pos, cfg.kernel_size,
                                         cfg.kernel_stride, cfg.block_size,
                                         cfg.num_selected_blocks, huge)
    assert why is not None and "shared memory" in why
    auto = case.select(q, treq, pos, huge, None)
    assert torch.equal(auto, case.select(q, treq, pos, huge, "triton"))
    with pytest.raises(ValueError, match="shared memory"):
        case.select(q, treq, pos, huge, "cuda")
    # 20 query heads per kv head: more than one m16 tile
    wide_q = torch.randn(2, 40, 128, device="cuda", dtype=torch.bfloat16)
    assert ops.cuda_selection_unsupported(wide_q, case.k1, case.rt, treq, pos, cfg.kernel_size,
                                          cfg.kernel_stride, cfg.block_size,
                                          cfg.num_selected_blocks, 100) is not None
    with pytest.raises(ValueError, match="impl"):
        case.select(q, treq, pos, 100, "cutlass")


@needs_extension
def test_auto_dispatch_follows_the_measured_choice_and_the_override(monkeypatch) -> None:
    from sala_sglang.ops import sparse as ops

    calls: list[str] = []
    triton_select = ops._select_blocks_triton

    def spy(*args, **kwargs):
        calls.append("triton")
        return triton_select(*args, **kwargs)

    monkeypatch.setattr(ops, "_select_blocks_triton", spy)
    case = Case("tiny", torch.float16, [700, 90], seed=6)
    q, treq, pos = case.queries([1, 2, 1], [699, 89, 300])
    monkeypatch.setattr(ops, "_cuda_selection_faster", lambda *args: True)
    assert torch.equal(case.select(q, treq, pos, 64, None), case.select(q, treq, pos, 64, "cuda"))
    assert calls == []
    monkeypatch.setattr(ops, "_cuda_selection_faster", lambda *args: False)
    case.select(q, treq, pos, 64, None)
    assert calls == ["triton"]
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda")
    case.select(q, treq, pos, 64, None)
    assert calls == ["triton"]
    empty = case.select(q[:0], treq[:0], pos[:0], 64, "cuda")
    assert empty.shape == (0, case.groups, case.cfg.num_selected_blocks)


@needs_extension
def test_cuda_selection_op_registration_passes_opcheck() -> None:
    case = Case("tiny", torch.bfloat16, [500], seed=7)
    cfg = case.cfg
    q, treq, pos = case.queries([1, 1, 1], [10, 250, 499])
    torch.library.opcheck(
        torch.ops.sala_sglang.select_blocks.default,
        (q, case.k1, case.rt, treq, pos, cfg.kernel_size, cfg.kernel_stride, cfg.block_size,
         cfg.init_blocks, cfg.local_blocks, cfg.num_selected_blocks, 40, 0.125),
    )
