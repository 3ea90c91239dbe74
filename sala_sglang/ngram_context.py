"""The NGRAM corpus's view of each request: the tail of its context, sliced, not copied whole.

SGLang's NGRAM worker asks its n-gram corpus with, and adds to it, the last
`--speculative-ngram-max-trie-depth` tokens of each request's context, at every decode step
(`_prepare_draft_tokens`, `_update_ngram_corpus`). It builds them from `list(req.origin_input_ids)`,
a copy of the whole prompt: 0.23 ms at 128K tokens (1.8 ms at 1M) twice a step, on the host,
between the wait for the previous step and the next launch, where it is GPU idle time. Here the
same tails are sliced from the prompt's end. For MiniCPM-SALA the drafts are then verified as
chains (`chain_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sala_sglang.config import MiniCPMSALAConfig


def context_tail(prompt: Sequence[int], output: Sequence[int], accepted: list[int],
                 n: int) -> list[int]:
    """The last n tokens of prompt + output + accepted (tokens accepted but not yet in the
    request's output ids), copying at most n of the prompt's. SGLang keeps a request's ids in
    lists or `array.array`s."""
    tail = list(output[-n:]) + accepted
    if len(tail) >= n:
        return tail[-n:]
    return list(prompt[-(n - len(tail)):]) + tail


def chain_masks(mask: np.ndarray, draft_len: int) -> np.ndarray:
    """Each request's drafts as one chain (token j sees tokens 0..j), whatever tree the n-gram
    corpus built: it pads a short match with tokens hung off the root, which would fork the
    lightning state."""
    chain = np.tril(np.ones((draft_len, draft_len), dtype=mask.dtype)).ravel()
    return np.tile(chain, mask.size // chain.size).reshape(mask.shape)


def serves_sala(model_runner: Any) -> bool:
    """Whether a model runner (a speculative worker's `model_runner`) serves MiniCPM-SALA."""
    return isinstance(model_runner.model_config.hf_config, MiniCPMSALAConfig)


def _accepted_pending(worker: Any, batch: Any) -> bool:
    """Whether the previous step's accepted tokens are missing from `req.output_ids`: under the
    overlap scheduler its results are processed one step behind (grammar batches excepted)."""
    return worker.enable_overlap and not batch.has_grammar


def _tails(worker: Any, batch: Any) -> list[list[int]]:
    """Each request's context tail as the worker's corpus sees it; accepted tokens not yet in
    `req.output_ids` come from the worker's host copy of the previous step's result."""
    n, stride = worker.max_trie_depth, worker.draft_token_num
    pending = _accepted_pending(worker, batch)
    tails = []
    for i, req in enumerate(batch.reqs):
        accepted = (worker.prev_token_ids[i * stride: i * stride + worker.prev_accept_lens[i]]
                    if pending else [])
        tails.append(context_tail(req.origin_input_ids, req.output_ids, accepted, n))
    return tails


def draft_chains_from_context_tails(original: Any, worker: Any, batch: Any, *args: Any,
                                    **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Around `NGRAMWorker._prepare_draft_tokens(batch)`: for MiniCPM-SALA, the corpus is asked
    with sliced context tails, and the drafts come back as chains."""
    if not serves_sala(worker.model_runner):
        return original(worker, batch, *args, **kwargs)
    staged = worker.__dict__.pop("_sala_accepted_on_host", None)
    if staged is None:
        tokens, lens = batch.spec_info.accept_tokens.cpu(), batch.spec_info.accept_lens.cpu()
    else:
        tokens, lens, copied = staged
        copied.synchronize()
    # the worker keeps the host copy for `_update_ngram_corpus` after the step
    worker.prev_token_ids = tokens.tolist()
    worker.prev_accept_lens = lens.tolist()
    worker.ngram_corpus.synchronize()
    tails = _tails(worker, batch)
    pending = _accepted_pending(worker, batch)
    totals = [len(req.origin_input_ids) + len(req.output_ids)
              + (worker.prev_accept_lens[i] if pending else 0)
              for i, req in enumerate(batch.reqs)]
    drafts, mask = worker.ngram_corpus.batch_get([req.rid for req in batch.reqs], tails, totals)
    width = worker.draft_token_num
    if len(drafts) != len(batch.reqs) * width:
        raise RuntimeError(f"NGRAM corpus returned {len(drafts)} draft tokens for "
                           f"{len(batch.reqs)} requests of {width}")
    return drafts, chain_masks(mask, width)


def stage_accepted_on_host(worker: Any, spec_info: Any) -> None:
    """Start copying the previous step's accepted tokens to the host now, ahead of whatever is
    launched next on this stream, for the next `_prepare_draft_tokens` to read: a copy asked for
    after a launch would wait for that step too."""
    import torch

    def pinned(src: torch.Tensor) -> torch.Tensor:
        dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
        return dst.copy_(src, non_blocking=True)

    tokens, lens = pinned(spec_info.accept_tokens), pinned(spec_info.accept_lens)
    copied = torch.cuda.Event() if spec_info.accept_tokens.is_cuda else _Done()
    copied.record()
    worker._sala_accepted_on_host = (tokens, lens, copied)


class _Done:
    """An event for copies that finished when they returned (tensors on the CPU)."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def grow_corpus_from_context_tails(original: Any, worker: Any, batch: Any, *args: Any,
                                   **kwargs: Any) -> None:
    """Around `NGRAMWorker._update_ngram_corpus(batch)`: the same sliced tails go in."""
    if not serves_sala(worker.model_runner):
        return original(worker, batch, *args, **kwargs)
    worker.ngram_corpus.batch_put(_tails(worker, batch))
    return None
