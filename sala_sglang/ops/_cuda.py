"""The optional compiled kernels: `sala_sglang._C`, built from csrc/ by setup.py.

Importing the extension registers its ops as `torch.ops.sala_sglang.*` (usable under CUDA graphs
and torch.compile). It is loaded at most once; without it every op runs its Triton kernel.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sala_sglang.ops.overrides import IMPLS

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


@functools.cache
def _properties_of(index: int):
    return torch.cuda.get_device_properties(index)


def device_properties(device: torch.device):
    """A CUDA device's properties (SM count, shared memory), read once per device; a device
    without an index is the current one."""
    return _properties_of(device.index if device.index is not None
                          else torch.cuda.current_device())


def use_compiled(op: str, x: torch.Tensor) -> bool:
    """True when `op` should run its compiled kernel on x (extension loaded, x on a CUDA device);
    logs the first choice of each kind per op."""
    compiled = x.is_cuda and available()
    if (op, compiled) not in _reported:
        _reported.add((op, compiled))
        path = "CUDA kernel (sala_sglang._C)" if compiled else "Triton kernel"
        log.info("%s on %s: %s", op, x.device.type, path)
    return compiled


def resolve_impl(op: str, impl: str | None, cuda_faster: bool,
                 why_not_cuda: Callable[[], str | None]) -> str:
    """The implementation `op` runs, "cuda" or "triton": impl "cuda" requires CUDA (ValueError
    naming why it cannot run), "triton" refuses it, None takes the faster one (`cuda_faster`, from
    the H100 kernel benchmarks), falling back to Triton wherever CUDA cannot run. `why_not_cuda()`
    returns why the CUDA kernel cannot run, or None; it must read host facts only (plans are built
    while CUDA graphs are captured)."""
    if impl not in (None, *IMPLS):
        raise ValueError(f"{op}: impl={impl!r}; expected 'cuda', 'triton' or None")
    required = impl == "cuda"
    if impl is None:
        impl = "cuda" if cuda_faster else "triton"
    if impl == "triton":
        return "triton"
    why = why_not_cuda()
    if why is None:
        return "cuda"
    if required:
        raise ValueError(f"{op}: impl='cuda' cannot run: {why}")
    return "triton"


def planned_impl(op: str, prefer: str | None, cuda_faster: bool,
                 why_not_cuda: Callable[[], str | None]) -> str:
    """The implementation a plan fixes for `op`: `prefer` (an environment override,
    `KernelOverrides.impl`) in place of the measured choice `cuda_faster`, falling back to Triton
    wherever CUDA cannot run (`resolve_impl`'s rule, never raising)."""
    return resolve_impl(op, None, cuda_faster if prefer is None else prefer == "cuda",
                        why_not_cuda)


def choose_cuda(op: str, impl: str | None, x: torch.Tensor, cuda_faster: bool,
                unsupported: Callable[[], str | None]) -> bool:
    """Whether `op` runs its CUDA kernel on x (`resolve_impl`'s rule). The caller resolves
    environment overrides (`overrides.KernelOverrides`, read once per backend) into impl.
    `unsupported()` returns why the CUDA kernel cannot take the arguments, or None; it must read
    host metadata only (it runs while CUDA graphs are captured)."""

    def why_not_cuda() -> str | None:
        if not (x.is_cuda and available()):
            return _not_compiled(x.device)
        return unsupported()

    if resolve_impl(op, impl, cuda_faster, why_not_cuda) == "cuda":
        return use_compiled(op, x)
    return False


@dataclass(frozen=True)
class DeviceFacts:
    """What dispatch rules read about a device, once, when a backend is built."""

    name: str  # for messages: "cuda:0", "cpu"
    multiprocessors: int  # SMs of a CUDA GPU; 0 elsewhere
    compiled: bool  # sala_sglang._C is loaded and the device is a CUDA GPU
    max_smem: int = 0  # opt-in dynamic shared memory per CTA (bytes) of a CUDA GPU

    @classmethod
    def of(cls, device: torch.device | str) -> DeviceFacts:
        device = torch.device(device)
        if device.type != "cuda":
            return cls(name=str(device), multiprocessors=0, compiled=False)
        props = device_properties(device)
        return cls(name=str(device), multiprocessors=props.multi_processor_count,
                   compiled=available(),
                   max_smem=int(getattr(props, "shared_memory_per_block_optin", 48 * 1024)))

    def why_not_compiled(self) -> str | None:
        """Why no kernel of `sala_sglang._C` can run here, or None."""
        return None if self.compiled else _not_compiled(self.name)


def _not_compiled(where: object) -> str:
    return f"sala_sglang._C is not built or the tensors are on {where}"
