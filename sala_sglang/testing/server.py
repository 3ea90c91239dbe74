"""Launch `python -m sglang.launch_server` with the plugin for tests and benchmarks, and talk to
it (health, /generate with logprobs, load counters)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

STARTUP_TIMEOUT_S = 900
# Flags added to every test server's command line before the test's own (which win), so that
# parts of the GPU suite can share one GPU (scripts/gpu_checks.sh serving-parallel, side-by-side).
# SGLang sizes the pools from --mem-fraction-static of the whole GPU less what every other process
# holds when the server starts, so servers sharing a GPU take a large fraction and cap their
# pools instead (--max-total-tokens, --max-mamba-cache-size).
EXTRA_FLAGS_ENV = "SALA_SGLANG_TEST_SERVER_FLAGS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flush_cache(url: str) -> None:
    """Empties the server's prefix cache, so that nothing sent next finds what earlier requests
    left there. SGLang refuses (HTTP 400) while a request is queued or running, and a response can
    reach the client a step before the scheduler lets its request go, so it is asked to wait up to
    60 s for the scheduler to go idle instead."""
    requests.post(url + "/flush_cache", params={"timeout": 60}, timeout=120).raise_for_status()


class Server:
    """`python -m sglang.launch_server` in its own process group, log kept in a file."""

    mode = "server"  # the label `started` gives it, for messages

    def __init__(
        self, model_dir: Path, log_path: Path, *flags: str, env: dict | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(model_dir),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--attention-backend", "minicpm_flashinfer",
            "--sampling-backend", "pytorch",
            "--grammar-backend", "none",
            "--mem-fraction-static", "0.5",
            *shlex.split(os.environ.get(EXTRA_FLAGS_ENV, "")),
            *flags,  # last: a test's own flags win
        ]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1", **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, chars: int = 6000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def load(self) -> dict:
        """The scheduler's load counters from /v1/loads (first DP rank): running and waiting
        requests, used and total KV tokens."""
        r = requests.get(self.url + "/v1/loads", timeout=30)
        r.raise_for_status()
        return r.json()["loads"][0]

    def wait_for_load(self, what: str, until: Callable[[dict], bool],
                      timeout: float = 30) -> dict:
        """Polls /v1/loads (republished after every prefill chunk, every 15 decode steps and
        when idle) until `until` holds for it; returns that row."""
        deadline = time.time() + timeout
        while not until(row := self.load()):
            assert time.time() < deadline, f"{self.mode}: not {what} after {timeout} s: {row}"
            time.sleep(0.05)
        return row

    def assert_pools_free(self, settle_s: float = 3, timeout_s: float = 20) -> dict:
        """After the requests: the server alive, no leak reported by the strict idle checks it
        runs with, and the load counters back at no running or waiting request and no used KV
        token (the snapshot is published periodically, so it is polled up to timeout_s).
        Returns them."""
        time.sleep(settle_s)  # idle: the strict pool checks run
        assert self.alive(), self.tail()
        assert "leak" not in self.tail(10**8).lower(), self.tail()
        deadline = time.time() + timeout_s
        while True:
            row = self.load()
            if (row["num_used_tokens"], row["num_running_reqs"], row["num_waiting_reqs"]) == (
                    0, 0, 0):
                return row
            assert time.time() < deadline, row
            time.sleep(1)

    def flush_cache(self) -> None:
        flush_cache(self.url)

    def generate(self, input_ids: list[int], max_new_tokens: int, **extra: Any) -> dict:
        body = {
            "input_ids": input_ids,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                "ignore_eos": True},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
            **extra,
        }
        r = requests.post(self.url + "/generate", json=body, timeout=600)
        r.raise_for_status()
        return r.json()


@contextlib.contextmanager
def started(model_dir: Path, log_path: Path, *flags: str, mode: str,
            env: dict | None = None) -> Iterator[Server]:
    """A ready `Server` labelled `mode` for the block; stopped after it, its log's tail printed
    (pytest shows it with the failing test)."""
    srv = Server(model_dir, log_path, *flags, env=env)
    srv.mode = mode
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
        print(f"--- server log tail ({mode}) ---\n{srv.tail(3000)}")
