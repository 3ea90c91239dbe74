"""Lightning commit of accepted drafts (SPEC 2.1, ops/lightning_commit.py) against decoding them
one after another: the Triton op and its reference twin (the `op` parameter), each held to an
independent float64 loop of single decode steps (`decode_one_by_one`), for every layer's pool.

A commit advances each request's slot by exactly its accepted steps (0: the slot is left bit for
bit), writes the tracked snapshot, and touches nothing else; verify then commit leaves what
decoding the accepted drafts with `lightning_decode` leaves. Cases without the `gpu` mark run on
the `device` fixture (Triton's CPU interpreter without a GPU, fp32); the `gpu` case repeats them
at the real geometry with bf16 keys and values.
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
    STATE_TOL,
    small_dtype,
    strided,
)
from test_lightning import unowned as unowned_slots
from test_lightning_verify import OPS as VERIFY_OPS
from test_lightning_verify import decode_one_by_one

from sala_sglang.ops.lightning import lightning_decode
from sala_sglang.ops.lightning_commit import lightning_commit
from sala_sglang.reference.lightning import lightning_commit_reference, lightning_slopes

OPS = {"triton": lightning_commit, "reference": lightning_commit_reference}


@dataclass(frozen=True)
class CommitCase:
    slots: list[int]  # -1: a CUDA-graph padding row, which must touch no state
    accepted: list[int]  # 0: the request's slot is left alone
    pool: int
    draft_len: int
    layers: int = 2
    heads: int = SMALL_HEADS
    dim: int = SMALL_DIM
    dtype: torch.dtype | None = None  # of k and v; None: small_dtype(device)
    slopes: tuple[float, ...] | None = tuple(SMALL_SLOPES)  # None: the real schedule
    # the prefix cache's snapshots: request b also writes its state after step track_steps[b]
    # to track_slots[b] (-1 in either: none)
    track_slots: list[int] | None = None
    track_steps: list[int] | None = None

    def tracked(self) -> list[tuple[int, int, int]]:
        """(request, slot, step) of each snapshot the call must write."""
        if self.track_slots is None:
            return []
        return [(b, slot, step) for b, (slot, step) in enumerate(zip(self.track_slots,
                                                                      self.track_steps))
                if slot >= 0 and 0 <= step < self.accepted[b] and self.slots[b] >= 0]


def check_commit(case: CommitCase, op: str, device: str, relative_error, seed: int = 0) -> None:
    """Each request's slot in every layer holds the ground truth's state after its accepted steps
    (0: bit for bit what it held), each snapshot the state after its step; other slots are left
    bit for bit."""
    dtype = case.dtype or small_dtype(device)
    gen = torch.Generator().manual_seed(seed)
    slopes = (torch.tensor(case.slopes) if case.slopes else lightning_slopes(case.heads)).float()
    shape = (case.layers, len(case.slots), case.draft_len, case.heads, case.dim)
    k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
    state = torch.randn(case.layers, case.pool, case.heads, case.dim, case.dim,
                        generator=gen).to(device)
    before = state.clone()
    index = {"device": device, "dtype": torch.int32}
    track = {}
    if case.track_slots is not None:
        track = {"track_slots": torch.tensor(case.track_slots, **index),
                 "track_steps": torch.tensor(case.track_steps, **index)}
    OPS[op](state, torch.tensor(case.slots, **index), k, v, slopes.to(device),
            torch.tensor(case.accepted, **index), **track)

    def expected(layer: int, b: int) -> torch.Tensor:
        """The ground truth's states after steps 0..T-1 of request b in this layer."""
        return decode_one_by_one(k[layer, b], k[layer, b], v[layer, b],
                                 before[layer, case.slots[b]], slopes, 1.0)[1]

    for layer in range(case.layers):
        for b, (slot, n) in enumerate(zip(case.slots, case.accepted)):
            if slot < 0:
                continue
            where = f"layer {layer}, request {b} (slot {slot}, {n} accepted)"
            if n == 0:
                assert torch.equal(state[layer, slot], before[layer, slot]), where
            else:
                ref = expected(layer, b)[n - 1]
                assert relative_error(state[layer, slot].cpu(), ref) < STATE_TOL, where
        for b, slot, step in case.tracked():
            ref = expected(layer, b)[step]
            assert relative_error(state[layer, slot].cpu(), ref) < STATE_TOL, (
                f"layer {layer}, request {b}'s snapshot after step {step}")
    owned = [s for s, n in zip(case.slots, case.accepted) if n > 0]
    untouched = unowned_slots(case.pool, owned + [slot for _, slot, _ in case.tracked()])
    assert torch.equal(state[:, untouched], before[:, untouched]), "commit wrote a slot no one owns"


def accepted_cases(draft_len: int) -> CommitCase:
    """All T, a part, one and none accepted; a padding row that accepted all; slot 2 unowned."""
    return CommitCase([3, -1, 0, 4, 1], [draft_len, draft_len, draft_len // 2 + 1, 1, 0], pool=5,
                      draft_len=draft_len)


COMMIT_CASES = [
    *(pytest.param(accepted_cases(t), id=f"T{t}") for t in (2, 5, 8)),
    pytest.param(CommitCase([0, -1, 2], [8, 8, 3], pool=5, draft_len=8, heads=32, dim=128,
                            dtype=torch.bfloat16, slopes=None, track_slots=[3, 1, 4],
                            track_steps=[3, 7, 2]),
                 id="real-T8-tracked", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("case", COMMIT_CASES)
@pytest.mark.parametrize("op", list(OPS))
def test_commit_applies_exactly_the_accepted_steps(case: CommitCase, op: str, device: str,
                                                   relative_error) -> None:
    check_commit(case, op, device, relative_error)


# Snapshots (slots 5-9) after a middle step, after the last accepted step (of 3, and of all T),
# none (step -1, slot -1), a padding row's and one after a rejected step (both must write nothing).
TRACKED = CommitCase([3, 0, 4, 1, -1, 2, 10], [5, 3, 2, 4, 5, 5, 2], pool=11, draft_len=5,
                     track_slots=[5, 6, 7, -1, 8, 8, 9], track_steps=[2, 2, -1, 1, 1, 4, 2])


@pytest.mark.parametrize("op", list(OPS))
def test_commit_snapshots_the_state_after_the_tracked_step(op: str, device: str,
                                                           relative_error) -> None:
    check_commit(TRACKED, op, device, relative_error)


@pytest.mark.parametrize("op", list(OPS))
def test_verify_then_commit_equals_decoding_the_accepted_drafts(op: str, device: str,
                                                                relative_error) -> None:
    # Two layers, T = 4 drafts for three requests accepting 4, 2 and 0 of them, and a padding row.
    # The decode runs the accepted drafts step by step, a request that accepted fewer than the
    # step's index sitting it out as padding; the verify's outputs of the accepted rows and the
    # committed pools must be what it leaves.
    layers, slots, accepted, draft_len = 2, [2, 0, -1, 3], [4, 2, 4, 0], 4
    heads, dim, dtype = SMALL_HEADS, SMALL_DIM, small_dtype(device)
    batch = len(slots)
    gen = torch.Generator().manual_seed(6)
    slopes = torch.tensor(SMALL_SLOPES, device=device)
    q, k, v = (torch.randn(layers, batch, draft_len, heads, dim, generator=gen).to(device, dtype)
               for _ in range(3))
    state = torch.randn(layers, 4, heads, dim, dim, generator=gen).to(device)
    decoded = state.clone()
    scale = dim**-0.5

    verified = torch.stack([
        VERIFY_OPS[op](*(x[layer].flatten(0, 1) for x in (q, k, v)), state[layer],
                       torch.tensor(slots, device=device), slopes, scale, draft_len)
        .unflatten(0, (batch, draft_len))
        for layer in range(layers)])
    OPS[op](state, torch.tensor(slots, device=device), k, v, slopes,
            torch.tensor(accepted, device=device))

    for step in range(draft_len):
        live = torch.tensor([s if step < n else -1 for s, n in zip(slots, accepted)],
                            device=device, dtype=torch.int32)
        for layer in range(layers):
            out = lightning_decode(*(x[layer, :, step] for x in (q, k, v)), decoded[layer], live,
                                   slopes, scale, impl="triton")
            for b, n in enumerate(accepted):
                if slots[b] >= 0 and step < n:
                    assert relative_error(verified[layer, b, step].cpu(), out[b].cpu()) < (
                        OUT_TOL[dtype]), f"layer {layer}, request {b}, draft {step}"
    for slot in range(state.shape[1]):
        assert relative_error(state[:, slot], decoded[:, slot]) < STATE_TOL, f"slot {slot}"


def test_commit_names_the_bad_argument() -> None:
    state = torch.zeros(2, 3, 1, 32, 32)
    kv = torch.zeros(2, 2, 4, 1, 32)
    slots, slopes = torch.zeros(2, dtype=torch.int32), torch.ones(1)
    accepted = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="state has 3 layers, k and v 2"):
        lightning_commit(torch.zeros(3, 3, 1, 32, 32), slots, kv, kv, slopes, accepted)
    with pytest.raises(ValueError, match=r"expected state \[layers, slots, H, D, D\]"):
        lightning_commit(state[0], slots, kv, kv, slopes, accepted)
    with pytest.raises(ValueError, match="lightning state must be float32"):
        lightning_commit(state.double(), slots, kv, kv, slopes, accepted)
    with pytest.raises(ValueError, match=r"accepted torch.float32 \(2,\): expected integers \[2\]"):
        lightning_commit(state, slots, kv, kv, slopes, accepted.float())
    with pytest.raises(ValueError, match="pass track_slots and track_steps together"):
        lightning_commit(state, slots, kv, kv, slopes, accepted, track_slots=slots)
    with pytest.raises(ValueError, match=r"track_steps torch.int32 \(3,\): expected integers"):
        lightning_commit(state, slots, kv, kv, slopes, accepted, track_slots=slots,
                         track_steps=torch.zeros(3, dtype=torch.int32))


@pytest.mark.gpu
def test_commit_replays_in_a_cuda_graph() -> None:
    layers, batch, heads, dim, draft_len = 2, 3, 32, 128, 8
    slopes = lightning_slopes(heads).float().cuda()
    slots = torch.tensor([2, -1, 0], device="cuda", dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    k, v = (torch.randn(layers, batch, draft_len, heads, dim, device="cuda", dtype=torch.bfloat16,
                        generator=gen) for _ in range(2))
    # slot 1 takes the snapshots; what is accepted and tracked changes between replays
    state = torch.randn(layers, 3, heads, dim, dim, device="cuda")
    eager_state = state.clone()
    accepted = torch.zeros(batch, device="cuda", dtype=torch.int32)
    track_slots = torch.tensor([1, -1, -1], device="cuda")
    track_steps = torch.zeros(batch, device="cuda", dtype=torch.int32)

    def commit(st: torch.Tensor) -> None:
        lightning_commit(st, slots, k, v, slopes, accepted, track_slots, track_steps)

    commit(state.clone())  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        commit(state)
    for replay in range(2):
        for x in (k, v):
            x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
        accepted.copy_(torch.tensor([8 - replay, 5, 3 * replay]))
        track_steps.copy_(torch.tensor([4 + replay, 0, 0]))
        graph.replay()
        commit(eager_state)
        assert torch.equal(state, eager_state)


def test_commit_reads_strided_per_request_arrays_as_their_values(device: str) -> None:
    # slots, accepted counts and the snapshot pair as strided views (the sparse ops once read a
    # view of a request's slot past its element): the same pool as with dense arrays
    gen = torch.Generator().manual_seed(4)
    k, v = (torch.randn(2, 2, 4, SMALL_HEADS, SMALL_DIM, generator=gen)
            .to(device, small_dtype(device)) for _ in range(2))
    state = torch.randn(2, 6, SMALL_HEADS, SMALL_DIM, SMALL_DIM, generator=gen).to(device)
    slopes = torch.tensor(SMALL_SLOPES, device=device)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=torch.int32)

    dense = (ints([1, 3]), ints([4, 2]), ints([5, 0]), ints([1, 0]))
    views = tuple(strided(x, ints([2, 2])) for x in dense)
    pools = []
    for slots, accepted, track_slots, track_steps in (dense, views):
        pool = state.clone()
        lightning_commit(pool, slots, k, v, slopes, accepted, track_slots=track_slots,
                         track_steps=track_steps)
        pools.append(pool)
    assert torch.equal(*pools)
