"""The lightning backend plans each forward from host facts and what it read once when built, and
turns the scheduler's snapshot marks into kernel arguments on the device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.attention.hybrid_linear_attn_backend import (  # noqa: E402
    MambaAttnBackendBase,
)

from sala_sglang.attention import lightning_backend  # noqa: E402
from sala_sglang.ops._cuda import DeviceFacts  # noqa: E402

GPU = DeviceFacts(name="cuda:0", multiprocessors=132, compiled=True)


def build(monkeypatch: pytest.MonkeyPatch, make_tiny_config,
          snapshot_step: int = 64) -> lightning_backend.LightningBackend:
    """The backend over a stand-in model runner: SGLang's base sets only what the backend reads;
    request pool row r owns state slot 10 + r."""

    def base_init(self, runner) -> None:
        self.device, self.topk = runner.device, 0
        self.req_to_token_pool = SimpleNamespace(get_mamba_indices=lambda rows: rows + 10)

    monkeypatch.setattr(MambaAttnBackendBase, "__init__", base_init)
    monkeypatch.setattr(lightning_backend, "get_parallel",
                        lambda: SimpleNamespace(attn_tp_size=1, attn_tp_rank=0))
    server_args = SimpleNamespace(speculative_algorithm=None, mamba_cache_chunk_size=snapshot_step)
    runner = SimpleNamespace(device="cpu", server_args=server_args,
                             model_config=SimpleNamespace(hf_config=make_tiny_config()))
    return lightning_backend.LightningBackend(runner)


def batch(extend: bool, requests: int, tokens: int | None = None, **fields) -> SimpleNamespace:
    defaults = {"_original_batch_size": None, "mamba_track_mask": None,
                "mamba_track_indices": None, "req_pool_indices": torch.arange(requests)}
    return SimpleNamespace(batch_size=requests, extend_num_tokens=tokens,
                           forward_mode=SimpleNamespace(is_extend=lambda: extend),
                           **{**defaults, **fields})


def test_extend_is_planned_by_tokens_and_decode_by_requests(monkeypatch, make_tiny_config) -> None:
    backend = build(monkeypatch, make_tiny_config)  # 4 heads of 16 on the CPU: one segment
    backend._plan(batch(extend=True, requests=3, tokens=300))
    assert backend.plan.segment_len == 320
    backend._plan(batch(extend=False, requests=3))
    assert backend.plan.segment_len == 64
    assert backend.plan.decode_impl == "triton"


@pytest.mark.parametrize(("variable", "decode"), [("", "cuda"), ("triton", "triton")])
def test_kernel_overrides_are_read_once_when_the_backend_is_built(
    monkeypatch, make_tiny_config, variable: str, decode: str
) -> None:
    monkeypatch.setenv("SALA_SGLANG_KERNELS", variable)
    backend = build(monkeypatch, make_tiny_config)
    backend.device_facts, backend.head_dim = GPU, 128  # as if on a GPU, with a compiled head dim
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda" if variable else "triton")  # read no more
    backend._plan(batch(extend=False, requests=8))
    assert backend.plan.decode_impl == decode


def test_prefill_snapshot_lengths_count_whole_steps_of_the_extend(monkeypatch,
                                                                  make_tiny_config) -> None:
    backend = build(monkeypatch, make_tiny_config)
    # prefixes 0, 128, 64; the scheduler asks for snapshots at 200 and 192 (a branch point's
    # length + 1 also floors to it) and none for the middle request
    fb = batch(True, 3, 400, extend_seq_lens=torch.tensor([200, 100, 100], dtype=torch.int32),
               extend_prefix_lens=torch.tensor([0, 128, 64], dtype=torch.int32),
               mamba_track_mask=torch.tensor([True, False, True]),
               mamba_track_seqlens=torch.tensor([200, 228, 129], dtype=torch.int32),
               mamba_track_indices=torch.tensor([5, 6, 7]))
    backend.init_forward_metadata(fb)
    assert backend.track_len.tolist() == [192, -1, 64]
    assert backend.track_len.dtype == torch.int32
    assert backend.has_initial_state.tolist() == [0, 1, 1]
    meta = backend.forward_metadata
    assert meta.query_start_loc.tolist() == [0, 200, 300, 400]
    assert meta.mamba_cache_indices.tolist() == [10, 11, 12]
    assert meta.mamba_track_indices.tolist() == [5, 6, 7]


def test_without_the_prefix_cache_nothing_is_tracked(monkeypatch, make_tiny_config) -> None:
    backend = build(monkeypatch, make_tiny_config)
    backend.init_forward_metadata(batch(True, 1, 10, extend_seq_lens=torch.tensor([10]),
                                        extend_prefix_lens=torch.tensor([0])))
    assert backend.track_len is None and backend.forward_metadata.mamba_track_indices is None


def test_padding_rows_of_an_eager_batch_touch_no_state(monkeypatch, make_tiny_config) -> None:
    backend = build(monkeypatch, make_tiny_config)
    backend.init_forward_metadata(batch(False, 4, _original_batch_size=2))
    assert backend.forward_metadata.mamba_cache_indices.tolist() == [10, 11, -1, -1]


def test_snapshot_step_must_be_whole_prefill_chunks(monkeypatch, make_tiny_config) -> None:
    with pytest.raises(ValueError, match="mamba_cache_chunk_size 96 is not a multiple of the "
                                         "lightning prefill chunk 64"):
        build(monkeypatch, make_tiny_config, snapshot_step=96)


def test_decode_snapshots_go_where_the_scheduler_marks_them(monkeypatch, make_tiny_config) -> None:
    backend = build(monkeypatch, make_tiny_config)
    mask, slots = torch.tensor([False, True]), torch.tensor([8, 9])
    backend.init_forward_metadata(batch(False, 2, mamba_track_mask=mask, mamba_track_indices=slots))
    assert backend.decode_track == (slots, mask)
    backend.init_forward_metadata(batch(False, 2))
    assert backend.decode_track is None
