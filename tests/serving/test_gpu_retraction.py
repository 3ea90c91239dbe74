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
    from sala_sglang.testing.compare import (
        check_first_output_token,
        check_served,
        mark_lost_first_output_logprob,
    )

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
    lost = 0
    for prompt, result in zip(prompts, results):
        # SGLang 0.5.16 sometimes loses a retracted request's first output logprob (the ids
        # are all there): that token is checked against the reference's confident choice, and
        # every logprob the server did report against the reference
        marked = mark_lost_first_output_logprob(result)
        if marked is not None:
            lost += 1
            check_first_output_token(reference, prompt, result["output_ids"][0])
        check_served(reference, prompt, marked or result, mode=server.mode,
                     cached_tokens=result["meta_info"]["cached_tokens"],
                     first_output_logprob_lost=marked is not None)
    assert lost < len(prompts)  # seen for one request of eight at most; all would be a new bug
    # a forced step retracts one request while more than one runs ("#retracted_reqs: 0" once
    # a single one is left)
    retracted = [int(n) for n in re.findall(r"Testing retraction\. #retracted_reqs: (\d+)",
                                            server.tail(10**8))]
    print(f"{server.mode}: {len(retracted)} forced retraction steps, "
          f"{sum(retracted)} requests retracted, {lost} first output logprobs lost")
    assert sum(retracted) > 0


def test_pools_are_free_after_retractions(server) -> None:
    server.assert_pools_free()
