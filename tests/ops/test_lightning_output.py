"""The Lightning layer's output before its projection (SPEC 2.1 step 4, ops/lightning_output.py):
the Triton op and its reference twin (the `op` parameter), each held to an independent float64
ground truth, z read as the layer hands it over (a row-strided slice of the fused q/k/v/gate
projection). Cases without the `gpu` mark run on the `device` fixture (Triton's CPU interpreter
without a GPU, fp32); the `gpu` cases take bf16 and fp16 at the real geometry."""

from __future__ import annotations

import pytest
import torch
from test_lightning import OUT_TOL, small_dtype

from sala_sglang.ops.lightning_output import lightning_output_gate
from sala_sglang.reference.lightning import lightning_output_gate_reference

EPS = 1e-6
OPS = ["triton", "reference"]


def run_op(op: str, o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if op == "triton":
        return lightning_output_gate(o, z, weight, EPS)
    return lightning_output_gate_reference(o, z, weight, EPS)


def make_inputs(tokens: int, width: int, device: str, dtype: torch.dtype | None = None,
                seed: int = 0):
    """o [T, N]; z the last quarter of a fused [T, 4N] projection's output; weight near 1."""
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or small_dtype(device)
    o = torch.randn(tokens, width, generator=gen).to(device, dtype)
    fused = (2 * torch.randn(tokens, 4 * width, generator=gen)).to(device, dtype)
    weight = (1.0 + 0.3 * torch.randn(width, generator=gen)).to(device, dtype)
    return o, fused[:, 3 * width:], weight


def ground_truth(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    o, z, w = (t.double().cpu() for t in (o, z, weight))
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + EPS) * w * torch.sigmoid(z)


CASES = [
    pytest.param(7, 64, None, id="T7-n64"),
    pytest.param(3, 200, None, id="T3-n200"),  # not a power of two: a masked tail
    *(pytest.param(tokens, 4096, dtype, id=f"T{tokens}-n4096-{dtype}", marks=pytest.mark.gpu)
      for dtype in (torch.bfloat16, torch.float16) for tokens in (1, 8192)),
]


@pytest.mark.parametrize("tokens, width, dtype", CASES)
@pytest.mark.parametrize("op", OPS)
def test_output_is_the_normalised_o_times_the_sigmoid_gate(op: str, tokens: int, width: int,
                                                            dtype, device: str,
                                                            relative_error) -> None:
    o, z, weight = make_inputs(tokens, width, device, dtype)
    out = run_op(op, o, z, weight)
    assert out.shape == (tokens, width) and out.dtype == o.dtype and out.is_contiguous()
    assert relative_error(out, ground_truth(o, z, weight)) < OUT_TOL[o.dtype]


def test_fp16_output_rounds_where_separate_kernels_round(device: str) -> None:
    """The norm, the gate and the product each rounded to fp16, as SGLang's RMSNorm, PyTorch's
    sigmoid and the multiply left them (and the reference model computes): all but the rare
    element whose norm (a sum in another order) or exp lands across a rounding boundary are the
    reference's bit for bit."""
    o, z, weight = make_inputs(64, 256, device, torch.float16, seed=2)
    same = (run_op("triton", o, z, weight) == run_op("reference", o, z, weight)).float().mean()
    assert same.item() >= 0.99, same.item()


@pytest.mark.parametrize("op", OPS)
def test_output_of_no_tokens_is_empty(op: str, device: str) -> None:
    o, z, weight = make_inputs(0, 64, device)
    assert run_op(op, o, z, weight).shape == (0, 64)


def test_output_names_the_bad_argument() -> None:
    o, z, weight = make_inputs(2, 16, "cpu")
    with pytest.raises(ValueError, match=r"z torch.float32 \(2, 8\)"):
        lightning_output_gate(o, z[:, :8], weight, EPS)
    with pytest.raises(ValueError, match=r"weight \(8,\): expected \[16\]"):
        lightning_output_gate(o, z, weight[:8], EPS)
    with pytest.raises(ValueError, match="expected unit stride in the last dimension"):
        lightning_output_gate(o, torch.cat([z, z], -1)[:, ::2], weight, EPS)
