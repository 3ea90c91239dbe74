"""The small SGLang hooks the plugin registers for MiniCPM-SALA.

- Pool sizing: SGLang sizes the KV pool by bytes per token; the compressed keys (one row per
  window, stored beside the KV page of its last token) add a fixed share of the K part.
- Idle state check: SGLang's idle invariant checker covers the KV pool and the request slots, and
  the recurrent-state slots only when a prefix cache manages them; this adds the state slots
  (under `SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1` a leak stops the scheduler, otherwise it
  warns).
- Request checks: a prompt token id outside [0, vocab_size) reaches the embedding lookup on the
  GPU, where it is a device-side assert that takes the whole scheduler down (seen on an H100 with
  the tiny checkpoint). SGLang 0.5.16 has a vocabulary check for input ids but never calls it;
  this rejects such requests in the tokenizer manager, where a ValueError becomes an HTTP 400.
"""

from __future__ import annotations

import math
from typing import Any

from sala_sglang.config import MiniCPMSALAConfig, SparseConfig


def compressed_key_bytes_per_token(sparse: SparseConfig, kv_bytes_per_token: int) -> int:
    """Bytes of K1 per cached token, given the KV bytes per token (K and V halves): one K row
    per `kernel_stride` keys."""
    return math.ceil(kv_bytes_per_token / 2 * sparse.windows_per_block / sparse.block_size)


def add_compressed_keys_to_cell_size(cell_size: int, configurator: Any, kvc: Any, *args: Any,
                                     **kwargs: Any) -> int:
    """After SGLang's per-token KV cost: add the compressed keys for MiniCPM-SALA models."""
    config = kvc.model_config.hf_config
    if not isinstance(config, MiniCPMSALAConfig):
        return cell_size
    return cell_size + compressed_key_bytes_per_token(config.sparse, cell_size)


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


def reject_out_of_vocab_ids(manager: Any, obj: Any, input_ids: Any, *args: Any,
                            **kwargs: Any) -> None:
    """Before `TokenizerManager._validate_one_request`: every prompt id must index the vocab."""
    config = manager.model_config.hf_config
    if not isinstance(config, MiniCPMSALAConfig) or not input_ids:
        return None
    vocab = config.vocab_size
    bad = next((t for t in input_ids if not isinstance(t, int) or t < 0 or t >= vocab), None)
    if bad is not None:
        raise ValueError(
            f"input_ids contains the token id {bad!r}; this model's vocabulary is [0, {vocab})"
        )
    return None
