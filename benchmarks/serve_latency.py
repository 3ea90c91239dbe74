"""TTFT and decode speed of one request at a time, served by SGLang with the plugin.

Runs the real MiniCPM-SALA config with random weights (`--load-format dummy`, no tokenizer) and
writes JSON (device, versions, date, command, numbers) under benchmarks/results/.

    python benchmarks/serve_latency.py --lengths 32768 --decode-tokens 256 --tag serving32k
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RELEASED_CONFIG, RESULTS, header, write_result  # noqa: E402

from sala_sglang.served_check import Server  # noqa: E402


def model_dir(config: Path, workdir: Path, overrides: dict) -> Path:
    raw = json.loads(config.read_text())
    raw.update(overrides)
    (workdir / "config.json").write_text(json.dumps(raw, indent=2))
    return workdir


def timed_generate(url: str, ids: list[int], new_tokens: int) -> dict:
    """Stream one greedy request; TTFT from send to first chunk, decode rate from the rest."""
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
        "stream": True,
    }
    t0 = time.perf_counter()
    stamps = []
    with requests.post(url + "/generate", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                stamps.append(time.perf_counter())
    ttft = stamps[0] - t0
    decode_s = stamps[-1] - stamps[0]
    return {
        "input_tokens": len(ids),
        "output_tokens": new_tokens,
        "ttft_s": round(ttft, 4),
        "decode_tok_per_s": round((new_tokens - 1) / decode_s, 2) if new_tokens > 1 else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768])
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--tag", default="serving")
    p.add_argument("--config", type=Path, default=RELEASED_CONFIG)
    p.add_argument("--server-args", default="", help="extra flags for sglang.launch_server")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sala-bench-"))
    model = model_dir(args.config, work, {})
    vocab = json.loads(args.config.read_text())["vocab_size"]
    flags = [
        "--load-format", "dummy", "--skip-tokenizer-init", "--mem-fraction-static", "0.85",
        "--context-length", str(max(args.lengths) + args.decode_tokens + 16),
        *args.server_args.split(),
    ]
    server = Server(model, work / "server.log", *flags)
    started = time.perf_counter()
    results = []
    try:
        server.wait_ready()
        startup_s = time.perf_counter() - started
        gen = torch.Generator().manual_seed(0)
        timed_generate(server.url, torch.randint(3, vocab, (512,), generator=gen).tolist(), 8)
        for n in args.lengths:
            ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
            row = timed_generate(server.url, ids, args.decode_tokens)
            print(json.dumps(row), flush=True)
            results.append(row)
    finally:
        server.stop()
        log_text = server.tail(10**8)
    memory_lines = [
        line for line in log_text.splitlines()
        if "MiniCPM-SALA memory" in line or "max_total_num_tokens" in line
    ]
    record = {
        **header("serve_latency", args.tag),
        "server_flags": flags,
        "model": "MiniCPM-SALA released config, random weights (--load-format dummy)",
        "startup_s": round(startup_s, 1),
        "results": results,
        "server_memory_log": memory_lines,
    }
    write_result(record, args.tag, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
