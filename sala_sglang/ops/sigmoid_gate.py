"""A mixer's sigmoid output gate before its projection, `a * sigmoid(gate)`, in one launch: the
sparse layer's output (SPEC 2.2), and the Lightning layer's under tensor parallelism, after its
all-reduced norm (at TP 1 `ops/lightning_output.py` takes the norm too).

PyTorch's sigmoid and multiply were two kernels a layer (16 of a decode step in the sparse
layers); this reads `a` and `gate` once and writes the product once, rounding where the two
kernels round (the gate, then the product, each to the model's dtype), so the served numbers are
theirs. `gate` is read where the fused q/k/v/gate projection left it (a row-strided slice).
Reference twin: `sala_sglang.reference.sparse.sigmoid_gate_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of a row per program: a 4096-wide row (32 heads of 128) in two programs.
BLOCK = 2048


@triton.jit
def store_gated(out_ptrs, a, g, mask):
    """Stores a * sigmoid(g) (both in the accumulation dtype) at out_ptrs: the gate rounded to
    the output's dtype, then the product, where PyTorch's sigmoid and multiply round them."""
    out_ty = out_ptrs.dtype.element_ty
    gate = (1.0 / (1.0 + tl.exp(-g))).to(out_ty)
    tl.store(out_ptrs, (a * gate.to(a.dtype)).to(out_ty), mask=mask)


@triton.jit
def _sigmoid_gate_kernel(
    a_ptr, g_ptr, out_ptr, n_cols,
    stride_a, stride_g,  # rows of a and gate: [T, N], unit stride within a row
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=live, other=0.0).to(ACC)
    a = tl.load(a_ptr + row * stride_a + cols, mask=live, other=0.0).to(ACC)
    store_gated(out_ptr + row * n_cols + cols, a, g, live)


def check_gate_operands(op: str, a_name: str, a: torch.Tensor, gate_name: str,
                        gate: torch.Tensor) -> None:
    """ValueError naming what `op` cannot take: a and gate must be [T, N] of one dtype, each
    with unit stride within a row."""
    if a.dim() != 2 or gate.shape != a.shape or gate.dtype != a.dtype:
        raise ValueError(f"{op}: {a_name} {a.dtype} {tuple(a.shape)}, {gate_name} {gate.dtype} "
                         f"{tuple(gate.shape)}: expected both [T, N] of one dtype")
    if a.stride(-1) != 1 or gate.stride(-1) != 1:
        raise ValueError(f"{op}: {a_name} strides {a.stride()}, {gate_name} strides "
                         f"{gate.stride()}: expected unit stride in the last dimension")


def accumulation_type(dtype: torch.dtype) -> tl.dtype:
    """The kernels' math: fp64 for fp64 inputs, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def sigmoid_gate(a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """a, gate [T, N] of one dtype (any row stride, unit stride within a row) -> [T, N]
    contiguous: a * sigmoid(gate), the gate and the product each rounded to a's dtype as separate
    kernels would round them. Math in fp32 (fp64 for fp64 inputs)."""
    check_gate_operands("sigmoid_gate", "a", a, "gate", gate)
    tokens, width = a.shape
    out = torch.empty(tokens, width, dtype=a.dtype, device=a.device)
    if tokens == 0 or width == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(width))
    _sigmoid_gate_kernel[(tokens, triton.cdiv(width, block))](
        a, gate, out, width, a.stride(0), gate.stride(0), BLOCK=block,
        ACC=accumulation_type(a.dtype), num_warps=max(1, min(8, block // 256)),
    )
    return out
