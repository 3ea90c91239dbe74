"""benchmarks/soak.py without a GPU: its arguments, the request plans of both modes, and the
real-config mode's report against a faked SGLang server on this machine (real HTTP: streams,
client drops, load polling)."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from benchmarks import soak

ROOT = Path(__file__).resolve().parents[2]


def test_arguments_default_by_model() -> None:
    tiny = soak.parse_args([])
    assert (tiny.model, tiny.requests, tiny.max_len, tiny.concurrency, tiny.tag) == (
        "tiny", 1000, 65536, 32, "soak_tiny")
    assert tiny.force_retract_every == 0 and soak.retract_env(tiny) == {}  # only a full pool
    sala = soak.parse_args(["--model", "sala"])
    assert (sala.max_len, sala.concurrency, sala.tag, sala.minutes, sala.min_len, sala.longest,
            sala.longest_every, sala.max_output, sala.abort_fraction, sala.abort_within) == (
        524288, 64, "soak_sala", 5.0, 8192, 1 << 20, 25, 1024, 0.1, 120.0)
    given = soak.parse_args(["--model", "sala", "--max-len", "4096", "--concurrency", "3",
                             "--tag", "t", "--minutes", "0.5"])
    assert (given.max_len, given.concurrency, given.tag, given.minutes) == (4096, 3, "t", 0.5)


def test_the_gpu_checks_soak_real_part_runs_the_sala_mode_within_one_call() -> None:
    """Its flags parse, and the requests leave room in a 10-minute call for the server's start
    (up to 185 s measured) and the checks after."""
    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    line = re.search(r"soak-real\) run \"\$part\" python benchmarks/soak.py (.*?);;", script,
                     re.S)
    flags = line.group(1).replace("\\\n", " ").replace('"$out"', "out")
    # ${SOAK_MINUTES:-4.5}: the default, a fresh machine's part
    flags = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", flags)
    args = soak.parse_args(shlex.split(flags))
    assert args.model == "sala" and args.force_retract_every > 0
    assert 185 + args.minutes * 60 + soak.IDLE_S + 60 <= 600
    assert args.part and args.tag.startswith("soak_sala_part_") and args.seed > 0


def test_parts_of_a_soak_get_their_own_tag_and_seed(monkeypatch) -> None:
    import datetime

    class At:  # the clock at two parts' starts
        now_value = datetime.datetime(2026, 12, 8, 9, 30, 5, tzinfo=datetime.timezone.utc)

        @classmethod
        def now(cls, tz=None):
            return cls.now_value

    monkeypatch.setattr(soak.datetime, "datetime", At)
    first = soak.parse_args(["--model", "sala", "--part"])
    At.now_value += datetime.timedelta(minutes=12)
    second = soak.parse_args(["--model", "sala", "--part"])
    assert (first.tag, second.tag) == ("soak_sala_part_093005", "soak_sala_part_094205")
    assert first.seed != second.seed
    assert soak.make_timed_plans(first) != soak.make_timed_plans(second)
    plain = soak.parse_args(["--model", "sala"])
    assert (plain.tag, plain.seed, plain.part) == ("soak_sala", 0, False)


def test_tiny_plan_covers_both_apis_and_aborts() -> None:
    plans = soak.make_plans(1000, 65536, 0.1, seed=0)
    aborted = [p for p in plans if p.abort_after is not None]
    assert 70 <= len(aborted) <= 130 and all(p.stream for p in aborted)
    lengths = [p.prompt_len for p in plans]
    assert min(lengths) >= 1 and max(lengths) <= 65536
    assert sum(n <= 256 for n in lengths) > 200 and sum(n > 8192 for n in lengths) > 100
    assert {p.api for p in plans} == {"native", "openai"}
    assert soak.make_plans(1000, 65536, 0.1, seed=0) == plans


def test_sala_plan_spans_8k_to_512k_with_every_25th_at_1m_and_a_tenth_dropped() -> None:
    args = soak.parse_args(["--model", "sala"])
    plans = soak.make_timed_plans(args)
    assert len(plans) == 1000
    longest = [p for p in plans if p.prompt_len == 1 << 20]
    assert [p.index for p in longest] == list(range(24, 1000, 25))
    lengths = [p.prompt_len for p in plans if p not in longest]
    assert min(lengths) >= 8192 and max(lengths) <= 524288
    # log-uniform over six octaves: a third below 32K, a sixth above 256K
    assert sum(n < 32768 for n in lengths) > 250 and sum(n > 262144 for n in lengths) > 120
    assert {p.max_tokens for p in plans} <= set(range(1, 1025))
    assert len({p.max_tokens for p in plans}) > 500
    dropped = [p.drop_after_s for p in plans if p.drop_after_s is not None]
    assert 70 <= len(dropped) <= 130 and all(0 <= s <= 120 for s in dropped)
    assert max(dropped) > 60  # drops spread over the whole window
    assert soak.make_timed_plans(args) == plans
    assert soak.make_timed_plans(soak.parse_args(["--model", "sala", "--seed", "1"])) != plans


def _chunk(completion_tokens: int, finish_reason: dict | None = None) -> bytes:
    meta = {"completion_tokens": completion_tokens, "finish_reason": finish_reason}
    return b"data: " + json.dumps({"text": "", "meta_info": meta}).encode()


def test_a_stream_is_judged_by_its_last_chunk() -> None:
    assert soak.stream_error(_chunk(8, {"type": "length"}), 8) is None
    assert soak.stream_error(_chunk(5, {"type": "length"}), 8) == (
        "5 tokens generated, 8 requested")
    assert soak.stream_error(_chunk(3, {"type": "abort", "message": "too long"}), 8) == (
        "aborted by the server: too long")
    assert soak.stream_error(b'data: {"error": {"message": "bad"}}', 8) == (
        "streamed error: {'message': 'bad'}")
    assert soak.stream_error(b"", 8) == "no tokens streamed"


def test_a_leak_a_held_token_or_a_queued_request_fails_the_soak() -> None:
    load = {"num_used_tokens": 0, "num_running_reqs": 0, "num_waiting_reqs": 0,
            "max_total_num_tokens": 1000}
    record = {"errors": 0, "server_alive_after_idle": True, "health_after": 200,
              "leak_lines_in_log": [], "load_before": load, "load_after": load}
    assert soak.passed(record)
    assert not soak.passed({**record, "leak_lines_in_log": ["token leak: 64"]})
    for held in ({"num_used_tokens": 64}, {"num_waiting_reqs": 1}, {"num_running_reqs": 1},
                 {"max_total_num_tokens": 936}):
        assert not soak.passed({**record, "load_after": {**load, **held}}), held
    assert not soak.passed({**record, "server_alive_after_idle": False, "load_after": None})


class _FakeSGLang:
    """An HTTP server on this machine answering as SGLang: /generate streams a chunk per token
    every token_s (the tokens so far; the finish reason in the last), /health, and /v1/loads
    with the requests streaming now as running. Keeps every /generate body."""

    def __init__(self, token_s: float, pool: int) -> None:
        self.bodies: list[dict] = []
        self.streaming = 0
        self.pool = pool
        fake, lock = self, threading.Lock()

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: a stream ends when the server closes
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                load = {"num_running_reqs": fake.streaming, "num_waiting_reqs": 0,
                        "num_used_tokens": 0, "max_total_num_tokens": pool, "token_usage": 0.0}
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if self.path == "/v1/loads":
                    self.wfile.write(json.dumps({"loads": [load]}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n = body["sampling_params"]["max_new_tokens"]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                with lock:
                    fake.bodies.append(body)
                    fake.streaming += 1
                try:
                    for i in range(1, n + 1):
                        time.sleep(token_s)
                        self.wfile.write(_chunk(i, {"type": "length"} if i == n else None)
                                         + b"\n\n")
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client dropped the request
                finally:
                    with lock:
                        fake.streaming -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def alive(self) -> bool:
        return True

    def load(self) -> dict:
        return requests.get(self.url + "/v1/loads", timeout=10).json()["loads"][0]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


RETRACT_LOG = """\
[2026-12-06 10:00:01] Prefill batch, #new-seq: 1, #new-token: 8192
[2026-12-06 10:00:02] KV cache pool is full. Retract requests. #retracted_reqs: 3, \
#new_tokens_gained: 4096, #new_token_ratio: 0.7000 -> 0.9000
[2026-12-06 10:00:05] KV cache pool is full. Retract requests. #retracted_reqs: 1, \
#new_tokens_gained: 512, #new_token_ratio: 0.6000 -> 0.8000
[2026-12-06 10:00:06] Testing retraction. #retracted_reqs: 2, #new_tokens_gained: 128, \
#mamba_num_gained: 3
"""


@pytest.fixture
def fake_sglang(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_FakeSGLang, list]]:
    """The soak's `served` replaced by the fake server (its log: RETRACT_LOG), the GPU memory
    reading by 1234 MiB; yields the fake and [the flags, the environment] it was given."""
    fake = _FakeSGLang(token_s=0.05, pool=2000)
    started: list = []

    @contextlib.contextmanager
    def served(model_dir: Path, log_path: Path, flags: list[str], info: dict,
               keep_log: bool, env: dict | None = None) -> Iterator[_FakeSGLang]:
        started.extend([flags, env])
        info.update(startup_s=1.0, max_total_num_tokens=fake.pool)
        log_path.write_text(RETRACT_LOG)
        yield fake

    monkeypatch.setattr(soak, "served", served)
    monkeypatch.setattr(soak, "gpu_used_mib", lambda: 1234)
    monkeypatch.setattr(soak, "IDLE_S", 0.5)  # the fake sees a dropped stream at its next write
    monkeypatch.setattr(soak, "LOAD_POLL_S", 0.05)
    monkeypatch.setattr(soak.signal, "signal", lambda *args: None)  # leave pytest's handlers
    try:
        yield fake, started
    finally:
        fake.close()


def test_sala_soak_reports_outcomes_retractions_pools_and_memory(
    fake_sglang: tuple[_FakeSGLang, list], tmp_path: Path,
) -> None:
    fake, started = fake_sglang
    argv = ["--model", "sala", "--minutes", "0.05", "--requests", "200", "--min-len", "16",
            "--max-len", "256", "--longest", "1024", "--longest-every", "10", "--max-output",
            "12", "--concurrency", "6", "--abort-fraction", "0.3", "--abort-within", "0.3",
            "--force-retract-every", "50", "--out", str(tmp_path)]
    assert soak.main(argv) == 0
    [path] = tmp_path.glob("soak_sala_*.json")
    record = json.loads(path.read_text())

    assert record["passed"] and record["benchmark"] == "soak"
    assert record["requests"] == (record["completed"] + record["aborted_by_client"]
                                  + record["dropped_at_end"] + record["errors"])
    assert record["errors"] == 0 and record["error_samples"] == []
    assert record["completed"] > 0 and record["aborted_by_client"] > 0
    assert record["dropped_at_end"] > 0  # six were in flight when the time was up
    assert 0 <= record["aborted_before_first_token"] <= record["aborted_by_client"]
    assert record["requests"] < 200  # the minutes ended the run, not the plan
    assert 0 < record["longest_prompt_completed"] <= 1024
    assert (record["retractions"], record["retracted_requests"]) == (2, 4)
    assert (record["forced_retractions"], record["forced_retracted_requests"]) == (1, 2)
    assert started[1] == {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "50"}
    assert (record["gpu_used_mib_before"], record["gpu_used_mib_after"]) == (1234, 1234)
    assert record["server_alive_after_idle"] and record["health_after"] == 200
    assert record["load_before"]["max_total_num_tokens"] == 2000
    assert record["load_after"]["num_used_tokens"] == 0
    assert record["peak_load"]["num_running_reqs"] >= 1
    assert record["in_flight_tokens_peak"] > 0
    assert record["oversubscribed"] == (record["in_flight_tokens_peak"] > 2000)
    assert record["settings"]["minutes"] == 0.05 and record["server_flags"] == started[0]

    # served with bench's flags: random weights, OpenBMB's flags, CUDA graphs on, and a context
    # for the longest planned prompt and output
    flags = started[0]
    assert "--disable-cuda-graph" not in flags and "--dense-as-sparse" in flags
    assert flags[flags.index("--load-format") + 1] == "dummy"
    assert int(flags[flags.index("--context-length") + 1]) == 1024 + 12 + 64

    # streamed token-id prompts, fixed by the seed, and never logprob_start_len 0
    plans = soak.make_timed_plans(soak.parse_args(argv))
    for body in fake.bodies:
        assert body["stream"] and "logprob_start_len" not in body
        assert body["sampling_params"]["ignore_eos"]
        assert body["input_ids"] in [soak.prompt_ids(p.prompt_len, soak.TINY_VOCAB_SIZE, 0,
                                                     p.index) for p in plans[:record["requests"]]]


def test_timed_outcomes_are_summarised_by_kind() -> None:
    outcomes = [
        {"index": 0, "prompt_len": 100, "outcome": "completed"},
        {"index": 1, "prompt_len": 300, "outcome": "completed"},
        {"index": 2, "prompt_len": 50, "outcome": "aborted", "chunks": 0},
        {"index": 3, "prompt_len": 50, "outcome": "aborted", "chunks": 4},
        {"index": 4, "prompt_len": 900, "outcome": "dropped_at_end", "chunks": 0},
        {"index": 5, "prompt_len": 10, "outcome": "error", "error": "HTTP 500: boom"},
    ]
    summary = soak.timed_summary(outcomes)
    assert {k: v for k, v in summary.items() if k != "error_samples"} == {
        "requests": 6, "completed": 2, "aborted_by_client": 2, "aborted_before_first_token": 1,
        "dropped_at_end": 1, "errors": 1, "prompt_tokens_completed": 400,
        "longest_prompt_completed": 300}
    assert summary["error_samples"] == [outcomes[5]]
