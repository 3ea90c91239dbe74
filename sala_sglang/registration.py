"""Registers MiniCPM-SALA's config class, attention backends, linear layers and server hooks with
SGLang; both ways in call it.

`plugin.register()` (the `sglang.srt.plugins` entry point, run in every process SGLang starts)
calls `register_with_sglang()` and then adds the model class. Tools that load no plugins
(`bench_one_batch`) reach it through `SGLANG_EXTERNAL_MODEL_PACKAGE=sala_sglang.models`: importing
that package calls `register_with_sglang()`, and SGLang finds the model class itself there by its
`EntryClass`. So nothing in the package imports `plugin`, and this module imports no model code.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from sala_sglang.config import MiniCPMSALAConfig
from sala_sglang.hooks import (
    add_compressed_keys_to_cell_size,
    cap_state_pool_for_one_full_request,
    check_state_slots_when_idle,
    commit_verified_drafts,
    extra_buffer_for_minicpm_sala,
    keep_logprob_offset_at_output_ids,
    keep_no_state_per_draft_token,
    namespace_request_class,
    reject_out_of_vocab_ids,
)
from sala_sglang.ngram_context import (
    draft_chains_from_context_tails,
    grow_corpus_from_context_tails,
)
from sala_sglang.plain_decode_steps import (
    capture_plain_decode_graphs,
    decode_when_nothing_drafted,
    no_host_lengths_for_sala,
    verify_without_full_mask,
)
from sala_sglang.server_args import (
    ARCHITECTURE,
    BACKEND_NAMES,
    add_cli_args,
    adjust_server_args,
    from_cli_args,
    unsupported_option_exits_with_one_line,
)

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG = "0.5.16"

_registered = False


class RegistrationError(RuntimeError):
    """SGLang's extension points are not where sala-sglang expects them."""


def registration_error(exc: Exception) -> RegistrationError:
    """The error to raise when registering with SGLang failed with `exc`."""
    return RegistrationError(
        f"sala-sglang could not register MiniCPM-SALA with SGLang: {exc}. "
        f"sala-sglang supports SGLang {SUPPORTED_SGLANG}; check `pip show sglang`."
    )


def register_with_sglang() -> None:
    """Register config, backends, linear layers and server hooks with SGLang; idempotent."""
    global _registered
    if _registered:
        return
    # Set first: applying the hooks imports SGLang modules that may import its model registry,
    # which imports our model package (SGLANG_EXTERNAL_MODEL_PACKAGE) and so calls this again.
    _registered = True
    try:
        import sglang

        if sglang.__version__ != SUPPORTED_SGLANG:
            logger.warning(
                "sala-sglang is tested with SGLang %s, found %s",
                SUPPORTED_SGLANG,
                sglang.__version__,
            )
        _register_config()
        _register_backends()
        _register_linear_layers()
        _register_server_hooks()
    except Exception as exc:
        _registered = False
        raise registration_error(exc) from exc
    logger.info(
        "sala-sglang registered %s (config %r, backends %s)",
        ARCHITECTURE,
        MiniCPMSALAConfig.model_type,
        ", ".join(BACKEND_NAMES),
    )


def _register_config() -> None:
    from sglang.srt.utils.hf_transformers.common import _CONFIG_REGISTRY
    from transformers import AutoConfig

    _CONFIG_REGISTRY[MiniCPMSALAConfig.model_type] = MiniCPMSALAConfig
    try:
        AutoConfig.register(MiniCPMSALAConfig.model_type, MiniCPMSALAConfig, exist_ok=True)
    except TypeError:  # transformers without exist_ok
        try:
            AutoConfig.register(MiniCPMSALAConfig.model_type, MiniCPMSALAConfig)
        except ValueError:
            pass  # already registered by an earlier call in this process


def _register_backends() -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import add_attention_backend_choices

    for name in BACKEND_NAMES:
        register_attention_backend(name)(create_backend)
    from sglang.srt import server_args

    new = [n for n in BACKEND_NAMES if n not in server_args.ATTENTION_BACKEND_CHOICES]
    if new:
        add_attention_backend_choices(new)


def create_backend(runner: Any) -> Any:
    """Attention-backend factory SGLang calls with its ModelRunner."""
    from sala_sglang.attention.backend import create_minicpm_backend

    return create_minicpm_backend(runner)


def _register_linear_layers() -> None:
    from sglang.srt.configs.linear_attn_model_registry import (
        LinearAttnModelSpec,
        get_linear_attn_spec_by_arch,
        register_linear_attn_model,
    )

    if get_linear_attn_spec_by_arch(ARCHITECTURE) is not None:
        return
    # SGLang then builds the hybrid pools (KV for sparse layers, state slots for linear ones),
    # wraps our sparse-layer backend with this linear one in its HybridLinearAttnBackend and,
    # unless --disable-radix-cache, caches prefixes in a UnifiedRadixCache that keeps recurrent-
    # state snapshots beside the KV pages.
    register_linear_attn_model(
        LinearAttnModelSpec(
            config_class=MiniCPMSALAConfig,
            backend_class_name="sala_sglang.attention.lightning_backend.LightningBackend",
            arch_names=[ARCHITECTURE],
            uses_mamba_radix_cache=True,
        )
    )


def _register_server_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.add_cli_args", add_cli_args, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.from_cli_args", from_cli_args, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.__post_init__", _before_post_init, HookType.BEFORE
    )
    # The launchers (`python -m sglang.launch_server`, `sglang serve`) parse argv here; the
    # registry also rebinds the launcher's `from ... import prepare_server_args`.
    HookRegistry.register(
        "sglang.srt.server_args.prepare_server_args",
        unsupported_option_exits_with_one_line,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        add_compressed_keys_to_cell_size,
        HookType.AFTER,
    )
    # The callers (ServerArgs' strategy validation and the resolution pass in the same module)
    # look the function up in its module when they run, so patching the module attribute reaches
    # them.
    HookRegistry.register(
        "sglang.srt.arg_groups.overrides.supports_mamba_cache_extra_buffer",
        extra_buffer_for_minicpm_sala,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._handle_max_mamba_cache",
        cap_state_pool_for_one_full_request,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.memory_pool.HybridReqToTokenPool.__init__",
        keep_no_state_per_draft_token,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.layers.attention.hybrid_linear_attn_backend.HybridLinearAttnBackend."
        "update_mamba_state_after_mtp_verify",
        commit_verified_drafts,
        HookType.AROUND,
    )
    if _importable("sglang.srt.speculative.ngram_worker"):
        # it loads sgl_kernel's CUDA ops: on a machine without CUDA there is no NGRAM worker
        HookRegistry.register(
            "sglang.srt.speculative.ngram_worker.NGRAMWorker._prepare_draft_tokens",
            draft_chains_from_context_tails,
            HookType.AROUND,
        )
        HookRegistry.register(
            "sglang.srt.speculative.ngram_worker.NGRAMWorker._update_ngram_corpus",
            grow_corpus_from_context_tails,
            HookType.AROUND,
        )
        HookRegistry.register(
            "sglang.srt.speculative.ngram_worker.NGRAMWorker.forward_batch_generation",
            decode_when_nothing_drafted,
            HookType.AROUND,
        )
        HookRegistry.register(
            "sglang.srt.speculative.ngram_worker.NGRAMWorker.__init__",
            verify_without_full_mask,
            HookType.AFTER,
        )
    # The scheduler calls it by the name it imported.
    HookRegistry.register(
        "sglang.srt.managers.scheduler.decide_needs_cpu_seq_lens",
        no_host_lengths_for_sala,
        HookType.AROUND,
    )
    # Both the first capture and the recapture after a weight update.
    for method in ("init_cuda_graphs", "init_decode_cuda_graph"):
        HookRegistry.register(
            f"sglang.srt.model_executor.model_runner.ModelRunner.{method}",
            capture_plain_decode_graphs,
            HookType.AFTER,
        )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler._maybe_namespace_elastic_radix_cache",
        namespace_request_class,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.invariant_checker."
        "SchedulerInvariantChecker._check_req_pool",
        check_state_slots_when_idle,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        reject_out_of_vocab_ids,
        HookType.BEFORE,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.output_streamer."
        "_GenerationStreamAccumulator.accept",
        keep_logprob_offset_at_output_ids,
        HookType.AFTER,
    )
    # Hooks registered outside load_plugins() (SGLANG_EXTERNAL_MODEL_PACKAGE, direct calls)
    # still need applying; already-applied targets are skipped.
    HookRegistry.apply_hooks()


def _before_post_init(server_args: Any, *args: Any, **kwargs: Any) -> None:
    adjust_server_args(server_args)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
