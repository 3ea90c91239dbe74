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
def _sigmoid_gate_kernel(
    a_ptr, g_ptr, out_ptr, n_cols,
    stride_a, stride_g,  # rows of a and gate: [T, N], unit stride within a row
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < n_cols
    out_ty = out_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + cols, mask=live, other=0.0).to(ACC)
    gate = (1.0 / (1.0 + tl.exp(-g))).to(out_ty)
    a = tl.load(a_ptr + row * stride_a + cols, mask=live, other=0.0).to(ACC)
    tl.store(out_ptr + row * n_cols + cols, (a * gate.to(ACC)).to(out_ty), mask=live)


def sigmoid_gate(a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """a, gate [T, N] of one dtype (any row stride, unit stride within a row) -> [T, N]
    contiguous: a * sigmoid(gate), the gate and the product each rounded to a's dtype as separate
    kernels would round them. Math in fp32 (fp64 for fp64 inputs)."""
    if a.dim() != 2 or gate.shape != a.shape or gate.dtype != a.dtype:
        raise ValueError(f"sigmoid_gate: a {a.dtype} {tuple(a.shape)}, gate {gate.dtype} "
                         f"{tuple(gate.shape)}: expected both [T, N] of one dtype")
    if a.stride(-1) != 1 or gate.stride(-1) != 1:
        raise ValueError(f"sigmoid_gate: a strides {a.stride()}, gate strides {gate.stride()}: "
                         "expected unit stride in the last dimension")
    tokens, width = a.shape
    out = torch.empty(tokens, width, dtype=a.dtype, device=a.device)
    if tokens == 0 or width == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(width))
    _sigmoid_gate_kernel[(tokens, triton.cdiv(width, block))](
        a, gate, out, width, a.stride(0), gate.stride(0), BLOCK=block,
        ACC=tl.float64 if a.dtype == torch.float64 else tl.float32,
        num_warps=max(1, min(8, block // 256)),
    )
    return out
