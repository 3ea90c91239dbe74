"""Lightning kernels on the GPU against the reference recurrence (bf16 inputs, awkward sizes)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("lengths", [[1], [63, 64, 65], [5, 300, 1, 129], [1000]])
def test_prefill_matches_recurrence_with_state_in_and_out(head_dim: int, lengths: list) -> None:
    from sala_sglang.ops.lightning import lightning_prefill
    from sala_sglang.reference.lightning import lightning_recurrent, lightning_slopes

    torch.manual_seed(sum(lengths) + head_dim)
    heads, dev = 4, "cuda"
    slopes = torch.tensor([0.84, 0.3, 0.01, 2**-8], device=dev)  # includes the steepest decay
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(len(lengths) + 3, heads, head_dim, head_dim, device=dev)
    before = state.clone()
    slots = torch.randperm(len(lengths) + 3, device=dev)[: len(lengths)].to(torch.int32)
    has_init = torch.tensor([i % 2 for i in range(len(lengths))], device=dev, dtype=torch.int32)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=dev, dtype=torch.int32)
    scale = head_dim**-0.5
    out = lightning_prefill(q, k, v, state, slots, cu, has_init, slopes, scale)
    for i, n in enumerate(lengths):
        s = int(cu[i])
        init = before[slots[i]].double().cpu() if has_init[i] else None
        ref_o, ref_s = lightning_recurrent(
            *(x[s : s + n].double().cpu() for x in (q, k, v)), slopes.double().cpu(), scale, init
        )
        assert rel_err(out[s : s + n].cpu(), ref_o) < 1e-2
        assert rel_err(state[slots[i]].cpu(), ref_s) < 1e-2
    untouched = [j for j in range(state.shape[0]) if j not in slots.tolist()]
    assert torch.equal(state[untouched], before[untouched])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_step_matches_recurrence_and_skips_padding(head_dim: int) -> None:
    from sala_sglang.ops.lightning import lightning_decode
    from sala_sglang.reference.lightning import lightning_recurrent, lightning_slopes

    torch.manual_seed(head_dim)
    heads, batch, dev = 32, 7, "cuda"
    slopes = lightning_slopes(heads).float().to(dev)
    q, k, v = (torch.randn(batch, heads, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(batch + 2, heads, head_dim, head_dim, device=dev)
    before = state.clone()
    slots = torch.tensor([3, 0, -1, 8, 1, -1, 5], device=dev, dtype=torch.int32)
    out = lightning_decode(q, k, v, state, slots, slopes, head_dim**-0.5)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        ref_o, ref_s = lightning_recurrent(
            *(x[i : i + 1].double().cpu() for x in (q, k, v)), slopes.double().cpu(),
            head_dim**-0.5, before[slot].double().cpu(),
        )
        assert rel_err(out[i : i + 1].cpu(), ref_o) < 1e-2
        assert rel_err(state[slot].cpu(), ref_s) < 1e-5
    for slot in (2, 4, 6):  # no request owns them; padding rows must not write them
        assert torch.equal(state[slot], before[slot])
