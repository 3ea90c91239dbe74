"""Bad requests get an HTTP 4xx with a reason, and the server keeps serving with its pools free.

The tiny checkpoint served with a 512-token context: a prompt longer than the context, empty
prompts, and invalid sampling parameters, through the native and the OpenAI endpoints. After
each one the server must still answer a good request; at the end the pools must be free (the
server runs with SGLang's strict idle memory check plus ours, which stop it on a leak).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.serving]

CONTEXT = 512
GOOD = {"input_ids": [1, 7, 9, 11], "sampling_params": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from sala_sglang.testing.server import started
    from sala_sglang.tiny import make_tiny

    tiny = make_tiny(tmp_path_factory.mktemp("tiny"))
    with started(tiny, tmp_path_factory.mktemp("logs") / "server.log", "--context-length",
                 str(CONTEXT), "--chunked-prefill-size", "128", mode="http") as srv:
        yield srv


def _post(server, path: str, body: dict):
    import requests

    return requests.post(server.url + path, json=body, timeout=120)


def _still_serving(server) -> None:
    r = _post(server, "/generate", GOOD)
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 4, r.text


BAD_NATIVE = {
    "prompt longer than the context": {"input_ids": [1] + [7] * (CONTEXT + 10),
                                       "sampling_params": {"max_new_tokens": 4}},
    "empty input_ids": {"input_ids": [], "sampling_params": {"max_new_tokens": 4}},
    "token id outside the vocabulary": {"input_ids": [1, 10**6],
                                        "sampling_params": {"max_new_tokens": 4}},
    "negative temperature": {**GOOD, "sampling_params": {"max_new_tokens": 4, "temperature": -1}},
    "top_p above 1": {**GOOD, "sampling_params": {"max_new_tokens": 4, "top_p": 1.5}},
    "negative max_new_tokens": {**GOOD, "sampling_params": {"max_new_tokens": -3}},
    "top_k of zero": {**GOOD, "sampling_params": {"max_new_tokens": 4, "top_k": 0}},
}

BAD_OPENAI = {
    "prompt longer than the context": ("/v1/completions", {
        "model": "tiny", "prompt": [1] + [7] * (CONTEXT + 10), "max_tokens": 4}),
    "empty prompt": ("/v1/completions", {"model": "tiny", "prompt": [], "max_tokens": 4}),
    "no messages": ("/v1/chat/completions", {"model": "tiny", "messages": [], "max_tokens": 4}),
    "negative temperature": ("/v1/completions", {
        "model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": -0.5}),
    "max_tokens past the context": ("/v1/completions", {
        "model": "tiny", "prompt": "hello", "max_tokens": CONTEXT * 4}),
}


@pytest.mark.parametrize("case", sorted(BAD_NATIVE))
def test_bad_native_request_gets_4xx_and_server_keeps_serving(server, case: str) -> None:
    r = _post(server, "/generate", BAD_NATIVE[case])
    print(case, r.status_code, r.text[:300])
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    assert r.text.strip(), "the error must say why"
    _still_serving(server)


@pytest.mark.parametrize("case", sorted(BAD_OPENAI))
def test_bad_openai_request_gets_4xx_and_server_keeps_serving(server, case: str) -> None:
    path, body = BAD_OPENAI[case]
    r = _post(server, path, body)
    print(case, r.status_code, r.text[:300])
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    assert "message" in r.text or "detail" in r.text or "error" in r.text
    _still_serving(server)


def test_pools_free_after_bad_requests(server) -> None:
    server.assert_pools_free()
