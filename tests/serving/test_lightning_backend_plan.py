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


class StatePool:
    """SGLang's request pool as the backend reads it: request row r owns state slot 10 + r; the
    lightning layers' states [layers, slots, heads, dim, dim] in one tensor."""

    def __init__(self, config, slots: int = 32, requests: int = 4) -> None:
        self.size = requests
        self.mamba_map = {layer: i for i, layer in enumerate(config.linear_layer_ids)}
        h, d, _ = config.linear_state_shape()
        temporal = torch.randn(len(self.mamba_map), slots, h, d, d, dtype=torch.float64)
        self.mamba_pool = SimpleNamespace(mamba_cache=SimpleNamespace(
            temporal=temporal.float()))

    def get_mamba_indices(self, rows: torch.Tensor) -> torch.Tensor:
        return rows + 10

    def mamba2_layer_cache(self, layer_id: int) -> SimpleNamespace:
        return SimpleNamespace(temporal=self.mamba_pool.mamba_cache.temporal[
            self.mamba_map[layer_id]])


def build(monkeypatch: pytest.MonkeyPatch, make_tiny_config, snapshot_step: int = 64,
          draft_len: int | None = None) -> lightning_backend.LightningBackend:
    """The backend over a stand-in model runner: SGLang's base sets only what the backend reads.
    draft_len: serve with NGRAM chains of that many tokens."""
    config = make_tiny_config()

    def base_init(self, runner) -> None:
        self.device, self.topk = runner.device, 0
        self.req_to_token_pool = StatePool(config)

    monkeypatch.setattr(MambaAttnBackendBase, "__init__", base_init)
    monkeypatch.setattr(lightning_backend, "get_parallel",
                        lambda: SimpleNamespace(attn_tp_size=1, attn_tp_rank=0))
    server_args = SimpleNamespace(speculative_algorithm=draft_len and "NGRAM",
                                  speculative_num_draft_tokens=draft_len,
                                  mamba_cache_chunk_size=snapshot_step)
    runner = SimpleNamespace(device="cpu", server_args=server_args,
                             model_config=SimpleNamespace(hf_config=config, dtype=torch.float32))
    return lightning_backend.LightningBackend(runner)


def batch(extend: bool, requests: int, tokens: int | None = None, verify: bool = False,
          **fields) -> SimpleNamespace:
    defaults = {"_original_batch_size": None, "mamba_track_mask": None,
                "mamba_track_indices": None, "req_pool_indices": torch.arange(requests)}
    mode = SimpleNamespace(is_extend=lambda: extend or verify, is_target_verify=lambda: verify)
    return SimpleNamespace(batch_size=requests, extend_num_tokens=tokens, forward_mode=mode,
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


def test_a_graph_replay_view_without_a_track_mask_is_planned(monkeypatch,
                                                             make_tiny_config) -> None:
    """SGLang's decode graph runner hands the backend a view of the batch (a SimpleNamespace)
    that has no mamba_track_mask: the captured kernels read the mask slot they captured."""
    backend = build(monkeypatch, make_tiny_config)
    monkeypatch.setattr(MambaAttnBackendBase, "init_forward_metadata_out_graph",
                        lambda self, fb, in_capture=False: setattr(
                            self, "forward_metadata",
                            SimpleNamespace(mamba_track_indices=torch.tensor([8, 9]))))
    view = batch(False, 2)
    del view.mamba_track_mask
    backend.init_forward_metadata_out_graph(view)
    assert backend.decode_track is None and backend.plan.decode_impl == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs Triton in the CPU interpreter")
def test_verify_then_commit_is_decoding_the_accepted_drafts(monkeypatch,
                                                            make_tiny_config) -> None:
    """Two requests verify chains of 4 on every lightning layer: the pool is left as it was;
    the commit (3 and 1 accepted tokens, a snapshot after the first token of the second) leaves
    the states, and the verify the outputs, that decoding those tokens one by one gives. q, k
    and v are slices of one fused projection, as the layer passes v."""
    draft_len, requests = 4, 2
    backend = build(monkeypatch, make_tiny_config, draft_len=draft_len)
    layers = [SimpleNamespace(layer_id=i) for i in backend.layer_index]
    width = backend.num_heads * backend.head_dim
    torch.manual_seed(0)
    qkv = {i: (torch.randn(requests * draft_len, 3 * width) / 4).split(width, -1)
           for i in backend.layer_index}
    pool = backend.req_to_token_pool.mamba_pool.mamba_cache.temporal
    before = pool.clone()

    verify = batch(False, requests, verify=True)
    backend.init_forward_metadata(verify)
    outputs = {layer.layer_id: backend.forward_extend(*qkv[layer.layer_id], layer, verify)
               for layer in layers}
    assert torch.equal(pool, before)
    accepted = torch.tensor([3, 1])
    backend.commit_verified_drafts(accepted - 1, torch.tensor([20, 21]), torch.tensor([-1, 0]))
    committed = pool.clone()

    pool.copy_(before)
    for step in range(draft_len):
        live = accepted > step
        decode = batch(False, requests, _original_batch_size=None)
        backend.init_forward_metadata(decode)
        backend.forward_metadata.mamba_cache_indices[~live] = -1  # finished: no state change
        for layer in layers:
            q, k, v = (x.view(requests, draft_len, width)[:, step] for x in qkv[layer.layer_id])
            out = backend.forward_decode(q, k, v, layer, decode)
            verified = outputs[layer.layer_id].view(requests, draft_len, width)[:, step]
            torch.testing.assert_close(verified[live], out[live], atol=1e-5, rtol=1e-5)
        if step == 0:
            torch.testing.assert_close(committed[:, 21], pool[:, 11], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(committed[:, 10:12], pool[:, 10:12], atol=1e-5, rtol=1e-5)
    assert torch.equal(committed[:, 20], before[:, 20])  # no snapshot asked for the first
