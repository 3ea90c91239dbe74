"""Names, flags and server options of MiniCPM-SALA, shared by the registration, the CLI and the
backend.

A leaf module (it imports nothing of the package): the architecture and backend names, the
`--dense-as-sparse` flag and its reader, OpenBMB's recommended serve flags, and
`adjust_server_args`, which runs before SGLang's own `ServerArgs.__post_init__` (a plugin hook) so
a bad option fails at startup, in the launching process, with a message that names it (one line
on stderr when the option came from a launcher's command line).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)

ARCHITECTURE = "MiniCPMSALAForCausalLM"
# The second name is what command lines written for OpenBMB's fork and upstream SGLang use.
BACKEND_NAMES = ("minicpm_flashinfer", "minicpm_flashattn")
DENSE_AS_SPARSE_FLAG = "--dense-as-sparse"
DENSE_AS_SPARSE_ATTR = "dense_as_sparse"

# OpenBMB's serving flags for MiniCPM-SALA (SPEC section 3), less the two the plugin decides
# itself: the page size (the InfLLM-v2 block size) and --disable-radix-cache (the prefix cache is
# on by default here; --disable-radix-cache still turns it off).
RECOMMENDED_SERVE_FLAGS = (
    "--attention-backend", "minicpm_flashinfer",
    "--chunked-prefill-size", "8192",
    "--max-running-requests", "32",
    "--skip-server-warmup",
)


def dense_as_sparse(server_args: Any) -> bool:
    """Whether `--dense-as-sparse` was given to the server."""
    return bool(getattr(server_args, DENSE_AS_SPARSE_ATTR, False))


def add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
    """After `ServerArgs.add_cli_args`: add `--dense-as-sparse` to SGLang's parser."""
    if DENSE_AS_SPARSE_FLAG not in parser._option_string_actions:
        parser.add_argument(
            DENSE_AS_SPARSE_FLAG,
            action="store_true",
            default=False,
            help="MiniCPM-SALA: use InfLLM-v2 sparse attention for every token (dense_len = 0), "
            "as OpenBMB's serving default; otherwise prompts shorter than the config's "
            "sparse_config.dense_len use dense attention.",
        )
    return result


def from_cli_args(original: Any, cls_or_args: Any, *rest: Any, **kwargs: Any) -> Any:
    """Around `ServerArgs.from_cli_args`: keep `--dense-as-sparse` on the ServerArgs."""
    # ServerArgs keeps only its dataclass fields; carry our flag across as an attribute, which
    # pickling to the scheduler process preserves.
    args = rest[0] if rest else kwargs.get("args")
    server_args = original(cls_or_args, *rest, **kwargs)
    setattr(server_args, DENSE_AS_SPARSE_ATTR, bool(getattr(args, DENSE_AS_SPARSE_ATTR, False)))
    return server_args


class UnsupportedServerOption(ValueError):
    """A server option MiniCPM-SALA cannot be served with."""


def unsupported_option_exits_with_one_line(original: Any, *args: Any, **kwargs: Any) -> Any:
    """Around SGLang's `prepare_server_args`: an unsupported option exits with one stderr line."""
    # The launchers (`python -m sglang.launch_server`, `sglang serve`) parse argv here; exit as
    # argparse does (status 2), not with a traceback. `ServerArgs(...)` built in code still raises.
    try:
        return original(*args, **kwargs)
    except UnsupportedServerOption as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _local_config(model_path: str | None) -> dict | None:
    """config.json of a local checkpoint directory, or None (not local, missing, unreadable)."""
    if not model_path:
        return None
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _is_minicpm_sala_config(raw: dict | None) -> bool:
    return raw is not None and (
        raw.get("model_type") == "minicpm_sala" or ARCHITECTURE in (raw.get("architectures") or [])
    )


def is_minicpm_sala(model_path: str | None) -> bool:
    """Whether `model_path` is a local MiniCPM-SALA checkpoint directory."""
    return _is_minicpm_sala_config(_local_config(model_path))


def adjust_server_args(args: Any) -> None:
    """Fill MiniCPM-SALA's required defaults and reject unsupported options, in place."""
    config = _local_config(getattr(args, "model_path", None))
    if not _is_minicpm_sala_config(config):
        return
    _reject_unsupported(args, config)
    if args.attention_backend is None:
        args.attention_backend = BACKEND_NAMES[0]
        logger.info("MiniCPM-SALA: using --attention-backend %s", BACKEND_NAMES[0])
    elif args.attention_backend not in BACKEND_NAMES:
        raise UnsupportedServerOption(
            f"--attention-backend {args.attention_backend}: MiniCPM-SALA's sparse layers need "
            f"--attention-backend {BACKEND_NAMES[0]} (or its alias {BACKEND_NAMES[1]})"
        )
    if not args.disable_radix_cache:
        _configure_prefix_cache(args)


def _reject_unsupported(args: Any, config: dict) -> None:
    block_size = config.get("sparse_config", {}).get("block_size", 64)
    page_size = getattr(args, "page_size", None)
    if page_size is None:
        # A KV page is one InfLLM-v2 block: blocks are gathered whole and their compressed keys
        # live beside their page.
        args.page_size = block_size
    elif page_size != block_size:
        raise UnsupportedServerOption(
            f"--page-size {page_size}: MiniCPM-SALA pages its KV cache by sparse_config.block_size "
            f"= {block_size}; drop --page-size or set it to {block_size}"
        )
    _reject_unsupported_caches_and_states(args)
    _reject_clashes_with_what_the_plugin_sets(args, block_size)
    _configure_speculative(args, config)
    kv_dtype = str(getattr(args, "kv_cache_dtype", "auto"))
    if kv_dtype not in ("auto", "bfloat16", "bf16", "float16", "fp16"):
        raise UnsupportedServerOption(
            f"--kv-cache-dtype {kv_dtype}: MiniCPM-SALA keeps its KV cache in the model dtype "
            "(no FP8 on the sparse path); drop --kv-cache-dtype"
        )
    if getattr(args, "enable_dp_attention", False):
        raise UnsupportedServerOption(
            "--enable-dp-attention: not supported for MiniCPM-SALA; drop it (--dp-size alone "
            "serves independent replicas)"
        )
    pp_size = getattr(args, "pp_size", 1) or 1
    if pp_size > 1:
        raise UnsupportedServerOption(
            f"--pp-size {pp_size}: MiniCPM-SALA does not support pipeline parallelism; "
            "use --tp-size"
        )
    tp_size = getattr(args, "tp_size", 1) or 1
    heads, kv_heads = config.get("num_attention_heads", 32), config.get("num_key_value_heads", 2)
    lightning_heads = config.get("lightning_nh", 32)
    if heads % tp_size or lightning_heads % tp_size:
        raise UnsupportedServerOption(
            f"--tp-size {tp_size}: it must divide num_attention_heads ({heads}) and lightning_nh "
            f"({lightning_heads})"
        )
    if kv_heads % tp_size:
        # A replicated kv head would leave each GPU part of its query group, and InfLLM-v2 picks
        # blocks from scores summed over the whole group.
        raise UnsupportedServerOption(
            f"--tp-size {tp_size}: it must divide num_key_value_heads ({kv_heads}), so that the "
            "sparse layers' block selection sees all query heads of a kv head on one GPU"
        )


def longest_chain_beside_graph_padding(kernel_size: int, padding_keys: int = 1) -> int:
    """The longest verified chain a CUDA-graph padding row may carry: the row sits after
    `padding_keys` keys (SGLang's seq_len fill value) and must not complete a compressed-key
    window (kernel_size keys), which it would write into a page it does not own."""
    return kernel_size - padding_keys - 1


def _configure_speculative(args: Any, config: dict) -> None:
    """NGRAM drafts (no draft model exists), verified as chains: the lightning layers' state
    follows one path of drafts, and the sparse layers attend by position."""
    algorithm = getattr(args, "speculative_algorithm", None)
    if not algorithm:
        return
    if str(algorithm).upper() != "NGRAM":
        raise UnsupportedServerOption(
            f"--speculative-algorithm {algorithm}: MiniCPM-SALA has no draft model; use "
            "--speculative-algorithm NGRAM (drafts from n-grams of the prompt and the output)"
        )
    breadth = getattr(args, "speculative_ngram_max_bfs_breadth", 1)
    if breadth != 1:
        if breadth != type(args).speculative_ngram_max_bfs_breadth:  # given by the user
            raise UnsupportedServerOption(
                f"--speculative-ngram-max-bfs-breadth {breadth}: MiniCPM-SALA verifies chain "
                "drafts (one path through the n-gram tree); set it to 1 or drop it"
            )
        args.speculative_ngram_max_bfs_breadth = 1
    args.speculative_ngram_min_bfs_breadth = 1
    window = config.get("sparse_config", {}).get("kernel_size", 32)
    longest = min(MAX_DRAFT_TOKENS, longest_chain_beside_graph_padding(window))
    depth = getattr(args, "speculative_num_draft_tokens", None)
    if depth is not None and not 2 <= depth <= longest:
        raise UnsupportedServerOption(
            f"--speculative-num-draft-tokens {depth}: MiniCPM-SALA verifies chains of 2 to "
            f"{longest} tokens (the last accepted token and up to {longest - 1} drafts)"
        )


# The compressed keys live in the sparse-layer backend beside their KV page, outside SGLang's
# KV pool, so anything that copies, offloads or transfers the pool would leave them behind.
_COMPRESSED_KEYS_LEFT_BEHIND = (
    "but not the sparse layers' compressed keys, which live beside the KV pages in "
    "MiniCPM-SALA's attention backend"
)

# Switches MiniCPM-SALA cannot serve with, prefix cache on or off: (flag, ServerArgs field, why).
_UNSUPPORTED_SWITCHES = (
    ("--enable-hierarchical-cache", "enable_hierarchical_cache",
     f"the hierarchical cache copies KV pages and recurrent states to host memory "
     f"{_COMPRESSED_KEYS_LEFT_BEHIND}"),
    ("--enable-lmcache", "enable_lmcache",
     "LMCache replaces SGLang's cache with one that keeps full-attention KV only, not "
     "MiniCPM-SALA's recurrent states or compressed keys"),
    ("--enable-flexkv", "enable_flexkv",
     "FlexKV replaces SGLang's cache with one that keeps full-attention KV only, not "
     "MiniCPM-SALA's recurrent states or compressed keys"),
    ("--enable-int8-mamba-checkpoint", "enable_int8_mamba_checkpoint",
     "MiniCPM-SALA keeps its recurrent state in float32, cached snapshots included, so that a "
     "prefix hit continues from the state a fresh prefill computes"),
    ("--enable-linear-replayssm", "enable_linear_replayssm",
     "it is a decode kernel for SGLang's GDN/KDA layers; MiniCPM-SALA's lightning layers "
     "decode with their own kernels"),
    ("--enable-gdn-replayssm-spec", "enable_gdn_replayssm_spec",
     "it is a speculative-decoding kernel for SGLang's GDN layers"),
    ("--enable-unified-memory", "enable_unified_memory",
     "it needs SGLang's Triton attention and linear-attention backends; MiniCPM-SALA's "
     "backends index the static KV and state pools"),
)

# Switches that clash with the prefix cache only: allowed with --disable-radix-cache.
_PREFIX_CACHE_CLASHES = (
    # SGLang's merge of a prefill into the running decodes drops the batch's snapshot targets
    # after the scheduler has recorded them, so the tree would later take in unwritten slots.
    ("--enable-mixed-chunk", "enable_mixed_chunk",
     "a batch that mixes prefill chunks with decodes drops the recurrent-state snapshots its "
     "chunks were to write, and the prefix cache would keep states that were never written"),
    ("--enable-streaming-session", "enable_streaming_session",
     "streaming sessions are not tested with MiniCPM-SALA's recurrent-state prefix cache"),
)

_CPP_RADIX_TREE_ENV = "SGLANG_EXPERIMENTAL_CPP_RADIX_TREE"
# SGLang's recurrent-state chunk (FLA_CHUNK_SIZE): prefill snapshots and the branch points of a
# prefix hit fall on multiples of it from the matched prefix, so decode snapshots must too.
STATE_CHUNK = 64
# Longest verified chain: the lightning verify keeps a chain's running state in registers and
# unrolls its steps.
MAX_DRAFT_TOKENS = 16


def _reject_unsupported_caches_and_states(args: Any) -> None:
    """Caches, state stores and transfers that would lose MiniCPM-SALA's compressed keys or
    recurrent states, whether or not the prefix cache is on."""
    for flag, name, why in _UNSUPPORTED_SWITCHES:
        if getattr(args, name, False):
            raise UnsupportedServerOption(f"{flag}: {why}; drop it")
    storage = getattr(args, "hicache_storage_backend", None)
    if storage is not None:
        raise UnsupportedServerOption(
            f"--hicache-storage-backend {storage}: it is the storage tier of the hierarchical "
            f"cache, which keeps KV pages and recurrent states {_COMPRESSED_KEYS_LEFT_BEHIND}; "
            "drop it"
        )
    backend = getattr(args, "radix_cache_backend", None)
    if backend:
        # A registered backend replaces SGLang's choice even under --disable-radix-cache.
        raise UnsupportedServerOption(
            f"--radix-cache-backend {backend}: MiniCPM-SALA needs SGLang's own cache choice "
            "(UnifiedRadixCache with recurrent-state snapshots, or ChunkCache under "
            "--disable-radix-cache); drop it"
        )
    mode = getattr(args, "disaggregation_mode", "null")
    if mode not in (None, "null"):
        raise UnsupportedServerOption(
            f"--disaggregation-mode {mode}: PD disaggregation hands KV pages and recurrent states "
            f"to the decode server {_COMPRESSED_KEYS_LEFT_BEHIND}; serve prefill and decode on "
            "one server"
        )


def _configure_prefix_cache(args: Any) -> None:
    """With the radix cache on: SGLang's UnifiedRadixCache keeping recurrent-state snapshots in
    each request's extra track slots (`extra_buffer`); refuse what clashes with it."""
    if not _gpu_visible():
        # The snapshots are written by the GPU kernels and SGLang asserts a GPU for them; a
        # ServerArgs built without one (CPU tests of the model code) gets the plain chunk cache.
        args.disable_radix_cache = True
        logger.warning("MiniCPM-SALA: no GPU visible; serving with --disable-radix-cache")
        return
    for flag, name, why in _PREFIX_CACHE_CLASHES:
        if getattr(args, name, False):
            raise UnsupportedServerOption(
                f"{flag}: {why}; add --disable-radix-cache to use it (without prefix caching), "
                "or drop it"
            )
    from sglang.srt.environ import envs

    if envs.SGLANG_EXPERIMENTAL_CPP_RADIX_TREE.get():
        # SGLang picks that tree before it checks for recurrent states.
        raise UnsupportedServerOption(
            f"{_CPP_RADIX_TREE_ENV}={os.environ[_CPP_RADIX_TREE_ENV]}: SGLang's C++ radix tree "
            "keeps no recurrent states, so a prefix hit would start from an empty state; unset "
            "it, or add --disable-radix-cache"
        )
    page_size = args.page_size
    strategy = getattr(args, "mamba_radix_cache_strategy", "auto")
    if strategy == "auto":
        args.mamba_radix_cache_strategy = "extra_buffer"
    elif strategy == "no_buffer":
        raise UnsupportedServerOption(
            f"--mamba-radix-cache-strategy no_buffer: it needs --page-size 1, and MiniCPM-SALA "
            f"pages its KV cache by sparse_config.block_size = {page_size}; drop it (the plugin "
            "uses extra_buffer) or add --disable-radix-cache"
        )
    elif strategy == "extra_buffer_lazy":
        raise UnsupportedServerOption(
            "--mamba-radix-cache-strategy extra_buffer_lazy: MiniCPM-SALA's prefix cache is "
            "served with extra_buffer only (lazy mode holds one snapshot slot per request and "
            "allocates the second at decode track points, which its kernels are not tested "
            "with); drop it (the plugin uses extra_buffer) or add --disable-radix-cache"
        )
    interval = getattr(args, "mamba_track_interval", None)
    grid = math.lcm(STATE_CHUNK, page_size)
    if interval is not None and interval % grid:
        raise UnsupportedServerOption(
            f"--mamba-track-interval {interval}: MiniCPM-SALA snapshots recurrent states on a "
            f"{grid}-token grid (SGLang's state chunk and the KV page), so it must be a multiple "
            f"of {grid}; use {_nearest_multiples(interval, grid)}"
        )


def _gpu_visible() -> bool:
    """Whether this process sees a CUDA (or ROCm) GPU."""
    import torch

    return torch.cuda.is_available()


def _reject_clashes_with_what_the_plugin_sets(args: Any, page_size: int) -> None:
    """Options that must agree with what the plugin sets by itself: the page size (the block
    size) and the attention backend (ours)."""
    # SGLang asserts the chunk rule only when the engine starts (ServerArgs.check_server_args):
    # a bare AssertionError and a traceback. The track-interval rule is checked with the prefix
    # cache's options; --max-prefill-tokens and --max-total-tokens SGLang rounds down to whole
    # pages itself.
    chunk = getattr(args, "chunked_prefill_size", None)
    if chunk is not None and chunk > 0 and chunk % page_size:
        raise UnsupportedServerOption(
            f"--chunked-prefill-size {chunk}: MiniCPM-SALA pages its KV cache in blocks of "
            f"{page_size} tokens, so it must be a multiple of {page_size}; "
            f"use {_nearest_multiples(chunk, page_size)}"
        )
    for flag, name in (("--prefill-attention-backend", "prefill_attention_backend"),
                       ("--decode-attention-backend", "decode_attention_backend")):
        backend = getattr(args, name, None)
        if backend is not None and backend not in BACKEND_NAMES:
            raise UnsupportedServerOption(
                f"{flag} {backend}: MiniCPM-SALA's sparse layers need {BACKEND_NAMES[0]} (or its "
                f"alias {BACKEND_NAMES[1]}) in prefill and decode; drop {flag}"
            )


def _nearest_multiples(value: int, step: int) -> str:
    """The multiples of `step` next to `value`: "192 or 256" (just "64" below the first)."""
    below = value // step * step
    return f"{below} or {below + step}" if below else str(step)
