"""Where a decode step's time goes: MiniCPM-SALA (released config, random weights) served by
SGLang with CUDA graphs, one request decoding after a long prompt, profiled by SGLang's torch
profiler (/start_profile) for a number of steps. Reports kernels per step, GPU-busy time per step
against the step's wall time, and the kernels that take the most time.

    python benchmarks/profile_decode.py --context 32768 --steps 32
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import requests

from sala_sglang.bench import (
    COMMON_FLAGS,
    MODELS,
    SAMPLED,
    header,
    prepare_model_dir,
    random_ids,
    stream_one,
    write_result,
)
from sala_sglang.testing.server import Server
from sala_sglang.tiny import TINY_VOCAB_SIZE

TRACE_WAIT_S = 300


def gpu_events(events: list[dict], categories: tuple[str, ...] = ("kernel",)) -> list[dict]:
    """A Chrome trace's complete ("ph": "X") GPU events of these categories: kernels by default,
    "gpu_memcpy" and "gpu_memset" too where asked; times in us."""
    return [e for e in events if e.get("cat") in categories and e.get("ph") == "X"]


def durations_by_name(events: list[dict]) -> dict[str, list[float]]:
    """Each event name's durations (us), the names ordered by total time, largest first."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in events:
        by_name[e["name"]].append(float(e["dur"]))
    return dict(sorted(by_name.items(), key=lambda kv: -sum(kv[1])))


def span_us(events: list[dict]) -> float:
    """From the first event's start to the last one's end (us)."""
    return max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)


def kernel_summary(events: list[dict], top: int = 30) -> dict:
    """Per-step figures from a Chrome trace's GPU kernel events ("cat": "kernel", times in us);
    a step is one CUDA-graph launch (the profiler may take a step more than it was asked to)."""
    kernels = gpu_events(events)
    steps = sum(1 for e in events
                if e.get("name") == "cudaGraphLaunch" and e.get("ph") == "X")
    if not kernels or not steps:
        return {"error": f"the trace holds {len(kernels)} GPU kernels and {steps} graph launches"}
    by_name = durations_by_name(kernels)
    busy_us = sum(sum(d) for d in by_name.values())
    span = span_us(kernels)
    return {
        "steps": steps,
        "kernels_per_step": round(len(kernels) / steps, 1),
        "gpu_busy_ms_per_step": round(busy_us / steps / 1e3, 3),
        "span_ms_per_step": round(span / steps / 1e3, 3),
        "busy_fraction": round(busy_us / span, 3),
        "top_kernels": [
            {"name": name[:160], "calls_per_step": round(len(d) / steps, 2),
             "ms_per_step": round(sum(d) / steps / 1e3, 4), "mean_us": round(sum(d) / len(d), 2)}
            for name, d in list(by_name.items())[:top]
        ],
    }


def start_profile(url: str, output_dir: Path, **options: object) -> None:
    """SGLang's /start_profile (its ProfileReq fields as options); the trace goes to output_dir."""
    r = requests.post(url + "/start_profile", timeout=60,
                      json={"output_dir": str(output_dir), **options})
    r.raise_for_status()


def wait_for_trace(folder: Path) -> Path:
    """The first trace file under folder, once its size has stopped changing (fully written)."""
    deadline = time.time() + TRACE_WAIT_S
    last_size = -1
    while time.time() < deadline:
        found = sorted(folder.rglob("*.trace.json.gz")) + sorted(folder.rglob("*.trace.json"))
        size = found[0].stat().st_size if found else -1
        if size > 0 and size == last_size:
            return found[0]
        last_size = size
        time.sleep(1)
    raise TimeoutError(f"no complete trace under {folder} after {TRACE_WAIT_S} s")


def load_events(path: Path) -> list[dict]:
    """A Chrome trace's events (gzipped or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=32768, help="prompt tokens before decoding")
    p.add_argument("--server-context", type=int, default=None,
                   help="the server's --context-length (default: the prompt and its decode): "
                        "decode selection scans the server's whole block width, so a server "
                        "started for more tokens decodes the same prompt more slowly")
    p.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    p.add_argument("--server-args", default="", help="extra flags for sglang.launch_server")
    p.add_argument("--sampled", action="store_true",
                   help="sample the profiled request at temperature 1 over the whole vocabulary "
                        "(greedy otherwise): with --speculative-algorithm NGRAM among the server "
                        "args, drafts then almost never match, so each step is one verify")
    p.add_argument("--tag", default="profile_decode_sala")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    shape = MODELS["sala"]
    work = Path(tempfile.mkdtemp(prefix="sala-profile-"))
    model_dir, tok_dir = prepare_model_dir(shape, work)
    new_tokens = 64 + 4 * args.steps
    server_context = max(args.server_context or 0, args.context + new_tokens + 64)
    flags = [*COMMON_FLAGS, *shape.server_flags, "--context-length",
             str(server_context), "--tokenizer-path", str(tok_dir),
             *args.server_args.split()]
    sampling = SAMPLED if args.sampled else None
    record = {**header("profile_decode", args.tag), "context": args.context, "server_flags": flags,
              "sampling": sampling or "greedy"}
    server = Server(model_dir, work / "server.log", *flags)
    try:
        server.wait_ready()
        stream_one(server.url, random_ids(4096, TINY_VOCAB_SIZE, 0), 32)  # JIT and autotuning
        result: dict = {}
        decoding = threading.Event()
        request = threading.Thread(target=lambda: result.update(stream_one(
            server.url, random_ids(args.context, TINY_VOCAB_SIZE, 1), new_tokens,
            sampling=sampling, speculative="--speculative-algorithm" in flags,
            first_token=decoding)))
        request.start()
        if not decoding.wait(timeout=TRACE_WAIT_S):
            raise TimeoutError(f"no token after {TRACE_WAIT_S} s: {result}")
        traces = work / "traces"
        start_profile(server.url, traces, num_steps=args.steps, activities=["CPU", "GPU"])
        events = load_events(wait_for_trace(traces))
        request.join()
        record["request"] = result
        record["profile"] = kernel_summary(events)
        print(json.dumps(record["profile"], indent=1), flush=True)
    finally:
        server.stop()
        record["server_log_tail"] = server.tail(3000)
        write_result(record, args.tag, args.out)
        shutil.rmtree(work, ignore_errors=True)
    return 0 if "error" not in record.get("profile", {"error": 1}) else 1


if __name__ == "__main__":
    sys.exit(main())
