"""Prefix caching on a GPU: the tiny checkpoint served with SGLang's radix cache (on by default)
agrees with the reference on the whole sequence at every hit, and gives the same greedy tokens as
a server with --disable-radix-cache (SPEC section 4: they may part only where the reference's
top-1/top-2 margin is below 0.1).

Every hit is confirmed by `cached_tokens` and predicted exactly from how SGLang 0.5.16 places the
linear state's snapshots (benchmarks/prefix_cache_study.md): after every prefill chunk, the last
chunk floored to 64 tokens; every --mamba-track-interval (256) decoded tokens; at a branch point
the radix tree plants for the next request. A match ends at the deepest snapshot within the
shared, page-aligned prefix, and never past the request's `logprob_start_len`, so each request
here sets that to where its prefix stops being shared (0 would disable the match).
"""

from __future__ import annotations

import contextlib
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import server_mode_params

pytestmark = [pytest.mark.gpu, pytest.mark.serving, pytest.mark.prefix_cache]

CHUNK = 256  # --chunked-prefill-size: several snapshots per prompt
STEP = 64  # SGLang's mamba_cache_chunk_size: prefill snapshots at multiples of it
INTERVAL = 256  # --mamba-track-interval's default: decode snapshots
NEW_TOKENS = 12
COMMON = ["--chunked-prefill-size", str(CHUNK), "--max-running-requests", "8",
          "--dtype", "float16"]
SERVER_MODES = {
    "graph": COMMON,
    "eager": [*COMMON, "--disable-cuda-graph"],
    "graph_dense_as_sparse": [*COMMON, "--dense-as-sparse"],
}
MODE_MARKS = {
    "graph": [pytest.mark.cuda_graph],
    "eager": [pytest.mark.eager],
    "graph_dense_as_sparse": [pytest.mark.cuda_graph, pytest.mark.dense_as_sparse],
}
# A pool that holds a few of the prompts below and evicts the rest.
SMALL_POOL = [*COMMON, "--max-mamba-cache-size", "20", "--max-total-tokens", "4096",
              "--max-running-requests", "2"]


@pytest.fixture(scope="module", params=server_mode_params(SERVER_MODES, MODE_MARKS))
def server(request, tiny_dir: Path, server_logs: Path):
    from sala_sglang.testing.server import started

    log = server_logs / f"server_{request.param}.log"
    with started(tiny_dir, log, *SERVER_MODES[request.param], mode=request.param) as srv:
        yield srv


@pytest.fixture(scope="module")
def baselines(tiny_dir: Path, server_logs: Path):
    """The same flags with --disable-radix-cache, started when first asked for, by
    --dense-as-sparse."""
    from sala_sglang.testing.server import started

    servers: dict[bool, object] = {}
    with contextlib.ExitStack() as stack:

        def get(dense_as_sparse: bool):
            if dense_as_sparse not in servers:
                flags = [*COMMON, "--disable-radix-cache"]
                flags += ["--dense-as-sparse"] if dense_as_sparse else []
                name = f"no_cache_{dense_as_sparse}"
                servers[dense_as_sparse] = stack.enter_context(
                    started(tiny_dir, server_logs / f"server_{name}.log", *flags, mode=name))
            return servers[dense_as_sparse]

        yield get


def _dense_as_sparse(server) -> bool:
    return server.mode.endswith("dense_as_sparse")


@pytest.fixture
def reference(server, references: dict):
    return references[_dense_as_sparse(server)]


@pytest.fixture
def baseline(server, baselines):
    return baselines(_dense_as_sparse(server))


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [1] + _tokens(rng, length - 1, vocab)


def _tokens(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(5, vocab) for _ in range(length)]


def _prefill_snapshot(length: int, prefix: int = 0) -> int:
    """Where the last snapshot of a prompt of `length` tokens prefilled alone from `prefix` lies:
    each chunk ends in one, the last chunk's floored to STEP (none if it is shorter)."""
    start = prefix
    while length - start > CHUNK:
        start += CHUNK
    return start + (length - start) // STEP * STEP


def _ask(server, prompt: list[int], shared: int, new_tokens: int = NEW_TOKENS) -> dict:
    """Greedy generation scoring the prompt from `shared` on, which lets the match reach it."""
    return server.generate(prompt, new_tokens, logprob_start_len=shared)


def _agrees(server, reference, baseline, prompt: list[int], result: dict, shared: int,
            **label) -> int:
    """Check a served answer against the reference and the no-cache server; its cached
    tokens."""
    from sala_sglang.testing.compare import check_served, first_confident_divergence

    cached = result["meta_info"]["cached_tokens"]
    check_served(reference, prompt, result, mode=server.mode, cached_tokens=cached, **label)
    new_tokens = len(result["output_ids"])
    plain = baseline.generate(prompt, new_tokens, logprob_start_len=shared)
    assert plain["meta_info"]["cached_tokens"] == 0
    at = first_confident_divergence(reference, prompt, result["output_ids"], plain["output_ids"])
    assert at is None, f"served with and without the cache, confident token {at} differs"
    return cached


def test_the_same_prompt_twice(server, reference, baseline) -> None:
    server.flush_cache()
    vocab = reference.config.vocab_size
    prompt = _prompt(random.Random(1), 700, vocab)
    first = _ask(server, prompt, 0)
    assert _agrees(server, reference, baseline, prompt, first, 0) == 0
    hit = _prefill_snapshot(700)  # 640: chunks end at 256 and 512, the last 188 floor to 128
    second = _ask(server, prompt, len(prompt) - 1)
    assert _agrees(server, reference, baseline, prompt, second, len(prompt) - 1) == hit


@pytest.mark.parametrize("diverge", [450, 464], ids=["mid_page", "after_page_boundary"])
def test_suffixes_diverging_from_a_cached_prompt(server, reference, baseline,
                                                 diverge: int) -> None:
    # B shares A's first `diverge` tokens: it hits A's chunk-end snapshot at 256 and plants one at
    # the branch point 448 (the shared pages floored to 64); C, sharing as much, hits that.
    server.flush_cache()
    rng = random.Random(diverge)
    vocab = reference.config.vocab_size
    a = _prompt(rng, 700, vocab)
    _agrees(server, reference, baseline, a, _ask(server, a, 0), 0)
    expected = {"b": 256, "c": diverge // 16 * 16 // STEP * STEP}
    for name in ("b", "c"):
        prompt = a[:diverge] + _tokens(rng, 150, vocab)
        cached = _agrees(server, reference, baseline, prompt, _ask(server, prompt, diverge),
                         diverge, request=name)
        assert cached == expected[name], (name, cached, expected)


def test_a_prefix_inserted_by_a_request_still_decoding(server, reference, baseline) -> None:
    server.flush_cache()
    rng = random.Random(3)
    vocab = reference.config.vocab_size
    donor = _prompt(rng, 700, vocab)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_ask, server, donor, 0, 1500)
        # until its prefill is over (the running batch holds decoding requests only): a fixed
        # sleep was too short where the prefill compiled kernels first (a fresh eager server,
        # whose match then found the donor's chunks only)
        server.wait_for_load("decoding the donor", lambda row: row["num_running_reqs"] >= 1,
                             timeout=60)
        prompt = donor + _tokens(rng, 60, vocab)
        result = _ask(server, prompt, len(donor))
        assert not running.done(), "the donor finished first: its decode was too short"
        cached = _agrees(server, reference, baseline, prompt, result, len(donor))
        assert cached == _prefill_snapshot(700)
        _agrees(server, reference, baseline, donor, running.result(), 0, request="donor")


def test_multi_turn_chat_hits_a_decode_snapshot(server, reference, baseline) -> None:
    # Turn 1: 300 prompt + 300 answer tokens; decode snapshots every 256 tokens of the sequence,
    # so turn 2 (turn 1's prompt and answer, then a question) hits 512, past turn 1's prompt.
    server.flush_cache()
    rng = random.Random(4)
    vocab = reference.config.vocab_size
    turn1 = _prompt(rng, 300, vocab)
    answer = _ask(server, turn1, 0, new_tokens=300)
    _agrees(server, reference, baseline, turn1, answer, 0, turn=1)
    turn2 = turn1 + answer["output_ids"] + _tokens(rng, 60, vocab)
    shared = len(turn1) + len(answer["output_ids"])
    cached = _agrees(server, reference, baseline, turn2, _ask(server, turn2, shared), shared,
                     turn=2)
    assert cached == shared // INTERVAL * INTERVAL == 512


def test_dense_and_sparse_prompts_share_only_under_dense_as_sparse(server, reference,
                                                                   baseline) -> None:
    # A (200 tokens) is below dense_len 256, B (A and 200 more) above: their shared tokens were
    # computed differently unless every prompt is sparse
    server.flush_cache()
    rng = random.Random(5)
    vocab = reference.config.vocab_size
    a = _prompt(rng, 200, vocab)
    _agrees(server, reference, baseline, a, _ask(server, a, 0), 0, request="dense")
    b = a + _tokens(rng, 200, vocab)
    cached = _agrees(server, reference, baseline, b, _ask(server, b, len(a)), len(a),
                     request="sparse")
    assert cached == (_prefill_snapshot(200) if _dense_as_sparse(server) else 0)


def test_flush_cache_forgets_every_prefix(server, reference, baseline) -> None:
    server.flush_cache()
    prompt = _prompt(random.Random(6), 500, reference.config.vocab_size)
    _ask(server, prompt, 0)
    assert _ask(server, prompt, len(prompt) - 1)["meta_info"]["cached_tokens"] > 0
    server.flush_cache()
    after = _ask(server, prompt, len(prompt) - 1)
    assert _agrees(server, reference, baseline, prompt, after, len(prompt) - 1) == 0


def test_concurrent_requests_share_one_prefix(server, reference, baseline) -> None:
    server.flush_cache()
    rng = random.Random(7)
    vocab = reference.config.vocab_size
    donor = _prompt(rng, 600, vocab)
    _ask(server, donor, 0)
    shared = 590
    prompts = [donor[:shared] + _tokens(rng, 50, vocab) for _ in range(6)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: _ask(server, p, shared), prompts))
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        cached = _agrees(server, reference, baseline, prompt, result, shared, request=i)
        assert cached == _prefill_snapshot(600), i  # 576


def test_pools_are_free_after_requests(server) -> None:
    # SGLang's strict idle check counts every state slot and KV page as free, cached or
    # protected, and stops the server on a leak.
    server.assert_pools_free()


@pytest.mark.cuda_graph
def test_eviction_under_a_small_pool(tiny_dir: Path, server_logs: Path, references: dict,
                                     baselines) -> None:
    from sala_sglang.testing.server import started

    reference, baseline = references[False], baselines(False)
    log = server_logs / "server_small_pool.log"
    with started(tiny_dir, log, *SMALL_POOL, mode="small_pool") as srv:
        rng = random.Random(8)
        prompts = [_prompt(rng, 600, reference.config.vocab_size) for _ in range(10)]
        for prompt in prompts:
            _ask(srv, prompt, 0)
        # the first prompt's pages and states were evicted for later ones; the last one's stayed
        again = {i: _ask(srv, prompts[i], len(prompts[i]) - 1) for i in (0, 9)}
        for i, result in again.items():
            _agrees(srv, reference, baseline, prompts[i], result, len(prompts[i]) - 1,
                    request=i)
        assert again[9]["meta_info"]["cached_tokens"] == _prefill_snapshot(600)
        assert again[0]["meta_info"]["cached_tokens"] < again[9]["meta_info"]["cached_tokens"]
        srv.assert_pools_free()
