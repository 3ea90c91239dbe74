"""The Triton lightning kernels, run by Triton's CPU interpreter, against the reference (fp32).

This keeps the kernels' indexing, masking, state slots and chunk carry-over under CPU CI; the GPU
tests repeat the comparison in bf16 on real hardware.
"""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("triton")

from triton_interpreter import run_interpreted  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import torch
    from sala_sglang.ops.lightning import lightning_decode, lightning_prefill
    from sala_sglang.reference.lightning import lightning_recurrent

    def err(a, b):
        return float((a.double() - b).norm() / b.norm())

    torch.manual_seed(0)
    H, D = 2, 32
    slopes = torch.tensor([0.84, 0.01])
    lens = [5, 37, 16]
    cu = torch.tensor([0, 5, 42, 58], dtype=torch.int32)
    q, k, v = (torch.randn(58, H, D) for _ in range(3))
    state = torch.randn(4, H, D, D)
    before = state.clone()
    slots = torch.tensor([2, 0, 3], dtype=torch.int32)
    has = torch.tensor([1, 0, 1], dtype=torch.int32)
    small = {"chunk": 16}
    o = lightning_prefill(q, k, v, state, slots, cu, has, slopes, D**-0.5, launch=small)
    worst = 0.0
    for i, n in enumerate(lens):
        s = int(cu[i])
        init = before[slots[i]].double() if has[i] else None
        ref_o, ref_s = lightning_recurrent(q[s:s+n].double(), k[s:s+n].double(), v[s:s+n].double(),
                                          slopes.double(), D**-0.5, init)
        worst = max(worst, err(o[s:s+n], ref_o), err(state[slots[i]], ref_s))
    assert torch.equal(state[1], before[1]), "prefill wrote a slot no sequence owns"
    split = before.clone()  # the 37-token sequence as 3 segments run in parallel
    o_split = lightning_prefill(q, k, v, split, slots, cu, has, slopes, D**-0.5, launch=small,
                                segment_len=16)
    worst = max(worst, err(o_split, o.double()), err(split, state.double()))
    has2 = torch.tensor([0, 1, 1], dtype=torch.int32)  # the split sequence now carries state in
    split2 = before.clone()
    o2 = lightning_prefill(q, k, v, split2, slots, cu, has2, slopes, D**-0.5, launch=small,
                           segment_len=16)
    for i, n in enumerate(lens):
        s = int(cu[i])
        init = before[slots[i]].double() if has2[i] else None
        ref_o, ref_s = lightning_recurrent(q[s:s+n].double(), k[s:s+n].double(), v[s:s+n].double(),
                                          slopes.double(), D**-0.5, init)
        worst = max(worst, err(o2[s:s+n], ref_o), err(split2[slots[i]], ref_s))
    qd, kd, vd = (torch.randn(3, H, D) for _ in range(3))
    before = state.clone()
    dslots = torch.tensor([2, -1, 0], dtype=torch.int32)
    od = lightning_decode(qd, kd, vd, state, dslots, slopes, D**-0.5)
    for i in (0, 2):
        ref_o, ref_s = lightning_recurrent(qd[i:i+1].double(), kd[i:i+1].double(), vd[i:i+1].double(),
                                          slopes.double(), D**-0.5, before[dslots[i]].double())
        worst = max(worst, err(od[i:i+1], ref_o), err(state[dslots[i]], ref_s))
    assert torch.equal(state[1], before[1]) and torch.equal(state[3], before[3]), "padding wrote state"
    print(worst)
    """
)


def test_interpreted_kernels_match_the_recurrence() -> None:
    last_line = run_interpreted(SCRIPT)
    assert float(last_line) < 1e-5
