"""The Lightning layer's output before its projection (SPEC 2.1 step 4) in one launch: RMSNorm
over the layer's heads, times the sigmoid gate.

SGLang's RMSNorm, PyTorch's sigmoid and the multiply were three kernels a layer (72 of a decode
step, a few microseconds each plus a graph gap); this reads o and z once and writes the product
once, rounding where the three kernels round (the normalised o, the gate, the product, each to
the model's dtype), so the served numbers are theirs. z is read where the fused q/k/v/gate
projection left it (a row-strided slice). One tensor-parallel rank holds only its heads' slice
of o, while the norm spans all heads: the layer keeps its all-reduce path there.
Reference twin: `sala_sglang.reference.lightning.lightning_output_gate_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala_sglang.ops.sigmoid_gate import accumulation_type, check_gate_operands, store_gated


@triton.jit
def _output_gate_kernel(
    o_ptr, z_ptr, w_ptr, out_ptr, eps,
    stride_o, stride_z,  # rows of o and z: [T, N], unit stride within a row
    N: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < N
    o = tl.load(o_ptr + token * stride_o + cols, mask=live, other=0.0).to(ACC)
    inv_rms = 1.0 / tl.sqrt(tl.sum(o * o, axis=0) / N + eps)
    out_ty = out_ptr.dtype.element_ty
    normed = (o * inv_rms * tl.load(w_ptr + cols, mask=live, other=0.0).to(ACC)).to(out_ty)
    z = tl.load(z_ptr + token * stride_z + cols, mask=live, other=0.0).to(ACC)
    store_gated(out_ptr + token * N + cols, normed.to(ACC), z, live)


def lightning_output_gate(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """o, z [T, N] (any row stride, unit stride within a row), weight [N] -> [T, N] contiguous in
    o's dtype: RMSNorm(o) * weight (eps), times sigmoid(z), each rounded to o's dtype as separate
    kernels would round it. Math in fp32 (fp64 for fp64 inputs)."""
    check_gate_operands("lightning_output_gate", "o", o, "z", z)
    if weight.shape != (o.shape[1],):
        raise ValueError(f"lightning_output_gate: weight {tuple(weight.shape)}: expected "
                         f"[{o.shape[1]}]")
    tokens, width = o.shape
    out = torch.empty(tokens, width, dtype=o.dtype, device=o.device)
    if tokens == 0:
        return out
    block = triton.next_power_of_2(width)
    _output_gate_kernel[(tokens,)](
        o, z, weight.contiguous(), out, eps, o.stride(0), z.stride(0),
        N=width, BLOCK=block, ACC=accumulation_type(o.dtype),
        num_warps=max(1, min(16, block // 256)),
    )
    return out
