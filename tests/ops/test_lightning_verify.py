"""Lightning speculative verify (SPEC 2.1, ops/lightning_verify.py) against decoding the drafts one
after another: the Triton op and its reference twin (the `op` parameter), each held to an
independent float64 loop of single decode steps (`lightning_recurrent`, one token per call).

Row b*T+j of a verify must be the output of decoding request b's drafts 0..j from its slot, and
the state pool must come out bit for bit as it went in. Cases without the `gpu` mark run on the
`device` fixture (Triton's CPU interpreter without a GPU, fp32, held to test_lightning's
tolerances); the `gpu` case repeats them at the real geometry in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from test_lightning import (
    OUT_TOL,
    SMALL_DIM,
    SMALL_HEADS,
    SMALL_SLOPES,
    other_layouts,
    small_dtype,
    strided,
)

from sala_sglang.ops.lightning_verify import lightning_verify
from sala_sglang.reference.lightning import (
    lightning_recurrent,
    lightning_slopes,
    lightning_verify_reference,
)

OPS = {"triton": lightning_verify, "reference": lightning_verify_reference}


def decode_one_by_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      initial: torch.Tensor | None, slopes: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground truth: q,k,v [T, H, D] decoded as T single float64 steps, each from the state
    the last one left (initial [H, D, D] or None: zero). Returns (o [T, H, D], states
    [T, H, D, D]), states[j] the state after j + 1 steps."""
    state = None if initial is None else initial.double().cpu()
    outs, states = [], []
    for t in range(q.shape[0]):
        o, state = lightning_recurrent(*(x[t : t + 1].double().cpu() for x in (q, k, v)),
                                       slopes.double().cpu(), scale, state)
        outs.append(o[0])
        states.append(state)
    return torch.stack(outs), torch.stack(states)


@dataclass(frozen=True)
class VerifyCase:
    slots: list[int]  # -1: a CUDA-graph padding row
    pool: int
    draft_len: int
    heads: int = SMALL_HEADS
    dim: int = SMALL_DIM
    dtype: torch.dtype | None = None  # None: small_dtype(device)
    slopes: tuple[float, ...] | None = tuple(SMALL_SLOPES)  # None: the real schedule


def run_verify(case: VerifyCase, op: str, device: str, seed: int = 0):
    """Inputs, slopes, the pool before, and the op's output and pool after."""
    dtype = case.dtype or small_dtype(device)
    gen = torch.Generator().manual_seed(seed)
    slopes = (torch.tensor(case.slopes) if case.slopes else lightning_slopes(case.heads)).float()
    rows = len(case.slots) * case.draft_len
    q, k, v = (torch.randn(rows, case.heads, case.dim, generator=gen).to(device, dtype)
               for _ in range(3))
    state = torch.randn(case.pool, case.heads, case.dim, case.dim, generator=gen).to(device)
    before = state.clone()
    slots = torch.tensor(case.slots, device=device, dtype=torch.int32)
    out = OPS[op](q, k, v, state, slots, slopes.to(device), case.dim**-0.5, case.draft_len)
    return (q, k, v), slopes, before, out, state


def check_verify(case: VerifyCase, op: str, device: str, relative_error, seed: int = 0) -> None:
    """Every row of every request (padding rows: from a zero state) is the ground truth's output
    after as many steps."""
    (q, k, v), slopes, before, out, _ = run_verify(case, op, device, seed)
    dtype, t = q.dtype, case.draft_len
    assert out.shape == q.shape and out.dtype == dtype
    for b, slot in enumerate(case.slots):
        rows = slice(b * t, (b + 1) * t)
        ref_o, _ = decode_one_by_one(q[rows], k[rows], v[rows],
                                     before[slot] if slot >= 0 else None, slopes, case.dim**-0.5)
        for j in range(t):
            assert relative_error(out[b * t + j].cpu(), ref_o[j]) < OUT_TOL[dtype], (
                f"request {b} (slot {slot}), draft {j}")


VERIFY_CASES = [
    # slot 1 owned by no request; request 1 a padding row
    *(pytest.param(VerifyCase([2, -1, 0, 3], pool=5, draft_len=t), id=f"T{t}") for t in (2, 5, 8)),
    pytest.param(VerifyCase([0, 2, -1], pool=3, heads=32, dim=128, dtype=torch.bfloat16,
                            draft_len=8, slopes=None), id="real-T8", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("case", VERIFY_CASES)
@pytest.mark.parametrize("op", list(OPS))
def test_verify_row_j_is_the_output_of_decoding_drafts_0_to_j(case: VerifyCase, op: str,
                                                               device: str,
                                                               relative_error) -> None:
    check_verify(case, op, device, relative_error)


@pytest.mark.parametrize("op", list(OPS))
def test_verify_leaves_the_pool_bit_identical(op: str, device: str) -> None:
    # every slot but one is a request's, and the padding row would read the last slot if it
    # indexed with -1
    _, _, before, _, state = run_verify(VerifyCase([3, 0, -1, 1], pool=4, draft_len=5), op, device)
    assert torch.equal(state, before)


@pytest.mark.parametrize("op", list(OPS))
def test_verify_padding_row_reads_no_state(op: str, device: str) -> None:
    # a pool of NaN: any read of it by the padding row shows in its outputs
    case = VerifyCase([-1], pool=2, draft_len=3)
    dtype = small_dtype(device)
    q = torch.randn(3, case.heads, case.dim).to(device, dtype)
    state = torch.full((2, case.heads, case.dim, case.dim), float("nan"), device=device)
    out = OPS[op](q, q, q, state, torch.tensor([-1], device=device),
                           torch.tensor(SMALL_SLOPES, device=device), 0.1, case.draft_len)
    assert torch.isfinite(out).all()


def test_verify_names_the_bad_argument() -> None:
    q = torch.zeros(6, 1, 32)
    state, slopes = torch.zeros(2, 1, 32, 32), torch.ones(1)
    slots = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="draft_len = 4: expected a positive divisor of the 6"):
        lightning_verify(q, q, q, state, slots, slopes, 0.1, draft_len=4)
    with pytest.raises(ValueError, match=r"state_slots torch.int32 \(2,\): expected integers \[3"):
        lightning_verify(q, q, q, state, slots, slopes, 0.1, draft_len=2)
    with pytest.raises(ValueError, match="lightning state must be float32"):
        lightning_verify(q, q, q, state.double(), slots, slopes, 0.1, draft_len=3)
    with pytest.raises(ValueError, match=r"slopes \(2,\): expected \[1\]"):
        lightning_verify(q, q, q, state, slots, torch.ones(2), 0.1, draft_len=3)
    with pytest.raises(ValueError, match="impl='cuda'; expected 'triton' or None"):
        lightning_verify(q, q, q, state, slots, slopes, 0.1, draft_len=3, impl="cuda")


@pytest.mark.gpu
def test_verify_replays_in_a_cuda_graph() -> None:
    batch, heads, dim, draft_len = 3, 32, 128, 8
    slopes = lightning_slopes(heads).float().cuda()
    slots = torch.tensor([2, -1, 0], device="cuda", dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch * draft_len, heads, dim, device="cuda", dtype=torch.bfloat16,
                           generator=gen) for _ in range(3))
    state = torch.randn(3, heads, dim, dim, device="cuda")
    before = state.clone()

    def verify() -> torch.Tensor:
        return lightning_verify(q, k, v, state, slots, slopes, 0.1, draft_len)

    verify()  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = verify()
    for _ in range(2):
        for x in (q, k, v):
            x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
        graph.replay()
        assert torch.equal(out, verify()) and torch.equal(state, before)


def test_verify_reads_a_strided_slot_array_as_its_values(device: str) -> None:
    # a request's slot as a strided view (the sparse ops once read such a view past its element)
    (q, k, v), slopes, before, dense, _ = run_verify(VerifyCase([2, 0], pool=4, draft_len=3),
                                                     "triton", device)
    slots = strided(torch.tensor([2, 0], device=device, dtype=torch.int32),
                    torch.tensor([3, 3], device=device, dtype=torch.int32))
    out = lightning_verify(q, k, v, before, slots, slopes.to(device), SMALL_DIM**-0.5, 3)
    assert torch.equal(out, dense)


def test_verify_reads_strided_q_k_v_as_their_values(device: str) -> None:
    # v as the layer passes it (a slice of the fused qkv projection), q and k in other layouts
    (q, k, v), slopes, before, dense, _ = run_verify(VerifyCase([2, 0], pool=4, draft_len=3),
                                                     "triton", device)
    out = lightning_verify(*other_layouts(q, k, v), before, torch.tensor([2, 0], device=device),
                           slopes.to(device), SMALL_DIM**-0.5, 3)
    assert torch.equal(out, dense)
