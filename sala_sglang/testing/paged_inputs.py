"""Inputs for the InfLLM-v2 ops in the serving layout (sala_sglang/attention/sparse_backend.py):
a paged KV cache with shuffled pages (page size = block size), its req_to_token table, the K1
compressed-key buffer beside the pages, and per-token query metadata. Shared by the kernel
benchmarks and the op tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sala_sglang.config import SparseConfig
from sala_sglang.ops.infllm_v2 import compress_new_windows


def paged_cache(
    lengths: list[int], block: int, groups: int, dim: int, dev: str,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """req_to_token [len(lengths) + 1, max_len + block] (row r + 1 = request r, row 0 unused),
    k, v [slots, groups, dim] random, each request's pages shuffled over the pool."""
    pages = sum(math.ceil(n / block) for n in lengths) + 3
    perm = torch.randperm(pages, device=dev) + 1
    rt = torch.zeros(len(lengths) + 1, max(lengths) + block, dtype=torch.int32, device=dev)
    used = 0
    for r, n in enumerate(lengths):
        own = perm[used : used + math.ceil(n / block)]
        used += own.numel()
        pos = torch.arange(n, device=dev)
        rt[r + 1, :n] = (own[pos // block] * block + pos % block).to(torch.int32)
    k = torch.randn((pages + 2) * block, groups, dim, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    return rt, k, v


@dataclass
class SparseInputs:
    """One sparse layer's state for requests of `lengths` keys and a batch of query tokens."""

    cfg: SparseConfig
    rt: torch.Tensor  # [requests + 1, max_len + block] int32
    k: torch.Tensor  # [slots, G, D]
    v: torch.Tensor
    k1: torch.Tensor  # [pages, windows_per_block, G, D]
    lengths: list[int]
    q: torch.Tensor  # [T, Hq, D]
    token_req: torch.Tensor  # [T] int32 row of rt
    token_pos: torch.Tensor  # [T] int32
    token_sparse: torch.Tensor  # [T] int32 (all 1: every token takes the sparse path)

    @property
    def slots(self) -> torch.Tensor:
        return torch.arange(1, len(self.lengths) + 1, dtype=torch.int32, device=self.rt.device)

    def request_keys(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of request r (0-based) in position order: [len, G, D] each."""
        idx = self.rt[r + 1, : self.lengths[r]].long()
        return self.k[idx], self.v[idx]


def paged_k1(
    k: torch.Tensor, rt: torch.Tensor, lengths: list[int], cfg: SparseConfig
) -> torch.Tensor:
    """K1 of every request [pages, windows_per_block, G, D], written by the serving op from
    nothing to `lengths` (the measured-faster kernel)."""
    pages = k.shape[0] // cfg.block_size
    slots = torch.arange(1, len(lengths) + 1, dtype=torch.int32, device=k.device)
    new = torch.tensor(lengths, dtype=torch.int32, device=k.device)
    k1 = torch.zeros(pages, cfg.windows_per_block, *k.shape[1:], dtype=k.dtype, device=k.device)
    compress_new_windows(k, k1, rt, slots, torch.zeros_like(new), new, cfg,
                         max_new_windows=max(lengths) // cfg.kernel_stride + 2)
    return k1


def request_k1(k1: torch.Tensor, rt: torch.Tensor, row: int, length: int,
               cfg: SparseConfig) -> torch.Tensor:
    """The K1 of request row `row` of rt (`length` keys cached) in window order: [n1, G, D],
    read through the layout (window c beside the page of its last token, `SparseConfig.k1_home`)."""
    homes = [cfg.k1_home(c) for c in range(cfg.num_k1(length))]
    block = torch.tensor([b for b, _ in homes], dtype=torch.long, device=rt.device)
    row_in_page = torch.tensor([r for _, r in homes], dtype=torch.long, device=k1.device)
    page = rt[row, block * cfg.block_size].long().to(k1.device) // cfg.block_size
    return k1[page, row_in_page]


def correlated_queries(tokens: int, heads: int, dim: int, shared: float, dev: str) -> torch.Tensor:
    """Unit-variance queries whose direction is `shared` (0..1) common to all tokens of a head:
    neighbouring tokens then select overlapping blocks, as real queries tend to."""
    common = torch.randn(1, heads, dim, device=dev)
    own = torch.randn(tokens, heads, dim, device=dev)
    return (shared**0.5 * common + (1 - shared) ** 0.5 * own).to(torch.bfloat16)


def paged_batch(
    cfg: SparseConfig, lengths: list[int], token_req: list[int], token_pos: list[int],
    heads: int, groups: int, dim: int, dev: str, dtype: torch.dtype = torch.bfloat16,
    shared: float | None = None,
) -> SparseInputs:
    """Requests of `lengths` keys with their K1, and query tokens of request rows `token_req`
    (1-based) at `token_pos`, all in sparse mode: random queries, or `correlated_queries` when
    `shared` is given."""
    rt, k, v = paged_cache(lengths, cfg.block_size, groups, dim, dev, dtype)
    k1 = paged_k1(k, rt, lengths, cfg)
    req = torch.tensor(token_req, dtype=torch.int32, device=dev)
    pos = torch.tensor(token_pos, dtype=torch.int32, device=dev)
    if shared is None:
        q = torch.randn(len(token_req), heads, dim, device=dev, dtype=dtype)
    else:
        q = correlated_queries(len(token_req), heads, dim, shared, dev).to(dtype)
    return SparseInputs(cfg, rt, k, v, k1, lengths, q, req, pos, torch.ones_like(pos))


def prefill_chunk(
    cfg: SparseConfig, context: int, chunk: int, heads: int, groups: int, dim: int, dev: str,
    shared: float = 0.0,
) -> SparseInputs:
    """One request of `context` cached keys; the queries are its last `chunk` tokens (the
    chunked-prefill step that completes the prompt), all in sparse mode."""
    return paged_batch(cfg, [context], [1] * chunk, list(range(context - chunk, context)), heads,
                       groups, dim, dev, shared=shared)


def decode_batch(
    cfg: SparseConfig, context: int, batch: int, heads: int, groups: int, dim: int, dev: str
) -> SparseInputs:
    """`batch` requests of `context` keys each, one decode query per request at its last position
    (the new token's key is already cached, as in serving)."""
    return paged_batch(cfg, [context] * batch, list(range(1, batch + 1)), [context - 1] * batch,
                       heads, groups, dim, dev)
