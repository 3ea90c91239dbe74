"""The small SGLang hooks the plugin registers for MiniCPM-SALA.

- Pool sizing: SGLang sizes the KV pool by bytes per token; the compressed keys (one row per
  window, stored beside the KV page of its last token) add a fixed share of the K part. Left to
  its memory ratio, SGLang gives about half the memory to recurrent-state slots (48 MiB each on
  the released model), which can leave the KV pool short of one full-context request; the state
  pool is capped so that one always fits.
- Prefix cache: SGLang's `extra_buffer` strategy (state snapshots in extra track slots, the only
  one that works with 64-token pages) checks an allowlist of architectures; ours is added. A
  prompt shorter than dense_len is computed densely and a longer one sparsely, so the same tokens
  give different KV and states in the two classes: dense-class requests get their own namespace
  in the radix tree.
- Speculative decoding (NGRAM): drafts are verified as chains (`ngram_context`, which also
  slices the corpus's context tails; steps with nothing drafted run as plain decode steps,
  `plain_decode_steps`); the lightning verify keeps the chains' keys and values (not SGLang's
  state per draft token, skipped in the pools and their sizing) and the commit replays the
  accepted ones, through SGLang's post-verify hook.
- Idle state check: SGLang's idle invariant checker covers the KV pool and the request slots, and
  the recurrent-state slots only when a prefix cache manages them; under --disable-radix-cache
  this adds the state slots (under `SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1` a leak stops
  the scheduler, otherwise it warns).
- Request checks: a prompt token id outside [0, vocab_size) reaches the embedding lookup on the
  GPU, where it is a device-side assert that takes the whole scheduler down (seen on an H100 with
  the tiny checkpoint). SGLang 0.5.16 has a vocabulary check for input ids but never calls it;
  this rejects such requests in the tokenizer manager, where a ValueError becomes an HTTP 400.
- Output logprobs after a retraction: SGLang 0.5.16's streamer moves a request's output-logprob
  offset to at least 1 whenever it looks at the request, even one with no output token yet (a
  non-streamed request retracted under the overlap scheduler before its first token was
  processed), so that request's first output logprob is never sent (fixed upstream in
  sgl-project/sglang#26510). The offset is kept at the output ids sent, for any model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from sala_sglang.config import MiniCPMSALAConfig, SparseConfig
from sala_sglang.server_args import ARCHITECTURE, dense_as_sparse

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Room left in the KV pool beyond one full-context request, as a fraction of it.
KV_SLACK = 0.05
# With the prefix cache and the overlap scheduler on, SGLang admits one running request per five
# state slots (`KVCacheConfigurator._calculate_mamba_ratio`): fewer would serve nothing.
MIN_STATE_SLOTS = 5
DENSE_CLASS_TAG = "|sala:dense"


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


def max_state_slots(rest_bytes: int, slot_bytes: int, kv_bytes_per_token: int,
                    context_len: int, page_size: int) -> int:
    """State slots that `rest_bytes` holds once the KV pool has room for one request of
    `context_len` tokens (plus KV_SLACK), in whole pages."""
    kv_tokens = -(-math.ceil(context_len * (1 + KV_SLACK)) // page_size) * page_size
    return max(0, (rest_bytes - kv_tokens * kv_bytes_per_token) // slot_bytes)


def cached_state_slots(state_slots: int, max_running: int, slots_per_request: int) -> int:
    """State slots left for cached prefix snapshots when `max_running` requests run, each
    holding `slots_per_request` (its working slot and its snapshot slots)."""
    return max(0, state_slots - max_running * slots_per_request)


def cap_state_pool_for_one_full_request(original: Any, configurator: Any,
                                        total_rest_memory: float, *args: Any,
                                        **kwargs: Any) -> float:
    """Around `KVCacheConfigurator._handle_max_mamba_cache` (GiB in, GiB left for the KV pool
    out): unless the user sized the state pool, cap it so one full-context request fits. With
    speculative decoding, the verify's keys and values come out of the pools' share, and SGLang's
    reserve for a state per draft token is skipped (the verify keeps none)."""
    server_args = configurator.server_args
    config = configurator.model_config.hf_config
    if not isinstance(config, MiniCPMSALAConfig):
        return original(configurator, total_rest_memory, *args, **kwargs)
    # SGLang's own precedent for "not given": the value equals the ServerArgs class default.
    user_sized = (server_args.max_mamba_cache_size is not None
                  or server_args.mamba_full_memory_ratio
                  != type(server_args).mamba_full_memory_ratio)
    spec = configurator.spec_algorithm
    if not spec.is_none():
        total_rest_memory -= verify_replay_gib(configurator)
        # SGLang would reserve a state per draft token; the verify keeps none
        configurator.spec_algorithm = type(spec).NONE
    try:
        kv_rest = original(configurator, total_rest_memory, *args, **kwargs)
    finally:
        configurator.spec_algorithm = spec
    if user_sized:
        return kv_rest
    from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator

    slot_bytes = configurator.mambaish_config.mamba2_cache_params.mamba_cache_per_req
    kv_bytes_per_token = create_memory_pool_configurator(configurator)._cell_size
    context_len = configurator.model_config.context_len
    cap = max_state_slots(int(total_rest_memory * GIB), slot_bytes, kv_bytes_per_token,
                          context_len, server_args.page_size)
    if cap < MIN_STATE_SLOTS:
        raise RuntimeError(
            f"MiniCPM-SALA: {total_rest_memory:.2f} GiB for the KV and state pools; one "
            f"{context_len}-token request needs {context_len * kv_bytes_per_token / GIB:.2f} GiB "
            f"of KV ({kv_bytes_per_token} B/token), which leaves {cap} recurrent-state slots of "
            f"{slot_bytes / 2**20:.0f} MiB, fewer than {MIN_STATE_SLOTS}; lower --context-length, "
            "raise --mem-fraction-static, or size the pools with --max-mamba-cache-size"
        )
    slots = server_args.max_mamba_cache_size
    if slots <= cap:
        return kv_rest
    server_args.override("sala.state_pool_fits_one_full_request", max_mamba_cache_size=cap)
    logger.info(
        "MiniCPM-SALA: %d recurrent-state slots instead of %d, so the KV pool holds one "
        "%d-token request", cap, slots, context_len,
    )
    return kv_rest + (slots - cap) * slot_bytes / GIB


def verify_replay_gib(configurator: Any) -> float:
    """GiB the lightning backend keeps for speculative verify (the chains' keys and values of
    every running request), taken from the pools' share."""
    server_args = configurator.server_args
    replay = configurator.model_config.hf_config.verify_replay_bytes(
        server_args.max_running_requests, server_args.speculative_num_draft_tokens,
        configurator.model_dtype.itemsize, configurator.ps.attn_tp_size,
    )
    logger.info("MiniCPM-SALA: %.2f GiB for the speculative verify's keys and values "
                "(%d requests x %d draft tokens)", replay / GIB,
                server_args.max_running_requests, server_args.speculative_num_draft_tokens)
    return replay / GIB


def keep_no_state_per_draft_token(original: Any, pool: Any, *args: Any, **kwargs: Any) -> None:
    """Around `HybridReqToTokenPool.__init__`: for MiniCPM-SALA's lightning state, no
    per-draft-token state copies (48 MiB per request and draft token on the released model);
    its verify keeps the chains' keys and values and the commit replays the accepted ones."""
    from sala_sglang.config import lightning_cache_params_class

    if isinstance(kwargs.get("cache_params"), lightning_cache_params_class()):
        kwargs["speculative_num_draft_tokens"] = None
    return original(pool, *args, **kwargs)


def commit_verified_drafts(original: Any, backend: Any, *args: Any, **kwargs: Any) -> None:
    """Around `HybridLinearAttnBackend.update_mamba_state_after_mtp_verify`: MiniCPM-SALA's
    lightning backend commits the accepted drafts by replaying them."""
    commit = getattr(backend.linear_attn_backend, "commit_verified_drafts", None)
    if commit is None:
        return original(backend, *args, **kwargs)
    return commit(*args, **kwargs)


def extra_buffer_for_minicpm_sala(original: Any, view: Any, model_arch: str) -> bool:
    """Around SGLang's `supports_mamba_cache_extra_buffer`: MiniCPM-SALA's backend writes the
    snapshots into the extra track slots itself, whatever the linear-attention backend flag."""
    return model_arch == ARCHITECTURE or original(view, model_arch)


def namespace_request_class(result: Any, scheduler: Any, req: Any, *args: Any,
                            **kwargs: Any) -> None:
    """After `Scheduler._maybe_namespace_elastic_radix_cache`: a dense-class request (prompt
    shorter than dense_len) gets its own radix-tree namespace."""
    config = scheduler.model_config.hf_config
    # sparse_config is the validated dict; the `sparse` property would validate it per request.
    if (isinstance(config, MiniCPMSALAConfig)
            and len(req.origin_input_ids) < config.sparse_config["dense_len"]
            and not dense_as_sparse(scheduler.server_args)):
        req.extra_key = (req.extra_key or "") + DENSE_CLASS_TAG
    return None


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


def keep_logprob_offset_at_output_ids(result: Any, accumulator: Any, *args: Any,
                                      **kwargs: Any) -> Any:
    """After the streamer's `_GenerationStreamAccumulator.accept(req=...)`: an unfinished
    request's output-logprob offset never runs ahead of the output ids sent with it."""
    req = kwargs["req"] if "req" in kwargs else args[0]
    if not req.finished():
        sent = len(req.output_ids_through_stop)
        if req.send_output_token_logprobs_offset > sent:
            req.send_output_token_logprobs_offset = sent
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
