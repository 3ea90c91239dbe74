"""SGLang hooks: pool sizing counts the compressed keys beside each KV page and leaves the KV pool
room for one full-context request; the prefix cache keeps the dense and sparse classes apart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sala_sglang.config import MiniCPMSALAConfig
from sala_sglang.hooks import (
    add_compressed_keys_to_cell_size,
    cached_state_slots,
    compressed_key_bytes_per_token,
    max_state_slots,
    namespace_request_class,
)


def test_released_model_adds_a_sixteenth_of_k() -> None:
    # 8 layers x 2 kv heads x 128 x (K + V) x 2 B = 8 KiB/token; K1 = 1/16 of K.
    assert compressed_key_bytes_per_token(MiniCPMSALAConfig().sparse, 8192) == 256


def test_hook_adds_compressed_keys_only_for_minicpm_sala() -> None:
    ours = SimpleNamespace(model_config=SimpleNamespace(hf_config=MiniCPMSALAConfig()))
    other = SimpleNamespace(model_config=SimpleNamespace(hf_config=object()))
    assert add_compressed_keys_to_cell_size(8192, None, ours, 8) == 8192 + 256
    assert add_compressed_keys_to_cell_size(8192, None, other, 8) == 8192


def test_sglang_pool_configurator_uses_the_hook() -> None:
    pytest.importorskip("sglang")
    from sala_sglang import plugin

    plugin.register()
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    fn = DefaultPoolConfigurator._compute_cell_size
    assert "add_compressed_keys_to_cell_size" in repr(getattr(fn, "__wrapped__", fn)) or any(
        "add_compressed_keys_to_cell_size" in repr(c.cell_contents)
        for c in (fn.__closure__ or ())
        if hasattr(c, "cell_contents")
    )


# ---- the state pool leaves the KV pool room for one full-context request ----------------------
SLOT = 24 * 32 * 128 * 128 * 4  # released model: fp32 state of 24 linear layers, 48 MiB
CELL = 8192 + 256  # released model: KV and compressed keys per token, bytes
GIB = 1 << 30
MIB = 1 << 20


def test_state_slots_leave_one_full_request_and_its_slack_in_the_kv_pool() -> None:
    rest, context = 12 * GIB, 1 << 20
    slots = max_state_slots(rest, SLOT, CELL, context, page_size=64)
    kv_tokens = (rest - slots * SLOT) // CELL
    assert kv_tokens >= 1.05 * context
    assert (rest - (slots + 1) * SLOT) // CELL < 1.05 * context
    assert slots == 71


def test_no_state_slots_when_one_full_request_does_not_fit() -> None:
    assert max_state_slots(8 * GIB, SLOT, CELL, 1 << 20, page_size=64) == 0


def test_cached_states_are_the_slots_running_requests_do_not_hold() -> None:
    assert cached_state_slots(444, 88, 3) == 180
    assert cached_state_slots(444, 88, 2) == 268
    assert cached_state_slots(100, 88, 3) == 0


class FakeServerArgs:
    """The ServerArgs fields SGLang's state-pool sizing reads, with SGLang's defaults."""

    mamba_full_memory_ratio = 0.9  # a class default, as on ServerArgs

    def __init__(self, **fields) -> None:
        self.max_mamba_cache_size = None
        self.max_running_requests = None
        self.disable_radix_cache = False
        self.page_size = 64
        self.__dict__.update(fields)

    def override(self, source: str, **fields) -> None:
        self.__dict__.update(fields)


@pytest.fixture()
def size_state_pool(monkeypatch: pytest.MonkeyPatch):
    """SGLang's `_handle_max_mamba_cache`, as the plugin hooks it, for the released config with
    a 1M-token context: (GiB after weights, ServerArgs fields) -> (server args, GiB for KV)."""
    pytest.importorskip("sglang")
    from sala_sglang import plugin

    plugin.register()
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor import pool_configurator

    monkeypatch.setattr(pool_configurator, "create_memory_pool_configurator",
                        lambda kvc: SimpleNamespace(_cell_size=CELL))

    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    def size(rest_gib: float, hf_config=None, spec: str = "NONE", **fields):
        config = MiniCPMSALAConfig()
        configurator = SimpleNamespace(
            server_args=FakeServerArgs(**fields),
            model_config=SimpleNamespace(hf_config=hf_config or config, context_len=1 << 20),
            model_dtype=torch.bfloat16,
            mambaish_config=config,
            spec_algorithm=SpeculativeAlgorithm[spec],
            ps=SimpleNamespace(attn_dp_size=1, attn_tp_size=1),
        )
        kv_gib = KVCacheConfigurator._handle_max_mamba_cache(configurator, rest_gib)
        return configurator.server_args, kv_gib

    return size


def test_state_pool_is_capped_so_one_full_context_request_fits(size_state_pool) -> None:
    args, kv_gib = size_state_pool(12.0)
    assert args.max_mamba_cache_size == 71  # SGLang's memory ratio alone gives 121
    assert kv_gib == pytest.approx(12.0 - 71 * SLOT / GIB)
    assert kv_gib * GIB // CELL >= 1.05 * (1 << 20)


def test_state_pool_that_leaves_room_is_kept(size_state_pool) -> None:
    args, kv_gib = size_state_pool(40.0)
    assert args.max_mamba_cache_size == int(40.0 * 0.9 / 1.9 * GIB // SLOT)
    assert kv_gib == pytest.approx(40.0 - args.max_mamba_cache_size * SLOT / GIB)


@pytest.mark.parametrize("fields, slots", [
    ({"max_mamba_cache_size": 200}, 200),
    ({"mamba_full_memory_ratio": 2.0}, int(12.0 * 2 / 3 * GIB // SLOT)),
])
def test_a_state_pool_the_user_sized_is_kept(size_state_pool, fields: dict, slots: int) -> None:
    args, _ = size_state_pool(12.0, **fields)
    assert args.max_mamba_cache_size == slots


def test_speculative_verify_takes_its_keys_and_values_and_no_state_per_draft(
    size_state_pool,
) -> None:
    """NGRAM chains of 8 for 8 requests: 24 layers x 64 tokens x 32 heads x 256 x 2 B of keys
    and values come out of the pools' share; SGLang's reserve of 8 states per request is not
    taken (the fake configurator lacks what SGLang's reserve would read)."""
    replay = 24 * 64 * 32 * 256 * 2 / GIB
    args, kv_gib = size_state_pool(12.0, spec="NGRAM", max_running_requests=8,
                                   speculative_num_draft_tokens=8)
    plain, plain_kv = size_state_pool(12.0 - replay)
    assert args.max_mamba_cache_size == plain.max_mamba_cache_size
    assert kv_gib == pytest.approx(plain_kv)


def test_other_models_state_pools_are_left_alone(size_state_pool) -> None:
    args, _ = size_state_pool(12.0, hf_config=object())
    assert args.max_mamba_cache_size == 121


def test_too_little_memory_for_one_full_request_fails_with_both_numbers(size_state_pool) -> None:
    with pytest.raises(RuntimeError,
                       match=r"MiniCPM-SALA: 8.80 GiB .* one 1048576-token request needs 8.25 GiB "
                             r"of KV \(8448 B/token\), which leaves 2 recurrent-state slots of 48 "
                             r"MiB, fewer than 5"):
        size_state_pool(8.8)


def test_memory_log_states_the_cached_states_that_fit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("sglang")
    import torch

    from sala_sglang.attention import sparse_backend

    monkeypatch.setattr(sparse_backend, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    runner = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=MiniCPMSALAConfig(), get_num_kv_heads=lambda tp: 2),
        token_to_kv_pool=SimpleNamespace(size=3 << 20, dtype=torch.bfloat16),
        req_to_token_pool=SimpleNamespace(mamba_pool=SimpleNamespace(size=444),
                                          mamba_ping_pong_track_buffer_size=2),
        max_running_requests=88,
        server_args=SimpleNamespace(disable_radix_cache=False),
    )
    backend = SimpleNamespace(max_context_len=1 << 20, compressed_key_bytes=lambda: GIB,
                              dense_len=8192)
    with caplog.at_level("INFO", logger=sparse_backend.__name__):
        sparse_backend._log_memory_split(runner, backend)
    message = caplog.records[-1].getMessage()
    assert "3145728 tokens (24.00 GiB, 3.00x the context length 1048576)" in message
    assert "48.0 MiB/slot for 24 linear layers, 444 state slots (20.81 GiB)" in message
    assert "max running requests 88, 3 slots per running request, 180 cached prefix states fit" \
        in message


# ---- dense-class prompts get their own radix-tree namespace -----------------------------------
def fake_scheduler(hf_config, dense_as_sparse: bool = False) -> SimpleNamespace:
    """The Scheduler attributes SGLang's namespace method and the hook read."""
    return SimpleNamespace(
        server_args=SimpleNamespace(elastic_ep_backend=None, dense_as_sparse=dense_as_sparse),
        model_config=SimpleNamespace(hf_config=hf_config),
    )


def fake_req(prompt_len: int, extra_key: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(origin_input_ids=[7] * prompt_len, extra_key=extra_key)


def test_a_prompt_shorter_than_dense_len_is_tagged_dense() -> None:
    req = fake_req(8191)  # the released dense_len is 8192
    namespace_request_class(None, fake_scheduler(MiniCPMSALAConfig()), req)
    assert req.extra_key == "|sala:dense"


def test_a_dense_prompt_keeps_the_callers_extra_key_in_front() -> None:
    req = fake_req(100, extra_key="tenant-a")
    namespace_request_class(None, fake_scheduler(MiniCPMSALAConfig()), req)
    assert req.extra_key == "tenant-a|sala:dense"


def test_a_sparse_class_prompt_is_left_untagged() -> None:
    req = fake_req(8192, extra_key="tenant-a")
    namespace_request_class(None, fake_scheduler(MiniCPMSALAConfig()), req)
    assert req.extra_key == "tenant-a"


def test_under_dense_as_sparse_no_prompt_is_tagged() -> None:
    req = fake_req(100)
    namespace_request_class(None, fake_scheduler(MiniCPMSALAConfig(), dense_as_sparse=True), req)
    assert req.extra_key is None


def test_other_models_requests_are_left_untagged() -> None:
    req = fake_req(100)
    namespace_request_class(None, fake_scheduler(object()), req)
    assert req.extra_key is None


def test_sglang_scheduler_tags_new_requests_through_the_hook() -> None:
    pytest.importorskip("sglang")
    from sala_sglang import plugin

    plugin.register()
    from sglang.srt.managers.scheduler import Scheduler

    req = fake_req(100)
    Scheduler._maybe_namespace_elastic_radix_cache(fake_scheduler(MiniCPMSALAConfig()), req)
    assert req.extra_key == "|sala:dense"


def test_sglang_allows_extra_buffer_snapshots_for_minicpm_sala_only() -> None:
    pytest.importorskip("sglang")
    from sala_sglang import plugin

    plugin.register()
    from sglang.srt.arg_groups import overrides

    view = SimpleNamespace(linear_attn_backend="flashinfer")
    assert overrides.supports_mamba_cache_extra_buffer(view, "MiniCPMSALAForCausalLM")
    assert not overrides.supports_mamba_cache_extra_buffer(view, "LlamaForCausalLM")
    assert not overrides.supports_mamba_cache_extra_buffer(view, "Qwen3NextForCausalLM")


def test_lightning_pools_keep_no_state_per_draft_token() -> None:
    pytest.importorskip("sglang")
    from sala_sglang.hooks import keep_no_state_per_draft_token

    seen = {}

    def pool_init(pool, **kwargs):
        seen.update(kwargs)

    keep_no_state_per_draft_token(pool_init, None, cache_params=MiniCPMSALAConfig(
        ).mamba2_cache_params, speculative_num_draft_tokens=8)
    assert seen["speculative_num_draft_tokens"] is None
    keep_no_state_per_draft_token(pool_init, None, cache_params=object(),
                                  speculative_num_draft_tokens=8)
    assert seen["speculative_num_draft_tokens"] == 8


def test_post_verify_commit_goes_to_our_lightning_backend() -> None:
    from sala_sglang.hooks import commit_verified_drafts

    calls = []
    ours = SimpleNamespace(linear_attn_backend=SimpleNamespace(
        commit_verified_drafts=lambda *a, **k: calls.append(("ours", a))))
    other = SimpleNamespace(linear_attn_backend=object())
    commit_verified_drafts(lambda backend, *a, **k: calls.append(("sglang", a)), ours, 1, 2)
    commit_verified_drafts(lambda backend, *a, **k: calls.append(("sglang", a)), other, 3)
    assert calls == [("ours", (1, 2)), ("sglang", (3,))]


# ---- output logprobs of a request retracted before its first token --------------------------
def _stream(req) -> list[list[float]]:
    """What SGLang's streamer sends for `req` in one pass: its output-logprob slices."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.scheduler_components.output_streamer import (
        DEFAULT_FORCE_STREAM_INTERVAL,
        _GenerationStreamAccumulator,
    )
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    acc = _GenerationStreamAccumulator(
        return_logprob=True, return_hidden_states=False, return_routed_experts=False,
        return_indexer_topk=False, return_sampling_mask=False,
        spec_algorithm=SpeculativeAlgorithm.NONE, disaggregation_mode=DisaggregationMode.NULL,
        default_stream_interval=1, default_force_stream_interval=DEFAULT_FORCE_STREAM_INTERVAL,
        get_cached_tokens_details=lambda req: None,
    )
    acc.accept(req=req)
    return acc.output_token_logprobs_val


def test_a_request_retracted_before_its_first_token_keeps_every_output_logprob() -> None:
    """Seen on an H100 under forced retraction: a non-streamed request retracted while its
    prefill result was in flight is streamed with no output id (0 % 50 == 0); SGLang 0.5.16 then
    moved its logprob offset to 1, and the first output logprob was never sent."""
    pytest.importorskip("sglang")
    from array import array

    from sala_sglang import plugin

    plugin.register()
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=2)
    params.normalize(None)
    req = Req("r", "", array("q", [1, 2, 3]), params, return_logprob=True)
    req.is_retracted = True
    assert _stream(req) == [[]]
    # re-prefilled, then decoded to its length: both tokens and both logprobs
    for token, logprob in ((60, -0.5), (61, -0.25)):
        req.output_ids.append(token)
        req.logprob.output_token_logprobs_val.append(logprob)
        req.logprob.output_token_logprobs_idx.append(token)
    req.finished_reason = FINISH_LENGTH(length=2)
    assert _stream(req) == [[-0.5, -0.25]]
