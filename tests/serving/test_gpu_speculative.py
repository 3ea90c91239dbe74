"""Speculative decoding on a GPU: the tiny checkpoint served with NGRAM chains agrees with the
reference on the whole sequence (SPEC section 4) and gives the tokens a server without
speculation gives at every position whose reference top-1/top-2 margin is at least 0.1; prompts
across dense_len, prefilled in several chunks, alone and concurrently, with acceptance that is
full, partial and none; the pools are back to their free size afterwards.

Acceptance is read from SGLang's `meta_info` (`spec_verify_ct`, `spec_accept_length`: tokens per
verify, the bonus token included). A prompt that repeats one short span many times makes the
random model's greedy output repeat a span of the prompt too (it copies through the n-gram
statistics of its own context only by chance, so the test asserts acceptance on the aggregate,
and reports each request's).
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import server_mode_params

pytestmark = [pytest.mark.gpu, pytest.mark.serving, pytest.mark.speculative]

DRAFT = 4  # --speculative-num-draft-tokens: the last token and 3 drafts
NEW_TOKENS = 48
COMMON = ["--chunked-prefill-size", "256", "--max-running-requests", "4", "--dtype", "float16"]
SPEC = ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(DRAFT)]
SERVER_MODES = {
    "graph": [*COMMON, *SPEC],
    "eager": [*COMMON, *SPEC, "--disable-cuda-graph"],
    "graph_no_cache": [*COMMON, *SPEC, "--disable-radix-cache"],
}
MODE_MARKS = {
    "graph": [pytest.mark.cuda_graph, pytest.mark.prefix_cache],
    "eager": [pytest.mark.eager, pytest.mark.prefix_cache],
    "graph_no_cache": [pytest.mark.cuda_graph],
}
# below dense_len (256), across it inside one chunk, and several chunks long
PROMPT_LENGTHS = [100, 300, 700]


@pytest.fixture(scope="module", params=server_mode_params(SERVER_MODES, MODE_MARKS))
def server(request, tiny_dir: Path, server_logs: Path):
    from sala_sglang.testing.server import started

    log = server_logs / f"server_{request.param}.log"
    with started(tiny_dir, log, *SERVER_MODES[request.param], mode=request.param) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain(tiny_dir: Path, server_logs: Path):
    """The same server without speculation."""
    from sala_sglang.testing.server import started

    with started(tiny_dir, server_logs / "server_plain.log", *COMMON, mode="plain") as srv:
        yield srv


@pytest.fixture
def reference(references: dict):
    return references[False]


def _random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [1] + [rng.randrange(5, vocab) for _ in range(length - 1)]


def _repeating_prompt(rng: random.Random, length: int, vocab: int, span: int = 6) -> list[int]:
    pattern = [rng.randrange(5, vocab) for _ in range(span)]
    return [1] + (pattern * (length // span + 1))[: length - 1]


def _agrees(server, plain, reference, prompt: list[int], result: dict, **label) -> dict:
    """The served answer against the reference and the server without speculation; the
    request's acceptance."""
    from sala_sglang.testing.compare import check_served, first_confident_divergence

    check_served(reference, prompt, result, mode=server.mode, **label)
    ours = result["output_ids"]
    theirs = plain.generate(prompt, len(ours))["output_ids"]
    at = first_confident_divergence(reference, prompt, ours, theirs)
    assert at is None, f"with and without NGRAM, confident token {at} differs ({label})"
    meta = result["meta_info"]
    accepted = {"verifies": meta.get("spec_verify_ct", 0),
                "accept_length": meta.get("spec_accept_length", 1.0)}
    print(json.dumps({"mode": server.mode, **label, **accepted}))
    return accepted


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
@pytest.mark.parametrize("kind", ["random", "repeating"])
def test_one_request(server, plain, reference, length: int, kind: str) -> None:
    rng = random.Random(length)
    vocab = reference.config.vocab_size
    make = _random_prompt if kind == "random" else _repeating_prompt
    prompt = make(rng, length, vocab)
    result = server.generate(prompt, NEW_TOKENS)
    accepted = _agrees(server, plain, reference, prompt, result, prompt_len=length, kind=kind)
    assert accepted["verifies"] > 0, "no verify ran: speculation was off"
    assert accepted["verifies"] <= NEW_TOKENS


def test_concurrent_requests_with_full_partial_and_no_acceptance(server, plain,
                                                                  reference) -> None:
    """Eight requests, four at a time (random and repeating prompts side by side in one verify
    batch); across them some verifies accept every draft and some none."""
    rng = random.Random(7)
    vocab = reference.config.vocab_size
    prompts = [(_repeating_prompt if i % 2 else _random_prompt)(rng, 150 + 80 * i, vocab)
               for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: server.generate(p, NEW_TOKENS), prompts))
    lengths = []
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        accepted = _agrees(server, plain, reference, prompt, result, request=i)
        lengths.append(accepted["accept_length"])
    # mean tokens per verify: 1 when no draft is ever accepted, DRAFT when all are
    assert min(lengths) < DRAFT, lengths
    assert max(lengths) > 1.0, f"no draft was ever accepted: {lengths}"


def test_steps_with_nothing_drafted_ran_as_plain_decode_steps(server) -> None:
    """Random prompts leave some steps with no n-gram match in any request of the batch: those
    ran as plain decode steps (sala_sglang.plain_decode_steps, logged once), some of them
    launched before their corpus query (a streak), under CUDA graphs on the decode graphs
    captured beside the verify graphs; the tests above checked their tokens."""
    log = server.log_path.read_text(errors="replace")
    assert "ran as a plain decode step" in log
    assert "ran before its corpus query" in log
    captured = "decode graphs captured beside the NGRAM verify graphs" in log
    assert captured == (server.mode != "eager"), server.mode


def test_pools_are_free_afterwards(server) -> None:
    server.flush_cache()
    server.assert_pools_free()
