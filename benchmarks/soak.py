"""Soak test: many requests of random shape against the tiny checkpoint, 10% aborted mid-stream.

Prompts of 1 to 64K tokens (log-uniform, so they fall on both sides of the tiny model's
dense_len of 256 and of the chunked-prefill size), random max_tokens, native /generate and
OpenAI /v1/completions, streaming and not; a tenth of the requests are streamed and dropped by
the client after a few chunks. Afterwards the server must be alive and healthy, every request
but the aborted ones must have succeeded with the requested number of tokens, and the KV pool
(with the compressed keys paged alongside it) and the recurrent-state slots must be back at
their free size (SGLang's strict idle check plus ours would stop the server otherwise; the
/v1/loads counters are recorded before and after).

    python benchmarks/soak.py --requests 1000 --max-len 65536
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, header, write_result
from sala_sglang.bench import random_ids  # noqa: E402
from sala_sglang.testing.server import Server  # noqa: E402
from sala_sglang.tiny import TINY_VOCAB_SIZE, make_tiny  # noqa: E402


@dataclass(frozen=True)
class Plan:
    index: int
    prompt_len: int
    max_tokens: int
    api: str  # "native" or "openai"
    stream: bool
    abort_after: int | None  # chunks read before the client drops the stream


def make_plans(n: int, max_len: int, abort_fraction: float, seed: int) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for i in range(n):
        aborted = rng.random() < abort_fraction
        plans.append(Plan(
            index=i,
            prompt_len=min(max_len, int(math.exp(rng.uniform(0, math.log(max_len))))),
            max_tokens=rng.randint(16, 256) if aborted else rng.randint(1, 256),
            api=rng.choice(["native", "openai"]),
            stream=aborted or rng.random() < 0.5,
            abort_after=rng.randint(1, 8) if aborted else None,
        ))
    return plans


def _body(plan: Plan, ids: list[int]) -> tuple[str, dict]:
    if plan.api == "native":
        return "/generate", {
            "input_ids": ids, "stream": plan.stream,
            "sampling_params": {"max_new_tokens": plan.max_tokens, "ignore_eos": True,
                                "temperature": 0.7},
        }
    body = {"model": "tiny", "prompt": ids, "max_tokens": plan.max_tokens, "stream": plan.stream,
            "temperature": 0.7, "ignore_eos": True}
    if plan.stream:
        body["stream_options"] = {"include_usage": True}
    return "/v1/completions", body


def _completion_tokens(plan: Plan, response: requests.Response) -> int:
    """Generated tokens of a finished request, from its body or its streamed chunks."""
    if not plan.stream:
        data = response.json()
        if plan.api == "native":
            return data["meta_info"]["completion_tokens"]
        return data["usage"]["completion_tokens"]
    chunks = [json.loads(line[6:]) for line in response.iter_lines()
              if line.startswith(b"data: ") and line != b"data: [DONE]"]
    if plan.api == "native":
        return chunks[-1]["meta_info"]["completion_tokens"]
    return next(c["usage"]["completion_tokens"] for c in reversed(chunks) if c.get("usage"))


def run_one(url: str, plan: Plan, seed: int) -> dict:
    ids = random_ids(plan.prompt_len, TINY_VOCAB_SIZE, seed * 100003 + plan.index)
    path, body = _body(plan, ids)
    t0 = time.perf_counter()
    outcome = {"index": plan.index, "prompt_len": plan.prompt_len, "api": plan.api,
               "stream": plan.stream}
    try:
        with requests.post(url + path, json=body, stream=plan.stream, timeout=1800) as r:
            if r.status_code != 200:
                return {**outcome, "error": f"HTTP {r.status_code}: {r.text[:300]}"}
            if plan.abort_after is not None:
                chunks = 0
                for line in r.iter_lines():
                    chunks += line.startswith(b"data: ")
                    if chunks >= plan.abort_after:
                        break
                return {**outcome, "aborted_after_chunks": chunks}  # closing drops the stream
            got = _completion_tokens(plan, r)
    except (requests.RequestException, ValueError, KeyError, TypeError, StopIteration) as exc:
        return {**outcome, "error": repr(exc)[:300]}
    outcome["seconds"] = round(time.perf_counter() - t0, 3)
    if got != plan.max_tokens:
        outcome["error"] = f"{got} tokens generated, {plan.max_tokens} requested"
    return outcome


LOAD_KEYS = ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "num_total_tokens",
             "max_total_num_tokens", "token_usage", "memory")


def loads(server: Server) -> dict:
    """The load counters the soak records before and after."""
    row = server.load()
    return {k: row[k] for k in LOAD_KEYS if k in row}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--max-len", type=int, default=65536)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--abort-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra flags for sglang.launch_server")
    p.add_argument("--tag", default="soak_tiny")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sala-soak-"))
    model = make_tiny(work / "tiny")
    flags = ["--context-length", str(args.max_len + 300), "--chunked-prefill-size", "8192",
             "--max-running-requests", str(args.concurrency), *args.server_args.split()]
    plans = make_plans(args.requests, args.max_len, args.abort_fraction, args.seed)
    server = Server(model, work / "server.log", *flags)
    record = {**header("soak", args.tag), "server_flags": flags, "settings": vars(args) | {
        "out": str(args.out)}}
    done: list[dict] = []
    try:
        server.wait_ready()
        record["load_before"] = loads(server)
        print(f"[soak] {len(plans)} requests, {args.concurrency} at a time", flush=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for outcome in pool.map(lambda plan: run_one(server.url, plan, args.seed), plans):
                done.append(outcome)
                if len(done) % 100 == 0:
                    print(f"[soak] {len(done)} done, {sum('error' in d for d in done)} errors, "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        time.sleep(15)  # idle: SGLang's strict pool checks (and ours) run, loads are republished
        record["server_alive_after_idle"] = server.alive()
        record["health_after"] = (requests.get(server.url + "/health", timeout=30).status_code
                                  if server.alive() else None)
        record["load_after"] = loads(server) if server.alive() else None
    finally:
        server.stop()
        log = server.tail(10**8)
    errors = [d for d in done if "error" in d]
    aborted = [d for d in done if "aborted_after_chunks" in d]
    after, before = record.get("load_after") or {}, record.get("load_before") or {}
    record.update({
        "requests": len(done),
        "completed": len(done) - len(errors) - len(aborted),
        "aborted_by_client": len(aborted),
        "errors": len(errors),
        "error_samples": errors[:20],
        "prompt_tokens": sum(d["prompt_len"] for d in done),
        "longest_prompt": max((d["prompt_len"] for d in done), default=0),
        "streamed": sum(d["stream"] for d in done),
        "openai_api": sum(d["api"] == "openai" for d in done),
        "leak_lines_in_log": [line[-300:] for line in log.splitlines() if "leak" in line.lower()],
        "server_log_errors": [line[-300:] for line in log.splitlines()
                              if "Traceback" in line or " ERROR " in line][:20],
    })
    record["passed"] = bool(
        record["errors"] == 0 and record["server_alive_after_idle"]
        and record["health_after"] == 200 and not record["leak_lines_in_log"]
        and after.get("num_used_tokens") == before.get("num_used_tokens") == 0
        and after.get("num_running_reqs") == 0
    )
    write_result(record, args.tag, args.out)
    summary = {k: record[k] for k in ("passed", "requests", "completed", "aborted_by_client",
                                      "errors", "prompt_tokens", "longest_prompt", "seconds")}
    print("[soak] " + json.dumps(summary), flush=True)
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
