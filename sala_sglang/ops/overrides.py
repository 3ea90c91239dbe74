"""Kernel overrides from the environment, read once when a backend is built (never per layer call).

`SALA_SGLANG_KERNELS=cuda|triton` makes every op that has both kernels run that one where it can
(an end-to-end check of the other kernel); `SALA_SGLANG_SELECT_TILE=1|4|8` forces the CUDA
selection's per-token kernel or that many tokens per CTA, and `SALA_SGLANG_SELECT_SEGMENT=n` the
blocks of scores its token-tiled kernel keeps at a time (tests and benchmarks).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

IMPLS = ("cuda", "triton")
FORCE_ENV = "SALA_SGLANG_KERNELS"
SELECT_TILE_ENV = "SALA_SGLANG_SELECT_TILE"
SELECT_SEGMENT_ENV = "SALA_SGLANG_SELECT_SEGMENT"
SELECT_TILES = (1, 4, 8)


@dataclass(frozen=True)
class KernelOverrides:
    """What the environment forces; None leaves the choice to the plan's measured rules."""

    impl: str | None = None
    select_tile: int | None = None
    select_segment: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KernelOverrides:
        """Read and check the three variables (ValueError naming the variable and what it takes)."""
        impl = environ.get(FORCE_ENV, "") or None
        if impl not in (None, *IMPLS):
            raise ValueError(f"{FORCE_ENV}={impl!r}; expected 'cuda', 'triton' or unset")
        return cls(impl=impl,
                   select_tile=_int_env(environ, SELECT_TILE_ENV, SELECT_TILES),
                   select_segment=_int_env(environ, SELECT_SEGMENT_ENV, None))


def _int_env(environ: Mapping[str, str], name: str, allowed: tuple[int, ...] | None) -> int | None:
    raw = environ.get(name, "")
    if not raw:
        return None
    accepted = f"one of {allowed}" if allowed else "a positive integer"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}; expected {accepted} or unset") from None
    if value < 1 or (allowed and value not in allowed):
        raise ValueError(f"{name}={raw!r}; expected {accepted} or unset")
    return value
