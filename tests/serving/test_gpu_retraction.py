"""Forced decode retraction on a GPU: with SGLANG_TEST_RETRACT=1, SGLang retracts a running
request every SGLANG_TEST_RETRACT_INTERVAL (3) forward steps, as it does when the KV pool runs
out: the request gives back its KV pages (with their compressed keys) and its state slots, waits,
and is prefilled again from its prompt and the tokens generated so far. Every output must still
agree with the reference (SPEC section 4), the log must show the retractions, and the pools must
come back to their free size; with the prefix cache (where a re-prefill may continue from a
cached snapshot) and without it.
"""

from __future__ import annotations

import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.serving, pytest.mark.retraction]

COMMON = ["--chunked-prefill-size", "64", "--max-running-requests", "8", "--dtype", "float16"]
SERVER_MODES = {"cache": COMMON, "no_cache": [*COMMON, "--disable-radix-cache"]}
LENGTHS = [40, 130, 250, 300, 520, 700, 64, 1000]  # dense and sparse classes
NEW_TOKENS = 40


@pytest.fixture(scope="module", params=sorted(SERVER_MODES))
def server(request, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from sala_sglang.testing.server import started

    log = tmp_path_factory.mktemp("logs") / f"server_retract_{request.param}.log"
    with started(tiny_dir, log, *SERVER_MODES[request.param], mode=f"retract_{request.param}",
                 env={"SGLANG_TEST_RETRACT": "1"}) as srv:
        yield srv


def test_retracted_requests_match_the_reference(server, references: dict) -> None:
    from sala_sglang.testing.compare import check_served

    reference = references[False]
    rng = random.Random(12)
    vocab = reference.config.vocab_size
    prompts = [[1] + [rng.randrange(5, vocab) for _ in range(n - 1)] for n in LENGTHS]
    # half the requests score only their last prompt token, which lets a re-prefill match its
    # own cached prompt
    starts = [0 if i % 2 else len(p) - 1 for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(
            lambda ps: server.generate(ps[0], NEW_TOKENS, logprob_start_len=ps[1]),
            zip(prompts, starts)))
    for prompt, result in zip(prompts, results):
        check_served(reference, prompt, result, mode=server.mode,
                     cached_tokens=result["meta_info"]["cached_tokens"])
    # a forced step retracts one request while more than one runs ("#retracted_reqs: 0" once
    # a single one is left)
    retracted = [int(n) for n in re.findall(r"Testing retraction\. #retracted_reqs: (\d+)",
                                            server.tail(10**8))]
    print(f"{server.mode}: {len(retracted)} forced retraction steps, "
          f"{sum(retracted)} requests retracted")
    assert sum(retracted) > 0


def test_pools_are_free_after_retractions(server) -> None:
    server.assert_pools_free()
