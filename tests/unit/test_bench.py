"""The long-context benchmark's arithmetic (FLOPs, bytes per token) against SPEC section 3, its
table and plots from result files, the decode profile's summary, and `sala-sglang bench` without
a GPU, the SOAR-style workload, and the prefix-cache (multiturn) and speculative-decoding
workloads against a faked server (the soak's tests: test_soak.py)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import plot_long_context as plot
from benchmarks import profile_decode
from sala_sglang import bench
from sala_sglang.bench import (
    MODELS,
    SOAR_MIX,
    WARMUP_TOKENS,
    Conversation,
    converse,
    prepare_model_dir,
    recorded,
    repeating_prompt,
    replay,
    result_path,
    soar_requests,
    stream_one,
    write_result,
    write_soar_workload,
)


def test_sala_counts_match_the_spec() -> None:
    sala = MODELS["sala"]
    assert sala.matmul_params() == pytest.approx(8.875e9, rel=1e-3)  # SPEC: 2 x 8.875 B per token
    assert sala.prefill_flops(262144) == pytest.approx(5.1e15, rel=0.03)  # SPEC: ~5.1 PFLOP
    kv = 8 * 2 * 2 * 128 * 2  # SPEC: 8 KiB/token of KV in the 8 sparse layers
    assert kv < sala.cache_bytes_per_token() < kv * (1 + 1 / 16 + 1 / 64) + 1
    assert sala.state_bytes_per_request() == 24 * 32 * 128 * 128 * 4


def test_dense_baseline_counts() -> None:
    dense = MODELS["qwen3-8b"]
    assert dense.matmul_params() == pytest.approx(6.95e9, rel=1e-2)  # Qwen3-8B without embeddings
    assert dense.cache_bytes_per_token() == 36 * 2 * 8 * 128 * 2
    n = 65536  # causal attention grows as n^2: the dense model's long-context cost
    assert dense.attention_flops(2 * n) / dense.attention_flops(n) == pytest.approx(4, rel=1e-3)
    # SALA's quadratic term is only stage-1 scoring over compressed keys (1 per 16 tokens, 8 layers)
    big = 1 << 20
    assert MODELS["sala"].attention_flops(big) < dense.attention_flops(big) / 100


def _record(model: str, backend: str, points: list[dict], date: str = "2026-11-22") -> dict:
    return {"model": f"{model}: config.json, random weights", "attention_backend": backend,
            "device": "GPU", "batch1": points, "date": date}


def test_table_and_plots_from_result_files(tmp_path: Path) -> None:
    sala = [{"input_tokens": n, "ttft_s": n / 2e4, "decode_tok_per_s": 90.0, "mfu": 0.4}
            for n in (65536, 131072, 262144)]
    dense = [{"input_tokens": 65536, "ttft_s": 5.0, "decode_tok_per_s": 99.0},
             {"input_tokens": 131072, "ttft_s": 17.0, "note": "includes JIT"},
             {"input_tokens": 262144, "error": "rejected"}]
    (tmp_path / "long_context_sala_x.json").write_text(json.dumps(_record("sala", "m", sala)))
    (tmp_path / "long_context_qwen3-8b_x.json").write_text(
        json.dumps(_record("qwen3-8b", "flashinfer", dense)))
    runs = plot.load_runs(tmp_path)
    table = plot.table(runs)
    assert "| 64K | 3.28 | 90.0 | 40% | 5.00 | 99.0 | 1.53x |" in table
    assert "| 128K | 6.55 | 90.0 | 40% | - | - | - |" in table  # the noted point is left out
    assert "does not fit" in table.splitlines()[-1]
    pytest.importorskip("matplotlib")
    assert all(path.stat().st_size > 0 for path in plot.plot(runs, tmp_path))


def test_a_length_measured_again_takes_the_newest_point(tmp_path: Path) -> None:
    old = [{"input_tokens": n, "ttft_s": 9.0, "decode_tok_per_s": 90.0} for n in (32768, 65536)]
    new = [{"input_tokens": 32768, "ttft_s": 1.0, "decode_tok_per_s": 110.0}]
    # the file names sort the other way round: the dates decide
    (tmp_path / "long_context_sala_a.json").write_text(
        json.dumps(_record("sala", "m", new, date="2026-11-23T00:18:11+00:00")))
    (tmp_path / "long_context_sala_z.json").write_text(
        json.dumps(_record("sala", "m", old, date="2026-11-22T19:00:00+00:00")))
    runs = plot.load_runs(tmp_path)
    points = {p["input_tokens"]: p["ttft_s"] for p in runs["sala (m)"]["points"]}
    assert points == {32768: 1.0, 65536: 9.0}


def test_a_quantized_run_is_its_own_model(tmp_path: Path) -> None:
    bf16 = [{"input_tokens": 131072, "ttft_s": 6.0, "decode_tok_per_s": 107.0, "mfu": 0.5}]
    fp8 = {**_record("sala", "m", [{"input_tokens": 131072, "ttft_s": 4.0,
                                     "decode_tok_per_s": 155.0}], date="2026-11-23"),
           "server_flags": ["--load-format", "dummy", "--quantization", "fp8"]}
    (tmp_path / "long_context_sala_a.json").write_text(json.dumps(_record("sala", "m", bf16)))
    (tmp_path / "long_context_sala_fp8_h100_2026-11-23.json").write_text(json.dumps(fp8))
    runs = plot.load_runs(tmp_path)
    assert sorted(runs) == ["sala (m)", "sala fp8 (m)"]
    assert "| 128K | 6.00 | 107.0 | 50% |" in plot.table(runs)


def test_a_run_with_kernel_overrides_is_kept_apart(tmp_path: Path) -> None:
    default = {**_record("sala", "m", [{"input_tokens": 131072, "ttft_s": 5.5,
                                         "decode_tok_per_s": 107.0, "mfu": 0.6}]),
               "env": {"SALA_SGLANG_CUDA": "0"}}  # a build flag, not a kernel choice
    forced = {**_record("sala", "m", [{"input_tokens": 131072, "ttft_s": 5.7,
                                        "decode_tok_per_s": 106.0}], date="2026-11-23"),
              "env": {"SALA_SGLANG_KERNELS": "triton"}}
    (tmp_path / "long_context_sala_a.json").write_text(json.dumps(default))
    (tmp_path / "long_context_sala_b.json").write_text(json.dumps(forced))
    runs = plot.load_runs(tmp_path)
    assert sorted(runs) == ["sala (m)", "sala kernels=triton (m)"]
    assert "| 128K | 5.50 | 107.0 | 60% |" in plot.table(runs)


def test_runs_without_the_cache_or_with_other_chunks_are_kept_apart(tmp_path: Path) -> None:
    point = [{"input_tokens": 1048576, "ttft_s": 74.0, "decode_tok_per_s": 87.0, "mfu": 0.38}]
    flags = ["--chunked-prefill-size", "8192", "--load-format", "dummy"]
    variants = {"a": [], "b": ["--disable-radix-cache"], "c": ["--chunked-prefill-size=16384"],
                "d": ["--chunked-prefill-size", "8192"]}  # d: the default given again
    for day, (name, extra) in enumerate(variants.items(), start=1):
        record = {**_record("sala", "m", point, date=f"2026-12-0{day}"),
                  "server_flags": [*flags, *extra]}
        (tmp_path / f"long_context_sala_{name}.json").write_text(json.dumps(record))
    runs = plot.load_runs(tmp_path)
    assert sorted(runs) == ["sala (m)", "sala chunk=16384 (m)", "sala no-radix-cache (m)"]
    assert runs["sala (m)"]["files"] == ["long_context_sala_a.json", "long_context_sala_d.json"]


def test_a_result_file_is_named_by_what_device_and_date(tmp_path: Path) -> None:
    record = {"date": "2026-11-23T05:08:01+00:00", "device": "NVIDIA H100 80GB HBM3"}
    assert write_result(record, "long_context_sala", tmp_path).name == (
        "long_context_sala_h100_2026-11-23.json")
    # a name that already ends with the device (kernels_lightning_<gpu>) does not repeat it
    assert write_result(record, "kernels_lightning_h100", tmp_path).name == (
        "kernels_lightning_h100_2026-11-23.json")
    assert json.loads((tmp_path / "long_context_sala_h100_2026-11-23.json").read_text()) == record


def test_a_run_cut_short_keeps_its_record_and_removes_its_work_folder(tmp_path: Path) -> None:
    record = {"date": "2026-12-07T00:00:00+00:00", "device": "NVIDIA H100 80GB HBM3", "rows": []}
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(RuntimeError), recorded(record, "run", tmp_path, work) as save:
        record["rows"].append(1)
        assert save() == result_path(record, "run", tmp_path)
        record["rows"].append(2)  # measured after the last save, then the run fails
        raise RuntimeError("server died")
    assert json.loads(result_path(record, "run", tmp_path).read_text())["rows"] == [1, 2]
    assert not work.exists()


class _Reply:
    """An HTTP 200 answer that streams these lines (before_first runs before the first)."""

    status_code = 200

    def __init__(self, lines: list[bytes], before_first: Callable[[], None] = lambda: None):
        self.lines, self.before_first = lines, before_first

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def iter_lines(self):
        self.before_first()
        yield from self.lines

    def raise_for_status(self) -> None:
        pass


def _stream_replies(monkeypatch: pytest.MonkeyPatch, lines: list[bytes],
                    before_first: Callable[[], None] = lambda: None) -> None:
    """requests.post answers with HTTP 200 and streams these lines."""
    monkeypatch.setattr("sala_sglang.bench.requests.post",
                        lambda *a, **k: _Reply(lines, before_first))


def test_streamed_rejection_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _stream_replies(monkeypatch,
                    [b'data: {"error": {"message": "input is longer than the KV pool"}}'])
    assert stream_one("http://x", [1, 2, 3], 4) == {
        "error": {"message": "input is longer than the KV pool"}}


def test_decode_profile_summary_counts_graph_launches_as_steps() -> None:
    def kernel(name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 5}] * 2
    for step in range(2):  # 2 steps of 1000 us: a 300 us GEMM and 4 norms of 50 us each
        t = 1000 * step
        events += [kernel("gemm", t, 300)] + [kernel("rmsnorm", t + 300 + 50 * i, 50)
                                              for i in range(4)]
    summary = profile_decode.kernel_summary(events)
    assert summary["kernels_per_step"] == 5
    assert summary["gpu_busy_ms_per_step"] == 0.5
    assert summary["span_ms_per_step"] == 0.75  # first kernel start to last kernel end, over 2
    assert [k["name"] for k in summary["top_kernels"]] == ["gemm", "rmsnorm"]
    assert summary["top_kernels"][1]["calls_per_step"] == 4
    assert "error" in profile_decode.kernel_summary(events[2:])  # no graph launch: no steps


def test_first_token_event_is_set_when_the_first_chunk_arrives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = threading.Event()
    seen_before_first_chunk = []
    _stream_replies(monkeypatch, [b'data: {"text": "a"}', b'data: {"text": "ab"}', b"data: [DONE]"],
                    before_first=lambda: seen_before_first_chunk.append(first.is_set()))
    result = stream_one("http://x", [1, 2, 3], 2, first_token=first)
    assert seen_before_first_chunk == [False] and first.is_set()
    assert result["streamed_chunks"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_a_gpu_says_so(capsys: pytest.CaptureFixture) -> None:
    from sala_sglang.cli import main

    assert main(["bench", "--lengths", "1024"]) == 2
    assert "no CUDA GPU visible" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--lengths", "1024", "--concurrency", "8", "--no-peaks"],  # random-ids bench_serving runs
    ["--workload", "soar", "--concurrency", "--no-peaks"],  # soar runs bench_serving regardless
    ["--workload", "multiturn", "--concurrency", "0"],  # the generated-shared-prefix runs
], ids=["random_with_concurrency", "soar_without_concurrency", "multiturn_with_concurrency"])
def test_bench_serving_without_datasets_fails_before_starting_a_server(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("server started"))
    monkeypatch.setattr(bench, "run_multiturn", lambda args: pytest.fail("server started"))
    assert bench.main(argv) == 2
    assert "needs the `datasets` package" in capsys.readouterr().err


def test_compression_benchmark_parses_its_arguments_and_counts_bytes_without_a_gpu() -> None:
    pytest.importorskip("triton")
    from benchmarks.kernels import sparse_compress as bench

    args = bench.parse_args(["--batches", "1", "4", "--context", "65536", "--tag", "t"])
    assert (args.batches, args.context, args.chunk, args.tag) == ([1, 4], 65536, 8192, "t")
    k1 = bench.Compression("K1", kernel=32, stride=16)
    # a decode step at 128K completes one K1 window: its 32 keys read once, one row written
    assert k1.windows(131072) - k1.windows(131071) == 1
    row = 2 * 128 * 2
    assert bench.call_bytes(k1, 131071, 131072, 8, 2, 128, 2) == 8 * (32 * row + row + 32 * 4)
    # an 8192-token chunk: 512 new windows over 511 * 16 + 32 keys, each key read once
    assert bench.call_bytes(k1, 122880, 131072, 1, 2, 128, 2) == 8208 * (row + 4) + 512 * row
    assert bench.call_bytes(k1, 100, 100, 1, 2, 128, 2) == 0


def test_soar_mix_is_two_thirds_32k_to_512k_and_the_cap_keeps_the_requests() -> None:
    rows = soar_requests()
    assert len(rows) == sum(count for _, _, count in SOAR_MIX) == 24
    assert sum(32768 <= n <= 524288 for n, _ in rows) == 16
    assert max(n for n, _ in rows) == 524288
    capped = soar_requests(262144)
    assert [out for _, out in capped] == [out for _, out in rows]
    assert max(n for n, _ in capped) == 262144
    assert sum(n == 262144 for n, _ in capped) == 5  # 3 at 256K and the 2 cut from 512K
    half = soar_requests(262144, 0.5)
    assert len(half) == 14 and sum(32768 <= n for n, _ in half) == 9  # still ~two thirds
    assert sorted(set(half)) == sorted(set(capped))  # every length class kept


def test_soar_workload_is_fixed_by_its_seed(tmp_path: Path) -> None:
    a, b, c = (tmp_path / name for name in ("a.jsonl", "b.jsonl", "c.jsonl"))
    rows = write_soar_workload(a, seed=3, max_input=4096)
    assert write_soar_workload(b, seed=3, max_input=4096) == rows
    assert a.read_bytes() == b.read_bytes()
    write_soar_workload(c, seed=4, max_input=4096)
    assert a.read_bytes() != c.read_bytes()
    assert sorted((r["input_tokens"], r["output_tokens"]) for r in rows) == sorted(
        soar_requests(4096))


def test_soar_workload_loads_in_bench_servings_custom_dataset(tmp_path: Path) -> None:
    """sglang's own loader, with the tokenizer `bench` gives it, counts the planned lengths."""
    custom = pytest.importorskip("sglang.benchmark.datasets.custom")
    from transformers import AutoTokenizer

    rows = write_soar_workload(tmp_path / "soar.jsonl", seed=0, max_input=8192)
    _, tok_dir = prepare_model_dir(MODELS["sala"], tmp_path)
    got = custom.sample_custom_requests(str(tmp_path / "soar.jsonl"), len(rows),
                                        AutoTokenizer.from_pretrained(tok_dir))
    assert sorted((r.prompt_len, r.output_len) for r in got) == sorted(
        (r["input_tokens"], r["output_tokens"]) for r in rows)


def test_benchmark_tokenizer_decodes_every_model_id_to_text(tmp_path: Path) -> None:
    """bench_serving times a request's first token by its first non-empty streamed text: every id
    a random-weight model can generate decodes to text, while the prompts (random ids below the
    base vocabulary, corpus text) stay those of the tiny tokenizer."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from sala_sglang.tiny import CORPUS_PATH, TINY_VOCAB_SIZE, TOKENIZER_PATH

    model_dir, tok_dir = prepare_model_dir(MODELS["sala"], tmp_path)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert (tok.vocab_size, len(tok)) == (TINY_VOCAB_SIZE, vocab)
    assert all(tok.decode([i]) for i in (TINY_VOCAB_SIZE, 40000, vocab - 1))
    text = CORPUS_PATH.read_text()[:5000]
    assert tok.encode(text) == Tokenizer.from_file(str(TOKENIZER_PATH)).encode(text).ids


def test_bench_soar_mode_parses_and_needs_a_gpu(capsys: pytest.CaptureFixture) -> None:
    from sala_sglang.cli import build_parser, main

    args = build_parser().parse_args(["bench", "--workload", "soar", "--soar-max-input",
                                      "262144", "--model", "qwen3-8b", "--seed", "2"])
    assert (args.workload, args.soar_max_input, args.seed, args.lengths) == (
        "soar", 262144, 2, None)
    assert args.soar_concurrency == [1, 8, 0]
    assert build_parser().parse_args(["bench", "--workload", "soar", "--soar-concurrency", "8",
                                      "0"]).soar_concurrency == [8, 0]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--workload", "soar", "--soar-concurrency", "4"])
    assert main(["bench", "--workload", "soar"]) == 2
    assert "no CUDA GPU visible" in capsys.readouterr().err
    assert main(["bench", "--workload", "soar", "--soar-scale", "0"]) == 2
    assert "--soar-scale 0: give a positive factor" in capsys.readouterr().err


# ---- the prefix-cache (multiturn) workload ----------------------------------------------------
class _FakeServer:
    """SGLang's /generate (streamed, every chunk holding the ids generated so far) and
    /flush_cache; with a cache, cached_tokens is the longest prefix shared with a sequence
    (prompt and answer) held since the last flush. Every /generate body is kept."""

    def __init__(self, cache: bool) -> None:
        self.cache = cache
        self.bodies: list[dict] = []
        self.held: list[list[int]] = []

    def post(self, url: str, data: str | None = None, **kwargs) -> _Reply:
        if url.endswith("/flush_cache"):
            self.held.clear()
            return _Reply([])
        body = json.loads(data)
        self.bodies.append(body)
        ids, n = body["input_ids"], body["sampling_params"]["max_new_tokens"]
        cached = max((len(os.path.commonprefix([ids, seq])) for seq in self.held), default=0)
        cached = min(cached, len(ids) - 1) if self.cache else 0
        answer = [5 + (len(ids) + i) % 100 for i in range(n)]
        self.held.append(ids + answer)
        chunks = [{"output_ids": answer[:i + 1], "meta_info": {"cached_tokens": cached}}
                  for i in range(n)]
        return _Reply([b"data: " + json.dumps(c).encode() for c in chunks] + [b"data: [DONE]"],
                      before_first=lambda: time.sleep(0.002))  # a TTFT above the 1 ms rounding


def _serve_fake(monkeypatch: pytest.MonkeyPatch, server: _FakeServer) -> None:
    monkeypatch.setattr("sala_sglang.bench.requests.post", server.post)


def test_each_turn_is_the_last_prompt_then_its_answer_then_a_new_question() -> None:
    conversation = Conversation.make(1000, 4, 50, vocab=1280, seed=0)
    answers = [[7] * 8, [8] * 8, [9] * 8]
    first = conversation.prompt(answers, 1)
    assert first == conversation.document + conversation.questions[0]
    for turn in range(1, 4):
        assert conversation.prompt(answers, turn + 1) == (
            conversation.prompt(answers, turn) + answers[turn - 1] + conversation.questions[turn])
        assert len(conversation.prompt(answers, turn)) == 1000 + turn * 50 + (turn - 1) * 8


def test_conversations_of_other_lengths_or_seeds_share_no_kv_page() -> None:
    """No two documents (nor the warm-up's) begin with the same 64 tokens, a KV page."""
    documents = [Conversation.make(n, 2, 16, vocab=1280, seed=seed).document
                 for n in (1024, 2048, 4096) for seed in (0, 1)]
    documents.append(Conversation.make(WARMUP_TOKENS, 2, 16, vocab=1280, seed="warm-up").document)
    for i, a in enumerate(documents):
        for b in documents[i + 1:]:
            assert len(os.path.commonprefix([a, b])) < 64
    questions = Conversation.make(1024, 4, 64, vocab=1280, seed=0).questions
    assert len({tuple(q) for q in questions}) == 4
    assert Conversation.make(1024, 4, 64, vocab=1280, seed=0).questions == questions  # fixed


def test_a_conversation_sends_each_turn_the_last_prompt_and_answer_with_a_new_question(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _FakeServer(cache=True)
    _serve_fake(monkeypatch, server)
    conversation = Conversation.make(512, 3, 32, vocab=1280, seed=0)
    rows, answers = converse("http://x", conversation, answer_tokens=8)
    sent = [body["input_ids"] for body in server.bodies]
    assert sent[0] == conversation.document + conversation.questions[0]
    for turn in (1, 2):
        assert sent[turn] == sent[turn - 1] + answers[turn - 1] + conversation.questions[turn]
    assert [len(a) for a in answers] == [8, 8, 8]
    assert [r["prompt_tokens"] for r in rows] == [544, 584, 624]
    assert [r["cached_tokens"] for r in rows] == [0, 552, 592]  # the last prompt and answer
    assert all(r["ttft_s"] >= 0 and r["decode_tok_per_s"] > 0 for r in rows)
    # a prefix hit needs logprob_start_len -1 or none (0 caps the match at 0 tokens)
    assert all(body.get("logprob_start_len", -1) != 0 for body in server.bodies)
    assert all(body["sampling_params"]["ignore_eos"] for body in server.bodies)


def test_a_conversation_stops_when_a_later_turn_finds_nothing_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _serve_fake(monkeypatch, _FakeServer(cache=False))
    rows, answers = converse("http://x", Conversation.make(512, 4, 32, vocab=1280, seed=0), 8)
    assert [r["turn"] for r in rows] == [1, 2] and len(answers) == 1


def test_a_replay_sends_the_same_prompts_for_one_token_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held, again = _FakeServer(cache=True), _FakeServer(cache=False)
    conversation = Conversation.make(512, 4, 32, vocab=1280, seed=0)
    _serve_fake(monkeypatch, held)
    _, answers = converse("http://x", conversation, 8)
    _serve_fake(monkeypatch, again)
    rows = replay("http://y", conversation, answers, [2, 4])
    assert [r["turn"] for r in rows] == [2, 4]
    assert [b["input_ids"] for b in again.bodies] == [held.bodies[1]["input_ids"],
                                                      held.bodies[3]["input_ids"]]
    assert [b["sampling_params"]["max_new_tokens"] for b in again.bodies] == [1, 1]
    assert [r["cached_tokens"] for r in rows] == [0, 0]
    assert replay("http://y", conversation, answers[:1], [2, 3]) == rows[:1]  # turn 3: no answer 2


def test_multiturn_record_pairs_each_turn_with_and_without_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """Both servers in one record: per-turn rows with each side's TTFT and cached tokens and the
    no-cache / cache ratio, the flags each ran with, the bench_serving runs of each."""
    servers: dict[str, _FakeServer] = {}
    started: list[list[str]] = []

    @contextlib.contextmanager
    def served(model_dir, log_path, flags, info, keep_log) -> Iterator[argparse.Namespace]:
        started.append(flags)
        side = "no_cache" if "--disable-radix-cache" in flags else "cache"
        servers[side] = _FakeServer(cache=side == "cache")
        monkeypatch.setattr("sala_sglang.bench.requests.post", servers[side].post)
        info["startup_s"] = 1.0
        yield argparse.Namespace(url=f"http://{side}")

    monkeypatch.setattr(bench, "served", served)
    monkeypatch.setattr(bench, "server_state", lambda url, *keys: {
        "disable_radix_cache": url.endswith("no_cache")})
    monkeypatch.setattr(bench, "bench_serving", lambda url, tok, dataset, prompts, conc, work: {
        "command": ["bench_serving", *dataset], "completed": prompts,
        "cache_report": {"cache_hit_rate_pct": 75.0 if url.endswith("//cache") else 0.0}})
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--workload", "multiturn", "--lengths", "256", "512", "--turns", "3",
                         "--question-tokens", "16", "--answer-tokens", "8", "--no-cache-turns",
                         "2", "3", "--concurrency", "0", "--tag", "t", "--out", str(tmp_path)])
    path = bench.run_multiturn(args)

    record = json.loads(path.read_text())
    assert path.name.startswith("t_") and record["benchmark"] == "prefix_cache"
    assert record["workload"]["no_cache_turns"] == [2, 3]
    assert record["workload"]["shared_prefix"]["prompts_per_group"] == bench.SHARED_PREFIX_SET[1]
    cache, no_cache = (record["servers"][side] for side in ("cache", "no_cache"))
    assert "--disable-radix-cache" not in cache["flags"]
    assert no_cache["flags"] == [*cache["flags"], "--disable-radix-cache"]
    assert (cache["disable_radix_cache"], no_cache["disable_radix_cache"]) == (False, True)
    context = int(cache["flags"][cache["flags"].index("--context-length") + 1])
    assert context >= WARMUP_TOKENS + 3 * (16 + 8)  # the longest conversation, answer included
    rows = record["turns"]
    assert [(r["document_tokens"], r["turn"]) for r in rows] == [
        (n, turn) for n in (256, 512) for turn in (1, 2, 3)]
    for row in rows:
        assert row["prompt_tokens"] == row["document_tokens"] + row["turn"] * 16 + (
            row["turn"] - 1) * 8
        assert set(row["cache"]) == {"ttft_s", "decode_tok_per_s", "cached_tokens"}
        assert (row["cache"]["cached_tokens"] > 0) == (row["turn"] > 1)
        if row["turn"] == 1:  # not in --no-cache-turns
            assert "no_cache" not in row and "ttft_no_cache_over_cache" not in row
        else:
            assert row["no_cache"]["cached_tokens"] == 0
            assert "ttft_s" in row["no_cache"] and "ttft_no_cache_over_cache" in row
    # the server without the cache got the very prompts of the turns it replays
    generated = [b["input_ids"] for b in servers["cache"].bodies]
    replayed = [b["input_ids"] for b in servers["no_cache"].bodies
                if b["sampling_params"]["max_new_tokens"] == 1]
    assert len(replayed) == 4 and all(ids in generated for ids in replayed)
    bodies = servers["cache"].bodies + servers["no_cache"].bodies
    assert all(body.get("logprob_start_len", -1) != 0 for body in bodies)
    assert [(r["server"], r["max_concurrency"]) for r in record["bench_serving"]] == [
        ("cache", 0), ("no_cache", 0)]
    assert "generated-shared-prefix" in record["bench_serving"][0]["command"]
    assert record["bench_serving"][0]["cache_report"]["cache_hit_rate_pct"] == 75.0


def test_shared_prefix_set_parses_in_bench_serving_and_shares_each_groups_prompt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """sglang.bench_serving's own parser takes the flags; its generator, with the tokenizer
    `bench` gives it, makes groups x per_group requests, each starting with its group's prompt."""
    serving = pytest.importorskip("sglang.benchmark.serving")
    from sglang.benchmark.datasets.generated_shared_prefix import (
        sample_generated_shared_prefix_requests,
    )
    from transformers import AutoTokenizer

    seen = {}
    monkeypatch.setattr(serving, "run_benchmark", lambda args: seen.update(vars(args)))
    monkeypatch.setattr("sys.argv", ["bench_serving", *bench.shared_prefix_dataset(2, 3, 256,
                                                                                    16, 8)])
    serving.cli_main()
    assert (seen["dataset_name"], seen["gsp_num_groups"], seen["gsp_prompts_per_group"],
            seen["gsp_system_prompt_len"], seen["gsp_question_len"], seen["gsp_output_len"],
            seen["cache_report"]) == ("generated-shared-prefix", 2, 3, 256, 16, 8, True)
    monkeypatch.setenv("HOME", str(tmp_path))  # the generator caches its set under ~/.cache
    _, tok_dir = prepare_model_dir(MODELS["sala"], tmp_path)
    rows = sample_generated_shared_prefix_requests(2, 3, 256, 16, 8, 1.0,
                                                   AutoTokenizer.from_pretrained(tok_dir), seed=1)
    starts = {row.prompt.split("\n\n")[0] for row in rows}
    assert len(rows) == 6 and len(starts) == 2 and {row.output_len for row in rows} == {8}


def test_bench_multiturn_parses_its_arguments() -> None:
    from sala_sglang.cli import build_parser

    args = build_parser().parse_args(["bench", "--workload", "multiturn", "--lengths", "131072",
                                      "1048576", "--turns", "3", "--question-tokens", "512",
                                      "--answer-tokens", "128", "--no-cache-turns", "2", "3"])
    assert (args.workload, args.lengths, args.turns, args.question_tokens, args.answer_tokens,
            args.no_cache_turns) == ("multiturn", [131072, 1048576], 3, 512, 128, [2, 3])
    defaults = build_parser().parse_args(["bench", "--workload", "multiturn"])
    assert (defaults.lengths, defaults.turns, defaults.question_tokens, defaults.answer_tokens,
            defaults.no_cache_turns) == (None, 4, 1024, 256, None)


def test_a_no_cache_turn_past_the_conversation_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture,
) -> None:
    assert bench.main(["--workload", "multiturn", "--turns", "2", "--no-cache-turns", "2",
                       "3"]) == 2
    assert "--no-cache-turns 3: a conversation has turns 1 to 2 (--turns)" in (
        capsys.readouterr().err)


# ---- the speculative-decoding workload --------------------------------------------------------
def _clock(monkeypatch: pytest.MonkeyPatch, step_s: float) -> None:
    """bench's time.perf_counter advances step_s per call: stream_one calls it once at send and
    once per chunk, so every chunk arrives step_s after the one before."""
    monkeypatch.setattr(bench, "time", SimpleNamespace(
        perf_counter=itertools.count(0.0, step_s).__next__))


def test_a_speculative_stream_counts_tokens_not_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A verify step streams the tokens it accepted as one chunk: 6 tokens after the first in 2
    chunks, 1 s apart, decode at 3 tokens/s, not 1 chunk/s."""
    spec = {"spec_verify_ct": 2, "spec_accept_length": 3.5, "spec_accept_rate": 0.83}
    chunks = [{"meta_info": {"completion_tokens": 1}}, {"meta_info": {"completion_tokens": 4}},
              {"meta_info": {"completion_tokens": 7, **spec}}]
    _stream_replies(monkeypatch, [b"data: " + json.dumps(c).encode() for c in chunks])
    _clock(monkeypatch, 1.0)
    assert stream_one("http://x", [1, 2, 3], 7, speculative=True) == {
        "ttft_s": 1.0, "decode_tok_per_s": 3.0, "streamed_chunks": 3, **spec}
    _clock(monkeypatch, 1.0)
    assert stream_one("http://x", [1, 2, 3], 7) == {  # the other workloads: chunks, as before
        "ttft_s": 1.0, "decode_tok_per_s": 1.0, "streamed_chunks": 3}


def test_the_repeating_prompt_ends_with_one_span_repeated() -> None:
    ids = repeating_prompt(10000, vocab=1280, seed=0)
    span = ids[-bench.REPEAT_SPAN:]
    assert len(ids) == 10000 and bench.REPEAT_TOKENS == 4096
    assert ids[-4096:] == span * 64
    assert ids[-4096 - 64:-4096] != span  # the random head does not begin the pattern
    assert len(set(span)) > 32 and all(5 <= i < 1280 for i in ids)
    assert repeating_prompt(10000, 1280, 0) == ids and repeating_prompt(10000, 1280, 1) != ids
    with pytest.raises(ValueError, match="needs at least 4096"):
        repeating_prompt(4095, 1280, 0)


def _row(server: str, n: int, workload: str, rate: float, accept: float | None = None) -> dict:
    draft = None if server == "plain" else int(server.split("_")[1])
    row = {"server": server, "draft_tokens": draft, "document_tokens": n, "workload": workload,
           "decode_tok_per_s": rate}
    return row if accept is None else {**row, "spec_accept_length": accept}


def test_ngram_rows_are_compared_with_the_plain_row_of_the_same_length_and_workload() -> None:
    rows = [_row("plain", 32768, "repeating", 100.0), _row("plain", 32768, "never_matching", 90.0),
            _row("plain", 131072, "repeating", 50.0)]
    repeating = _row("ngram_4", 32768, "repeating", 250.0, accept=3.0)
    bench.compare_with_plain(rows, repeating)
    # 3 tokens a verify at 250 tokens/s: 83 verifies/s against 100 plain steps/s
    assert repeating["speedup_over_plain"] == 2.5 and repeating["step_over_decode_step"] == 1.2
    # steps keeping 1.2 tokens at 60 tokens/s: 50 steps/s against 90 plain steps/s
    never = _row("ngram_4", 32768, "never_matching", 60.0, accept=1.2)
    bench.compare_with_plain(rows, never)
    assert never["speedup_over_plain"] == pytest.approx(0.667)
    assert never["step_over_decode_step"] == 1.8
    for row in (_row("ngram_8", 131072, "never_matching", 40.0, accept=1.0),  # no plain row
                _row("ngram_8", 131072, "repeating", None),  # no rate (an error)
                _row("plain", 32768, "repeating", 100.0)):
        bench.compare_with_plain(rows, row)
        assert "speedup_over_plain" not in row and "step_over_decode_step" not in row


@pytest.mark.parametrize("argv, message", [
    (["--draft-tokens", "4", "17"], "--draft-tokens 17: a chain verifies 2 to 16 tokens"),
    (["--draft-tokens", "1", "2"], "--draft-tokens 1: a chain verifies 2 to 16 tokens"),
    (["--workload", "speculative", "--lengths", "2048", "32768"],
     "--lengths 2048: the speculative workload's repeating prompt ends with 4096 repeating"),
], ids=["draft_tokens_above_16", "draft_tokens_below_2", "length_below_the_repeating_tail"])
def test_speculative_arguments_out_of_range_are_refused_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture,
) -> None:
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_runs_the_speculative_workload_without_bench_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run_speculative, no bf16 peak, and no `datasets` needed with --concurrency's default."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.signal, "signal", lambda *a: None)
    ran: list[argparse.Namespace] = []
    monkeypatch.setattr(bench, "run_speculative", ran.append)
    for other in ("run", "run_multiturn", "measure_bf16_peak"):
        monkeypatch.setattr(bench, other, lambda *a: pytest.fail(f"{other} called"))
    assert bench.main(["--workload", "speculative", "--draft-tokens", "2", "9"]) == 0
    assert [(a.draft_tokens, a.lengths, a.decode_tokens) for a in ran] == [([2, 9], None, 1024)]


class _FakeSpeculativeServer:
    """SGLang's streamed /generate, with NGRAM at draft_tokens (None: no speculation): a greedy
    request accepts every draft (a chunk of draft_tokens tokens per verify), a sampled one none
    (one token per verify); the first chunk holds the prefill's token. Every body is kept."""

    def __init__(self, draft_tokens: int | None) -> None:
        self.draft_tokens = draft_tokens
        self.bodies: list[dict] = []

    def post(self, url: str, data: str | None = None, **kwargs) -> _Reply:
        body = json.loads(data)
        self.bodies.append(body)
        params = body["sampling_params"]
        n = params["max_new_tokens"]
        step = self.draft_tokens if self.draft_tokens and params["temperature"] == 0 else 1
        counts = [*range(1, n, step), n]  # completion tokens after each chunk
        chunks = [{"meta_info": {"completion_tokens": c}} for c in counts]
        if self.draft_tokens:
            verifies = len(counts) - 1
            chunks[-1]["meta_info"].update(spec_verify_ct=verifies,
                                           spec_accept_length=n / verifies)
        return _Reply([b"data: " + json.dumps(c).encode() for c in chunks] + [b"data: [DONE]"])


def _run_fake_speculative(
    monkeypatch: pytest.MonkeyPatch, argv: list[str],
) -> tuple[dict[str, tuple[list[str], _FakeSpeculativeServer]], Path]:
    """run_speculative over _FakeSpeculativeServers (100 chunks/s) -> the servers by log name
    (their flags and fake) and the result file."""
    servers: dict[str, tuple[list[str], _FakeSpeculativeServer]] = {}

    @contextlib.contextmanager
    def served(model_dir, log_path, flags, info, keep_log) -> Iterator[argparse.Namespace]:
        spec = "--speculative-num-draft-tokens" in flags
        draft = int(flags[flags.index("--speculative-num-draft-tokens") + 1]) if spec else None
        servers[log_path.stem] = (flags, _FakeSpeculativeServer(draft))
        monkeypatch.setattr("sala_sglang.bench.requests.post", servers[log_path.stem][1].post)
        yield argparse.Namespace(url="http://x")

    monkeypatch.setattr(bench, "served", served)
    monkeypatch.setattr(bench, "server_state", lambda url, *keys: dict.fromkeys(keys))
    _clock(monkeypatch, 0.01)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return servers, bench.run_speculative(p.parse_args(["--workload", "speculative", *argv]))


def test_speculative_record_has_a_row_per_server_length_and_workload(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """The plain server, then one NGRAM server per --draft-tokens with the same flags and the
    speculative ones; on each, two warm-up requests, then per length a greedy request on the
    repeating prompt and a sampled one on random ids; NGRAM rows compared with plain ones."""
    servers, path = _run_fake_speculative(
        monkeypatch, ["--lengths", "4096", "8192", "--decode-tokens", "40", "--draft-tokens", "4",
                      "--tag", "t", "--out", str(tmp_path)])

    record = json.loads(path.read_text())
    assert path.name.startswith("t_") and record["benchmark"] == "speculative"
    assert set(record["workload"]) >= {"repeating", "never_matching", "draft_tokens"}
    assert list(record["servers"]) == ["plain", "ngram_4"] == [s[len("server_"):]
                                                               for s in servers]
    (plain_flags, plain), (ngram_flags, ngram) = servers.values()
    assert ngram_flags == [*plain_flags, "--speculative-algorithm", "NGRAM",
                           "--speculative-num-draft-tokens", "4"]
    assert int(plain_flags[plain_flags.index("--context-length") + 1]) >= WARMUP_TOKENS + 40
    # two warm-ups (both workloads), then the measured requests, the same on both servers
    assert [b["sampling_params"]["max_new_tokens"] for b in plain.bodies] == [32, 32] + [40] * 4
    assert [b["input_ids"] for b in plain.bodies] == [b["input_ids"] for b in ngram.bodies]
    for body in plain.bodies[2:]:
        ids, params = body["input_ids"], body["sampling_params"]
        if params["temperature"] == 0:
            assert ids[-4096:] == ids[-64:] * 64
        else:
            assert (params["top_k"], params["top_p"]) == (-1, 1.0) and params["temperature"] == 1
    rows = record["rows"]
    assert [(r["server"], r["draft_tokens"], r["document_tokens"], r["workload"])
            for r in rows] == [
        (server, draft, n, workload) for server, draft in (("plain", None), ("ngram_4", 4))
        for n in (4096, 8192) for workload in ("repeating", "never_matching")]
    for row in rows:
        if row["server"] == "plain":
            assert row["decode_tok_per_s"] == pytest.approx(100, rel=1e-2)
            assert "spec_verify_ct" not in row and "speedup_over_plain" not in row
        elif row["workload"] == "repeating":  # 39 tokens in 10 verifies of 4
            assert (row["spec_verify_ct"], row["spec_accept_length"]) == (10, 4.0)
            assert row["speedup_over_plain"] == pytest.approx(3.9, rel=1e-2)
            assert row["step_over_decode_step"] == pytest.approx(4.0 * 100 / 390, rel=1e-2)
        else:  # one token per verify, each as long as a plain step
            assert row["spec_verify_ct"] == 39
            assert row["speedup_over_plain"] == pytest.approx(1.0, rel=1e-2)
            assert row["step_over_decode_step"] == pytest.approx(40 / 39, rel=1e-2)


def test_a_depth_sweep_runs_only_the_never_matching_workload(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    """--spec-workloads never_matching: one warm-up and one sampled request per length on each
    server, a length below the repeating prompt's tail allowed, every NGRAM row with its verify
    step's cost over a plain decode step."""
    assert bench.main(["--workload", "speculative", "--lengths", "2048",
                       "--spec-workloads", "repeating", "--draft-tokens", "3"]) == 2
    assert "--lengths 2048" in capsys.readouterr().err
    servers, path = _run_fake_speculative(
        monkeypatch, ["--lengths", "2048", "--decode-tokens", "40", "--draft-tokens", "2", "3",
                      "--spec-workloads", "never_matching", "--out", str(tmp_path)])
    record = json.loads(path.read_text())
    assert "repeating" not in record["workload"] and "never_matching" in record["workload"]
    for _, fake in servers.values():
        assert [b["sampling_params"]["temperature"] for b in fake.bodies] == [1, 1]
    assert [(r["server"], r["workload"]) for r in record["rows"]] == [
        (name, "never_matching") for name in ("plain", "ngram_2", "ngram_3")]
    assert all(r["step_over_decode_step"] == pytest.approx(40 / 39, rel=1e-2)
               for r in record["rows"][1:])


def test_each_bench_serving_run_starts_from_an_empty_prefix_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """The SOAR-style levels send the same prompts: without a flush between them, a later level
    would be served from the prefix cache the earlier one filled."""
    calls: list[str] = []
    server = _FakeServer(cache=True)

    def post(url: str, data: str | None = None, **kwargs) -> _Reply:
        if url.endswith("/flush_cache"):
            calls.append("flush")
        return server.post(url, data, **kwargs)

    @contextlib.contextmanager
    def served(model_dir, log_path, flags, info, keep_log) -> Iterator[argparse.Namespace]:
        info["startup_s"] = 1.0
        yield argparse.Namespace(url="http://x", alive=lambda: True)

    monkeypatch.setattr("sala_sglang.bench.requests.post", post)
    monkeypatch.setattr(bench, "served", served)
    monkeypatch.setattr(bench, "bench_serving", lambda url, tok, dataset, prompts, conc, work: (
        calls.append(f"run {conc}") or {"command": ["bench_serving"], "duration": 1.0}))
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--workload", "soar", "--soar-scale", "0.1", "--soar-max-input", "8192",
                         "--tag", "t", "--out", str(tmp_path)])
    args.peaks = None  # what `bench` sets (no GPU to measure)
    record = json.loads(bench.run(args).read_text())
    assert calls == ["flush", "run 1", "flush", "run 8", "flush", "run 0"]
    assert record["bench_serving_from_empty_cache"] is True
    assert record["soar_total_s"] == 3.0
