"""Idle-time check that MiniCPM-SALA's own per-request memory is all back in its pools.

SGLang's idle invariant checker covers the KV pool and the request slots, and the recurrent-state
slots only when a prefix cache manages them (ours never does). This adds the state slots; under
`SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1` a leak stops the scheduler, otherwise it warns.
"""

from __future__ import annotations

from typing import Any


def check_state_slots_when_idle(result: Any, checker: Any, *args: Any, **kwargs: Any) -> Any:
    """After SGLang's request-pool check: every recurrent-state slot must be free."""
    allocator = getattr(checker.req_to_token_pool, "mamba_allocator", None)
    if allocator is None or checker.tree_cache.supports_mamba():
        return result
    free, size = allocator.available_size(), allocator.size
    if free != size:
        checker._report_leak(
            "MiniCPM-SALA recurrent-state pool", f"free slots {free} of {size} while idle"
        )
    return result
