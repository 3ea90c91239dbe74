"""A mixer's sigmoid output gate (ops/sigmoid_gate.py): the Triton op and its reference twin (the
`op` parameter), each held to an independent float64 ground truth, the gate read as the layer
hands it over (a row-strided slice of the fused q/k/v/gate projection). Cases without the `gpu`
mark run on the `device` fixture (Triton's CPU interpreter without a GPU, fp32); the `gpu` cases
take bf16 and fp16 at the real geometry."""

from __future__ import annotations

import pytest
import torch
from test_lightning import OUT_TOL, small_dtype

from sala_sglang.ops.sigmoid_gate import sigmoid_gate
from sala_sglang.reference.sparse import sigmoid_gate_reference

OPS = ["triton", "reference"]


def run_op(op: str, a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return sigmoid_gate(a, gate) if op == "triton" else sigmoid_gate_reference(a, gate)


def make_inputs(tokens: int, width: int, device: str, dtype: torch.dtype | None = None,
                seed: int = 0):
    """a [T, N]; gate the last part of a fused [T, 2N + N / 8] projection's output, as the sparse
    layer's q, k, v and gate split it."""
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or small_dtype(device)
    a = torch.randn(tokens, width, generator=gen).to(device, dtype)
    kv = max(1, width // 16)
    fused = (2 * torch.randn(tokens, 2 * width + 2 * kv, generator=gen)).to(device, dtype)
    return a, fused[:, width + 2 * kv:]


def ground_truth(a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return a.double().cpu() * torch.sigmoid(gate.double().cpu())


CASES = [
    pytest.param(7, 64, None, id="T7-n64"),
    pytest.param(3, 200, None, id="T3-n200"),  # not a power of two: a masked tail
    pytest.param(2, 5000, None, id="T2-n5000"),  # three programs a row, the last one partial
    *(pytest.param(tokens, 4096, dtype, id=f"T{tokens}-n4096-{dtype}", marks=pytest.mark.gpu)
      for dtype in (torch.bfloat16, torch.float16) for tokens in (1, 8192)),
]


@pytest.mark.parametrize("tokens, width, dtype", CASES)
@pytest.mark.parametrize("op", OPS)
def test_output_is_a_times_the_sigmoid_gate(op: str, tokens: int, width: int, dtype,
                                            device: str, relative_error) -> None:
    a, gate = make_inputs(tokens, width, device, dtype)
    assert gate.stride(0) != width  # the strided slice, as served
    out = run_op(op, a, gate)
    assert out.shape == (tokens, width) and out.dtype == a.dtype and out.is_contiguous()
    assert relative_error(out, ground_truth(a, gate)) < OUT_TOL[a.dtype]


def test_fp16_output_rounds_where_separate_kernels_round(device: str) -> None:
    """The gate and the product each rounded to fp16, as PyTorch's sigmoid and multiply left them
    (and the reference model computes): all but the rare element whose exp lands across a
    rounding boundary are the reference's bit for bit."""
    a, gate = make_inputs(64, 256, device, torch.float16, seed=2)
    same = (run_op("triton", a, gate) == run_op("reference", a, gate)).float().mean()
    assert same.item() >= 0.99, same.item()


@pytest.mark.parametrize("op", OPS)
def test_output_of_no_tokens_is_empty(op: str, device: str) -> None:
    a, gate = make_inputs(0, 64, device)
    assert run_op(op, a, gate).shape == (0, 64)


def test_output_names_the_bad_argument() -> None:
    a, gate = make_inputs(2, 16, "cpu")
    with pytest.raises(ValueError, match=r"gate torch.float32 \(2, 8\)"):
        sigmoid_gate(a, gate[:, :8])
    with pytest.raises(ValueError, match=r"gate torch.float64"):
        sigmoid_gate(a, gate.double())
    with pytest.raises(ValueError, match="expected unit stride in the last dimension"):
        sigmoid_gate(a, torch.cat([gate, gate], -1)[:, ::2])
