"""The NGRAM corpus's view of each request (sala_sglang.ngram_context): context tails sliced from
the prompt's end equal the whole context's last tokens, the worker's query and update use them,
and drafts are verified as chains."""

from __future__ import annotations

import itertools
from array import array
from types import SimpleNamespace

import numpy as np
import torch

from sala_sglang.config import MiniCPMSALAConfig
from sala_sglang.ngram_context import (
    chain_masks,
    context_tail,
    draft_chains_from_context_tails,
    grow_corpus_from_context_tails,
)


def test_a_tail_is_the_last_tokens_of_the_whole_context_for_every_length_mix() -> None:
    n = 5
    for p, o, a in itertools.product(range(8), range(8), range(4)):
        prompt, output, accepted = list(range(p)), list(range(100, 100 + o)), [7] * a
        expected = (prompt + output + accepted)[-n:]
        assert context_tail(prompt, output, accepted, n) == expected
        # SGLang 0.5.16 keeps output ids (and may keep prompt ids) in array.array
        assert context_tail(array("q", prompt), array("q", output), accepted, n) == expected


def test_corpus_drafts_are_verified_as_one_chain_per_request() -> None:
    # the corpus pads a 2-token match of a 4-token draft with tokens hung off the root (row 3
    # sees tokens 0 and 3 only); every row j of the chain sees tokens 0..j
    tree = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=np.uint8)
    mask = chain_masks(np.tile(tree.ravel(), 2), 4)
    assert mask.dtype == tree.dtype and mask.shape == (32,)
    assert mask.flags.writeable  # SGLang copies it into a tensor with torch.from_numpy
    assert (mask.reshape(2, 4, 4) == np.tril(np.ones((4, 4), dtype=np.uint8))).all()


class _Corpus:
    def __init__(self) -> None:
        self.asked, self.put, self.synced = [], [], 0

    def synchronize(self) -> None:
        self.synced += 1

    def batch_get(self, rids, tails, totals):
        self.asked.append((rids, tails, totals))
        n = len(rids) * 3
        return np.arange(n), np.tile(np.eye(3, dtype=np.uint8).ravel(), len(rids))

    def batch_put(self, tails) -> None:
        self.put.append(tails)


def _worker(config=None, overlap=True):
    runner = SimpleNamespace(model_config=SimpleNamespace(hf_config=config or MiniCPMSALAConfig()))
    return SimpleNamespace(model_runner=runner, max_trie_depth=4, draft_token_num=3,
                           enable_overlap=overlap, ngram_corpus=_Corpus())


def _batch():
    reqs = [SimpleNamespace(rid="a", origin_input_ids=list(range(10)), output_ids=array("q", [50])),
            SimpleNamespace(rid="b", origin_input_ids=[1, 2], output_ids=array("q"))]
    # the previous step accepted 2 tokens for a, 1 for b (stride 3)
    spec = SimpleNamespace(accept_tokens=torch.tensor([60, 61, 0, 70, 0, 0]),
                           accept_lens=torch.tensor([2, 1]))
    return SimpleNamespace(reqs=reqs, spec_info=spec, has_grammar=False)


def test_the_worker_asks_and_grows_the_corpus_with_tails_and_gets_chains() -> None:
    worker, batch = _worker(), _batch()
    drafts, mask = draft_chains_from_context_tails(None, worker, batch)
    (rids, tails, totals), = worker.ngram_corpus.asked
    assert rids == ["a", "b"] and worker.ngram_corpus.synced == 1
    # under overlap the previous step's accepted tokens follow the output ids
    assert tails == [[9, 50, 60, 61], [1, 2, 70]] and totals == [13, 3]
    assert drafts.tolist() == list(range(6))
    assert (mask.reshape(2, 3, 3) == np.tril(np.ones((3, 3)))).all()
    grow_corpus_from_context_tails(None, worker, batch)
    assert worker.ngram_corpus.put == [tails]

    # without overlap the output ids are complete already
    worker = _worker(overlap=False)
    draft_chains_from_context_tails(None, worker, batch)
    assert worker.ngram_corpus.asked[0][1:] == ([[7, 8, 9, 50], [1, 2]], [11, 2])


def test_other_models_keep_sglang_s_methods() -> None:
    worker = _worker(config=object())
    assert draft_chains_from_context_tails(lambda w, b: "sglang", worker, _batch()) == "sglang"
    assert grow_corpus_from_context_tails(lambda w, b: "sglang", worker, _batch()) == "sglang"
    assert not worker.ngram_corpus.asked and not worker.ngram_corpus.put


def test_a_staged_host_copy_of_the_accepted_tokens_is_read_once() -> None:
    from sala_sglang.ngram_context import stage_accepted_on_host

    worker, batch = _worker(), _batch()
    stage_accepted_on_host(worker, batch.spec_info)
    # what the query reads is the copy made when staged, not the tensors as they are later
    batch.spec_info.accept_tokens[:] = -1
    draft_chains_from_context_tails(None, worker, batch)
    assert worker.prev_token_ids == [60, 61, 0, 70, 0, 0]
    assert "_sala_accepted_on_host" not in vars(worker)
    draft_chains_from_context_tails(None, worker, batch)
    assert worker.prev_token_ids == [-1] * 6
