"""End to end on a GPU: the tiny checkpoint served by SGLang agrees with the reference model.

Teacher-forced (SPEC section 4): every served logprob within 5e-2 of the reference's, and the
served greedy choice equal to the reference's argmax wherever its top-1/top-2 margin is >= 0.1.
Prompts are shorter and longer than a small --chunked-prefill-size and up to ~4x the tiny
model's dense_len (256; sparse selection drops blocks beyond 128 tokens), one decode crosses
dense_len, 1 and 8 concurrent requests, CUDA graphs on and off (with mixed prefill+decode
batches), with and without --dense-as-sparse; afterwards the pools are free (the server runs
with SGLang's strict idle memory check, which stops it on a leak). One more mode serves a tiny
checkpoint with the released model's attention geometry (GQA group 16, head_dim 128, 64-token
blocks; dense_len 512), so the kernels run with their real tile shapes.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import server_mode_params

pytestmark = [pytest.mark.gpu, pytest.mark.serving]

CHUNK = 64
# The exactness modes serve in float16 (SGLang's fused norms have no float32 kernel), in the
# spirit of SPEC section 4's "serve it in float32"; bf16 is held to looser logprob bounds
# (sala_sglang.testing.compare.check_served).
SHORT_AND_LONG = [40, 250, 300, 700]
CONCURRENT = [5, 33, 64, 65, 100, 131, 200, 257]
CONCURRENT_LONG = [250, 300, 520, 777, 1000, 64, 131, 700]  # several drop blocks
NEW_TOKENS = 12

COMMON = ["--chunked-prefill-size", str(CHUNK), "--max-running-requests", "8"]
SERVER_MODES = {
    "graph_fp16": [*COMMON, "--dtype", "float16"],
    # mixed prefill+decode batches drop SGLang's state-snapshot marks, so they need the prefix
    # cache off: this mode is also the suite's run without it
    "eager_mixed_fp16": [*COMMON, "--dtype", "float16", "--disable-cuda-graph",
                         "--enable-mixed-chunk", "--disable-radix-cache"],
    "graph_fp16_dense_as_sparse": [*COMMON, "--dtype", "float16", "--dense-as-sparse"],
    "graph_bf16": [*COMMON, "--dtype", "bfloat16"],
    # the tiny model with the released attention geometry (sala_sglang.tiny.RELEASED_GEOMETRY):
    # the kernels' real tile shapes; dense_len 512, so the longer prompts are sparse
    "graph_fp16_released_geometry": [*COMMON, "--dtype", "float16"],
}
RELEASED = "released_geometry"


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sala_sglang.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("released"), geometry="released")


@pytest.fixture(scope="module")
def released_reference(released_dir: Path):
    from sala_sglang.reference.model import ReferenceModel

    return ReferenceModel.from_pretrained(released_dir, dtype=torch.float64).to("cuda")


@pytest.fixture
def reference(request, server, references: dict):
    if server.mode.endswith(RELEASED):
        return request.getfixturevalue("released_reference")
    return references[server.mode.endswith("dense_as_sparse")]


# Markers select server modes (scripts/gpu_checks.sh runs them in parts that fit one call).
MODE_MARKS = {
    "graph_fp16": [pytest.mark.fp16, pytest.mark.cuda_graph],
    "eager_mixed_fp16": [pytest.mark.fp16, pytest.mark.eager],
    "graph_fp16_dense_as_sparse": [pytest.mark.fp16, pytest.mark.cuda_graph,
                                   pytest.mark.dense_as_sparse],
    "graph_bf16": [pytest.mark.bf16, pytest.mark.cuda_graph],
    "graph_fp16_released_geometry": [pytest.mark.fp16, pytest.mark.cuda_graph,
                                     pytest.mark.released_geometry],
}


@pytest.fixture(scope="module",
                params=server_mode_params(SERVER_MODES, MODE_MARKS))
def server(request, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from sala_sglang.testing.server import started

    log = tmp_path_factory.mktemp("logs") / f"server_{request.param}.log"
    released = request.param.endswith(RELEASED)
    model = request.getfixturevalue("released_dir") if released else tiny_dir
    with started(model, log, *SERVER_MODES[request.param], mode=request.param) as srv:
        yield srv


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [1] + [rng.randrange(5, vocab) for _ in range(length - 1)]


def _check(server, reference, prompt: list[int], result: dict) -> dict:
    from sala_sglang.testing.compare import check_served

    return check_served(reference, prompt, result, bf16=server.mode.endswith("bf16"),
                        mode=server.mode)


@pytest.mark.parametrize("length", SHORT_AND_LONG)
def test_single_request_matches_reference(server, reference, length: int) -> None:
    prompt = _prompt(random.Random(length), length, reference.config.vocab_size)
    _check(server, reference, prompt, server.generate(prompt, NEW_TOKENS))


def _concurrent(server, reference, lengths: list[int], seed: int) -> None:
    rng = random.Random(seed)
    prompts = [_prompt(rng, n, reference.config.vocab_size) for n in lengths]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: server.generate(p, NEW_TOKENS), prompts))
    for prompt, result in zip(prompts, results):
        _check(server, reference, prompt, result)


def test_concurrent_requests_of_different_lengths_match_reference(server, reference) -> None:
    _concurrent(server, reference, CONCURRENT, seed=7)


def test_concurrent_long_sparse_requests_match_reference(server, reference) -> None:
    _concurrent(server, reference, CONCURRENT_LONG, seed=11)


def test_pools_are_free_after_requests(server) -> None:
    # SGLang's idle check (strict mode, plus ours for the state slots) stops the server on a leak.
    server.assert_pools_free()
    import requests

    assert requests.get(server.url + "/health", timeout=30).status_code == 200


def test_generate_with_text_answers(server) -> None:
    import requests

    r = requests.post(server.url + "/generate", json={
        "text": "The little model said", "sampling_params": {"max_new_tokens": 8}}, timeout=120)
    assert r.status_code == 200 and isinstance(r.json()["text"], str)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_completions(server, stream: bool) -> None:
    import requests

    # Sampled from a random model, the answer may reach EOS before max_tokens unless told not to.
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "stream": stream,
            "ignore_eos": True}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=120, stream=stream)
    assert r.status_code == 200
    if stream:
        chunks = [line for line in r.iter_lines() if line.startswith(b"data: ")]
        assert chunks[-1] == b"data: [DONE]" and len(chunks) >= 2
    else:
        choice = r.json()["choices"][0]
        assert isinstance(choice["text"], str) and r.json()["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_completions(server, stream: bool) -> None:
    import requests

    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 8, "stream": stream}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120, stream=stream)
    assert r.status_code == 200
    if stream:
        chunks = [line for line in r.iter_lines() if line.startswith(b"data: ")]
        assert chunks[-1] == b"data: [DONE]"
        deltas = [json.loads(c[6:]) for c in chunks[:-1]]
        assert any(d["choices"] and d["choices"][0]["delta"].get("content") for d in deltas)
    else:
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
