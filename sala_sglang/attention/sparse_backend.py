"""Sparse-layer side of the hybrid backend: the InfLLM-v2 layers, their KV cache and their
compressed-key cache (SPEC 2.2).

SGLang's `HybridLinearAttnBackend` routes the sparse layers (the config's
`full_attention_layer_ids`) here. The KV pool is paged with page size = block_size, so a block is
a page and each compressed key K1 lives in a buffer indexed by the page of its window's last
token: a page's rows depend only on that page and earlier ones (so a shared prefix page is never
written by the request extending it), and they are allocated, freed and reused together with the
KV cache (see `sala_sglang.ops.infllm_v2.compress`).

Per forward, `init_forward_metadata_in_graph` builds per-token metadata once (request slot,
position, mode) with device ops only, so decode and speculative verify (a chain of draft tokens
per request) run under CUDA graphs with no host sync, and the ops' plan
(`infllm_v2.plan.make_plan`) from host sizes only; every sparse layer reuses both.
Kernel overrides from the environment are read once, when the backend is built.

Mode switch (SPEC, DECIDED): a token at position p of a request whose prompt has P tokens is
sparse iff max(P, p + 1) >= dense_len, with max(P, seq_len) taken from SGLang's `orig_seq_lens`.
Tokens below n_sel * block_size attend to every block either way (identical result), so they skip
selection.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.runtime_context import get_parallel

from sala_sglang.hooks import cached_state_slots
from sala_sglang.ops._cuda import DeviceFacts
from sala_sglang.ops.infllm_v2 import (
    SparsePlan,
    block_sparse_attention,
    compress_new_windows,
    make_plan,
    select_blocks,
)
from sala_sglang.ops.overrides import KernelOverrides
from sala_sglang.server_args import dense_as_sparse, longest_chain_beside_graph_padding

logger = logging.getLogger(__name__)


@dataclass
class TokenMetadata:
    """Per-token view of one forward, shared by every sparse layer."""

    token_req: torch.Tensor  # [T] int32 row of req_to_token
    token_pos: torch.Tensor  # [T] int32 absolute position
    token_sparse: torch.Tensor  # [T] int32: 1 = attend to the selected blocks
    req_slots: torch.Tensor  # [B] int32
    old_lens: torch.Tensor  # [B] keys cached before this forward
    new_lens: torch.Tensor  # [B] keys cached after it
    max_new_tokens: int  # bound on new keys per request (grid sizes)
    select: bool  # whether any token can need selection
    width: int  # blocks of the longest sequence (selection width)


class SparseLayerBackend(AttentionBackend):
    """Dense and InfLLM-v2 sparse attention of the sparse layers over SGLang's paged KV cache."""

    needs_cpu_seq_lens = False

    def __init__(self, model_runner) -> None:
        super().__init__()
        config = model_runner.model_config.hf_config
        self.sparse = config.sparse
        self.device = model_runner.device
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.max_context_len = model_runner.model_config.context_len
        self.page_size = model_runner.server_args.page_size
        if self.page_size != self.sparse.block_size:
            raise ValueError(
                f"--page-size {self.page_size}: MiniCPM-SALA's sparse layers need the page size "
                f"to equal sparse_config.block_size = {self.sparse.block_size}"
            )
        self.dense_len = 0 if dense_as_sparse(model_runner.server_args) else self.sparse.dense_len
        self.num_heads = config.num_attention_heads // get_parallel().attn_tp_size
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.max_blocks = math.ceil(self.max_context_len / self.sparse.block_size)
        k_buffer = self.token_to_kv_pool.get_key_buffer(config.sparse_layer_ids[0])
        self.kv_heads = k_buffer.shape[1]
        self.k1 = self._allocate_compressed_keys(config, k_buffer)
        self.overrides = KernelOverrides.from_env()
        self.device_facts = DeviceFacts.of(self.device)
        self.meta: TokenMetadata | None = None
        self.plan: SparsePlan | None = None
        _log_memory_split(model_runner, self)

    def _allocate_compressed_keys(self, config, k_buffer: torch.Tensor) -> dict[int, torch.Tensor]:
        pages = k_buffer.shape[0] // self.sparse.block_size
        return {
            i: torch.zeros(pages, self.sparse.windows_per_block, *k_buffer.shape[1:],
                           dtype=k_buffer.dtype, device=self.device)
            for i in config.sparse_layer_ids
        }

    def compressed_key_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k1.values())

    # ---- metadata ------------------------------------------------------------------------------
    def init_forward_metadata_out_graph(
        self, forward_batch: ForwardBatch, in_capture: bool = False
    ) -> None:
        pass  # everything is derived on the device in _in_graph

    def init_forward_metadata_in_graph(self, forward_batch: ForwardBatch) -> None:
        mode = forward_batch.forward_mode
        if mode.is_target_verify():  # before is_extend, which TARGET_VERIFY also answers
            self.meta = self._verify_metadata(forward_batch)
        elif mode.is_decode_or_idle():
            self.meta = self._chain_metadata(forward_batch.req_pool_indices,
                                             forward_batch.seq_lens - 1, 1)
        elif mode.is_extend():
            self.meta = self._extend_metadata(forward_batch)
        else:
            raise NotImplementedError(f"MiniCPM-SALA: forward mode {mode} is not supported")
        sp = self.sparse
        # Decode and verify run a few tokens per request over long caches (and under CUDA
        # graphs): split K, as decode always has.
        self.plan = make_plan(
            sp, tokens=self.meta.token_req.shape[0], groups=self.kv_heads,
            head_dim=self.head_dim, width=self.meta.width,
            decode=mode.is_decode_or_idle() or mode.is_target_verify(),
            device=self.device_facts, overrides=self.overrides,
            n_sel=sp.num_selected_blocks if self.meta.select else 1,
        )

    def _is_sparse(self, prompt_or_len: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        longest = torch.maximum(prompt_or_len, pos + 1)
        return ((longest >= self.dense_len) & (pos >= self.sparse.max_sparse_keys)).to(torch.int32)

    def _verify_metadata(self, fb: ForwardBatch) -> TokenMetadata:
        """TARGET_VERIFY: each request's last sampled token and its drafts, a chain after its
        seq_lens committed keys (the draft mask is lower-triangular, so token j sees the cache and
        tokens 0..j of its chain: causal by position, as the ops are). A rejected draft leaves
        KV and compressed keys only at positions the next forward writes again."""
        chain = fb.spec_info.draft_token_num
        # A CUDA-graph padding row keeps a stale req slot (maybe freed, its pages reused) with
        # seq_len = the fill value: a chain reaching kernel_size keys there would write window 0
        # into the page that slot's row still names.
        fill, window = self.get_cuda_graph_seq_len_fill_value(), self.sparse.kernel_size
        longest = longest_chain_beside_graph_padding(window, fill)
        if chain > longest:
            raise ValueError(
                f"speculative_num_draft_tokens {chain}: MiniCPM-SALA's sparse layers verify "
                f"chains of at most {longest} tokens (sparse_config.kernel_size "
                f"{window} less a padding row's {fill} + 1 keys)"
            )
        # positions (SGLang's: seq_len + depth) are stale in padding rows; seq_lens are not
        return self._chain_metadata(fb.req_pool_indices, fb.seq_lens, chain)

    def _chain_metadata(self, req_pool_indices: torch.Tensor, old_lens: torch.Tensor,
                        chain: int) -> TokenMetadata:
        """`chain` new tokens per request at positions old_lens .. old_lens + chain - 1
        (request-major): decode is the chain of one. Device ops only, static shapes."""
        req = req_pool_indices.to(torch.int32)
        old_lens = old_lens.to(torch.int32)
        steps = torch.arange(chain, dtype=torch.int32, device=old_lens.device)
        pos = (old_lens[:, None] + steps).flatten()
        return TokenMetadata(
            # contiguous: for one request, flatten() would return a stride-0 view of `req`,
            # which kernels indexing token_req[t] read past
            token_req=req[:, None].expand(-1, chain).contiguous().view(-1),
            token_pos=pos,
            # a token past the prompt sees its own position + 1 keys (max(P, p + 1) = p + 1)
            token_sparse=self._is_sparse(pos + 1, pos),
            req_slots=req,
            old_lens=old_lens,
            new_lens=old_lens + chain,
            max_new_tokens=chain,
            select=True,  # static shapes under CUDA graphs
            width=self.max_blocks,
        )

    def _extend_metadata(self, fb: ForwardBatch) -> TokenMetadata:
        tokens = int(fb.extend_num_tokens)
        req = fb.req_pool_indices.to(torch.int32)
        token_req = torch.repeat_interleave(req, fb.extend_seq_lens, output_size=tokens)
        pos = fb.positions.to(torch.int32)
        orig = fb.orig_seq_lens if fb.orig_seq_lens is not None else fb.seq_lens
        token_orig = torch.repeat_interleave(
            orig.to(torch.int32), fb.extend_seq_lens, output_size=tokens
        )
        # host-side lists SGLang already holds: no device sync, no per-request Python loop
        longest = max(map(operator.add, fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu))
        return TokenMetadata(
            token_req=token_req,
            token_pos=pos,
            token_sparse=self._is_sparse(token_orig, pos),
            req_slots=req,
            old_lens=fb.extend_prefix_lens.to(torch.int32),
            new_lens=fb.seq_lens.to(torch.int32),
            max_new_tokens=max(fb.extend_seq_lens_cpu),
            select=longest > self.sparse.max_sparse_keys,
            # a multiple of 16 blocks keeps the selection kernels' sizes and strides in one
            # divisibility class, so a new chunk never compiles them again
            width=-(-longest // (16 * self.sparse.block_size)) * 16,
        )

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        pass  # metadata is recomputed inside the graph from SGLang's static inputs

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    # ---- layers --------------------------------------------------------------------------------
    def _select(self, layer_id: int, q: torch.Tensor, meta: TokenMetadata) -> torch.Tensor:
        if not meta.select:
            return torch.full((q.shape[0], 1, 1), -1, dtype=torch.int32, device=q.device)
        return select_blocks(
            q, self.k1[layer_id], self.req_to_token_pool.req_to_token, meta.token_req,
            meta.token_pos, self.sparse, meta.width, self.scale, self.plan,
        )

    def _attend(
        self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache: bool
    ) -> torch.Tensor:
        if save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        meta, sp, rt = self.meta, self.sparse, self.req_to_token_pool.req_to_token
        k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        compress_new_windows(
            k_buffer, self.k1[layer.layer_id], rt, meta.req_slots, meta.old_lens, meta.new_lens,
            sp, max_new_windows=meta.max_new_tokens // sp.kernel_stride + 2, plan=self.plan,
        )
        q = q.reshape(-1, self.num_heads, self.head_dim)
        selected = self._select(layer.layer_id, q, meta)
        out = block_sparse_attention(
            q, k_buffer, v_buffer, rt, meta.token_req, meta.token_pos, meta.token_sparse,
            selected, sp, self.scale, self.plan,
        )
        return out.reshape(-1, self.num_heads * self.head_dim)

    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True, **kwargs) -> torch.Tensor:
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True, **kwargs) -> torch.Tensor:
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache)


def _log_memory_split(runner, backend: SparseLayerBackend) -> None:
    config = runner.model_config.hf_config
    kv_pool = runner.token_to_kv_pool
    req_pool = runner.req_to_token_pool
    slots = req_pool.mamba_pool.size
    kv_heads = runner.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    kv_bytes_per_token = (
        2 * len(config.sparse_layer_ids) * kv_heads * config.head_dim * kv_pool.dtype.itemsize
    )
    state_bytes = config.mamba2_cache_params.mamba_cache_per_req
    running = runner.max_running_requests
    if runner.server_args.disable_radix_cache:
        cache = "no prefix cache (--disable-radix-cache)"
    else:
        # a running request holds its working slot and its snapshot (ping-pong) slots
        per_request = 1 + req_pool.mamba_ping_pong_track_buffer_size
        cache = (
            f"{per_request} slots per running request, "
            f"{cached_state_slots(slots, running, per_request)} cached prefix states fit"
        )
    logger.info(
        "MiniCPM-SALA memory: KV %d B/token for %d sparse layers, %d tokens (%.2f GiB, %.2fx the "
        "context length %d); compressed keys K1 %.2f GiB; recurrent state %.1f MiB/slot for %d "
        "linear layers, %d state slots (%.2f GiB); max running requests %d, %s; dense_len %d",
        kv_bytes_per_token,
        len(config.sparse_layer_ids),
        kv_pool.size,
        kv_bytes_per_token * kv_pool.size / 2**30,
        kv_pool.size / backend.max_context_len,
        backend.max_context_len,
        backend.compressed_key_bytes() / 2**30,
        state_bytes / 2**20,
        len(config.linear_layer_ids),
        slots,
        state_bytes * slots / 2**30,
        running,
        cache,
        backend.dense_len,
    )
