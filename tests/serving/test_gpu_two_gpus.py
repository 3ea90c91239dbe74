"""Two GPUs (issue 19): the tiny checkpoint served across two GPUs agrees with the reference
model, teacher-forced as in test_gpu_serving.py (SPEC section 4), and leaves its pools free.

`--tp-size 2`: each GPU holds half of every layer's heads (the tiny model's 8 query, 2 kv and 4
lightning heads: one kv head and its whole query group per GPU), with CUDA graphs, without them
(with mixed prefill+decode batches and no prefix cache, as test_gpu_serving's eager mode) and
with --dense-as-sparse. `--dp-size 2`: two replicas, one per GPU, behind SGLang's own round
robin; every replica's load counters must come back to zero (Server.assert_pools_free reads the
first replica's only). Every server keeps NVLink multicast off (NVLINK_MULTICAST_OFF).
"""

from __future__ import annotations

import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from conftest import server_mode_params
from test_gpu_serving import (
    CHUNK,
    CONCURRENT,
    CONCURRENT_LONG,
    NEW_TOKENS,
    SHORT_AND_LONG,
    _check,
    _concurrent,
    _prompt,
)

from benchmarks.two_gpus import NVLINK_MULTICAST_OFF

pytestmark = [
    pytest.mark.gpu, pytest.mark.serving, pytest.mark.two_gpus,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

COMMON = ["--chunked-prefill-size", str(CHUNK), "--max-running-requests", "8",
          "--dtype", "float16"]
TP2 = ["--tp-size", "2"]
SERVER_MODES = {
    "tp2_graph": [*COMMON, *TP2],
    "tp2_eager": [*COMMON, *TP2, "--disable-cuda-graph", "--enable-mixed-chunk",
                  "--disable-radix-cache"],
    "tp2_graph_dense_as_sparse": [*COMMON, *TP2, "--dense-as-sparse"],
    "dp2_graph": [*COMMON, "--dp-size", "2"],
}
# Markers select server modes (scripts/gpu_checks.sh runs them in two halves side by side).
MODE_MARKS = {
    "tp2_graph": [pytest.mark.fp16, pytest.mark.cuda_graph],
    "tp2_eager": [pytest.mark.fp16, pytest.mark.eager],
    "tp2_graph_dense_as_sparse": [pytest.mark.fp16, pytest.mark.cuda_graph,
                                  pytest.mark.dense_as_sparse],
    "dp2_graph": [pytest.mark.fp16, pytest.mark.cuda_graph],
}


def _size(mode: str, flag: str) -> int:
    """The mode's --tp-size or --dp-size (1 where it does not set it)."""
    flags = SERVER_MODES[mode]
    return int(flags[flags.index(flag) + 1]) if flag in flags else 1


@pytest.fixture(scope="module", params=server_mode_params(SERVER_MODES, MODE_MARKS))
def server(request, tiny_dir: Path, server_logs: Path):
    from sala_sglang.testing.server import started

    log = server_logs / f"server_{request.param}.log"
    with started(tiny_dir, log, *SERVER_MODES[request.param], mode=request.param,
                 env=NVLINK_MULTICAST_OFF) as srv:
        yield srv


@pytest.fixture
def reference(server, references: dict):
    return references[server.mode.endswith("dense_as_sparse")]


def _prefix(mode: str, replica: int, rank: int) -> str:
    """SGLang's log prefix of one scheduler: " DP<replica>" at --dp-size > 1, then " TP<rank>"
    at --tp-size > 1."""
    return ((f" DP{replica}" if _size(mode, "--dp-size") > 1 else "")
            + (f" TP{rank}" if _size(mode, "--tp-size") > 1 else ""))


def test_the_server_runs_on_two_gpus(server) -> None:
    """SGLang took the mode's parallel sizes, and every scheduler (one per GPU) loaded its
    weights."""
    from sala_sglang.bench import server_state

    tp, dp = _size(server.mode, "--tp-size"), _size(server.mode, "--dp-size")
    assert server_state(server.url, "tp_size", "dp_size") == {"tp_size": tp, "dp_size": dp}
    log = server.tail(10**8)
    for replica in range(dp):
        for rank in range(tp):
            prefix = _prefix(server.mode, replica, rank)
            assert re.search(rf"{prefix}\] Load weight end", log), (prefix, server.tail())


@pytest.mark.parametrize("length", SHORT_AND_LONG)
def test_single_request_matches_reference(server, reference, length: int) -> None:
    prompt = _prompt(random.Random(length), length, reference.config.vocab_size)
    _check(server, reference, prompt, server.generate(prompt, NEW_TOKENS))


def test_concurrent_requests_of_different_lengths_match_reference(server, reference) -> None:
    _concurrent(server, reference, CONCURRENT, seed=7)


def test_concurrent_long_sparse_requests_match_reference(server, reference) -> None:
    _concurrent(server, reference, CONCURRENT_LONG, seed=11)


def test_every_replica_serves_requests(server, reference) -> None:
    """Two requests per replica at once: SGLang's round robin alternates them, so every replica
    prefills (its first rank logs the batch), and each answer matches the reference."""
    dp = _size(server.mode, "--dp-size")
    rng = random.Random(13)
    prompts = [_prompt(rng, n, reference.config.vocab_size) for n in [70, 300] * dp]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: server.generate(p, NEW_TOKENS), prompts))
    for prompt, result in zip(prompts, results):
        _check(server, reference, prompt, result)
    log = server.tail(10**8)
    for replica in range(dp):
        prefix = _prefix(server.mode, replica, 0)
        assert re.search(rf"{prefix}\] Prefill batch", log), (prefix, server.tail())


def _loads(server) -> list[dict]:
    """/v1/loads: one row per data-parallel replica."""
    r = requests.get(server.url + "/v1/loads", timeout=30)
    r.raise_for_status()
    return r.json()["loads"]


def test_pools_are_free_after_requests(server) -> None:
    # SGLang's idle check (strict mode, plus ours for the state slots) stops a scheduler on a
    # leak, and the server with it; the first replica's counters are back at zero.
    server.assert_pools_free()
    dp = _size(server.mode, "--dp-size")
    deadline = time.time() + 20  # the snapshots are published periodically
    while True:
        rows = _loads(server)
        busy = [r for r in rows if (r["num_used_tokens"], r["num_running_reqs"],
                                    r["num_waiting_reqs"]) != (0, 0, 0)]
        if sorted(r["dp_rank"] for r in rows) == list(range(dp)) and not busy:
            break
        assert time.time() < deadline, rows
        time.sleep(1)
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
