"""Sparse-layer side of the hybrid backend: the 8 InfLLM-v2 layers and their KV cache.

SGLang's `HybridLinearAttnBackend` routes the sparse layers (the config's
`full_attention_layer_ids`) here. Dense causal GQA attention over SGLang's paged KV cache runs in
SGLang's Triton attention kernels; InfLLM-v2 block selection builds on top of this class.
"""

from __future__ import annotations

import logging

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.runtime_context import get_parallel

logger = logging.getLogger(__name__)


class SparseLayerBackend(TritonAttnBackend):
    """Attention of the sparse layers over the KV cache of those layers only."""

    def __init__(self, model_runner) -> None:
        super().__init__(model_runner)
        _log_memory_split(model_runner)


def _log_memory_split(runner) -> None:
    config = runner.model_config.hf_config
    kv_pool = runner.token_to_kv_pool
    req_pool = runner.req_to_token_pool
    kv_heads = runner.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    kv_bytes_per_token = (
        2 * len(config.sparse_layer_ids) * kv_heads * config.head_dim * kv_pool.dtype.itemsize
    )
    mamba_pool = req_pool.mamba_pool
    state_bytes = config.mamba2_cache_params.mamba_cache_per_req
    logger.info(
        "MiniCPM-SALA memory: KV %d B/token for %d sparse layers, %d tokens (%.2f GiB); "
        "recurrent state %.1f MiB/request for %d linear layers, %d state slots (%.2f GiB); "
        "max concurrent requests %d",
        kv_bytes_per_token,
        len(config.sparse_layer_ids),
        kv_pool.size,
        kv_bytes_per_token * kv_pool.size / 2**30,
        state_bytes / 2**20,
        len(config.linear_layer_ids),
        mamba_pool.size,
        state_bytes * mamba_pool.size / 2**30,
        min(req_pool.size, mamba_pool.size),
    )
