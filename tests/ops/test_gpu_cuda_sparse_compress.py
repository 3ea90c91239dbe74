"""The CUDA key compression op (`sala_sglang._C`, csrc/sparse_compress.cu) against its Triton twin
and the float64 reference `compress_keys`: both model geometries (and their K2 windows), awkward
old/new lengths, shuffled page tables, and nothing written outside the new windows' rows."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cuda_extension import ON_GPU, child_stdout, needs_extension

# the paged-cache builder is shared with benchmarks/kernels/sparse_attention.py
from sala_sglang.testing.paged_inputs import paged_cache

from sala_sglang.config import complete_windows  # noqa: E402

pytestmark = ON_GPU

GROUPS = 2
SENTINEL = 1000.0  # exact in every dtype; a mean of unit normals never gets near it


@dataclass(frozen=True)
class Geometry:
    name: str
    block: int
    stride: int
    kernel: int
    dim: int

    def windows(self, length: int) -> int:
        return complete_windows(length, self.kernel, self.stride)

    @property
    def rows(self) -> int:
        return -(-self.block // self.stride)


# K1 of the released model and of the tiny test model, and the K2 windows (4x) the backend also
# compresses with the same op: K2 of the tiny model has its stride larger than its block.
RELEASED = Geometry("released_k1", 64, 16, 32, 128)
TINY = Geometry("tiny_k1", 16, 8, 16, 64)
GEOMETRIES = [RELEASED, TINY, Geometry("released_k2", 64, 64, 128, 128),
              Geometry("tiny_k2", 16, 32, 64, 64)]


def _growth_cases(geo: Geometry) -> list[tuple[int, int]]:
    """(old_len, new_len) per request: empty, short of the first window, exactly one, a window
    boundary, mid-block, no growth (twice), one decode step with and without a new window, and a
    long prefill from nothing."""
    kl, ks, bs = geo.kernel, geo.stride, geo.block
    return [
        (0, 0),
        (0, kl - 1),
        (kl - 1, kl),
        (kl, kl + 3 * ks),
        (3 * bs + 5, 7 * bs + 3),
        (777, 777),
        (kl + 5 * ks, kl + 5 * ks),
        (5000, 5001),
        (kl + 40 * ks - 1, kl + 40 * ks),
        (0, 9001),
        (1234, 4321),
    ]


def _inputs(geo: Geometry, dtype: torch.dtype, cases: list[tuple[int, int]], seed: int,
            index_dtype: torch.dtype = torch.int32):
    """Paged cache for the requests (rows of req_to_token in shuffled order), k_buffer, and the
    index tensors of one compression call."""
    torch.manual_seed(seed)
    lengths = [max(new, 1) for _, new in cases]
    rt, k, _ = paged_cache(lengths, geo.block, GROUPS, geo.dim, "cuda", dtype)
    order = torch.randperm(len(cases)).tolist()  # request i of the batch is row order[i] + 1
    cases = [cases[j] for j in order]
    slots = torch.tensor([j + 1 for j in order], dtype=index_dtype, device="cuda")
    old = torch.tensor([o for o, _ in cases], dtype=index_dtype, device="cuda")
    new = torch.tensor([n for _, n in cases], dtype=index_dtype, device="cuda")
    pages = k.shape[0] // geo.block
    return rt, k, slots, old, new, cases, pages


def _run(impl: str, geo: Geometry, k, rt, slots, old, new, pages: int, most: int):
    from sala_sglang.ops.sparse import compress_new_windows

    out = torch.full((pages, geo.rows, GROUPS, geo.dim), SENTINEL, dtype=k.dtype, device="cuda")
    compress_new_windows(k, out, rt, slots, old, new, geo.kernel, geo.stride, geo.block,
                         max_new_windows=most, impl=impl)
    torch.cuda.synchronize()
    return out


def _expected_rows(geo: Geometry, rt, slots, cases, pages: int, most: int):
    """Mask [pages, rows] of the rows the call must write, and (row, request, window) of each."""
    mask = torch.zeros(pages, geo.rows, dtype=torch.bool)
    where = []
    rt_cpu = rt.cpu()
    for b, (o, n) in enumerate(cases):
        row = int(slots[b])
        lo, hi = geo.windows(o), geo.windows(n)
        for c in range(lo, min(hi, lo + most)):
            start = c * geo.stride
            page = int(rt_cpu[row, (start // geo.block) * geo.block]) // geo.block
            sub = (start % geo.block) // geo.stride
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


def _check_against_triton_and_reference(geo, dtype, rt, k, slots, old, new, cases, pages, most):
    from sala_sglang.reference.sparse import compress_keys

    cuda = _run("cuda", geo, k, rt, slots, old, new, pages, most)
    triton = _run("triton", geo, k, rt, slots, old, new, pages, most)
    mask, where = _expected_rows(geo, rt, slots, cases, pages, most)
    assert where, "test inputs: no window to write"

    untouched = cuda.cpu()[~mask]
    assert bool((untouched == SENTINEL).all()), (
        f"{geo.name} {dtype}: {int((untouched != SENTINEL).flatten(1).any(1).sum())} rows written "
        f"outside the new windows")
    assert bool((triton.cpu()[~mask] == SENTINEL).all()), "the Triton twin wrote outside its rows"

    idx = [(p, s) for p, s, _, _ in where]
    got = torch.stack([cuda[p, s] for p, s in idx]).cpu()
    twin = torch.stack([triton[p, s] for p, s in idx]).cpu()
    assert torch.isfinite(got.float()).all() and not bool((got == SENTINEL).any())
    # Same fp32 sums in another order, each rounded once to the storage dtype: at most a unit in
    # the last place apart.
    tol = dict(rtol=_ulp(dtype), atol=1e-6)
    assert torch.allclose(got.double(), twin.double(), **tol), _describe(got, twin, where,
                                                                         "CUDA vs Triton")

    rt_cpu, k_cpu = rt.cpu(), k.cpu()
    refs = {}
    want = []
    for _, _, b, c in where:
        if b not in refs:
            row, n = int(slots[b]), cases[b][1]
            refs[b] = compress_keys(k_cpu[rt_cpu[row, :n].long()].double(), geo.kernel, geo.stride)
        want.append(refs[b][c])
    want = torch.stack(want)
    # float64 mean vs an fp32 sum rounded once: within half a unit, plus the sum's own error
    assert torch.allclose(got.double(), want, **tol), _describe(got, want, where,
                                                                "CUDA vs float64 reference")
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < _ulp(dtype), f"relative error {rel:.2e}"


@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.name)
def test_cuda_writes_exactly_the_new_windows_like_triton_and_reference(
    geo: Geometry, dtype: torch.dtype
) -> None:
    cases = _growth_cases(geo)
    rt, k, slots, old, new, cases, pages = _inputs(geo, dtype, cases, seed=geo.dim + geo.stride)
    # grid larger than needed: the longest growth plus spare runs that must write nothing
    most = max(geo.windows(n) - geo.windows(o) for o, n in cases) + 37
    _check_against_triton_and_reference(geo, dtype, rt, k, slots, old, new, cases, pages, most)


@needs_extension
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cuda_takes_int64_indices_and_fp32_keys(index_dtype: torch.dtype) -> None:
    cases = [(0, 300), (17, 18), (31, 32), (100, 1000)]
    rt, k, slots, old, new, cases, pages = _inputs(RELEASED, torch.float32, cases, seed=3,
                                                   index_dtype=index_dtype)
    rt = rt.to(index_dtype)
    _check_against_triton_and_reference(RELEASED, torch.float32, rt, k, slots, old, new, cases,
                                        pages, most=80)


@needs_extension
@pytest.mark.parametrize("geo", [RELEASED, TINY], ids=lambda g: g.name)
def test_a_small_max_new_windows_writes_the_first_windows_like_triton(geo: Geometry) -> None:
    # max_new_windows below the growth: both kernels write windows lo .. lo + max - 1 only
    cases = [(0, 2000), (geo.kernel - 1, 900), (500, 501)]
    rt, k, slots, old, new, cases, pages = _inputs(geo, torch.bfloat16, cases, seed=5)
    _check_against_triton_and_reference(geo, torch.bfloat16, rt, k, slots, old, new, cases,
                                        pages, most=21)


@needs_extension
def test_cuda_compression_replays_in_a_cuda_graph_with_new_lengths() -> None:
    geo = RELEASED
    cases = [(0, 4000), (100, 3000), (2000, 2001)]
    rt, k, slots, old, new, cases, pages = _inputs(geo, torch.bfloat16, cases, seed=9)
    op = torch.ops.sala_sglang.compress_new_windows
    out = torch.zeros(pages, geo.rows, GROUPS, geo.dim, dtype=k.dtype, device="cuda")
    eager = out.clone()
    args = (geo.kernel, geo.stride, geo.block, 300)
    op(k, out, rt, slots, old, new, *args)  # warm up outside the capture
    eager.copy_(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(k, out, rt, slots, old, new, *args)
    # lengths change between replays, shapes do not: the grid must cover every step
    for o, n in (([0, 0, 0], [33, 3000, 48]), ([1000, 2999, 48], [4000, 3000, 3000])):
        old.copy_(torch.tensor(o))
        new.copy_(torch.tensor(n))
        graph.replay()
        op(k, eager, rt, slots, old, new, *args)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@needs_extension
def test_dispatch_falls_back_to_triton_where_cuda_cannot_run() -> None:
    from sala_sglang.ops.sparse import compress_new_windows

    # stride 12 is no multiple of the kernel's 8-key pieces
    geo = Geometry("stride12", 48, 12, 24, 64)
    cases = [(0, 500), (30, 31)]
    rt, k, slots, old, new, cases, pages = _inputs(geo, torch.bfloat16, cases, seed=11)
    auto = _run(None, geo, k, rt, slots, old, new, pages, 60)
    triton = _run("triton", geo, k, rt, slots, old, new, pages, 60)
    assert torch.equal(auto, triton)
    with pytest.raises(ValueError, match="stride 12"):
        compress_new_windows(k, auto, rt, slots, old, new, geo.kernel, geo.stride, geo.block,
                             max_new_windows=60, impl="cuda")


@needs_extension
def test_cuda_op_registration_passes_opcheck() -> None:
    geo = TINY
    rt, k, slots, old, new, _, pages = _inputs(geo, torch.bfloat16, [(0, 100), (40, 90)], seed=2)
    out = torch.zeros(pages, geo.rows, GROUPS, geo.dim, dtype=k.dtype, device="cuda")
    torch.library.opcheck(torch.ops.sala_sglang.compress_new_windows.default,
                          (k, out, rt, slots, old, new, geo.kernel, geo.stride, geo.block, 20))


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


@needs_extension
def test_cuda_op_names_the_bad_argument() -> None:
    out = child_stdout(BAD_ARGUMENTS)
    assert "out must be c10::BFloat16" in out or "out must be BFloat16" in out, out
    assert "stride a multiple of 8" in out, out
    assert "req_to_token must be an int32 or int64" in out, out
