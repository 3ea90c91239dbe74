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
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)

ARCHITECTURE = "MiniCPMSALAForCausalLM"
# The second name is what command lines written for OpenBMB's fork and upstream SGLang use.
BACKEND_NAMES = ("minicpm_flashinfer", "minicpm_flashattn")
DENSE_AS_SPARSE_FLAG = "--dense-as-sparse"
DENSE_AS_SPARSE_ATTR = "dense_as_sparse"

# OpenBMB's serving flags for MiniCPM-SALA (SPEC section 3). The plugin itself turns the radix
# cache off and pages the KV cache by the InfLLM-v2 block size, so those flags are not needed.
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
        # The recurrent state of the linear layers and the compressed keys of the sparse layers
        # cannot be restored from a shared prefix, so a prefix hit would compute wrong tokens.
        args.disable_radix_cache = True
        logger.warning(
            "MiniCPM-SALA: prefix (radix) caching is not supported; serving with "
            "--disable-radix-cache"
        )


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
    _reject_clashes_with_what_the_plugin_sets(args, block_size)
    if getattr(args, "speculative_algorithm", None):
        raise UnsupportedServerOption(
            f"--speculative-algorithm {args.speculative_algorithm}: MiniCPM-SALA has no draft "
            "model and its recurrent state cannot roll back rejected tokens; drop it"
        )
    kv_dtype = str(getattr(args, "kv_cache_dtype", "auto"))
    if kv_dtype not in ("auto", "bfloat16", "bf16", "float16", "fp16"):
        raise UnsupportedServerOption(
            f"--kv-cache-dtype {kv_dtype}: MiniCPM-SALA keeps its KV cache in the model dtype "
            "(no FP8 on the sparse path); drop --kv-cache-dtype"
        )
    if getattr(args, "enable_dp_attention", False):
        raise UnsupportedServerOption(
            "--enable-dp-attention: not supported for MiniCPM-SALA; use --dp-size with the router"
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


def _reject_clashes_with_what_the_plugin_sets(args: Any, page_size: int) -> None:
    """Options that must agree with what the plugin sets by itself: the page size (the block
    size), the radix cache (off) and the attention backend (ours)."""
    # SGLang asserts the chunk rule (with the same exceptions) only when the engine starts
    # (ServerArgs.check_server_args): a bare AssertionError and a traceback. Its other page-size
    # rules (--mamba-track-interval, the mamba chunk size) apply only with the radix cache, which
    # is off; --max-prefill-tokens and --max-total-tokens it rounds down to whole pages itself.
    chunk = getattr(args, "chunked_prefill_size", None)
    if chunk is not None and chunk > 0 and getattr(args, "disaggregation_mode", None) != "decode":
        if chunk % page_size:
            raise UnsupportedServerOption(
                f"--chunked-prefill-size {chunk}: MiniCPM-SALA pages its KV cache in blocks of "
                f"{page_size} tokens, so it must be a multiple of {page_size}; "
                f"use {_nearest_multiples(chunk, page_size)}"
            )
    if getattr(args, "enable_hierarchical_cache", False):
        # SGLang would name --disable-radix-cache, which the user never gave.
        raise UnsupportedServerOption(
            "--enable-hierarchical-cache: MiniCPM-SALA is served without a prefix (radix) cache, "
            "which the hierarchical cache extends; drop it"
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
