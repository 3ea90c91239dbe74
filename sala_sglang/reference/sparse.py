"""InfLLM-v2 sparse attention of the sparse layers (SPEC 2.2), plus the dense/sparse mode switch.

Sparse mode, per query token at position p and kv head g:
  1. compressed keys K1: mean of each complete window of `kernel_size` keys, `kernel_stride` apart;
  2. stage-1 softmax of q . K1 over the windows ending at or before p, summed over g's query heads;
  3. block score = max over the r + 1 windows c in [r*b - 1, r*b + r); forced blocks get +inf;
  4. the `num_selected_blocks` best blocks b <= p // block_size (ties: lower block index first);
  5. ordinary softmax attention over the cached tokens t <= p inside the selected blocks.
GQA everywhere: query head h reads kv head h // (Hq / G). One sequence per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sala_sglang.config import SparseConfig
from sala_sglang.reference.norms import compute_dtype

# Bounds the [queries, heads, keys] score tensor of one attention slice (elements).
_MAX_SCORE_ELEMENTS = 1 << 24


def sparse_mode(positions: torch.Tensor, prompt_len: int, dense_len: int) -> torch.Tensor:
    """Mode switch -> bool [T]: the token at position p is sparse iff max(P, p + 1) >= dense_len."""
    return torch.clamp(positions + 1, min=prompt_len) >= dense_len


def compress_keys(k: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Mean of each complete window k[stride*c : stride*c + kernel_size]: [L, G, D] -> [n, G, D]."""
    dt = compute_dtype(k)
    length, groups, dim = k.shape
    if length < kernel_size:
        return torch.zeros(0, groups, dim, dtype=dt, device=k.device)
    windows = k.to(dt).unfold(0, kernel_size, stride)  # [n, G, D, kernel_size]
    return windows.mean(dim=-1)


def stage1_scores(
    q: torch.Tensor, k1: torch.Tensor, positions: torch.Tensor, kernel_size: int, kernel_stride: int
) -> torch.Tensor:
    """Group score S_{g,c}: softmax over visible K1 windows summed over heads: -> [T, G, n1]."""
    t, hq, d = q.shape
    n1, groups, _ = k1.shape
    dt = compute_dtype(q, k1)
    qg = q.to(dt).reshape(t, groups, hq // groups, d)
    logits = torch.einsum("tgsd,cgd->tgsc", qg, k1.to(dt)) / math.sqrt(d)
    window_end = kernel_stride * torch.arange(n1, device=q.device) + kernel_size - 1
    visible = window_end[None, :] <= positions[:, None]  # [T, n1]
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A query that sees no window at all gives probability 0 to every window (not NaN).
    probs = torch.where(visible.any(dim=-1)[:, None, None, None], probs, torch.zeros_like(probs))
    return probs.sum(dim=2)


def pool_block_scores(
    window_scores: torch.Tensor, num_blocks: int, windows_per_block: int
) -> torch.Tensor:
    """Block max-pool over windows c in [r*b - 1, r*b + r), clipped: [T, G, n1] -> [T, G, nb].

    Window scores are softmax masses (>= 0), so a window missing from the clipped range counts as 0:
    a block whose range holds no window scores 0.
    """
    r = windows_per_block
    n1 = window_scores.shape[-1]
    b = torch.arange(num_blocks, device=window_scores.device)
    c = r * b[:, None] - 1 + torch.arange(r + 1, device=window_scores.device)[None, :]  # [nb, r+1]
    valid = (c >= 0) & (c < n1)
    padded = torch.cat(
        [window_scores, window_scores.new_zeros(*window_scores.shape[:-1], 1)], dim=-1
    )
    gathered = padded[..., torch.where(valid, c, n1)]  # [T, G, nb, r+1]; invalid -> the 0 column
    return gathered.amax(dim=-1)


def block_scores(
    q: torch.Tensor, k1: torch.Tensor, positions: torch.Tensor, cfg: SparseConfig
) -> torch.Tensor:
    """Block scores: q [T, Hq, D], k1 [n1, G, D], positions [T] -> [T, G, max(p) // bs + 1].

    Forced blocks score +inf, blocks after the query's block -inf, all others a finite value >= 0.
    """
    num_blocks = int(positions.max()) // cfg.block_size + 1
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, q.shape[1] * k1.shape[0]))  # queries per slice
    pieces = []
    for s in range(0, q.shape[0], rows):
        window_scores = stage1_scores(
            q[s : s + rows], k1, positions[s : s + rows], cfg.kernel_size, cfg.kernel_stride
        )
        pieces.append(pool_block_scores(window_scores, num_blocks, cfg.windows_per_block))
    scores = torch.cat(pieces)
    b = torch.arange(num_blocks, device=q.device)[None, :]
    qb = (positions // cfg.block_size)[:, None]
    forced = (b < cfg.init_blocks) | ((b >= qb - cfg.local_blocks) & (b <= qb))
    scores = scores.masked_fill(forced[:, None, :], float("inf"))
    return scores.masked_fill((b > qb)[:, None, :], float("-inf"))


# Stage-1 block scoring as `block_scores` does it: (q, k1, positions, cfg) -> [T, G, blocks].
BlockScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SparseConfig], torch.Tensor]


def select_blocks(scores: torch.Tensor, n_sel: int) -> torch.Tensor:
    """Indices [T, G, n_sel] of the best blocks, best first; ties: lower index first.

    -inf scores (blocks after the query's block) are never chosen; missing entries are -1.
    """
    # A stable sort keeps equal scores in index order: the lower block index wins a tie.
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    idx, vals = order.indices[..., :n_sel], order.values[..., :n_sel]
    idx = torch.where(vals == float("-inf"), torch.full_like(idx, -1), idx)
    missing = n_sel - idx.shape[-1]
    if missing > 0:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], missing), -1)], dim=-1)
    return idx


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    block_mask: torch.Tensor | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """Causal GQA softmax attention; optional block_mask [T, G, nb] restricts each query's keys."""
    t, hq, d = q.shape
    length, groups, _ = k.shape
    if hq % groups:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {groups} kv heads")
    dt = compute_dtype(q, k, v)
    qg = q.to(dt).reshape(t, groups, hq // groups, d)
    kf, vf = k.to(dt), v.to(dt)
    key_pos = torch.arange(length, device=q.device)
    out = torch.empty(t, groups, hq // groups, v.shape[-1], dtype=dt, device=q.device)
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, hq * length))
    for s in range(0, t, rows):
        e = min(s + rows, t)
        allowed = (key_pos[None, :] <= positions[s:e, None])[:, None, :]  # [n, 1, L]
        if block_mask is not None:
            allowed = allowed & block_mask[s:e][..., key_pos // block_size]  # [n, G, L]
        logits = torch.einsum("ngsd,lgd->ngsl", qg[s:e], kf) * scale
        logits = logits.masked_fill(~allowed[:, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.where(allowed.any(-1)[:, :, None, None], probs, torch.zeros_like(probs))
        out[s:e] = torch.einsum("ngsl,lgd->ngsd", probs, vf)
    return out.reshape(t, hq, v.shape[-1]).to(q.dtype)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal GQA attention: q [T, Hq, D] at positions [T], cached k, v [L, G, D] -> [T, Hq, D]."""
    return _attention(q, k, v, positions, scale)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    selected_blocks: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention to tokens t <= p in selected blocks [T, G, n_sel] (-1 ignored) -> [T, Hq, D]."""
    num_blocks = (k.shape[0] + block_size - 1) // block_size
    mask = torch.zeros(
        *selected_blocks.shape[:2], num_blocks + 1, dtype=torch.bool, device=q.device
    )
    slot = torch.where(selected_blocks >= 0, selected_blocks, num_blocks)  # -1 -> spare column
    mask.scatter_(-1, slot, True)
    return _attention(q, k, v, positions, scale, mask[..., :num_blocks], block_size)


def sparse_layer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k1: torch.Tensor,
    positions: torch.Tensor,
    prompt_len: int,
    cfg: SparseConfig,
    dense_len: int,
    scale: float,
    stage1: BlockScorer = block_scores,
) -> torch.Tensor:
    """Sparse-layer attention, mode picked per token: q [T, Hq, D], k, v [L, G, D] -> [T, Hq, D].

    `stage1` scores the blocks of the sparse tokens (`block_scores`; tests pass a perturbed one).
    """
    sparse = sparse_mode(positions, prompt_len, dense_len)
    out = torch.empty(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)
    if (~sparse).any():
        out[~sparse] = dense_attention(q[~sparse], k, v, positions[~sparse], scale)
    if sparse.any():
        qs, ps = q[sparse], positions[sparse]
        selected = select_blocks(stage1(qs, k1, ps, cfg), cfg.num_selected_blocks)
        out[sparse] = sparse_attention(qs, k, v, ps, selected, cfg.block_size, scale)
    return out


def sigmoid_gate_reference(a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """A mixer's output before its projection (SPEC 2.2 step "Output"; ops/sigmoid_gate.py):
    a, gate [T, N] -> a * sigmoid(gate) in a's dtype."""
    return a * torch.sigmoid(gate)
