"""What the lightning layers run in one forward, fixed per batch (FlashInfer's plan/run split).

`LightningBackend` builds a `LightningPlan` in `init_forward_metadata*` from host facts only (token
and request counts, layer geometry, and the device facts and kernel overrides it read when it was
built), so planning is safe while CUDA graphs are captured; every lightning layer of the forward
then runs with what the plan fixed, with no device query or environment read per layer call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sala_sglang.ops import _cuda
from sala_sglang.ops.overrides import IMPLS

# Head dims that csrc/lightning.cu instantiates; others take the Triton kernel.
CUDA_DECODE_HEAD_DIMS = (32, 64, 128, 256)
# Decode takes the CUDA kernel where it can: it beats Triton at batch 1-32 on an H100 (see
# benchmarks/README.md, Kernels, and benchmarks/NOTES.md).
CUDA_DECODE_FASTER = True

# Value columns per program of the one-token-at-a-time kernels (Triton decode, verify, commit): a
# [128, 64] fp32 state block is 64 registers a thread at 4 warps, and 128-dim heads still give
# two programs per (request, head).
STEP_BLOCK_V = 64

# Prefill launch shape: chunk rows, value columns per program, warps, software-pipeline stages.
# The fastest of the shapes benchmarks/kernels/lightning.py sweeps, at 32K-512K tokens on an H100.
PREFILL_LAUNCH = {"chunk": 64, "block_v": 64, "num_warps": 4, "num_stages": 2}
# Prefill programs that keep a GPU busy, per SM; a parallel segment is at least this many chunks.
PROGRAMS_PER_SM = 4
MIN_SEGMENT_CHUNKS = 4


@dataclass(frozen=True)
class LightningPlan:
    """One forward's choices, read by every lightning layer call."""

    decode_impl: str  # "cuda" or "triton": lightning_decode's impl
    segment_len: int  # lightning_prefill's tokens per parallel segment, a multiple of the chunk


def plan_lightning(
    tokens: int,
    batch: int,
    heads: int,
    head_dim: int,
    device: _cuda.DeviceFacts,
    prefer: str | None = None,
) -> LightningPlan:
    """The plan of a batch of `tokens` tokens in `batch` requests, `heads` heads of `head_dim`
    on `device`. prefer: the implementation to take where it can run (`KernelOverrides.impl`);
    None takes the faster one."""
    if prefer not in (None, *IMPLS):
        raise ValueError(f"plan_lightning: prefer={prefer!r}; expected 'cuda', 'triton' or None")
    decode = _cuda.planned_impl(
        "lightning_decode", prefer, CUDA_DECODE_FASTER,
        lambda: device.why_not_compiled() or decode_cuda_unsupported(head_dim))
    return LightningPlan(
        decode_impl=decode,
        segment_len=prefill_segment_len(tokens, batch, heads, head_dim, device.multiprocessors),
    )


def decode_cuda_unsupported(head_dim: int) -> str | None:
    """Why the CUDA decode kernel cannot take this head dim, or None."""
    if head_dim in CUDA_DECODE_HEAD_DIMS:
        return None
    return f"head dim {head_dim} is not compiled (csrc/lightning.cu: {CUDA_DECODE_HEAD_DIMS})"


def prefill_segment_len(
    tokens: int,
    batch: int,
    heads: int,
    head_dim: int,
    multiprocessors: int,
    launch: Mapping[str, int] = PREFILL_LAUNCH,
) -> int:
    """Tokens per parallel prefill segment, a multiple of the chunk: enough segments for
    PROGRAMS_PER_SM programs per SM (multiprocessors 0, no GPU: one program at a time, as Triton's
    CPU interpreter runs them), each at least MIN_SEGMENT_CHUNKS chunks; one segment per sequence
    where the batch alone fills the device."""
    chunk = launch["chunk"]
    programs_per_segment = heads * (head_dim // min(head_dim, launch["block_v"]))
    wanted = _cdiv(PROGRAMS_PER_SM * multiprocessors or 1, max(batch, 1) * programs_per_segment)
    if wanted <= 1:
        return max(_cdiv(tokens, chunk), 1) * chunk
    return max(_cdiv(_cdiv(tokens, wanted), chunk), MIN_SEGMENT_CHUNKS) * chunk


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
