"""Triton helpers the InfLLM-v2 kernels share: where a compressed key lives, and how one program
packs the query heads of a GQA group."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def page_of_window(rt_row_ptr, c, KS: tl.constexpr, BS: tl.constexpr, mask):
    """Page and slot-within-page of the compressed key whose window starts at KS * c."""
    start = c * KS
    page = tl.load(rt_row_ptr + (start // BS) * BS, mask=mask, other=0) // BS
    return page.to(tl.int64), (start % BS) // KS


def group_heads(query_heads: int, groups: int) -> tuple[int, int]:
    """Query heads per kv head, and that count padded to a power of two of at least 16 (the
    smallest tl.dot tile), so one program packs a whole GQA group."""
    per_group = query_heads // groups
    return per_group, max(16, triton.next_power_of_2(per_group))
