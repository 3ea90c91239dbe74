"""Pool sizing: SGLang sizes the KV pool by bytes per token; MiniCPM-SALA's compressed keys
(K1/K2, one row per window start, stored beside each KV page) add a fixed share of the K part."""

from __future__ import annotations

import math
from typing import Any

from sala_sglang.config import MiniCPMSALAConfig, SparseConfig


def compressed_key_bytes_per_token(sparse: SparseConfig, kv_bytes_per_token: int) -> int:
    """Bytes of K1 + K2 per cached token, given the KV bytes per token (K and V halves)."""
    rows_per_page = sparse.rows_per_block(sparse.kernel_stride) + sparse.rows_per_block(
        sparse.k2_kernel_stride
    )
    return math.ceil(kv_bytes_per_token / 2 * rows_per_page / sparse.block_size)


def add_compressed_keys_to_cell_size(cell_size: int, configurator: Any, kvc: Any, *args: Any,
                                     **kwargs: Any) -> int:
    """After SGLang's per-token KV cost: add the compressed keys for MiniCPM-SALA models."""
    config = kvc.model_config.hf_config
    if not isinstance(config, MiniCPMSALAConfig):
        return cell_size
    return cell_size + compressed_key_bytes_per_token(config.sparse, cell_size)
