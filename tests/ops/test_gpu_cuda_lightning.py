"""The CUDA lightning decode op (`sala_sglang._C`, csrc/lightning.cu) and the segment-parallel
Triton prefill against the reference recurrence: awkward batches, padding rows, chained steps."""

from __future__ import annotations

import textwrap

import pytest
import torch
from cuda_extension import ON_GPU, child_stdout, needs_extension

pytestmark = ON_GPU


def _decode_inputs(batch: int, heads: int, dim: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, dim, device="cuda", dtype=dtype, generator=gen)
               for _ in range(3))
    return q, k, v


def _reference_step(q, k, v, state, slopes, scale):
    from sala_sglang.reference.lightning import lightning_recurrent

    return lightning_recurrent(q[None].double().cpu(), k[None].double().cpu(),
                               v[None].double().cpu(), slopes.double().cpu(), scale,
                               state.double().cpu())


@needs_extension
@pytest.mark.parametrize("path", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "heads", "dim"), [(1, 32, 128), (3, 32, 128), (37, 4, 64)])
def test_decode_two_steps_match_recurrence_and_leave_padding_alone(
    batch: int, heads: int, dim: int, dtype: torch.dtype, path: str, relative_error
) -> None:
    from sala_sglang.ops import lightning
    from sala_sglang.reference.lightning import lightning_slopes

    decode = lightning.lightning_decode if path == "cuda" else lightning._decode_triton
    # every (32 // heads)-th slope of the real schedule: 0.84 (the steepest decay) first
    slopes = lightning_slopes(32)[:: 32 // heads].float().cuda()
    scale = dim**-0.5
    pool = batch + 5
    state = torch.randn(pool, heads, dim, dim, device="cuda")
    perm = torch.randperm(pool, device="cuda")[:batch]
    slots = perm.to(torch.int64 if batch == 3 else torch.int32)
    if batch > 1:
        slots[1] = -1  # a CUDA-graph padding row
    live = [(i, int(s)) for i, s in enumerate(slots.tolist()) if s >= 0]
    owned = {s for _, s in live}
    for step in range(2):  # the second step starts from the state the first one wrote
        before = state.clone()
        q, k, v = _decode_inputs(batch, heads, dim, dtype, seed=10 * batch + step)
        out = decode(q, k, v, state, slots, slopes, scale)
        assert out.shape == q.shape and out.dtype == dtype
        for i, slot in live:
            ref_o, ref_s = _reference_step(q[i], k[i], v[i], before[slot], slopes, scale)
            assert relative_error(out[i].cpu(), ref_o[0]) < 1e-2
            assert relative_error(state[slot].cpu(), ref_s) < 1e-5
        untouched = [j for j in range(pool) if j not in owned]
        assert torch.equal(state[untouched], before[untouched])


@needs_extension
def test_cuda_decode_reads_strided_views_and_padding_output_is_zero() -> None:
    from sala_sglang.reference.lightning import lightning_slopes

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


@needs_extension
def test_cuda_decode_replays_in_a_cuda_graph() -> None:
    from sala_sglang.reference.lightning import lightning_slopes

    batch, heads, dim = 8, 32, 128
    slopes = lightning_slopes(heads).float().cuda()
    slots = torch.arange(batch, device="cuda", dtype=torch.int32)
    q, k, v = _decode_inputs(batch, heads, dim, torch.bfloat16, seed=1)
    state = torch.randn(batch, heads, dim, dim, device="cuda")
    eager_state = state.clone()
    op = torch.ops.sala_sglang.lightning_decode
    op(q, k, v, state.clone(), slots, slopes, 0.1)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(q, k, v, state, slots, slopes, 0.1)
    for seed in (2, 3):
        for dst, src in zip((q, k, v), _decode_inputs(batch, heads, dim, torch.bfloat16, seed)):
            dst.copy_(src)
        graph.replay()
        expected = op(q, k, v, eager_state, slots, slopes, 0.1)
        assert torch.equal(out, expected) and torch.equal(state, eager_state)


BAD_ARGUMENTS = textwrap.dedent(
    """
    import torch
    import sala_sglang._C  # noqa: F401

    q = torch.randn(2, 4, 64, device="cuda", dtype=torch.bfloat16)
    slots = torch.zeros(2, device="cuda", dtype=torch.int32)
    slopes = torch.rand(4, device="cuda")
    state = torch.zeros(2, 4, 64, 64, device="cuda")
    for bad_state, bad_slopes in ((state.bfloat16(), slopes), (state, slopes.double())):
        try:
            torch.ops.sala_sglang.lightning_decode(q, q, q, bad_state, slots, bad_slopes, 0.1)
        except RuntimeError as exc:
            print(str(exc).splitlines()[0])
    """
)


@needs_extension
def test_cuda_decode_names_the_bad_argument() -> None:
    out = child_stdout(BAD_ARGUMENTS)
    assert "state must be float32" in out and "slopes must be float32" in out


@pytest.mark.parametrize("segment_len", [None, 128, 512])
def test_segment_parallel_prefill_matches_reference_at_real_dims(
    segment_len: int | None, relative_error
) -> None:
    from sala_sglang.ops.lightning import lightning_prefill
    from sala_sglang.reference.lightning import lightning_chunked, lightning_slopes

    heads, dim = 32, 128
    lengths = [1, 700, 2000, 64]
    torch.manual_seed(7)
    slopes = lightning_slopes(heads).float().cuda()
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    state = torch.randn(len(lengths) + 2, heads, dim, dim, device="cuda")
    before = state.clone()
    slots = torch.tensor([4, 0, 2, -1], device="cuda", dtype=torch.int32)
    has_init = torch.tensor([1, 0, 1, 1], device="cuda", dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda",
                      dtype=torch.int32)
    out = lightning_prefill(q, k, v, state, slots, cu, has_init, slopes, dim**-0.5,
                            segment_len=segment_len)
    for i, n in enumerate(lengths):
        s, slot = int(cu[i]), int(slots[i])
        init = before[slot].double() if has_init[i] and slot >= 0 else None
        ref_o, ref_s = lightning_chunked(*(x[s : s + n].double() for x in (q, k, v)),
                                         slopes.double(), dim**-0.5, init)
        assert relative_error(out[s : s + n], ref_o) < 1e-2
        if slot >= 0:
            assert relative_error(state[slot], ref_s) < 1e-2
    for slot in (1, 3, 5):  # owned by no sequence, or by the one with slot -1
        assert torch.equal(state[slot], before[slot])


@needs_extension
def test_cuda_decode_op_registration_passes_opcheck() -> None:
    batch, heads, dim = 3, 4, 64
    q, k, v = _decode_inputs(batch, heads, dim, torch.bfloat16, seed=4)
    state = torch.randn(batch, heads, dim, dim, device="cuda")
    slots = torch.tensor([2, -1, 0], device="cuda", dtype=torch.int32)
    slopes = torch.rand(heads, device="cuda")
    torch.library.opcheck(torch.ops.sala_sglang.lightning_decode.default,
                          (q, k, v, state, slots, slopes, 0.125))
