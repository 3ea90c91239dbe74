"""The Lightning layer's q/k preparation (SPEC 2.1 step 2, ops/lightning_qk.py): the Triton op and
its reference twin (the `op` parameter), each held to an independent float64 ground truth.

The ground truth normalises each head, then turns every pair (x_j, x_{j + D/2}) as the complex
number x_j + i x_{j + D/2} by the angle position * theta^(-2j/D), the angle computed in fp32 as
SPEC 2.1 (and SGLang's RoPE table) has it. Inputs are read as the layer hands them over: row
strided slices of a fused projection. Cases without the `gpu` mark run on the `device` fixture
(Triton's CPU interpreter without a GPU, fp32); the `gpu` cases take bf16 and fp16 at the real
geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from test_lightning import OUT_TOL, small_dtype

from sala_sglang.ops.lightning_qk import lightning_qk_norm_rope
from sala_sglang.reference.lightning import lightning_qk_reference
from sala_sglang.reference.rope import rope_cos_sin

THETA, EPS = 10000.0, 1e-6


def sglang_table(rows: int, dim: int, device: str) -> torch.Tensor:
    """RoPE table [rows, dim] laid out as SGLang's `cos_sin_cache`: the D/2 cosines, then the
    sines, of fp32 angles."""
    cos, sin = rope_cos_sin(torch.arange(rows), dim, THETA, torch.float32)
    return torch.cat([cos[:, : dim // 2], sin[:, : dim // 2]], -1).to(device)


def run_op(op: str, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
           k_weight: torch.Tensor, positions: torch.Tensor,
           table_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    if op == "triton":
        table = sglang_table(table_rows, q_weight.shape[0], q.device)
        return lightning_qk_norm_rope(q, k, q_weight, k_weight, EPS, positions, table)
    return lightning_qk_reference(q, k, q_weight, k_weight, EPS, positions, THETA)


OPS = ["triton", "reference"]


def ground_truth(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [T, H*D] -> [T, H, D] in float64: RMSNorm per head, then each pair (j, j + D/2) turned
    as one complex number by its fp32 angle."""
    dim = weight.shape[0]
    x = x.double().cpu().unflatten(-1, (-1, dim))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.double().cpu()
    inv_freq = 1.0 / (THETA ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = (positions.cpu().float()[:, None] * inv_freq[None, :]).double()  # [T, D/2]
    turned = torch.complex(x[..., : dim // 2], x[..., dim // 2 :]) * torch.polar(
        torch.ones_like(angles), angles)[:, None, :]
    return torch.cat([turned.real, turned.imag], -1)


@dataclass(frozen=True)
class QKCase:
    tokens: int
    heads: int
    dim: int
    table_rows: int = 4096
    dtype: torch.dtype | None = None  # None: small_dtype(device)
    positions_dtype: torch.dtype = torch.int64


def make_inputs(case: QKCase, device: str, seed: int = 0):
    """q, k as the layer's split gives them (row stride 3 * H * D), weights [D] near 1 and
    distinct positions in random order, with gaps."""
    gen = torch.Generator().manual_seed(seed)
    dtype = case.dtype or small_dtype(device)
    width = case.heads * case.dim
    qkv = torch.randn(case.tokens, 3 * width, generator=gen).to(device, dtype)
    q, k, _ = qkv.split(width, -1)
    q_weight, k_weight = ((1.0 + 0.3 * torch.randn(case.dim, generator=gen)).to(device, dtype)
                          for _ in range(2))
    positions = torch.randperm(case.table_rows, generator=gen)[: case.tokens]
    return q, k, q_weight, k_weight, positions.to(device, case.positions_dtype)


QK_CASES = [
    pytest.param(QKCase(37, 4, 64), id="T37-h4-d64"),
    pytest.param(QKCase(5, 3, 128, positions_dtype=torch.int32), id="T5-h3-d128-int32"),
    pytest.param(QKCase(9, 1, 16), id="T9-h1-d16"),
    pytest.param(QKCase(3, 40, 64), id="T3-h40-d64"),  # two head blocks, the second partly empty
    *(pytest.param(QKCase(tokens, heads, dim, table_rows=rows, dtype=dtype),
                   id=f"T{tokens}-h{heads}-d{dim}-{dtype}", marks=pytest.mark.gpu)
      for dtype in (torch.bfloat16, torch.float16)
      for tokens, heads, dim, rows in ((1, 32, 128, 524288), (8192, 32, 128, 524288),
                                       (1000, 16, 64, 8192), (77, 5, 128, 4096))),
]


@pytest.mark.parametrize("case", QK_CASES)
@pytest.mark.parametrize("op", OPS)
def test_qk_is_each_head_normalised_then_rotated(case: QKCase, op: str, device: str,
                                                  relative_error) -> None:
    q, k, q_weight, k_weight, positions = make_inputs(case, device)
    q_out, k_out = run_op(op, q, k, q_weight, k_weight, positions, case.table_rows)
    for name, out, x, w in (("q", q_out, q, q_weight), ("k", k_out, k, k_weight)):
        assert out.shape == (case.tokens, case.heads, case.dim) and out.dtype == q.dtype, name
        assert out.is_contiguous(), name
        assert relative_error(out, ground_truth(x, w, positions)) < OUT_TOL[q.dtype], name


def test_fp16_qk_rounds_the_normalised_head_where_the_reference_does(device: str) -> None:
    """The served model is held to the reference model (SPEC section 4), whose norm returns fp16
    before RoPE turns it (as SGLang's separate kernels did): the fused op rounds there too. Not
    rounding there, a third of the fp16 outputs differ by an ulp, carried by 24 layers'
    recurrences into the served logprobs. Rounding there, all but the rare element whose norm
    (a sum in another order, 1/sqrt for rsqrt) or fused multiply-add lands across a rounding
    boundary are the reference's bit for bit."""
    case = QKCase(64, 4, 64, dtype=torch.float16)
    q, k, q_weight, k_weight, positions = make_inputs(case, device, seed=2)
    served = run_op("triton", q, k, q_weight, k_weight, positions, case.table_rows)
    reference = run_op("reference", q, k, q_weight, k_weight, positions, case.table_rows)
    for out, ref in zip(served, reference):
        same = (out == ref).float().mean().item()
        assert same >= 0.99, same


@pytest.mark.parametrize("op", OPS)
def test_qk_reads_any_row_stride(op: str, device: str) -> None:
    # q with rows 3 elements apart from the next head (an unaligned stride), k contiguous: the
    # same values as from the fused projection's slices
    case = QKCase(11, 2, 32)
    q, k, q_weight, k_weight, positions = make_inputs(case, device, seed=1)
    padded = torch.full((case.tokens, q.shape[1] + 3), float("nan"), device=device,
                        dtype=q.dtype)
    padded[:, : q.shape[1]] = q
    strided = run_op(op, padded[:, : q.shape[1]], k.contiguous(), q_weight, k_weight, positions,
                     case.table_rows)
    fused = run_op(op, q, k, q_weight, k_weight, positions, case.table_rows)
    assert all(torch.equal(a, b) for a, b in zip(strided, fused))


@pytest.mark.parametrize("op", OPS)
def test_qk_of_no_tokens_is_empty(op: str, device: str) -> None:
    q, k, q_weight, k_weight, positions = make_inputs(QKCase(0, 4, 64), device)
    q_out, k_out = run_op(op, q, k, q_weight, k_weight, positions, 16)
    assert q_out.shape == k_out.shape == (0, 4, 64)


def test_qk_names_the_bad_argument() -> None:
    q, k, q_weight, k_weight, positions = make_inputs(QKCase(2, 2, 16), "cpu")
    table = sglang_table(8, 16, "cpu")
    with pytest.raises(ValueError, match=r"q_weight \(12,\).*D a power of two"):
        lightning_qk_norm_rope(q, k, q_weight[:12], k_weight[:12], EPS, positions, table)
    with pytest.raises(ValueError, match=r"q torch.float32 \(2, 32\), k torch.float32 \(2, 16\)"):
        lightning_qk_norm_rope(q, k[:, :16], q_weight, k_weight, EPS, positions, table)
    with pytest.raises(ValueError, match="expected unit stride in the last dimension"):
        lightning_qk_norm_rope(q, torch.cat([k, k], -1)[:, ::2], q_weight, k_weight, EPS,
                               positions, table)
    with pytest.raises(ValueError, match=r"positions torch.float32 \(2,\): expected integers"):
        lightning_qk_norm_rope(q, k, q_weight, k_weight, EPS, positions.float(), table)
    with pytest.raises(ValueError, match=r"cos_sin_cache \(8, 8\).*expected \[positions, 16\]"):
        lightning_qk_norm_rope(q, k, q_weight, k_weight, EPS, positions, table[:, :8])
