"""NGRAM steps with nothing drafted run as plain decode steps (sala_sglang.plain_decode_steps):
which corpus answers hold a draft, the routing, the decode batch a plain step builds and gives
back, its result in a verify's layout, and the graph runners chosen by forward mode."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sala_sglang.config import MiniCPMSALAConfig
from sala_sglang.plain_decode_steps import (
    GraphRunnersByMode,
    decode_when_nothing_drafted,
    drafted_requests,
    plain_decode_step,
)

pytest.importorskip("sglang")
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

WIDTH = 4


def test_a_request_has_a_draft_where_any_token_after_its_last_is_not_padding() -> None:
    # the corpus's rows: the last token, then matched tokens, then token-0 padding
    drafts = np.array([7, 0, 0, 0,  # nothing matched
                       7, 5, 0, 0,  # one token matched
                       9, 0, 3, 0])  # a tree whose first branch is token 0
    assert drafted_requests(drafts, WIDTH).tolist() == [False, True, True]


def _worker(config=None, **fields):
    runner = SimpleNamespace(model_config=SimpleNamespace(hf_config=config or MiniCPMSALAConfig()))
    return SimpleNamespace(model_runner=runner, draft_token_num=WIDTH, **fields)


def test_the_corpus_is_asked_once_a_step_and_a_batch_with_a_draft_is_verified(monkeypatch) -> None:
    from sala_sglang import plain_decode_steps

    events = []

    class Worker:
        draft_token_num = WIDTH
        model_runner = _worker().model_runner
        enable_overlap = True
        draft_tokens_batch = {1: torch.zeros(WIDTH, dtype=torch.int64)}

        def __init__(self):
            self.answers = []

        def _prepare_draft_tokens(self, batch):
            events.append(("query", self.__dict__.pop("_sala_accepted_on_host", None) is not None))
            return self.answers.pop(0), "mask"

    def original(worker, batch, on_publish=None):
        # SGLang's worker asks for the drafts again inside its verify
        events.append(("verify", worker._prepare_draft_tokens(batch)[0].tolist()))
        return "verified"

    def plain_step(worker, batch, last, on_publish):
        events.append(("plain", last.tolist(), on_publish))
        return "plain"

    monkeypatch.setattr(plain_decode_steps, "plain_decode_step", plain_step)
    monkeypatch.setattr(plain_decode_steps, "_after_step",
                        lambda worker, batch: events.append(("corpus",)))
    worker = Worker()
    spec = SimpleNamespace(accept_tokens=torch.tensor([9, 0, 0, 0], dtype=torch.int32),
                           accept_lens=torch.tensor([1], dtype=torch.int32))
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, has_grammar=False,
                            reqs=[SimpleNamespace(rid="a")], spec_info=spec)
    nothing, found = np.array([7, 0, 0, 0]), np.array([7, 5, 0, 0])

    # nothing drafted: asked first, then a plain step on the corpus's last token
    worker.answers = [nothing]
    assert decode_when_nothing_drafted(original, worker, batch, on_publish="pub") == "plain"
    assert events == [("query", False), ("plain", [7], "pub"), ("corpus",)]
    # the same request again: launched from the device's last token before the query, whose
    # host copy was started before the launch; the query finds a draft...
    events.clear()
    worker.answers = [found]
    assert decode_when_nothing_drafted(original, worker, batch, "pub") == "plain"
    assert events == [("plain", [9], "pub"), ("query", True), ("corpus",)]
    # ...so the next step asks first and verifies what it found, asking once
    events.clear()
    worker.answers = [found]
    assert decode_when_nothing_drafted(original, worker, batch, "pub") == "verified"
    assert events == [("query", False), ("verify", [7, 5, 0, 0])]
    assert "_prepare_draft_tokens" not in vars(worker)  # the instance shortcut is gone after
    # after a verify, no streak: a step with nothing drafted asks first again
    events.clear()
    worker.answers = [nothing]
    decode_when_nothing_drafted(original, worker, batch, "pub")
    assert events[0] == ("query", False)

    # prefill, grammar batches and other models go to SGLang's worker untouched
    events.clear()
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, has_grammar=False)
    worker.answers = [found]
    assert decode_when_nothing_drafted(original, worker, extend) == "verified"
    grammar = SimpleNamespace(**{**vars(batch), "has_grammar": True})
    worker.answers = [found]
    assert decode_when_nothing_drafted(original, worker, grammar) == "verified"
    other = _worker(config=object())
    other._prepare_draft_tokens = lambda batch: (found, None)
    assert decode_when_nothing_drafted(original, other, batch) == "verified"


class _Target:
    """Records the decode batch it was given; samples token 40 + request index."""

    def __init__(self, vocab: int = 64) -> None:
        self.seen: dict = {}
        self.vocab = vocab

    def forward_batch_generation(self, batch):
        self.seen = {name: getattr(batch, name) for name in (
            "input_ids", "out_cache_loc", "seq_lens", "seq_lens_cpu", "orig_seq_lens",
            "seq_lens_sum", "spec_info", "mamba_track_indices", "mamba_track_mask",
            "forward_mode")}
        self.seen = {k: v.clone() if isinstance(v, torch.Tensor) else v
                     for k, v in self.seen.items()}
        bs = len(batch.reqs)
        logits = torch.randn(bs, self.vocab, generator=torch.Generator().manual_seed(0))
        return SimpleNamespace(next_token_ids=torch.arange(bs, dtype=torch.int64) + 40,
                               logits_output=SimpleNamespace(next_token_logits=logits),
                               can_run_cuda_graph=True)


def _decode_batch(return_logprob: bool = False):
    req_to_token = torch.arange(4 * 64, dtype=torch.int32).view(4, 64)
    return SimpleNamespace(
        reqs=[SimpleNamespace(rid="a"), SimpleNamespace(rid="b")],
        forward_mode=ForwardMode.DECODE,
        input_ids=torch.tensor([1, 2]),
        out_cache_loc=torch.tensor([5, 6]),
        seq_lens=torch.tensor([10, 20]),
        seq_lens_cpu=torch.tensor([10, 20]),
        orig_seq_lens=torch.tensor([10, 20]),
        seq_lens_sum=30,
        spec_info="verify input",
        mamba_track_indices=None, mamba_track_mask=None, mamba_track_seqlens=None,
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        req_pool_indices=torch.tensor([3, 1]),
        return_logprob=return_logprob,
        sampling_info=SimpleNamespace(is_all_greedy=True),
        top_logprobs_nums=None, token_ids_logprobs=None,
    )


@pytest.fixture
def step_env(monkeypatch):
    import sglang.srt.managers.schedule_batch as schedule_batch
    import sglang.srt.runtime_context as runtime_context

    monkeypatch.setattr(runtime_context, "get_server_args", lambda: SimpleNamespace(
        enable_mamba_extra_buffer=lambda: True, mamba_track_interval=11))

    def track_indices(batch):
        batch.mamba_track_indices = batch.req_pool_indices * 100

    monkeypatch.setattr(schedule_batch, "set_mamba_track_indices_from_reqs", track_indices)
    put, erased = [], []
    worker = _worker(
        device="cpu", speculative_num_draft_tokens=WIDTH, target_worker=_Target(),
        draft_tokens_batch={2: torch.empty(2 * WIDTH, dtype=torch.int64)},
        _update_ngram_corpus=lambda batch: put.append([r.rid for r in batch.reqs]),
        _prev_decode_rids={"a", "gone"},
        ngram_corpus=SimpleNamespace(erase_match_state=erased.extend),
    )
    return worker, put, erased


def test_a_plain_step_decodes_each_last_token_into_the_verify_s_first_slot(step_env) -> None:
    worker, put, erased = step_env
    batch = _decode_batch()
    before = {k: getattr(batch, k) for k in ("input_ids", "seq_lens", "seq_lens_cpu",
                                             "spec_info", "out_cache_loc", "seq_lens_sum")}
    published = []
    result = plain_decode_step(worker, batch, torch.tensor([7, 8], dtype=torch.int32),
                               published.append)
    seen = worker.target_worker.seen
    assert seen["forward_mode"] == ForwardMode.DECODE and seen["spec_info"] is None
    assert seen["input_ids"].tolist() == [7, 8] and seen["input_ids"].dtype == torch.int64
    # request slot 3 at position 10, slot 1 at position 20
    assert seen["out_cache_loc"].tolist() == [3 * 64 + 10, 1 * 64 + 20]
    assert seen["out_cache_loc"].dtype == torch.int64
    assert seen["seq_lens"].tolist() == [11, 21] and seen["seq_lens_cpu"].tolist() == [11, 21]
    assert seen["orig_seq_lens"].tolist() == [11, 21] and seen["seq_lens_sum"] is None
    # the decode snapshot where the new length reaches the track interval (11), as the
    # verify's commit tracks it for one accepted token
    assert seen["mamba_track_mask"].tolist() == [True, False]
    assert seen["mamba_track_indices"].tolist() == [300, 100]
    # the batch is given back as it came
    for name, value in before.items():
        assert getattr(batch, name) is value, name
    assert batch.mamba_track_mask is None

    assert result.accept_lens.tolist() == [1, 1]
    assert result.next_token_ids.tolist() == [40, 0, 0, 0, 41, 0, 0, 0]
    assert result.new_seq_lens.tolist() == [11, 21] and published[0].tolist() == [11, 21]
    nxt = result.next_draft_input
    assert nxt.accept_tokens is result.next_token_ids and nxt.accept_lens is result.accept_lens
    assert nxt.draft_token_num == WIDTH and result.speculative_num_draft_tokens == WIDTH
    assert not put and not erased  # the corpus is the caller's


def test_after_a_plain_step_the_corpus_grows_and_departed_requests_are_forgotten(step_env):
    from sala_sglang.plain_decode_steps import _after_step

    worker, put, erased = step_env
    _after_step(worker, _decode_batch())
    assert put == [["a", "b"]] and erased == ["gone"] and worker._prev_decode_rids == {"a", "b"}


def test_a_plain_step_s_logprobs_come_in_the_verify_s_layout(step_env) -> None:
    worker, _, _ = step_env
    batch = _decode_batch(return_logprob=True)
    result = plain_decode_step(worker, batch, torch.tensor([7, 8]), None)
    logprobs = result.logits_output.next_token_logprobs
    assert logprobs.shape == (2, WIDTH)
    expected = torch.log_softmax(result.logits_output.next_token_logits, -1)[[0, 1], [40, 41]]
    assert torch.allclose(logprobs[:, 0], expected)


def test_graph_runners_are_chosen_by_forward_mode() -> None:
    calls = []

    class Runner:
        def __init__(self, name):
            self.name, self.capture_bs = name, [1, 2]

        def can_run_graph(self, fb):
            calls.append((self.name, "can"))
            return True

        def execute(self, fb, **kwargs):
            calls.append((self.name, "execute"))
            return self.name

    both = GraphRunnersByMode(Runner("verify"), Runner("plain"))
    decode = SimpleNamespace(forward_mode=ForwardMode.DECODE)
    verify = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY)
    assert both.can_run_graph(decode) and both.execute(decode, pp_proxy_tensors=None) == "plain"
    assert both.execute(verify) == "verify"
    assert calls == [("plain", "can"), ("plain", "execute"), ("verify", "execute")]
    assert both.capture_bs == [1, 2]  # everything else is the verify runner's
    assert copy.copy(both).verify is both.verify
    with pytest.raises(AttributeError):
        both.no_such_attribute  # noqa: B018


def test_the_scheduler_keeps_no_host_lengths_for_sala_under_ngram() -> None:
    # SGLang forces a host copy of the lengths under NGRAM (its full-mask verify reads them);
    # MiniCPM-SALA's backends read lengths on the device only, and its verify has no full mask
    from sala_sglang import plugin
    from sala_sglang.attention.lightning_backend import LightningBackend

    plugin.register()
    import sglang.srt.managers.scheduler as scheduler

    server_args = SimpleNamespace(speculative_algorithm="NGRAM", enable_two_batch_overlap=False)
    sparse = SimpleNamespace(needs_cpu_seq_lens=False)
    ours = SimpleNamespace(linear_attn_backend=LightningBackend.__new__(LightningBackend),
                           needs_cpu_seq_lens=False)
    assert not scheduler.decide_needs_cpu_seq_lens(server_args, [ours, sparse])
    assert server_args.speculative_algorithm == "NGRAM"  # the caller's arguments unchanged
    other = SimpleNamespace(linear_attn_backend=object(), needs_cpu_seq_lens=False)
    assert scheduler.decide_needs_cpu_seq_lens(server_args, [other])
    assert not LightningBackend.needs_cpu_seq_lens


def test_sala_s_ngram_verify_builds_no_full_mask(monkeypatch) -> None:
    import importlib
    import sys

    from sala_sglang.plain_decode_steps import verify_without_full_mask

    module = SimpleNamespace(USE_FULL_MASK=True)
    monkeypatch.setitem(sys.modules, "sglang.srt.speculative.ngram_worker", module)
    monkeypatch.setattr(importlib.import_module("sglang.srt.speculative"), "ngram_worker",
                        module, raising=False)
    verify_without_full_mask(None, _worker(config=object()))
    assert module.USE_FULL_MASK
    verify_without_full_mask(None, _worker())
    assert not module.USE_FULL_MASK


def test_decode_graphs_are_captured_beside_the_verify_graphs_for_sala_under_ngram(
        monkeypatch) -> None:
    import sglang.srt.layers.attention.hybrid_linear_attn_backend as hybrid_module
    import sglang.srt.model_executor.runner.decode_cuda_graph_runner as runner_module
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    import sala_sglang.attention.lightning_backend as lightning_module
    from sala_sglang.plain_decode_steps import capture_plain_decode_graphs

    built = []

    class Lightning:
        def __init__(self, runner, verify=True):
            self.verify = verify

    class Hybrid:
        def __init__(self, full, linear, layers):
            self.full, self.linear, self.layers = full, linear, layers

    class DecodeRunner:
        def __init__(self, runner, attn_backend=None):
            # captured while the model runner reads as not speculating: one token a request
            built.append((runner.spec_algorithm, attn_backend))

    monkeypatch.setattr(lightning_module, "LightningBackend", Lightning)
    monkeypatch.setattr(hybrid_module, "HybridLinearAttnBackend", Hybrid)
    monkeypatch.setattr(runner_module, "DecodeCudaGraphRunner", DecodeRunner)
    sparse = object()
    runner = SimpleNamespace(
        spec_algorithm=SpeculativeAlgorithm.NGRAM, decode_cuda_graph_runner="verify graphs",
        model_config=SimpleNamespace(hf_config=MiniCPMSALAConfig()),
        attn_backend=SimpleNamespace(full_attn_backend=sparse, full_attn_layers=[0, 5]))
    capture_plain_decode_graphs(None, runner)
    [(spec, backend)] = built
    assert spec == SpeculativeAlgorithm.NONE and runner.spec_algorithm.is_ngram()
    assert backend.full is sparse and backend.layers == [0, 5] and not backend.linear.verify
    routed = runner.decode_cuda_graph_runner
    assert isinstance(routed, GraphRunnersByMode) and routed.verify == "verify graphs"
    # called again on a runner that holds the router: its verify graphs are kept, the plain
    # ones captured anew (never a router inside a router)
    runner.decode_cuda_graph_runner = GraphRunnersByMode("new verify graphs", "old plain")
    capture_plain_decode_graphs(None, runner)
    assert runner.decode_cuda_graph_runner.verify == "new verify graphs" and len(built) == 2

    # no graphs (eager), no NGRAM, or another model: nothing captured
    for changed in ({"decode_cuda_graph_runner": None},
                    {"spec_algorithm": SpeculativeAlgorithm.NONE},
                    {"model_config": SimpleNamespace(hf_config=object())}):
        other = SimpleNamespace(**{**vars(runner), **changed})
        before = other.decode_cuda_graph_runner
        capture_plain_decode_graphs(None, other)
        assert other.decode_cuda_graph_runner is before and len(built) == 2
