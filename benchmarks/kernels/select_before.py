"""The Triton selection's top-k tail as it was before the chunked top-k (main at d8163dd), kept as
the "before" anchor of `sparse_attention.py --decode-selection-only`: one int64 key per block
(`_block_keys_kernel`), then torch.topk over the whole width, torch.where and the int32 cast. It
takes the window probabilities our stage-1 writes (`select._window_probabilities`), so before and
after are timed on the same inputs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala_sglang.config import SparseConfig

KEY_BLOCKS = 128  # blocks per key program, as it was


@triton.jit(do_not_specialize=["n_windows", "width"])
def _block_keys_kernel(
    w_ptr, tpos_ptr, key_ptr, n_windows, width,
    stride_wt, stride_wg, stride_kt, stride_kg,
    BS: tl.constexpr, RATIO: tl.constexpr, POOLP: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr, BB: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2) * BB + tl.arange(0, BB)
    j = tl.arange(0, POOLP)
    c = b[:, None] * RATIO - 1 + j[None, :]
    pooled = (j[None, :] <= RATIO) & (c >= 0) & (c < n_windows)
    w = tl.load(w_ptr + t.to(tl.int64) * stride_wt + g * stride_wg + c, mask=pooled, other=0.0)
    score = tl.max(w, axis=1)
    qb = tl.load(tpos_ptr + t) // BS
    forced = (b < INIT) | ((b >= qb - LOCAL) & (b <= qb))
    score = tl.where(forced, float("inf"), score)
    inverted = tl.full([BB], 0xFFFFFFFF, tl.int64) - b.to(tl.int64)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(b <= qb, ((bits + 1) << 32) | inverted, inverted)
    tl.store(key_ptr + t.to(tl.int64) * stride_kt + g * stride_kg + b, key, mask=b < width)


def top_blocks_before(probs: torch.Tensor, token_pos: torch.Tensor, cfg: SparseConfig,
                      width: int) -> torch.Tensor:
    """The old tail: window probabilities [T, G, width * r] -> [T, G, n_sel] int32."""
    tokens, groups, n_windows = probs.shape
    keys = torch.empty(tokens, groups, width, device=probs.device, dtype=torch.int64)
    _block_keys_kernel[(tokens, groups, triton.cdiv(width, KEY_BLOCKS))](
        probs, token_pos, keys, n_windows, width, probs.stride(0), probs.stride(1),
        keys.stride(0), keys.stride(1), BS=cfg.block_size, RATIO=cfg.windows_per_block,
        POOLP=triton.next_power_of_2(cfg.windows_per_block + 1), INIT=cfg.init_blocks,
        LOCAL=cfg.local_blocks, BB=KEY_BLOCKS,
    )
    top, idx = keys.topk(cfg.num_selected_blocks, dim=-1)
    return torch.where((top >> 32) > 0, idx, -1).to(torch.int32)
