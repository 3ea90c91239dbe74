"""Helpers the InfLLM-v2 kernels share: where a compressed key lives, how one program packs the
query heads of a GQA group, and the per-token arrays as the kernels index them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def page_of_window(rt_row_ptr, c, KL: tl.constexpr, KS: tl.constexpr, BS: tl.constexpr, mask):
    """Page and row-within-page of compressed key c (window `[KS * c, KS * c + KL)`): the page of
    the window's LAST token, so a page's rows depend only on that page and earlier ones (a request
    extending a shared prefix never writes into a shared page). Twin: `SparseConfig.k1_home`."""
    last = c * KS + (KL - 1)
    page = tl.load(rt_row_ptr + (last // BS) * BS, mask=mask, other=0) // BS
    return page.to(tl.int64), (last % BS) // KS


def group_heads(query_heads: int, groups: int) -> tuple[int, int]:
    """Query heads per kv head, and that count padded to a power of two of at least 16 (the
    smallest tl.dot tile), so one program packs a whole GQA group."""
    per_group = query_heads // groups
    return per_group, max(16, triton.next_power_of_2(per_group))


def dense_token_arrays(*arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-token or per-request arrays (request slot, position, mode, lengths) as the kernels
    index them: element t at offset t. A view with another stride (one request's chain expanded
    from its slot has stride 0) is copied; a dense array is passed as it is (no copy, safe under
    CUDA graph capture)."""
    return tuple(a.contiguous() for a in arrays)
