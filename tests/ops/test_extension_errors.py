"""A failing check inside `sala_sglang._C` reaches Python as a RuntimeError, step by step.

On the H100 image a child interpreter that calls a CUDA op of `_C` with a bad argument has exited
with SIGSEGV (test_compress / test_lightning's bad-argument tests, benchmarks/NOTES.md); on this
project's CPU machines the same pattern raises. Each test below is one step of that path in its own
interpreter, so the set that fails on a GPU says which step kills it: loading the extension and
touching the GPU; a host-only op (no tensor argument, the dispatcher's catch-all kernel) raising;
the CUDA ops' own host code raising on CPU tensors, redispatched to their CUDA kernels before any
CUDA context exists (this one also runs on a CPU machine where `_C` is built); test_compress's
bad-argument script, the interpreter then leaving through os._exit (no teardown), where
test_compress's own test leaves it normally."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import child_stdout, needs_extension
from test_compress import BAD_ARGUMENTS as COMPRESS_BAD_ARGUMENTS

PRELUDE = """
import os
import torch
import sala_sglang._C  # noqa: F401
"""

# The compiled CUDA kernels of two ops called with CPU tensors: their first TORCH_CHECK (device)
# fails in host code nvcc compiled, with no CUDA context created.
REDISPATCHED = """
cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
idx = torch.zeros(1, dtype=torch.int32)
k = torch.randn(64, 2, 128, dtype=torch.bfloat16)
q = torch.randn(2, 4, 64, dtype=torch.bfloat16)
for op, args in (
    (torch.ops.sala_sglang.compress_new_windows.default,
     (k, torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.int32),
      idx, idx, idx, 32, 16, 64, 4)),
    (torch.ops.sala_sglang.lightning_decode.default,
     (q, q, q, torch.zeros(2, 4, 64, 64), idx, torch.rand(4), 0.1)),
):
    try:
        op.redispatch(cuda_only, *args)
    except RuntimeError as exc:
        print("caught:", str(exc).splitlines()[0])
print("cuda initialized:", torch.cuda.is_initialized())
"""
# One step each; every script prints what it survived.
STEPS = {
    "load": """
x = torch.zeros(4, device="cuda")
print("loaded", float(x.sum()))
""",
    "host_op_raises": """
try:
    torch.ops.sala_sglang.select_blocks_smem_bytes(96, 0, 4, 1024, 1024, 96)
except RuntimeError as exc:
    print("caught:", str(exc).splitlines()[0])
""",
    "cuda_op_raises_then_hard_exit": COMPRESS_BAD_ARGUMENTS + "os._exit(0)\n",
}
EXPECTED = {
    "load": "loaded 0.0",
    "host_op_raises": "head dim 96 not compiled",
    "cuda_op_raises_then_hard_exit": "compress_new_windows: out must be",
}


@pytest.mark.skipif(importlib.util.find_spec("sala_sglang._C") is None,
                    reason="sala_sglang._C is not built")
def test_child_survives_host_code_raising_without_cuda() -> None:
    out = child_stdout(PRELUDE + REDISPATCHED)
    assert "compress_new_windows: k_buffer must be a CUDA tensor" in out, out
    assert "lightning_decode: q must be a CUDA tensor" in out, out
    assert "cuda initialized: False" in out, out


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("step", list(STEPS))
def test_child_survives_step(step: str) -> None:
    out = child_stdout(PRELUDE + STEPS[step])
    assert EXPECTED[step] in out, out
