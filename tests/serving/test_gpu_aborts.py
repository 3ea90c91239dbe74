"""Aborts at every stage of a request (issue 20): the client disconnects while its request waits
in the queue, between the chunks of its prefill, or while it decodes; POST /abort_request ends a
request by rid, or every request. After each, the server serves the next request as the
reference model does, and its pools are free (no request left, no KV slot held, no leak reported
by SGLang's strict idle check or ours, which would stop the server).

How SGLang 0.5.16 notices a disconnect: a streamed /generate answer carries a background task
(`TokenizerManager.create_abort_task`, in `entrypoints/http_server.py:generate_request`) that
Starlette runs when the stream ends, also when uvicorn reports the client gone (which cancels the
stream); 2 s later it sends the scheduler an abort for the rid. `Scheduler.abort_request` then
pops a queued request, marks the chunked-prefill request to be dropped before its next chunk
(`process_pending_chunked_abort`), or finishes a running one, and logs which ("Abort queued
request", "Abort chunked prefill request", "Abort running request") at debug level: these servers
log the scheduler's debug lines (LOGGING), and each test finds its request's line by rid.

The tiny checkpoint, float16, 64-token chunks, at most two running requests, with the prefix
cache and without it.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.serving, pytest.mark.aborts]

CHUNK = 64
COMMON = ["--chunked-prefill-size", str(CHUNK), "--max-running-requests", "2",
          "--dtype", "float16"]
SERVER_MODES = {"cache": COMMON, "no_cache": [*COMMON, "--disable-radix-cache"]}
# SGLang's logging setup (`configure_logger`, in every server process) takes a dictConfig from
# SGLANG_LOGGING_CONFIG_PATH: the usual INFO lines, and the scheduler's debug lines, which say
# where an abort found its request.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,  # the modules' loggers exist before the config is read
    "formatters": {"plain": {"format": "[%(asctime)s] %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {"sglang.srt.managers.scheduler": {"level": "DEBUG"}},
}
# Output lengths that no test waits for: a request given one is aborted.
ENDLESS = 100_000
# A prompt whose prefill (2,000 64-token chunks) outlasts the 2 s SGLang waits before it aborts
# a disconnected request; within the tiny model's 131,072-token context.
LONG_PROMPT = 128_000
SHORT_PROMPT = 20
NEXT_PROMPT = 300  # the request served after each abort: beyond dense_len (256), sparse
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=sorted(SERVER_MODES))
def server(request, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from sala_sglang.testing.server import started

    logs = tmp_path_factory.mktemp("logs")
    config = logs / "logging.json"
    config.write_text(json.dumps(LOGGING))
    with started(tiny_dir, logs / f"server_aborts_{request.param}.log",
                 *SERVER_MODES[request.param], mode=f"aborts_{request.param}",
                 env={"SGLANG_LOGGING_CONFIG_PATH": str(config)}) as srv:
        yield srv


@pytest.fixture
def reference(references: dict):
    return references[False]


def _rid(stage: str) -> str:
    # SGLang aborts every request whose rid starts with the one given: no rid is another's prefix
    return f"{stage}-{uuid.uuid4().hex}"


def _prompt(length: int, vocab: int) -> list[int]:
    rng = random.Random(length)
    return [1] + [rng.randrange(5, vocab) for _ in range(length - 1)]


def _body(rid: str, prompt: list[int], max_new_tokens: int, stream: bool) -> dict:
    return {"rid": rid, "input_ids": prompt, "stream": stream,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                "ignore_eos": True}}


def _generate(server, rid: str, prompt: list[int], max_new_tokens: int) -> dict:
    """A non-streamed request: the server's answer once it ends."""
    import requests

    r = requests.post(server.url + "/generate", json=_body(rid, prompt, max_new_tokens, False),
                      timeout=300)
    r.raise_for_status()
    return r.json()


def _stream(server, rid: str, prompt: list[int], max_new_tokens: int):
    """A streamed request, open once the headers are in (SGLang sends them at once, before any
    token); leaving the `with` block closes the connection: the client disconnects."""
    import requests

    r = requests.post(server.url + "/generate", json=_body(rid, prompt, max_new_tokens, True),
                      stream=True, timeout=300)
    assert r.status_code == 200, r.text
    return r


def _abort(server, **body) -> None:
    import requests

    requests.post(server.url + "/abort_request", json=body, timeout=30).raise_for_status()


def _aborts_logged(server, rid: str) -> list[str]:
    """The scheduler's abort lines for this rid."""
    return [line for line in server.tail(10**8).splitlines()
            if line.endswith(f"req.rid='{rid}'") and "Abort" in line]


def _wait_for_abort(server, where: str, rid: str, timeout: float = 20) -> None:
    """Waits for the scheduler's line "Abort <where> request. req.rid='<rid>'"."""
    deadline = time.time() + timeout
    while not any(f"Abort {where} request." in line for line in _aborts_logged(server, rid)):
        assert time.time() < deadline, (
            f"{server.mode}: no 'Abort {where} request' for {rid} after {timeout} s; its abort "
            f"lines: {_aborts_logged(server, rid)}")
        time.sleep(0.2)


def _serves_next_and_pools_free(server, reference) -> None:
    """A new request is served as the reference model serves it, and then the server is alive
    and idle: no request running or waiting, no KV slot held, no leak reported."""
    from sala_sglang.testing.compare import check_served

    prompt = _prompt(NEXT_PROMPT, reference.config.vocab_size)
    check_served(reference, prompt, server.generate(prompt, NEW_TOKENS), mode=server.mode)
    server.assert_pools_free(settle_s=0)


def test_disconnect_while_queued_aborts_the_queued_request(server, reference) -> None:
    vocab = reference.config.vocab_size
    running = [_rid("running"), _rid("running")]
    queued = _rid("queued")
    with ThreadPoolExecutor(len(running)) as pool:
        answers = [pool.submit(_generate, server, rid, _prompt(SHORT_PROMPT + i, vocab), ENDLESS)
                   for i, rid in enumerate(running)]
        try:
            server.wait_for_load("both slots running", lambda row: row["num_running_reqs"] == 2)
            with _stream(server, queued, _prompt(SHORT_PROMPT, vocab), ENDLESS):
                server.wait_for_load("queued", lambda row: row["num_waiting_reqs"] == 1)
            _wait_for_abort(server, "queued", queued)
            # the queue is empty, and the two running requests go on
            row = server.wait_for_load("without the queued request",
                                 lambda row: row["num_waiting_reqs"] == 0)
            assert row["num_running_reqs"] == 2, row
            assert all(not _aborts_logged(server, rid) for rid in running)
        finally:
            for rid in running:
                _abort(server, rid=rid)
        for answer in answers:
            assert answer.result()["meta_info"]["finish_reason"]["type"] == "abort"
    _serves_next_and_pools_free(server, reference)


def test_disconnect_between_prefill_chunks_aborts_the_chunked_request(server, reference) -> None:
    rid = _rid("prefill")
    with _stream(server, rid, _prompt(LONG_PROMPT, reference.config.vocab_size), 4):
        # a chunk's KV held: the prefill has begun, ~2,000 chunks to go
        row = server.wait_for_load("prefilling", lambda row: row["num_used_tokens"] > 0)
    print(f"{server.mode}: disconnected with {row['num_waiting_uncached_tokens']} prompt tokens "
          "left to prefill")
    # logged only while the request is still the chunked one: its prefill had not finished
    # (it was in the batch just run too, so "Abort running request" may come first)
    _wait_for_abort(server, "chunked prefill", rid)
    _serves_next_and_pools_free(server, reference)


def test_disconnect_while_decoding_aborts_the_running_request(server, reference) -> None:
    rid = _rid("decode")
    with _stream(server, rid, _prompt(SHORT_PROMPT, reference.config.vocab_size), ENDLESS) as r:
        tokens = 0
        for line in r.iter_lines():
            tokens += line.startswith(b"data: {")
            if tokens == 5:
                break
    _wait_for_abort(server, "running", rid)
    _serves_next_and_pools_free(server, reference)


def test_abort_request_by_rid_ends_that_request(server, reference) -> None:
    rid = _rid("by-rid")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_generate, server, rid,
                             _prompt(SHORT_PROMPT, reference.config.vocab_size), ENDLESS)
        server.wait_for_load("running", lambda row: row["num_running_reqs"] == 1)
        _abort(server, rid=rid)
        meta = answer.result(timeout=60)["meta_info"]
    assert meta["finish_reason"]["type"] == "abort", meta
    assert 0 < meta["completion_tokens"] < ENDLESS, meta
    _serves_next_and_pools_free(server, reference)


def test_abort_all_ends_running_and_queued_requests(server, reference) -> None:
    vocab = reference.config.vocab_size
    rids = [_rid("all"), _rid("all"), _rid("all")]
    with ThreadPoolExecutor(len(rids)) as pool:
        answers = {}
        for i, rid in enumerate(rids[:2]):
            answers[rid] = pool.submit(_generate, server, rid, _prompt(SHORT_PROMPT + i, vocab),
                                       ENDLESS)
        server.wait_for_load("both slots running", lambda row: row["num_running_reqs"] == 2)
        answers[rids[2]] = pool.submit(_generate, server, rids[2], _prompt(SHORT_PROMPT, vocab),
                                       ENDLESS)
        server.wait_for_load("queued", lambda row: row["num_waiting_reqs"] == 1)
        _abort(server, abort_all=True)
        metas = {rid: answer.result(timeout=60)["meta_info"] for rid, answer in answers.items()}
    assert all(meta["finish_reason"]["type"] == "abort" for meta in metas.values()), metas
    # SGLang's message for a request taken out of the waiting queue
    assert metas[rids[2]]["finish_reason"]["message"] == "Abort in waiting queue", metas
    assert metas[rids[2]]["completion_tokens"] == 0, metas
    _serves_next_and_pools_free(server, reference)
