"""Soak tests: many requests of random shape, a tenth dropped by the client, and afterwards a
server that is alive and healthy with its pools back at their free size.

`--model tiny` (the default): the tiny checkpoint, `--requests` requests. Prompts of 1 to 64K
tokens (log-uniform, so they fall on both sides of the tiny model's dense_len of 256 and of the
chunked-prefill size), random max_tokens, native /generate and OpenAI /v1/completions, streaming
and not; a tenth of the requests are streamed and dropped by the client after a few chunks.

    python benchmarks/soak.py --requests 1000 --max-len 65536

`--model sala`: MiniCPM-SALA's released config with random weights, served as `sala-sglang bench`
serves it (its model directory and flags: --load-format dummy, CUDA graphs on), for `--minutes`.
Prompts of 8K-512K random token ids (log-uniform) and every 25th of 1M, random output lengths,
64 requests in flight (more tokens than the KV pool holds: the scheduler queues them and may
retract running ones; the retractions are counted from the server log), a tenth dropped by the
client at a random time (queued, prefilling or decoding), and those still in flight at the end
dropped too.

    python benchmarks/soak.py --model sala --minutes 4.5 --force-retract-every 100

SGLang admits a prefill only where the pool has room for it, so a full pool, and with it
retraction, is rare even over-subscribed (none in 2.5 minutes at 3.4x on an H100).
`--force-retract-every N` sets SGLang's test knob (SGLANG_TEST_RETRACT, every N-th forward step
retracts running requests as a full pool would), so real-scale requests are retracted, freed and
prefilled again during the soak; those are counted apart from the pool-full ones.

Both: every request but the dropped ones must succeed with the requested number of tokens, and
after IDLE_S idle seconds the server must be alive and healthy, with the KV pool (and the
compressed keys paged alongside it) and the recurrent-state slots at their free size (SGLang's
strict idle check plus ours would stop the server otherwise; the /v1/loads counters are recorded
before and after). The sala mode also records the GPU memory in use before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import requests

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, header, write_result
from sala_sglang.bench import MODELS, prepare_model_dir, random_ids, served, server_flags  # noqa: E402
from sala_sglang.server_args import BACKEND_NAMES  # noqa: E402
from sala_sglang.testing.server import Server  # noqa: E402
from sala_sglang.tiny import TINY_VOCAB_SIZE, make_tiny  # noqa: E402

# Defaults that differ by model. sala: 64 requests of the plan's mean ~160K tokens (8K-512K
# log-uniform, every 25th 1M) are ~10M tokens, above the 5.9M-token KV pool of an H100 at
# --mem-fraction-static 0.85.
MODE_DEFAULTS = {
    "tiny": {"max_len": 65536, "concurrency": 32},
    "sala": {"max_len": 524288, "concurrency": 64},
}
# Idle seconds before the checks after the run: SGLang's strict pool checks (and ours) run, and
# the load counters are republished.
IDLE_S = 15
# How often the sala mode reads /v1/loads while requests run, for the peaks it reports.
LOAD_POLL_S = 2.0
PEAK_KEYS = ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "token_usage")
LOAD_KEYS = ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "num_total_tokens",
             "max_total_num_tokens", "token_usage", "memory")
# SGLang's line when a decode step finds the KV pool full (Scheduler.update_running_batch).
RETRACT_LINE = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")
# Its line when the test knob retracted (`--force-retract-every`).
FORCED_RETRACT_LINE = re.compile(r"Testing retraction\. #retracted_reqs: (\d+)")
SUMMARY_KEYS = ("passed", "requests", "completed", "aborted_by_client", "dropped_at_end",
                "errors", "retracted_requests", "forced_retracted_requests", "prompt_tokens",
                "longest_prompt", "prompt_tokens_completed", "longest_prompt_completed",
                "oversubscribed", "gpu_used_mib_before", "gpu_used_mib_after", "seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The soak's arguments, with the defaults that differ by model (MODE_DEFAULTS) filled in."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODE_DEFAULTS), default="tiny",
                   help="tiny: the tiny checkpoint; sala: MiniCPM-SALA's released config with "
                        "random weights")
    p.add_argument("--requests", type=int, default=1000,
                   help="requests to send (sala: at most, within --minutes)")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="sala: how long requests are sent; those in flight then are dropped")
    p.add_argument("--min-len", type=int, default=8192, help="sala: the shortest prompt")
    p.add_argument("--max-len", type=int, default=None,
                   help="the longest prompt (default 65536 tiny, 524288 sala), but for sala's "
                        "--longest")
    p.add_argument("--longest", type=int, default=1 << 20,
                   help="sala: the length of every --longest-every-th prompt")
    p.add_argument("--longest-every", type=int, default=25,
                   help="sala: every n-th prompt is --longest tokens long (0: none)")
    p.add_argument("--max-output", type=int, default=1024,
                   help="sala: output lengths are uniform in [1, this]")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight (default 32 tiny, 64 sala)")
    p.add_argument("--abort-fraction", type=float, default=0.1)
    p.add_argument("--abort-within", type=float, default=120.0,
                   help="sala: a dropped request is dropped at a random time up to this many "
                        "seconds after it was sent")
    p.add_argument("--force-retract-every", type=int, default=0, metavar="N",
                   help="SGLang's test knob: every N-th forward step retracts running requests "
                        "as a full KV pool would (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra flags for sglang.launch_server")
    p.add_argument("--tag", default=None, help="the result file's name (default soak_<model>)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--part", action="store_true",
                   help="one part of a soak spread over several runs (benchmarks/soak_parts.py "
                        "adds them up): the tag gets the start time (UTC) and the seed is that "
                        "time's, so parts neither overwrite each other nor repeat one plan")
    args = p.parse_args(argv)
    for key, value in MODE_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tag = args.tag or f"soak_{args.model}"
    if args.part:
        start = datetime.datetime.now(datetime.timezone.utc)
        args.tag = f"{args.tag}_part_{start:%H%M%S}"
        args.seed = int(start.timestamp())
    return args


def prompt_ids(length: int, vocab: int, seed: int, index: int) -> list[int]:
    """Request `index`'s prompt: random token ids, fixed by the soak's seed."""
    return random_ids(length, vocab, seed * 100003 + index)


# ---- the tiny checkpoint ----------------------------------------------------------------------
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
    ids = prompt_ids(plan.prompt_len, TINY_VOCAB_SIZE, seed, plan.index)
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


def run_tiny(args: argparse.Namespace) -> dict:
    """The tiny checkpoint's soak: `args.requests` requests, `args.concurrency` client threads."""
    work = Path(tempfile.mkdtemp(prefix="sala-soak-"))
    model = make_tiny(work / "tiny")
    flags = ["--context-length", str(args.max_len + 300), "--chunked-prefill-size", "8192",
             "--max-running-requests", str(args.concurrency), *args.server_args.split()]
    plans = make_plans(args.requests, args.max_len, args.abort_fraction, args.seed)
    server = Server(model, work / "server.log", *flags, env=retract_env(args))
    record = {**header("soak", args.tag), "server_flags": flags, "settings": _settings(args)}
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
        record.update(after_idle(server))
    finally:
        server.stop()
        log = server.tail(10**8)
    errors = [d for d in done if "error" in d]
    aborted = [d for d in done if "aborted_after_chunks" in d]
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
        **log_findings(log),
    })
    return record


# ---- the released config, random weights -------------------------------------------------------
@dataclass(frozen=True)
class TimedPlan:
    """One request of the sala soak; drop_after_s: when the client drops it, in seconds after
    sending it (None: kept to the end)."""

    index: int
    prompt_len: int
    max_tokens: int
    drop_after_s: float | None


def make_timed_plans(args: argparse.Namespace) -> list[TimedPlan]:
    """`args.requests` requests: prompts log-uniform in [min_len, max_len] tokens and every
    longest_every-th of `longest`, 1 to max_output output tokens, abort_fraction of them dropped
    at a time uniform in [0, abort_within] seconds after sending; fixed by the seed."""
    rng = random.Random(args.seed)
    low, high = math.log(args.min_len), math.log(args.max_len)
    plans = []
    for i in range(args.requests):
        prompt_len = round(math.exp(rng.uniform(low, high)))
        dropped = rng.random() < args.abort_fraction
        plans.append(TimedPlan(
            index=i,
            prompt_len=(args.longest if args.longest_every and (i + 1) % args.longest_every == 0
                        else prompt_len),
            max_tokens=rng.randint(1, args.max_output),
            drop_after_s=rng.uniform(0, args.abort_within) if dropped else None,
        ))
    return plans


def timed_body(plan: TimedPlan, vocab: int, seed: int) -> bytes:
    """A plan's streamed /generate request, encoded: the prompt as token ids and exactly
    max_tokens sampled tokens (ignore_eos). No input logprobs: asked from position 0 they would
    keep SGLang from matching any cached prefix."""
    return json.dumps({
        "input_ids": prompt_ids(plan.prompt_len, vocab, seed, plan.index),
        "sampling_params": {"max_new_tokens": plan.max_tokens, "ignore_eos": True,
                            "temperature": 0.7},
        "stream": True,
    }).encode()


def stream_error(last: bytes, max_tokens: int) -> str | None:
    """What went wrong with a stream that ended, read from its last `data:` chunk; None if it
    produced max_tokens tokens."""
    if not last:
        return "no tokens streamed"
    chunk = json.loads(last[len(b"data: "):])
    if "error" in chunk:  # SGLang streams a rejection as a data chunk (HTTP 200)
        return f"streamed error: {chunk['error']}"
    meta = chunk["meta_info"]
    reason = meta.get("finish_reason") or {}
    if reason.get("type") == "abort":  # e.g. one the scheduler could not fit even alone
        return f"aborted by the server: {reason.get('message')}"
    if meta["completion_tokens"] != max_tokens:
        return f"{meta['completion_tokens']} tokens generated, {max_tokens} requested"
    return None


class InFlight:
    """Planned tokens (prompt and output) of the requests in flight, and their peak."""

    def __init__(self) -> None:
        self.tokens = self.peak = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.peak = max(self.peak, self.tokens)


async def send(session: aiohttp.ClientSession, url: str, plan: TimedPlan, end: float, vocab: int,
               seed: int, in_flight: InFlight) -> dict:
    """One plan's request, dropped (its connection closed: SGLang aborts it) at its drop time or
    at `end` (event-loop time), whichever comes first. The outcome is "completed", "aborted"
    (dropped as planned), "dropped_at_end" or "error"; a drop notes the chunks streamed before
    it (none: the request was queued or prefilling)."""
    loop = asyncio.get_running_loop()
    data = await asyncio.to_thread(timed_body, plan, vocab, seed)  # ~1 s for 1M ids
    sent = loop.time()
    planned = plan.drop_after_s is not None and sent + plan.drop_after_s < end
    row = {"index": plan.index, "prompt_len": plan.prompt_len, "max_tokens": plan.max_tokens}
    chunks, last = 0, b""
    in_flight.add(plan.prompt_len + plan.max_tokens)
    try:
        async with asyncio.timeout_at(sent + plan.drop_after_s if planned else end):
            async with session.post(url + "/generate", data=data,
                                    headers={"Content-Type": "application/json"}) as r:
                if r.status != 200:
                    return {**row, "outcome": "error",
                            "error": f"HTTP {r.status}: {(await r.text())[:300]}"}
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        chunks, last = chunks + 1, line
        error = stream_error(last, plan.max_tokens)
    except TimeoutError:
        return {**row, "outcome": "aborted" if planned else "dropped_at_end", "chunks": chunks}
    except (aiohttp.ClientError, ValueError, KeyError) as exc:
        error = repr(exc)[:300]
    finally:
        in_flight.add(-(plan.prompt_len + plan.max_tokens))
    row["seconds"] = round(loop.time() - sent, 3)
    if error:
        return {**row, "outcome": "error", "error": error}
    return {**row, "outcome": "completed"}


async def watch_loads(session: aiohttp.ClientSession, url: str, peak: dict) -> None:
    """Keeps the highest /v1/loads counters (PEAK_KEYS) in `peak`, read every LOAD_POLL_S,
    until cancelled."""
    while True:
        try:
            async with session.get(url + "/v1/loads") as r:
                row = (await r.json())["loads"][0]
            for key in PEAK_KEYS:
                peak[key] = max(peak.get(key, 0), row.get(key, 0))
        except (aiohttp.ClientError, ValueError, KeyError, IndexError):
            pass  # a server gone away shows in the checks after the run
        await asyncio.sleep(LOAD_POLL_S)


async def drive(url: str, plans: list[TimedPlan], concurrency: int, seconds: float, vocab: int,
                seed: int) -> dict:
    """Sends the plans in order, `concurrency` at a time, for `seconds`: every request's outcome
    (see send), the peak of the planned tokens in flight, and the highest /v1/loads counters."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    todo = iter(plans)
    outcomes: list[dict] = []
    in_flight, peak = InFlight(), {}
    # One connection per request, closed with it; no client-side time limit but `end`; a chunk
    # carries every id generated so far, so lines may be long.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=None),
                                     read_bufsize=1 << 20) as session:

        async def client() -> None:
            for plan in todo:  # shared by the clients: each plan is sent once
                if loop.time() >= end:
                    return
                outcomes.append(await send(session, url, plan, end, vocab, seed, in_flight))

        watcher = asyncio.create_task(watch_loads(session, url, peak))
        await asyncio.gather(*(client() for _ in range(concurrency)))
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return {"outcomes": sorted(outcomes, key=lambda o: o["index"]),
            "in_flight_tokens_peak": in_flight.peak, "peak_load": peak}


def timed_summary(outcomes: list[dict]) -> dict:
    """The sala soak's counts: completed, dropped as planned (and how many of those before their
    first token), dropped at the end, errors."""
    count = Counter(o["outcome"] for o in outcomes)
    completed = [o for o in outcomes if o["outcome"] == "completed"]
    errors = [o for o in outcomes if o["outcome"] == "error"]
    return {
        "requests": len(outcomes),
        "completed": count["completed"],
        "aborted_by_client": count["aborted"],
        "aborted_before_first_token": sum(o["outcome"] == "aborted" and o["chunks"] == 0
                                          for o in outcomes),
        "dropped_at_end": count["dropped_at_end"],
        "errors": count["error"],
        "error_samples": errors[:20],
        "prompt_tokens_completed": sum(o["prompt_len"] for o in completed),
        "longest_prompt_completed": max((o["prompt_len"] for o in completed), default=0),
    }


def gpu_used_mib() -> int | None:
    """GPU 0's memory in use by every process (MiB), None where it cannot be read. Read in a
    child process: torch.cuda.mem_get_info here would give this client a CUDA context for the
    rest of the run; the child's own context is in every reading alike."""
    code = "import torch; free, total = torch.cuda.mem_get_info(0); print((total - free) >> 20)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    return int(out.stdout) if out.returncode == 0 and out.stdout.strip().isdigit() else None


def run_sala(args: argparse.Namespace) -> dict:
    """The released config's soak: requests for `args.minutes`, `args.concurrency` in flight."""
    shape = MODELS["sala"]
    work = Path(tempfile.mkdtemp(prefix="sala-soak-"))
    log_path = work / "server.log"
    plans = make_timed_plans(args)
    context = max(p.prompt_len for p in plans) + args.max_output + 64
    record = {**header("soak", args.tag),
              "model": f"sala: {shape.config_path.name}, random weights (--load-format dummy)",
              "settings": _settings(args)}
    try:
        model_dir, tok_dir = prepare_model_dir(shape, work)
        flags = record["server_flags"] = server_flags(shape, BACKEND_NAMES[0], context, tok_dir,
                                                      args.server_args)
        with served(model_dir, log_path, flags, record, keep_log=False,
                    env=retract_env(args)) as server:
            record["load_before"] = loads(server)
            record["gpu_used_mib_before"] = gpu_used_mib()
            print(f"[soak] {args.minutes} minutes, {args.concurrency} requests in flight",
                  flush=True)
            t0 = time.perf_counter()
            # the tokenizer `bench` gives the server: its ids are valid for the model too
            traffic = asyncio.run(drive(server.url, plans, args.concurrency, args.minutes * 60,
                                        TINY_VOCAB_SIZE, args.seed))
            record["seconds"] = round(time.perf_counter() - t0, 1)
            record.update(after_idle(server))
            record["gpu_used_mib_after"] = gpu_used_mib()
        log = log_path.read_text(errors="replace")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pool = record.get("max_total_num_tokens")
    record.update({
        **timed_summary(traffic["outcomes"]),
        "in_flight_tokens_peak": traffic["in_flight_tokens_peak"],
        "oversubscribed": bool(pool) and traffic["in_flight_tokens_peak"] > pool,
        "peak_load": traffic["peak_load"],
        **log_findings(log),
    })
    return record


# ---- shared ------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> dict:
    return vars(args) | {"out": str(args.out)}


def retract_env(args: argparse.Namespace) -> dict[str, str]:
    """The server environment that makes SGLang retract every `--force-retract-every` steps."""
    if args.force_retract_every <= 0:
        return {}
    return {"SGLANG_TEST_RETRACT": "1",
            "SGLANG_TEST_RETRACT_INTERVAL": str(args.force_retract_every)}


def loads(server: Server) -> dict:
    """The load counters the soak records before and after."""
    row = server.load()
    return {k: row[k] for k in LOAD_KEYS if k in row}


def after_idle(server: Server) -> dict:
    """After IDLE_S idle seconds: whether the server is alive and healthy, and its loads."""
    time.sleep(IDLE_S)
    alive = server.alive()
    return {
        "server_alive_after_idle": alive,
        "health_after": (requests.get(server.url + "/health", timeout=30).status_code
                         if alive else None),
        "load_after": loads(server) if alive else None,
    }


def log_findings(log: str) -> dict:
    """From the server log: retraction lines (and the requests they retracted; a full pool's and
    the test knob's apart), leak reports and errors."""
    lines = log.splitlines()
    retracted = [int(m.group(1)) for m in map(RETRACT_LINE.search, lines) if m]
    forced = [int(m.group(1)) for m in map(FORCED_RETRACT_LINE.search, lines) if m]
    return {
        "retractions": len(retracted),
        "retracted_requests": sum(retracted),
        "forced_retractions": len(forced),
        "forced_retracted_requests": sum(forced),
        "leak_lines_in_log": [line[-300:] for line in lines if "leak" in line.lower()],
        "server_log_errors": [line[-300:] for line in lines
                              if "Traceback" in line or " ERROR " in line][:20],
    }


def pool_back_to_start(record: dict) -> bool:
    """After the idle wait: no request left and every KV slot free, in a pool of its starting
    size."""
    before, after = record.get("load_before") or {}, record.get("load_after") or {}
    return bool(
        before.get("num_used_tokens") == after.get("num_used_tokens") == 0
        and after.get("num_running_reqs") == after.get("num_waiting_reqs") == 0
        and after.get("max_total_num_tokens") == before.get("max_total_num_tokens")
    )


def passed(record: dict) -> bool:
    """No request failed, and after the idle wait the server is alive and healthy, reported no
    leak, and its pool is back to its start (`pool_back_to_start`)."""
    return bool(
        record["errors"] == 0 and record.get("server_alive_after_idle")
        and record.get("health_after") == 200 and not record["leak_lines_in_log"]
        and pool_back_to_start(record)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (e.g. from `timeout`) must still stop the server through the finally blocks:
    # left running, it holds the GPU memory the next run needs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    record = run_sala(args) if args.model == "sala" else run_tiny(args)
    record["passed"] = passed(record)
    write_result(record, args.tag, args.out)
    print("[soak] " + json.dumps({k: record[k] for k in SUMMARY_KEYS if k in record}), flush=True)
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
