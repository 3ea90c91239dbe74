"""Lightning ops (SPEC 2.1) against the reference recurrence: prefill (Triton) and decode (each
implementation, the `impl` fixture), then the CUDA decode op's own contract.

Cases without the `gpu` mark run on the `device` fixture: Triton's CPU interpreter without a GPU
(fp32: the kernels' indexing, masking, state slots and chunk carry-over, held to 1e-5), compiled on
a GPU (bf16). The `gpu` cases repeat the comparison at real and awkward sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from conftest import child_stdout, needs_extension

from sala_sglang.ops.lightning import lightning_decode, lightning_prefill
from sala_sglang.reference.lightning import lightning_chunked, lightning_recurrent, lightning_slopes

# Output error against the float64 reference, by input dtype. The fp32 state a step writes is held
# to STATE_TOL whatever the inputs; prefill's state goes through tensor-core products in the input
# dtype, so it is held to the output's tolerance.
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
STATE_TOL = 1e-5
# Two heads of the steepest and a slow decay; the small cases' geometry.
SMALL_SLOPES = [0.84, 0.01]
SMALL_HEADS, SMALL_DIM = 2, 32


def small_dtype(device: str) -> torch.dtype:
    """fp32 in the interpreter (exact products); on a GPU tl.dot would round fp32 to tf32, so the
    serving dtype bf16."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def cumulative(lengths: Sequence[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device,
                        dtype=torch.int32)


def unowned(pool: int, slots: Sequence[int]) -> list[int]:
    return [j for j in range(pool) if j not in set(slots)]


# ---- prefill ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefillCase:
    lengths: list[int]
    slots: list[int]  # -1: the sequence keeps no state
    has_initial_state: list[int]
    pool: int
    heads: int = SMALL_HEADS
    dim: int = SMALL_DIM
    slopes: tuple[float, ...] | None = None  # None: the real schedule for `heads`
    segment_len: int | None = None
    chunk: int | None = None  # None: PREFILL_LAUNCH's
    # the prefix cache's snapshots: sequence i also writes its state after track_len[i] tokens
    # to track_slots[i] (-1 in either: none)
    track_slots: list[int] | None = None
    track_len: list[int] | None = None

    def tracked(self) -> list[tuple[int, int, int]]:
        """(sequence, slot, tokens) of each snapshot the call must write."""
        if self.track_slots is None:
            return []
        return [(i, slot, n) for i, (slot, n) in enumerate(zip(self.track_slots, self.track_len))
                if slot >= 0 and n >= 0]


def run_prefill(case: PrefillCase, device: str, dtype: torch.dtype, seed: int):
    """Inputs, the state pool before, and the op's output and pool after."""
    gen = torch.Generator().manual_seed(seed)
    slopes = (torch.tensor(case.slopes) if case.slopes else lightning_slopes(case.heads)).float()
    q, k, v = (torch.randn(sum(case.lengths), case.heads, case.dim, generator=gen).to(device, dtype)
               for _ in range(3))
    state = torch.randn(case.pool, case.heads, case.dim, case.dim, generator=gen).to(device)
    before = state.clone()
    track = {}
    if case.track_slots is not None:
        track = {"track_slots": torch.tensor(case.track_slots, device=device),
                 "track_len": torch.tensor(case.track_len, device=device, dtype=torch.int32)}
    out = lightning_prefill(
        q, k, v, state,
        torch.tensor(case.slots, device=device, dtype=torch.int32),
        cumulative(case.lengths, device),
        torch.tensor(case.has_initial_state, device=device, dtype=torch.int32),
        slopes.to(device), case.dim**-0.5,
        segment_len=case.segment_len, launch={"chunk": case.chunk} if case.chunk else None,
        **track,
    )
    return (q, k, v), slopes, before, out, state


def check_prefill(case: PrefillCase, device: str, dtype: torch.dtype, relative_error,
                  reference: Callable = lightning_recurrent, seed: int = 0) -> None:
    """Every sequence's output, final state and snapshot match the reference from its initial
    state (or zero); slots no sequence owns are left bit for bit."""
    (q, k, v), slopes, before, out, state = run_prefill(case, device, dtype, seed)
    starts = cumulative(case.lengths, "cpu").tolist()

    def expected(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, slot = starts[i], case.slots[i]
        init = before[slot].double().cpu() if case.has_initial_state[i] and slot >= 0 else None
        return reference(*(x[s : s + n].double().cpu() for x in (q, k, v)), slopes.double(),
                         case.dim**-0.5, init)

    for i, n in enumerate(case.lengths):
        ref_o, ref_s = expected(i, n)
        s, slot = starts[i], case.slots[i]
        assert relative_error(out[s : s + n].cpu(), ref_o) < OUT_TOL[dtype], f"sequence {i}"
        if slot >= 0:
            assert relative_error(state[slot].cpu(), ref_s) < OUT_TOL[dtype], f"sequence {i}"
    for i, slot, n in case.tracked():
        assert relative_error(state[slot].cpu(), expected(i, n)[1]) < OUT_TOL[dtype], (
            f"sequence {i}'s snapshot after {n} tokens")
    untouched = unowned(case.pool, case.slots + [slot for _, slot, _ in case.tracked()])
    assert torch.equal(state[untouched], before[untouched]), "prefill wrote a slot no one owns"


# Lengths 5, 37, 16 in 16-token chunks: a partial chunk, several chunks with a partial last one, one
# exact chunk; slot 1 is owned by no sequence. Segment length 16 splits the 37-token sequence into
# three segments run in parallel, with and without a state carried in.
SMALL_PREFILL = {
    "one_segment": PrefillCase([5, 37, 16], [2, 0, 3], [1, 0, 1], pool=4,
                               slopes=tuple(SMALL_SLOPES), chunk=16),
    "segments": PrefillCase([5, 37, 16], [2, 0, 3], [1, 0, 1], pool=4,
                            slopes=tuple(SMALL_SLOPES), chunk=16, segment_len=16),
    "segments_with_state_in": PrefillCase([5, 37, 16], [2, 0, 3], [0, 1, 1], pool=4,
                                          slopes=tuple(SMALL_SLOPES), chunk=16, segment_len=16),
}
# Snapshots (slots 4-6) at a chunk boundary inside a sequence, at a sequence's end (whole chunks,
# and the 5-token partial one), and none (-1); with segments of 16 the snapshot after 32 tokens is
# a segment's start and the one after 16 the end of a sequence's only segment.
TRACKED_PREFILL = {
    f"{name}_tracked": PrefillCase(case.lengths, case.slots, case.has_initial_state, pool=8,
                                   slopes=case.slopes, chunk=16, segment_len=case.segment_len,
                                   track_slots=track_slots, track_len=track_len)
    for name, case in SMALL_PREFILL.items()
    for track_slots, track_len in (([4, 5, 6], [-1, 32, 16]), ([6, 4, -1], [5, 16, 16]))
}


@pytest.mark.parametrize("name", [*SMALL_PREFILL, *TRACKED_PREFILL])
def test_prefill_matches_recurrence_with_state_in_and_out(name: str, device: str,
                                                          relative_error) -> None:
    case = SMALL_PREFILL.get(name) or TRACKED_PREFILL[name]
    check_prefill(case, device, small_dtype(device), relative_error)


def test_prefill_in_segments_equals_prefill_in_one(device: str, relative_error) -> None:
    dtype = small_dtype(device)
    _, _, _, out, state = run_prefill(SMALL_PREFILL["one_segment"], device, dtype, seed=0)
    _, _, _, out_split, state_split = run_prefill(SMALL_PREFILL["segments"], device, dtype, seed=0)
    assert relative_error(out_split, out) < OUT_TOL[dtype]
    assert relative_error(state_split, state) < OUT_TOL[dtype]


def gpu_prefill_cases() -> list:
    """Awkward lengths at head dims 64 and 128 (slopes from the steepest decay down), slots in
    random order, every other sequence with a state carried in."""
    cases = []
    for head_dim in (64, 128):
        for lengths in ([1], [63, 64, 65], [5, 300, 1, 129], [1000]):
            gen = torch.Generator().manual_seed(sum(lengths) + head_dim)
            pool = len(lengths) + 3
            slots = torch.randperm(pool, generator=gen)[: len(lengths)].tolist()
            case = PrefillCase(lengths, slots, [i % 2 for i in range(len(lengths))], pool=pool,
                               heads=4, dim=head_dim, slopes=(0.84, 0.3, 0.01, 2**-8))
            cases.append(pytest.param(case, id=f"d{head_dim}-{'_'.join(map(str, lengths))}"))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("case", gpu_prefill_cases())
def test_prefill_matches_recurrence_at_awkward_lengths(case: PrefillCase, relative_error) -> None:
    check_prefill(case, "cuda", torch.bfloat16, relative_error, seed=sum(case.lengths) + case.dim)


@pytest.mark.gpu
@pytest.mark.parametrize("segment_len", [None, 128, 512])
def test_segment_parallel_prefill_matches_reference_at_real_dims(segment_len: int | None,
                                                                 relative_error) -> None:
    # the last sequence keeps no state (slot -1); slots 1, 3 and 5 are owned by no one
    # snapshots after 640 tokens (mid-segment), 1024 (a segment boundary at 128 and 512) and at
    # the end of the stateless sequence
    case = PrefillCase([1, 700, 2000, 64], [4, 0, 2, -1], [1, 0, 1, 1], pool=6, heads=32, dim=128,
                       segment_len=segment_len, track_slots=[-1, 1, 3, 5],
                       track_len=[-1, 640, 1024, 64])
    check_prefill(case, "cuda", torch.bfloat16, relative_error, reference=lightning_chunked,
                  seed=7)


def test_prefill_has_no_cuda_kernel() -> None:
    q = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="impl='cuda'.*no CUDA prefill kernel"):
        lightning_prefill(q, q, q, torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.int32),
                          torch.tensor([0, 1], dtype=torch.int32),
                          torch.zeros(1, dtype=torch.int32), torch.ones(1), 0.25, impl="cuda")


def test_prefill_segment_length_must_be_whole_chunks() -> None:
    q = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="segment_len = 24: expected a positive multiple of"):
        lightning_prefill(q, q, q, torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.int32),
                          torch.tensor([0, 1], dtype=torch.int32),
                          torch.zeros(1, dtype=torch.int32), torch.ones(1), 0.25,
                          segment_len=24, launch={"chunk": 16})


# ---- decode ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeCase:
    slots: list[int]  # -1: a CUDA-graph padding row, which must touch no state
    pool: int
    heads: int = SMALL_HEADS
    dim: int = SMALL_DIM
    dtype: torch.dtype | None = None  # None: small_dtype(device)
    slopes: tuple[float, ...] | None = None  # None: every (32 // heads)-th of the 32-head schedule
    steps: int = 1  # later steps start from the state the previous one wrote
    int64_slots: bool = False


def random_slots(batch: int, pool: int) -> list[int]:
    """Distinct slots in random order; row 1 (if any) a padding row."""
    slots = torch.randperm(pool, generator=torch.Generator().manual_seed(batch))[:batch].tolist()
    if batch > 1:
        slots[1] = -1
    return slots


def gpu_decode_cases() -> list:
    cases = []
    for dim in (64, 128):  # 32 heads, the real schedule; two padding rows
        case = DecodeCase([3, 0, -1, 8, 1, -1, 5], pool=9, heads=32, dim=dim, dtype=torch.bfloat16)
        cases.append(pytest.param(case, id=f"b7-h32-d{dim}", marks=pytest.mark.gpu))
    for dtype in (torch.bfloat16, torch.float16):
        for batch, heads, dim in ((1, 32, 128), (3, 32, 128), (37, 4, 64)):
            case = DecodeCase(random_slots(batch, batch + 5), pool=batch + 5, heads=heads, dim=dim,
                              dtype=dtype, steps=2, int64_slots=batch == 3)
            cases.append(pytest.param(case, id=f"b{batch}-h{heads}-d{dim}-{dtype}-2steps",
                                      marks=pytest.mark.gpu))
    return cases


DECODE_CASES = [
    pytest.param(DecodeCase([2, -1, 0], pool=4, slopes=tuple(SMALL_SLOPES)), id="small"),
    *gpu_decode_cases(),
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_recurrence_and_leaves_padding_alone(case: DecodeCase, impl: str,
                                                            device: str, relative_error) -> None:
    dtype = case.dtype or small_dtype(device)
    slopes = torch.tensor(case.slopes) if case.slopes else lightning_slopes(32)[:: 32 // case.heads]
    slopes = slopes.float()
    gen = torch.Generator().manual_seed(len(case.slots))
    state = torch.randn(case.pool, case.heads, case.dim, case.dim, generator=gen).to(device)
    slots = torch.tensor(case.slots, device=device,
                         dtype=torch.int64 if case.int64_slots else torch.int32)
    live = [(i, s) for i, s in enumerate(case.slots) if s >= 0]
    scale = case.dim**-0.5
    for step in range(case.steps):
        before = state.clone()
        q, k, v = (torch.randn(len(case.slots), case.heads, case.dim, generator=gen)
                   .to(device, dtype) for _ in range(3))
        out = lightning_decode(q, k, v, state, slots, slopes.to(device), scale, impl=impl)
        assert out.shape == q.shape and out.dtype == dtype
        for i, slot in live:
            ref_o, ref_s = lightning_recurrent(
                *(x[i : i + 1].double().cpu() for x in (q, k, v)), slopes.double(), scale,
                before[slot].double().cpu())
            assert relative_error(out[i : i + 1].cpu(), ref_o) < OUT_TOL[dtype], f"step {step}"
            assert relative_error(state[slot].cpu(), ref_s) < STATE_TOL, f"step {step}"
        untouched = unowned(case.pool, case.slots)
        assert torch.equal(state[untouched], before[untouched]), "padding wrote state"


@pytest.mark.parametrize("heads,dim", [pytest.param(SMALL_HEADS, SMALL_DIM, id="small"),
                                       pytest.param(32, 128, id="real", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decode_snapshots_where_the_track_mask_is_set(heads: int, dim: int,
                                                      index_dtype: torch.dtype, impl: str,
                                                      device: str) -> None:
    # rows: tracked, a padding row whose mask is set (must write nothing), untracked, tracked
    slots = torch.tensor([2, -1, 0, 3], device=device, dtype=index_dtype)
    track_slots = torch.tensor([4, 5, 6, 7], device=device, dtype=index_dtype)
    mask = torch.tensor([True, True, False, True], device=device)
    gen = torch.Generator().manual_seed(3)
    dtype = small_dtype(device)
    q, k, v = (torch.randn(4, heads, dim, generator=gen).to(device, dtype) for _ in range(3))
    state = torch.randn(8, heads, dim, dim, generator=gen).to(device)
    slopes = lightning_slopes(heads).float().to(device)
    untracked = lightning_decode(q, k, v, state.clone(), slots, slopes, 0.1, impl=impl)
    before = state.clone()
    out = lightning_decode(q, k, v, state, slots, slopes, 0.1, impl=impl,
                           track_slots=track_slots, track_mask=mask)
    assert torch.equal(out, untracked)
    assert torch.equal(state[4], state[2]) and torch.equal(state[7], state[3])
    assert torch.equal(state[[1, 5, 6]], before[[1, 5, 6]]), "an untracked slot was written"


def test_track_arguments_come_in_pairs() -> None:
    q = torch.zeros(1, 1, 32)
    state, slots = torch.zeros(2, 1, 32, 32), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="pass track_slots and track_mask together"):
        lightning_decode(q, q, q, state, slots, torch.ones(1), 0.1, track_slots=slots)
    with pytest.raises(ValueError, match="pass track_slots and track_len together"):
        lightning_prefill(q, q, q, state, slots, torch.tensor([0, 1], dtype=torch.int32), slots,
                          torch.ones(1), 0.1, track_slots=slots)


def test_decode_impl_cuda_says_why_it_cannot_run() -> None:
    q = torch.zeros(1, 1, 32)
    with pytest.raises(ValueError, match="impl='cuda' cannot run: sala_sglang._C is not built or "
                                         "the tensors are on cpu"):
        lightning_decode(q, q, q, torch.zeros(1, 1, 32, 32), torch.zeros(1, dtype=torch.int32),
                         torch.ones(1), 0.1, impl="cuda")


def test_decode_rejects_an_unknown_impl() -> None:
    q = torch.zeros(1, 1, 32)
    with pytest.raises(ValueError, match="impl='fast'; expected 'cuda', 'triton' or None"):
        lightning_decode(q, q, q, torch.zeros(1, 1, 32, 32), torch.zeros(1, dtype=torch.int32),
                         torch.ones(1), 0.1, impl="fast")


@pytest.mark.gpu
def test_decode_replays_in_a_cuda_graph(impl: str) -> None:
    batch, heads, dim = 8, 32, 128
    slopes = lightning_slopes(heads).float().cuda()
    slots = torch.arange(batch, device="cuda", dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    # slots batch..2*batch-1 are the track slots; the mask changes between replays
    state = torch.randn(2 * batch, heads, dim, dim, device="cuda")
    eager_state = state.clone()
    track_slots = torch.arange(batch, 2 * batch, device="cuda")
    mask = torch.zeros(batch, dtype=torch.bool, device="cuda")

    def step(st: torch.Tensor) -> torch.Tensor:
        return lightning_decode(q, k, v, st, slots, slopes, 0.1, impl=impl,
                                track_slots=track_slots, track_mask=mask)

    step(state.clone())  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(state)
    for replay in range(2):
        for x in (q, k, v):
            x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
        mask.copy_(torch.arange(batch, device="cuda") % 2 == replay)
        graph.replay()
        expected = step(eager_state)
        assert torch.equal(out, expected) and torch.equal(state, eager_state)


# ---- the CUDA decode op's contract ------------------------------------------------------------

@pytest.mark.gpu
@needs_extension
def test_cuda_decode_reads_strided_views_and_padding_output_is_zero() -> None:
    batch, heads, dim = 5, 32, 128
    slopes = lightning_slopes(heads).float().cuda()
    fused = torch.randn(batch, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = fused.unbind(1)  # batch stride 3 * heads * dim: no copy needed
    assert not q.is_contiguous()
    slots = torch.tensor([0, -1, 2, 3, -1], device="cuda", dtype=torch.int32)
    state = torch.randn(4, heads, dim, dim, device="cuda")
    state_b = state.clone()
    out = torch.ops.sala_sglang.lightning_decode(q, k, v, state, slots, slopes, 0.1)
    ref = torch.ops.sala_sglang.lightning_decode(
        q.contiguous(), k.contiguous(), v.contiguous(), state_b, slots, slopes, 0.1
    )
    assert torch.equal(out, ref) and torch.equal(state, state_b)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[4], out[1])


@pytest.mark.gpu
@needs_extension
def test_cuda_decode_refuses_a_head_dim_it_does_not_compile() -> None:
    q = torch.zeros(1, 1, 48, device="cuda")
    with pytest.raises(ValueError, match="head dim 48 is not compiled"):
        lightning_decode(q, q, q, torch.zeros(1, 1, 48, 48, device="cuda"),
                         torch.zeros(1, device="cuda", dtype=torch.int32),
                         torch.ones(1, device="cuda"), 0.1, impl="cuda")


BAD_ARGUMENTS = """
import torch
import sala_sglang._C  # noqa: F401

q = torch.randn(2, 4, 64, device="cuda", dtype=torch.bfloat16)
slots = torch.zeros(2, device="cuda", dtype=torch.int32)
slopes = torch.rand(4, device="cuda")
state = torch.zeros(2, 4, 64, 64, device="cuda")
for bad_state, bad_slopes, track in ((state.bfloat16(), slopes, ()), (state, slopes.double(), ()),
                                     (state, slopes, (slots, slots)), (state, slopes, (slots,))):
    try:
        torch.ops.sala_sglang.lightning_decode(q, q, q, bad_state, slots, bad_slopes, 0.1, *track)
    except RuntimeError as exc:
        print(str(exc).splitlines()[0])
"""


@pytest.mark.gpu
@needs_extension
def test_cuda_decode_names_the_bad_argument() -> None:
    # A separate process: a failing TORCH_CHECK inside sala_sglang._C has brought the interpreter
    # down on the GPU machine (benchmarks/NOTES.md), which would end the whole session.
    out = child_stdout(BAD_ARGUMENTS)
    assert "state must be float32" in out and "slopes must be float32" in out
    assert "track_mask must be bool" in out and "track_slots and track_mask together" in out


@pytest.mark.gpu
@needs_extension
def test_cuda_decode_op_registration_passes_opcheck() -> None:
    batch, heads, dim = 3, 4, 64
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    state = torch.randn(batch, heads, dim, dim, device="cuda")
    slots = torch.tensor([2, -1, 0], device="cuda", dtype=torch.int32)
    slopes = torch.rand(heads, device="cuda")
    torch.library.opcheck(torch.ops.sala_sglang.lightning_decode.default,
                          (q, k, v, state, slots, slopes, 0.125))
    track = (torch.tensor([1, 0, -1], device="cuda"), torch.tensor([True, False, True],
                                                                    device="cuda"))
    torch.library.opcheck(torch.ops.sala_sglang.lightning_decode.default,
                          (q, k, v, state, slots, slopes, 0.125, *track))


def test_a_prefix_hit_continues_from_the_snapshot(device: str, relative_error) -> None:
    # Request A (70 tokens) snapshots its state after 64 into slot 2, as the prefix cache asks;
    # SGLang copies that snapshot into B's working slot (1) on a hit, and B prefills only its own
    # 30 tokens past the shared 64 from there: B's outputs and state must be the reference's for
    # its whole sequence.
    dtype = small_dtype(device)
    heads, dim, chunk = SMALL_HEADS, SMALL_DIM, 16
    slopes = torch.tensor(SMALL_SLOPES)
    gen = torch.Generator().manual_seed(5)
    shared, tail_a, tail_b = (torch.randn(n, 3, heads, dim, generator=gen) for n in (64, 6, 30))
    state = torch.zeros(3, heads, dim, dim, device=device)
    a = torch.cat([shared, tail_a]).to(device, dtype)
    lightning_prefill(*a.unbind(1), state, torch.tensor([0], device=device, dtype=torch.int32),
                      cumulative([70], device), torch.zeros(1, device=device, dtype=torch.int32),
                      slopes.to(device), dim**-0.5, launch={"chunk": chunk},
                      track_slots=torch.tensor([2], device=device),
                      track_len=torch.tensor([64], device=device, dtype=torch.int32))
    state[1] = state[2]  # SGLang's copy-on-write of the matched snapshot
    b = tail_b.to(device, dtype)
    out = lightning_prefill(*b.unbind(1), state, torch.tensor([1], device=device,
                                                               dtype=torch.int32),
                            cumulative([30], device), torch.ones(1, device=device,
                                                                 dtype=torch.int32),
                            slopes.to(device), dim**-0.5, launch={"chunk": chunk})
    whole = torch.cat([shared, tail_b]).to(dtype).double()
    ref_o, ref_s = lightning_recurrent(*whole.unbind(1), slopes.double(), dim**-0.5, None)
    assert relative_error(out.cpu(), ref_o[64:]) < OUT_TOL[dtype]
    assert relative_error(state[1].cpu(), ref_s) < OUT_TOL[dtype]


def strided(x: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
    """x's values as a stride-2 view; a kernel reading it as a dense array sees `filler` too."""
    return torch.stack([x, filler], 1)[:, 0]


def test_per_request_arrays_may_be_strided_views(impl: str, device: str) -> None:
    # The same decode and prefill with every per-request array (slots, track pairs, initial-state
    # flags, sequence starts) a strided view: the same outputs and states as with dense arrays
    # (the sparse ops once read a stride-0 view of a request's slot past its one element).
    dtype = small_dtype(device)
    heads, dim = SMALL_HEADS, SMALL_DIM
    slopes = torch.tensor(SMALL_SLOPES, device=device)
    gen = torch.Generator().manual_seed(8)
    state = torch.randn(8, heads, dim, dim, generator=gen).to(device)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=torch.int32)

    q, k, v = (torch.randn(3, heads, dim, generator=gen).to(device, dtype) for _ in range(3))
    slots, track, mask = ints([2, 0, 3]), ints([4, 5, 6]), torch.tensor([True, False, True],
                                                                         device=device)
    runs = []
    for view in (False, True):
        pool = state.clone()
        args = ((strided(slots, ints([1, 1, 1])), strided(track, ints([7, 7, 7])),
                 strided(mask, ~mask)) if view else (slots, track, mask))
        out = lightning_decode(q, k, v, pool, args[0], slopes, 0.1, impl=impl,
                               track_slots=args[1], track_mask=args[2])
        runs.append((out, pool))
    assert all(torch.equal(a, b) for a, b in zip(*runs))

    if impl != "triton":
        return  # prefill has one implementation
    q, k, v = (torch.randn(40, heads, dim, generator=gen).to(device, dtype) for _ in range(3))
    starts, first = ints([0, 16, 40]), ints([1, 0])
    runs = []
    for view in (False, True):
        pool = state.clone()
        args = ((strided(slots[:2], ints([3, 3])), strided(starts, ints([5, 5, 5])),
                 strided(first, ints([0, 1])), strided(ints([4, 5]), ints([6, 6])),
                 strided(ints([16, -1]), ints([0, 0])))
                if view else (slots[:2], starts, first, ints([4, 5]), ints([16, -1])))
        out = lightning_prefill(q, k, v, pool, args[0], args[1], args[2], slopes, 0.1,
                                launch={"chunk": 16}, track_slots=args[3], track_len=args[4])
        runs.append((out, pool))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def other_layouts(q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [T, H, D]'s values as three differently strided views: q stored head-major
    ([H, T, D]), k with its heads 2D apart, v the third of a fused [T, 3 * H * D] projection (how
    the layer passes v)."""
    q_view = q.transpose(0, 1).contiguous().transpose(0, 1)
    k_view = torch.cat([k, torch.full_like(k, float("nan"))], -1)[..., : k.shape[-1]]
    v_view = torch.stack([torch.full_like(v, float("nan")), v.neg(), v], 1)[:, 2]
    assert not any(x.is_contiguous() for x in (q_view, k_view, v_view))
    return q_view, k_view, v_view


def test_prefill_and_decode_read_q_k_v_with_their_own_strides(impl: str, device: str) -> None:
    # the same outputs and states, bit for bit, as from contiguous copies; a kernel that read one
    # tensor with another's strides would read NaN filler or another tensor's values
    dtype = small_dtype(device)
    heads, dim = SMALL_HEADS, SMALL_DIM
    slopes = torch.tensor(SMALL_SLOPES, device=device)
    gen = torch.Generator().manual_seed(9)
    state = torch.randn(4, heads, dim, dim, generator=gen).to(device)
    slots = torch.tensor([2, -1, 0], device=device, dtype=torch.int32)
    q, k, v = (torch.randn(3, heads, dim, generator=gen).to(device, dtype) for _ in range(3))
    runs = []
    for qkv in ((q, k, v), other_layouts(q, k, v)):
        pool = state.clone()
        runs.append((lightning_decode(*qkv, pool, slots, slopes, 0.1, impl=impl), pool))
    assert all(torch.equal(a, b) for a, b in zip(*runs))

    if impl != "triton":
        return  # prefill has one implementation
    q, k, v = (torch.randn(58, heads, dim, generator=gen).to(device, dtype) for _ in range(3))
    for segment_len in (None, 16):  # one segment; three of the 37-token sequence's
        runs = []
        for qkv in ((q, k, v), other_layouts(q, k, v)):
            pool = state.clone()
            out = lightning_prefill(*qkv, pool, slots, cumulative([5, 37, 16], device),
                                    torch.tensor([1, 0, 1], device=device, dtype=torch.int32),
                                    slopes, 0.1, segment_len=segment_len, launch={"chunk": 16})
            runs.append((out, pool))
        assert all(torch.equal(a, b) for a, b in zip(*runs)), f"segment_len {segment_len}"
