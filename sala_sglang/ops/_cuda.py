"""The optional compiled kernels: `sala_sglang._C`, built from csrc/ by setup.py.

Importing the extension registers its ops as `torch.ops.sala_sglang.*` (usable under CUDA graphs
and torch.compile). It is loaded at most once; without it every op runs its Triton kernel.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)
_reported: set[tuple[str, bool]] = set()


@functools.cache
def available() -> bool:
    """Whether `sala_sglang._C` is built and loads."""
    try:
        import sala_sglang._C  # noqa: F401  (side effect: registers torch.ops.sala_sglang.*)
    except ImportError as exc:
        log.info("sala_sglang._C is not available (%s)", exc)
        return False
    return True


def use_compiled(op: str, x: torch.Tensor) -> bool:
    """True when `op` should run its compiled kernel on x (extension loaded, x on a CUDA device);
    logs the first choice of each kind per op."""
    compiled = x.is_cuda and available()
    if (op, compiled) not in _reported:
        _reported.add((op, compiled))
        path = "CUDA kernel (sala_sglang._C)" if compiled else "Triton kernel"
        log.info("%s on %s: %s", op, x.device.type, path)
    return compiled
