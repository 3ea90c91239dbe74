"""NGRAM decode steps in which no request has a draft run as plain decode steps.

SGLang's NGRAM worker verifies `--speculative-num-draft-tokens` tokens per request at every
decode step, padding a short or empty n-gram match with token 0 (`fillResult` in its corpus).
Where nothing matches, the verify computes T tokens to keep one: on the real config at 128K that
step took 1.62x a decode step (benchmarks/NOTES.md). When no request of a batch has a draft (the
corpus's host answer, known before anything is launched), the step here runs SGLang's own decode
forward instead and returns its result laid out as a verify that accepted no draft, so the
scheduler, the corpus and the prefix cache see what they would after such a verify:

- input: each request's last token (row 0 of its draft row); its KV goes to the slot the verify's
  first row would use (`req_to_token[req, seq_len]`: SGLang allocates the step's T slots before
  the worker runs and frees the unused ones after it, whatever accepted); positions and lengths
  those of a decode step (`seq_lens + 1`), no spec_info;
- the prefix cache's decode snapshot where the new length reaches the track interval: what the
  verify's commit tracks for one accepted token (`commit_mamba_states_after_verify`);
- result: accept_lens 1, the sampled token at stride T, logprobs through SGLang's spec-v2 helper.

Under CUDA graphs SGLang captures only verify graphs for NGRAM, so decode graphs are captured
beside them (`capture_plain_decode_graphs`, on their own lightning backend without verify
buffers and the shared sparse backend, whose graph state is nothing) and the model runner's
graph runner is routed by forward mode (`GraphRunnersByMode`).

The host must not hold the GPU up between such steps: while the same requests keep finding
nothing, a step is launched before its corpus query (`decode_when_nothing_drafted`), and the
scheduler keeps no host copy of the lengths under NGRAM for this model, since its verify builds
no per-request mask from them (`verify_without_full_mask`, `no_host_lengths_for_sala`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch

from sala_sglang.ngram_context import serves_sala, stage_accepted_on_host

logger = logging.getLogger(__name__)


def drafted_requests(drafts: np.ndarray, draft_len: int) -> np.ndarray:
    """Which requests' corpus answers hold a draft: a request's row 0 is its last token and the
    corpus fills what it did not match with token 0, so any non-zero later token is a draft (a
    real draft of token 0 only is taken as none: that step is then a plain one, still correct)."""
    return (drafts.reshape(-1, draft_len)[:, 1:] != 0).any(axis=1)


def decode_when_nothing_drafted(original: Any, worker: Any, batch: Any, *args: Any,
                                **kwargs: Any) -> Any:
    """Around `NGRAMWorker.forward_batch_generation(batch, on_publish=None)`: a decode batch
    none of whose requests has a draft runs `plain_decode_step`; otherwise SGLang's verify runs
    on the drafts already fetched (the corpus is asked once a step).

    While the same requests keep finding nothing (a streak, under the overlap scheduler), a
    step is launched from the previous step's token on the device before the corpus is asked,
    so the host's wait for that token and its query overlap the step instead of idling the GPU;
    the query's answer (the same context the step would have been drafted from) decides whether
    the next step asks first. A match that starts there is drafted one step late."""
    streak, worker._sala_streak = getattr(worker, "_sala_streak", None), None
    if (not serves_sala(worker.model_runner) or not batch.forward_mode.is_decode()
            or batch.has_grammar):
        return original(worker, batch, *args, **kwargs)
    on_publish = kwargs.get("on_publish", args[0] if args else None)
    width, rids = worker.draft_token_num, tuple(req.rid for req in batch.reqs)
    if streak == rids:
        last = batch.spec_info.accept_tokens.view(len(rids), width)[:, 0]
        stage_accepted_on_host(worker, batch.spec_info)
        result = plain_decode_step(worker, batch, last, on_publish)
        drafted = drafted_requests(worker._prepare_draft_tokens(batch)[0], width).any()
        _log_once(worker, "an NGRAM step ran before its corpus query (nothing drafted in a row)")
    else:
        prepared = worker._prepare_draft_tokens(batch)
        if drafted_requests(prepared[0], width).any():
            worker._prepare_draft_tokens = lambda _batch: prepared
            try:
                return original(worker, batch, *args, **kwargs)
            finally:
                del worker._prepare_draft_tokens
        drafted = False
        tokens = worker.draft_tokens_batch[len(rids)]
        tokens.copy_(torch.from_numpy(prepared[0]), non_blocking=True)
        result = plain_decode_step(worker, batch, tokens.view(len(rids), width)[:, 0], on_publish)
    _after_step(worker, batch)
    _log_once(worker, "an NGRAM step with nothing drafted ran as a plain decode step")
    if worker.enable_overlap and not drafted:
        worker._sala_streak = rids
    return result


# the batch fields a plain step sets for its forward and gives back afterwards
_STEP_FIELDS = ("input_ids", "out_cache_loc", "seq_lens", "seq_lens_cpu", "orig_seq_lens",
                "seq_lens_sum", "spec_info", "mamba_track_indices", "mamba_track_mask",
                "mamba_track_seqlens")


def plain_decode_step(worker: Any, batch: Any, last: Any, on_publish: Any) -> Any:
    """One decode forward for `batch` (an NGRAM decode batch whose requests have no draft) on
    `last`, each request's last token on the device, launched and returned as NGRAMWorker
    returns a verify's result (the corpus is the caller's)."""
    from sglang.srt.layers.logprob_processor import compute_spec_v2_logprobs
    from sglang.srt.managers.schedule_batch import set_mamba_track_indices_from_reqs
    from sglang.srt.managers.scheduler import GenerationBatchResult
    from sglang.srt.runtime_context import get_server_args
    from sglang.srt.speculative.ngram_info import NgramVerifyInput
    from sglang.srt.speculative.spec_utils import record_stream_for_v2_verify

    device, bs, width = worker.device, len(batch.reqs), worker.draft_token_num
    record_stream_for_v2_verify(batch, None, torch.cuda.current_stream()
                                if torch.cuda.is_available() else None)
    saved = {name: getattr(batch, name) for name in _STEP_FIELDS}
    seq_lens = batch.seq_lens
    try:
        batch.input_ids = last.to(torch.int64)
        batch.out_cache_loc = batch.req_to_token_pool.req_to_token[
            batch.req_pool_indices, seq_lens].to(torch.int64)
        batch.seq_lens = seq_lens + 1
        if batch.seq_lens_cpu is not None:
            batch.seq_lens_cpu = batch.seq_lens_cpu + 1
        if batch.orig_seq_lens is not None:
            batch.orig_seq_lens = batch.orig_seq_lens + 1
        batch.seq_lens_sum = None
        batch.spec_info = None
        server_args = get_server_args()
        if server_args.enable_mamba_extra_buffer():
            set_mamba_track_indices_from_reqs(batch)
            batch.mamba_track_mask = batch.seq_lens % server_args.mamba_track_interval == 0
            batch.mamba_track_seqlens = None
        result = worker.target_worker.forward_batch_generation(batch)
    finally:
        for name, value in saved.items():
            setattr(batch, name, value)

    sampled = result.next_token_ids
    accept_lens = torch.ones(bs, dtype=torch.int32, device=device)
    accept_tokens = torch.zeros(bs, width, dtype=torch.int32, device=device)
    accept_tokens[:, 0] = sampled
    if batch.return_logprob:
        # the verify's layout: row i's accepted entries at [i, :accept_len], here its first only
        accept_index = torch.full((bs, width), -1, dtype=torch.int64, device=device)
        accept_index[:, 0] = torch.arange(bs, device=device)
        compute_spec_v2_logprobs(batch, result.logits_output, sampled, accept_index, width - 1)
    new_seq_lens = seq_lens + 1
    if on_publish is not None:
        on_publish(new_seq_lens)
    accept_tokens = accept_tokens.flatten()
    return GenerationBatchResult(
        logits_output=result.logits_output,
        next_token_ids=accept_tokens,
        can_run_cuda_graph=result.can_run_cuda_graph,
        accept_lens=accept_lens,
        new_seq_lens=new_seq_lens,
        next_draft_input=NgramVerifyInput(draft_token_num=width, new_seq_lens=new_seq_lens,
                                          accept_tokens=accept_tokens, accept_lens=accept_lens),
        speculative_num_draft_tokens=worker.speculative_num_draft_tokens,
    )


def _after_step(worker: Any, batch: Any) -> None:
    """What NGRAMWorker does after a verify besides the commit: the corpus takes the context's
    tail, and requests that left the decode batch have their match state erased (under overlap
    `req.finished()` flips one step late, so departures are found by rid)."""
    worker._update_ngram_corpus(batch)
    rids = {req.rid for req in batch.reqs}
    departed = worker._prev_decode_rids - rids
    if departed:
        worker.ngram_corpus.erase_match_state(list(departed))
    worker._prev_decode_rids = rids


def _log_once(worker: Any, what: str) -> None:
    logged = worker.__dict__.setdefault("_sala_logged", set())
    if what not in logged:
        logged.add(what)
        logger.info("MiniCPM-SALA: %s", what)


def verify_without_full_mask(result: Any, worker: Any, *args: Any, **kwargs: Any) -> None:
    """After `NGRAMWorker.__init__`: for MiniCPM-SALA the verify builds no [T, seq_len + T]
    mask per request from the host's lengths (`ngram_worker.USE_FULL_MASK`): the sparse and
    lightning backends read no mask, causal by position along each chain."""
    if serves_sala(worker.model_runner):
        from sglang.srt.speculative import ngram_worker

        ngram_worker.USE_FULL_MASK = False
    return result


def no_host_lengths_for_sala(original: Any, server_args: Any, attn_backends: Any,
                             *args: Any, **kwargs: Any) -> bool:
    """Around the scheduler's `decide_needs_cpu_seq_lens(server_args, attn_backends)`: SGLang
    keeps a host copy of the lengths under NGRAM for its full-mask verify, and so waits for each
    step before preparing the next; MiniCPM-SALA's verify has no full mask
    (`verify_without_full_mask`), so its backends decide, as without speculation."""
    from sala_sglang.attention.lightning_backend import LightningBackend

    ours = any(isinstance(getattr(b, "linear_attn_backend", None), LightningBackend)
               for b in attn_backends)
    if ours and server_args.speculative_algorithm is not None:
        server_args = copy.copy(server_args)
        server_args.speculative_algorithm = None
    return original(server_args, attn_backends, *args, **kwargs)


class GraphRunnersByMode:
    """The model runner's decode graph runner under NGRAM: decode batches replay the plain
    decode graphs, everything else (verify) SGLang's verify graphs."""

    def __init__(self, verify: Any, plain: Any) -> None:
        self.verify = verify
        self.plain = plain

    def _runner(self, forward_batch: Any) -> Any:
        return self.plain if forward_batch.forward_mode.is_decode() else self.verify

    def can_run_graph(self, forward_batch: Any) -> bool:
        return self._runner(forward_batch).can_run_graph(forward_batch)

    def execute(self, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        return self._runner(forward_batch).execute(forward_batch, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # only reached for names this class lacks; copy and pickle look dunders up before
        # __init__ ran, which must not recurse
        if name.startswith("__") or "verify" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.verify, name)


def capture_plain_decode_graphs(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """After `ModelRunner.init_cuda_graphs` (and `init_decode_cuda_graph`, its recapture): under
    NGRAM, capture decode graphs beside SGLang's verify graphs for MiniCPM-SALA."""
    captured = runner.decode_cuda_graph_runner
    if (captured is None or not runner.spec_algorithm.is_ngram()
            or not serves_sala(runner)):
        return result
    from sglang.srt.layers.attention.hybrid_linear_attn_backend import HybridLinearAttnBackend
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sala_sglang.attention.lightning_backend import LightningBackend

    verify = captured.verify if isinstance(captured, GraphRunnersByMode) else captured
    hybrid = runner.attn_backend
    backend = HybridLinearAttnBackend(hybrid.full_attn_backend,
                                      LightningBackend(runner, verify=False),
                                      hybrid.full_attn_layers)
    spec = runner.spec_algorithm
    # the runner captures decode (one token per request) only while the model runner reads as
    # speculating with nothing
    runner.spec_algorithm = SpeculativeAlgorithm.NONE
    try:
        plain = DecodeCudaGraphRunner(runner, attn_backend=backend)
    finally:
        runner.spec_algorithm = spec
    runner.decode_cuda_graph_runner = GraphRunnersByMode(verify, plain)
    logger.info("MiniCPM-SALA: decode graphs captured beside the NGRAM verify graphs, for steps "
                "with nothing drafted")
    return result
