"""K1 compression (`compress_new_windows`) by implementation against the float64 reference
`compress_keys`: awkward old/new lengths, shuffled page tables, nothing written outside the new
windows' rows; CUDA also against its Triton twin. Without a GPU the Triton kernel runs in the
CPU interpreter on short growths; the released geometry and half precision need a GPU."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import TINY_SPARSE, child_stdout, needs_extension

from sala_sglang.config import MiniCPMSALAConfig, SparseConfig
from sala_sglang.ops.infllm_v2 import compress_new_windows
from sala_sglang.reference.sparse import compress_keys
from sala_sglang.testing.paged_inputs import paged_cache, request_k1

GROUPS = 2
SENTINEL = 1000.0  # exact in every dtype; a mean of unit normals never gets near it


def _sparse(kernel_size: int, kernel_stride: int, block_size: int) -> SparseConfig:
    return SparseConfig(kernel_size=kernel_size, kernel_stride=kernel_stride, init_blocks=1,
                        block_size=block_size, window_size=2 * block_size, topk=2,
                        use_nope=False, dense_len=0)


# (name, geometry, head dim): the released model's K1, the tiny test model's, and a stride equal
# to the block (one row per page)
RELEASED = ("released", MiniCPMSALAConfig().sparse, 128)
TINY = ("tiny", TINY_SPARSE, 64)
ONE_ROW = ("one_row_per_page", _sparse(128, 64, 64), 128)
GEOMETRIES = [pytest.param(TINY, id="tiny"),
              pytest.param(RELEASED, id="released", marks=pytest.mark.gpu),
              pytest.param(ONE_ROW, id="one_row_per_page", marks=pytest.mark.gpu)]
DTYPES = [pytest.param(torch.float32, id="fp32"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
          pytest.param(torch.float16, id="fp16", marks=pytest.mark.gpu)]


def _growth_cases(cfg: SparseConfig, long: bool) -> list[tuple[int, int]]:
    """(old_len, new_len) per request: empty, short of the first window, exactly one, a window
    boundary, mid-block, no growth (twice), one decode step with and without a new window, and a
    long prefill from nothing (shorter ones in the CPU interpreter)."""
    kl, ks, bs = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    step, prefill, middle = ((5000, 5001), (0, 9001), (1234, 4321)) if long else \
        ((300, 301), (0, 420), (123, 432))
    return [(0, 0), (0, kl - 1), (kl - 1, kl), (kl, kl + 3 * ks), (3 * bs + 5, 7 * bs + 3),
            (777, 777), (kl + 5 * ks, kl + 5 * ks), step, (kl + 40 * ks - 1, kl + 40 * ks),
            prefill, middle]


class Growth:
    """One compression call: a paged cache for the requests (rows of req_to_token in shuffled
    order), k_buffer, and the index tensors."""

    def __init__(self, cfg: SparseConfig, dim: int, dtype: torch.dtype,
                 cases: list[tuple[int, int]], device: str, seed: int,
                 index_dtype: torch.dtype = torch.int32) -> None:
        torch.manual_seed(seed)
        self.cfg, self.dim = cfg, dim
        lengths = [max(new, 1) for _, new in cases]
        self.rt, self.k, _ = paged_cache(lengths, cfg.block_size, GROUPS, dim, device, dtype)
        order = torch.randperm(len(cases)).tolist()  # request i of the batch is row order[i] + 1
        self.cases = [cases[j] for j in order]
        self.slots = torch.tensor([j + 1 for j in order], dtype=index_dtype, device=device)
        self.old = torch.tensor([o for o, _ in self.cases], dtype=index_dtype, device=device)
        self.new = torch.tensor([n for _, n in self.cases], dtype=index_dtype, device=device)
        self.pages = self.k.shape[0] // cfg.block_size

    def run(self, impl: str | None, most: int) -> torch.Tensor:
        out = torch.full((self.pages, self.cfg.windows_per_block, GROUPS, self.dim), SENTINEL,
                         dtype=self.k.dtype, device=self.k.device)
        compress_new_windows(self.k, out, self.rt, self.slots, self.old, self.new, self.cfg,
                             most, impl=impl)
        return out

    def expected_rows(self, most: int):
        """Mask [pages, rows] of the rows the call must write, and (row, request, window) of
        each."""
        cfg = self.cfg
        mask = torch.zeros(self.pages, cfg.windows_per_block, dtype=torch.bool)
        where = []
        rt = self.rt.cpu()
        for b, (o, n) in enumerate(self.cases):
            row = int(self.slots[b])
            lo, hi = cfg.num_k1(o), cfg.num_k1(n)
            for c in range(lo, min(hi, lo + most)):
                block, sub = cfg.k1_home(c)
                page = int(rt[row, block * cfg.block_size]) // cfg.block_size
                assert not mask[page, sub], "test inputs: two windows share one output row"
                mask[page, sub] = True
                where.append((page, sub, b, c))
        return mask, where


def _ulp(dtype: torch.dtype) -> float:
    """Spacing of the dtype relative to a value: one rounding of an fp32 sum is within it."""
    # fp32: the summation order itself shows, a mean near 0 being the difference of large sums
    return {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-16}[dtype]


def _describe(got: torch.Tensor, want: torch.Tensor, where, label: str) -> str:
    diff = (got.double() - want.double()).abs()
    per_row = diff.flatten(1).amax(1)
    worst = int(per_row.argmax())
    page, sub, b, c = where[worst]
    return (f"{label}: max |diff| {float(diff.max()):.3e} at request {b} window {c} "
            f"(page {page}, row {sub}); got {got[worst].flatten()[:4].tolist()} want "
            f"{want[worst].flatten()[:4].tolist()}; rows differing: "
            f"{int((per_row > 0).sum())}/{len(where)}")


def check_growth(growth: Growth, impl: str, most: int, relative_error) -> None:
    """The call writes exactly the new windows (at most `most` per request), each the mean of its
    keys within a unit in the last place; CUDA also within one of Triton."""
    cfg, dtype = growth.cfg, growth.k.dtype
    out = growth.run(impl, most)
    mask, where = growth.expected_rows(most)
    assert where, "test inputs: no window to write"
    untouched = out.cpu()[~mask]
    assert bool((untouched == SENTINEL).all()), (
        f"{impl} {dtype}: {int((untouched != SENTINEL).flatten(1).any(1).sum())} rows written "
        f"outside the new windows")
    got = torch.stack([out[p, s] for p, s, _, _ in where]).cpu()
    assert torch.isfinite(got.float()).all() and not bool((got == SENTINEL).any())
    tol = dict(rtol=_ulp(dtype), atol=1e-6)
    if impl == "cuda":
        # Same fp32 sums in another order, each rounded once to the storage dtype: at most a unit
        # in the last place apart.
        triton = growth.run("triton", most)
        assert bool((triton.cpu()[~mask] == SENTINEL).all()), "Triton wrote outside its rows"
        twin = torch.stack([triton[p, s] for p, s, _, _ in where]).cpu()
        assert torch.allclose(got.double(), twin.double(), **tol), _describe(
            got, twin, where, "CUDA vs Triton")
    rt, k = growth.rt.cpu(), growth.k.cpu()
    refs: dict[int, torch.Tensor] = {}
    want = []
    for _, _, b, c in where:
        if b not in refs:
            row, n = int(growth.slots[b]), growth.cases[b][1]
            refs[b] = compress_keys(k[rt[row, :n].long()].double(), cfg.kernel_size,
                                    cfg.kernel_stride)
        want.append(refs[b][c])
    want = torch.stack(want)
    # float64 mean vs an fp32 sum rounded once: within half a unit, plus the sum's own error
    assert torch.allclose(got.double(), want, **tol), _describe(got, want, where,
                                                                f"{impl} vs float64 reference")
    assert relative_error(got, want) < _ulp(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_writes_exactly_the_new_windows_like_the_reference(
    impl: str, device: str, geometry, dtype: torch.dtype, relative_error
) -> None:
    _, cfg, dim = geometry
    cases = _growth_cases(cfg, long=device == "cuda")
    growth = Growth(cfg, dim, dtype, cases, device, seed=dim + cfg.kernel_stride)
    # grid larger than needed: the longest growth plus spare runs that must write nothing
    most = max(cfg.num_k1(n) - cfg.num_k1(o) for o, n in cases) + 37
    check_growth(growth, impl, most, relative_error)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_int64_indices_and_fp32_keys(impl: str, device: str, index_dtype: torch.dtype,
                                     relative_error) -> None:
    _, cfg, dim = RELEASED
    cases = [(0, 300), (17, 18), (31, 32), (100, 1000)]
    growth = Growth(cfg, dim, torch.float32, cases, device, seed=3, index_dtype=index_dtype)
    growth.rt = growth.rt.to(index_dtype)
    check_growth(growth, impl, 80, relative_error)


def test_strided_index_arrays_write_what_dense_ones_write(impl: str, device: str) -> None:
    # slots and lengths as strided views (the sparse ops once read a view of one request's slot
    # past its element): the same rows as with dense arrays
    _, cfg, dim = TINY
    growth = Growth(cfg, dim, torch.float16, [(0, 40), (5, 70), (33, 34)], device, seed=9)
    dense = growth.run(impl, 16)
    filler = torch.zeros_like(growth.slots)
    growth.slots, growth.old, growth.new = (torch.stack([x, filler], 1)[:, 0]
                                            for x in (growth.slots, growth.old, growth.new))
    assert growth.slots.stride() == (2,)
    assert torch.equal(growth.run(impl, 16), dense)


@pytest.mark.parametrize("geometry", [pytest.param(RELEASED, id="released"),
                                      pytest.param(TINY, id="tiny")])
def test_a_small_max_new_windows_writes_the_first_windows(impl: str, device: str, geometry,
                                                          relative_error) -> None:
    # max_new_windows below the growth: windows lo .. lo + max - 1 only
    _, cfg, dim = geometry
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = [(0, 2000), (cfg.kernel_size - 1, 900), (500, 501)]
    check_growth(Growth(cfg, dim, dtype, cases, device, seed=5), impl, 21, relative_error)


# (geometry, dtype, final lengths, lengths after the first step, bound on the error): fp32 to
# 1e-5 (largest abs. error), bf16 storage to 1e-2 (relative error)
TWO_STEPS = [pytest.param(TINY, torch.float32, [300, 180], [130, 77], 1e-5, id="tiny-fp32"),
             pytest.param(RELEASED, torch.bfloat16, [9000, 7001], [5000, 3333], 1e-2,
                          id="released-bf16", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("geometry,dtype,lens,first,bound", TWO_STEPS)
def test_two_growth_steps_give_every_window(impl: str, device: str, geometry, dtype, lens, first,
                                            bound, relative_error) -> None:
    """Two requests grown in two calls, the first ending inside a window: K1 holds each
    complete window's mean, wherever it was written."""
    _, cfg, dim = geometry
    torch.manual_seed(0)
    rt, k, _ = paged_cache(lens, cfg.block_size, GROUPS, dim, device, dtype)
    slots = torch.tensor([1, 2], dtype=torch.int32, device=device)
    k1 = torch.zeros(k.shape[0] // cfg.block_size, cfg.windows_per_block, GROUPS, dim,
                     dtype=dtype, device=device)
    for old, new in (([0, 0], first), (first, lens)):
        compress_new_windows(k, k1, rt, slots, torch.tensor(old, device=device),
                             torch.tensor(new, device=device), cfg,
                             max(lens) // cfg.kernel_stride + 2, impl=impl)
    for r, n in enumerate(lens):
        want = compress_keys(k[rt[r + 1, :n].long()].double().cpu(), cfg.kernel_size,
                             cfg.kernel_stride)
        got = request_k1(k1, rt, r + 1, n, cfg).double().cpu()
        if dtype == torch.float32:
            assert float((got - want).abs().max()) < bound, f"request {r}"
        else:
            assert relative_error(got, want) < bound, f"request {r}"


@pytest.mark.parametrize("geometry", [pytest.param(TINY, id="tiny"),
                                      pytest.param(RELEASED, id="released"),
                                      pytest.param(ONE_ROW, id="one_row_per_page")])
def test_a_window_lives_beside_the_page_of_its_last_token(geometry) -> None:
    """The layout rule (`SparseConfig.k1_home`): window c's (block, row) is the block of its last
    token and that token's offset in the block over the stride; rows of a block are distinct and
    fewer than windows_per_block, and every one depends only on tokens of that block or earlier."""
    _, cfg, _ = geometry
    kl, ks, bs, r = cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.windows_per_block
    seen: set[tuple[int, int]] = set()
    for c in range(40 * r):
        block, row = cfg.k1_home(c)
        last = ks * c + kl - 1
        assert block * bs <= last < (block + 1) * bs and 0 <= row < r, (c, block, row)
        assert (block, row) not in seen, f"window {c} shares ({block}, {row})"
        seen.add((block, row))
    lag = kl // ks - 1  # windows before c = 0 that would fill the first block's first rows
    assert len(seen) == 40 * r and {b * r + w for b, w in seen} == set(range(lag, 40 * r + lag))
    # c = 0 ends at token kl - 1; a window ending on a page's last token takes the page's last row
    assert cfg.k1_home(0) == ((kl - 1) // bs, ((kl - 1) % bs) // ks)
    ends_last = (bs - kl % bs) // ks if kl % bs else 0  # (ks*c + kl) % bs == 0
    assert cfg.k1_home(ends_last) == ((ks * ends_last + kl - 1) // bs, r - 1)


def test_the_layout_rule_on_the_real_and_tiny_configs() -> None:
    released, tiny = RELEASED[1], TINY[1]
    # released (32 / 16 / 64): windows 4p - 1 .. 4p + 2 in page p; page 0 row 0 never written
    assert [released.k1_home(c) for c in range(7)] == [
        (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert [released.k1_home(4 * 9 + d) for d in (-1, 0, 1, 2)] == [(9, w) for w in range(4)]
    # tiny (16 / 8 / 16): windows 2p - 1, 2p in page p; window 2 ends on token 31, page 1's last
    assert [tiny.k1_home(c) for c in range(4)] == [(0, 1), (1, 0), (1, 1), (2, 0)]
    # one row per page (128 / 64 / 64): window c lives in page c + 1, page 0 holds none
    assert [ONE_ROW[1].k1_home(c) for c in range(3)] == [(1, 0), (2, 0), (3, 0)]


def _shared_prefix_cache(cfg: SparseConfig, dim: int, dtype: torch.dtype, len_a: int,
                         shared: int, len_b: int, device: str):
    """req_to_token rows 1 (request A, `len_a` keys) and 2 (request B, `len_b` keys) whose first
    `shared` pages are the same physical pages (a prefix-cache hit: same keys), every other page
    each request's own; pages shuffled over the pool. Returns rt, k, A's pages, B's pages."""
    bs = cfg.block_size
    n_a, own_b = -(-len_a // bs), -(-len_b // bs) - shared
    perm = torch.randperm(n_a + own_b) + 1  # page 0 unused
    pages_a, pages_b = perm[:n_a], torch.cat([perm[:shared], perm[n_a:]])
    rt = torch.zeros(3, max(len_a, len_b) + bs, dtype=torch.int32)
    for row, pages, n in ((1, pages_a, len_a), (2, pages_b, len_b)):
        pos = torch.arange(n)
        rt[row, :n] = (pages[pos // bs] * bs + pos % bs).to(torch.int32)
    k = torch.randn((n_a + own_b + 1) * bs, GROUPS, dim, dtype=dtype)
    return rt.to(device), k.to(device), pages_a, pages_b


# (geometry, A's length, shared pages, B's length, where B's second step starts past the shared
# prefix, or None for one step from the shared prefix's end)
SHARED = [pytest.param(TINY, 100, 3, 118, None, id="tiny"),
          pytest.param(TINY, 100, 3, 118, 5, id="tiny-mid-page"),
          pytest.param(RELEASED, 1000, 5, 1020, None, id="released", marks=pytest.mark.gpu),
          pytest.param(RELEASED, 1000, 5, 1020, 37, id="released-mid-page",
                       marks=pytest.mark.gpu)]


@pytest.mark.parametrize("geometry,len_a,shared,len_b,mid", SHARED)
def test_a_request_extending_shared_pages_writes_none_of_them(
    impl: str, device: str, geometry, len_a: int, shared: int, len_b: int, mid: int | None
) -> None:
    """Prefix caching: B's req_to_token starts with A's first `shared` pages, and B compresses
    from the end of that prefix (old_len = shared * block, as a prefix hit gives). B writes
    nothing into a shared page (the window crossing the last shared page's end lives in B's own
    next page), B's windows are its keys' means, A's stay its own. `mid`: B grows in two steps,
    the second from mid-page in B's own first page (a chunked-prefill extend); that is all the
    layout guarantees: a prefix is shared only in whole pages, so an extend starting mid-page is
    in a page the request owns."""
    _, cfg, dim = geometry
    torch.manual_seed(len_b + (mid or 0))
    dtype = torch.float32
    rt, k, pages_a, pages_b = _shared_prefix_cache(cfg, dim, dtype, len_a, shared, len_b, device)
    out = torch.full((k.shape[0] // cfg.block_size, cfg.windows_per_block, GROUPS, dim),
                     SENTINEL, dtype=dtype, device=device)
    most = max(len_a, len_b) // cfg.kernel_stride + 2

    def grow(row: int, old: int, new: int) -> None:
        compress_new_windows(k, out, rt, torch.tensor([row], dtype=torch.int32, device=device),
                             torch.tensor([old], device=device),
                             torch.tensor([new], device=device), cfg, most, impl=impl)

    grow(1, 0, len_a)
    shared_pages = pages_a[:shared].to(device)
    before = out[shared_pages].clone()
    a_before = request_k1(out, rt, 1, len_a, cfg).clone()
    prefix = shared * cfg.block_size
    steps = [(prefix, len_b)] if mid is None else [(prefix, prefix + mid), (prefix + mid, len_b)]
    for old, new in steps:
        grow(2, old, new)
        assert torch.equal(out[shared_pages], before), (
            f"{impl}: B's growth {old} -> {new} wrote into a shared page")
    for row, n in ((1, len_a), (2, len_b)):
        want = compress_keys(k[rt[row, :n].long()].double().cpu(), cfg.kernel_size,
                             cfg.kernel_stride)
        got = request_k1(out, rt, row, n, cfg).double().cpu()
        assert want.shape[0] > 0 and float((got - want).abs().max()) < 1e-5, (
            f"{impl}: request {'AB'[row - 1]}'s windows")
    assert torch.equal(request_k1(out, rt, 1, len_a, cfg), a_before)
    # B's own pages hold B's windows only: nothing of B landed in an A-only page either
    assert not set(pages_b[shared:].tolist()) & set(pages_a.tolist())


@pytest.mark.gpu
@needs_extension
def test_cuda_compression_replays_in_a_cuda_graph_with_new_lengths() -> None:
    _, cfg, dim = RELEASED
    # every row holds the longest replay: past a row's allocation req_to_token reads page 0, so
    # windows there would race on page 0's rows with differing values
    growth = Growth(cfg, dim, torch.bfloat16, [(0, 4000), (100, 4000), (2000, 4000)], "cuda",
                    seed=9)
    op = torch.ops.sala_sglang.compress_new_windows
    out = torch.zeros(growth.pages, cfg.windows_per_block, GROUPS, dim, dtype=torch.bfloat16,
                      device="cuda")
    eager = out.clone()
    index = (growth.slots, growth.old, growth.new)
    args = (cfg.kernel_size, cfg.kernel_stride, cfg.block_size, 300)
    op(growth.k, out, growth.rt, *index, *args)  # warm up outside the capture
    eager.copy_(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(growth.k, out, growth.rt, *index, *args)
    # lengths change between replays, shapes do not: the grid must cover every step
    for o, n in (([0, 0, 0], [33, 3000, 48]), ([1000, 2999, 48], [4000, 3000, 3000])):
        growth.old.copy_(torch.tensor(o))
        growth.new.copy_(torch.tensor(n))
        graph.replay()
        op(growth.k, eager, growth.rt, *index, *args)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.gpu
@needs_extension
def test_dispatch_falls_back_to_triton_where_cuda_cannot_run() -> None:
    # stride 12 is no multiple of the kernel's 8-key pieces
    growth = Growth(_sparse(24, 12, 48), 64, torch.bfloat16, [(0, 500), (30, 31)], "cuda",
                    seed=11)
    assert torch.equal(growth.run(None, 60), growth.run("triton", 60))
    with pytest.raises(ValueError, match="stride 12"):
        growth.run("cuda", 60)


@pytest.mark.gpu
@needs_extension
def test_cuda_op_registration_passes_opcheck() -> None:
    _, cfg, dim = TINY
    growth = Growth(cfg, dim, torch.bfloat16, [(0, 100), (40, 90)], "cuda", seed=2)
    out = torch.zeros(growth.pages, cfg.windows_per_block, GROUPS, dim, dtype=torch.bfloat16,
                      device="cuda")
    torch.library.opcheck(torch.ops.sala_sglang.compress_new_windows.default,
                          (growth.k, out, growth.rt, growth.slots, growth.old, growth.new,
                           cfg.kernel_size, cfg.kernel_stride, cfg.block_size, 20))


BAD_ARGUMENTS = textwrap.dedent(
    """
    import torch
    import sala_sglang._C  # noqa: F401

    op = torch.ops.sala_sglang.compress_new_windows
    k = torch.randn(64, 2, 128, device="cuda", dtype=torch.bfloat16)
    rt = torch.zeros(2, 64, device="cuda", dtype=torch.int32)
    idx = torch.zeros(1, device="cuda", dtype=torch.int32)
    out = torch.zeros(1, 4, 2, 128, device="cuda", dtype=torch.bfloat16)
    for args in ((k, out.half(), rt, idx, idx, idx, 32, 16, 64, 4),
                 (k, out, rt, idx, idx, idx, 24, 12, 48, 4),
                 (k, out, rt.float(), idx, idx, idx, 32, 16, 64, 4)):
        try:
            op(*args)
        except RuntimeError as exc:
            print(str(exc).splitlines()[0])
    """
)


@pytest.mark.gpu
@needs_extension
def test_cuda_op_names_the_bad_argument() -> None:
    # A separate process: an error path of the compiled op once brought the whole interpreter
    # down (a segfault on the H100 image), which would end the test session.
    out = child_stdout(BAD_ARGUMENTS)
    assert "out must be c10::BFloat16" in out or "out must be BFloat16" in out, out
    assert "stride a multiple of 8" in out, out
    assert "req_to_token must be an int32 or int64" in out, out
