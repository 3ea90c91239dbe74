"""Long-context serving benchmark: MiniCPM-SALA (real config, random weights) and a dense model of
Qwen3-8B's shape, each served by SGLang at batch 1 (TTFT, decode speed, GPU memory) and under
`sglang.bench_serving` at fixed and unlimited concurrency.

`sala-sglang bench` and `benchmarks/long_context.py` run it; results are JSON (device, versions,
date, command) written after every measured point, so a run cut short keeps what it measured.
`--workload soar` runs instead a SOAR-2026-style serving score: a fixed request set (SOAR_MIX)
under bench_serving at concurrency 1, 8 and unlimited, each wall time recorded.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from sala_sglang.config import RELEASED_CONFIG_PATH, MiniCPMSALAConfig
from sala_sglang.hooks import compressed_key_bytes_per_token
from sala_sglang.server_args import RECOMMENDED_SERVE_FLAGS
from sala_sglang.testing.server import Server
from sala_sglang.tiny import CORPUS_PATH, TINY_VOCAB_SIZE, TOKENIZER_CONFIG, TOKENIZER_PATH

DATA_DIR = Path(__file__).resolve().parent / "data"
QWEN3_8B_CONFIG_PATH = DATA_DIR / "qwen3_8b_config.json"
DEFAULT_LENGTHS = [32768, 65536, 131072, 262144, 524288, 1048576]
PACKAGES = ("sglang", "sglang-kernel", "flashinfer-python", "flash-linear-attention", "triton",
            "sala-sglang")
# OpenBMB's flags for both models (the dense one's --attention-backend comes later and wins).
COMMON_FLAGS = [*RECOMMENDED_SERVE_FLAGS, "--load-format", "dummy", "--mem-fraction-static", "0.85"]
# SOAR-style request set, (input tokens, output tokens, requests): 16 of the 24 inputs lie in
# 32K-512K, the two thirds the SOAR 2026 set has; the exact lengths are this project's choice.
SOAR_MIX = ((4096, 512, 2), (8192, 512, 3), (16384, 512, 3), (32768, 256, 4), (65536, 256, 4),
            (131072, 256, 3), (262144, 256, 3), (524288, 256, 2))
SOAR_CONCURRENCY = (1, 8, 0)  # 0: unlimited


# ---- result records --------------------------------------------------------------------------
def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def header(benchmark: str, tag: str) -> dict:
    """The fields every result file starts with: what ran, where, when, with what."""
    import torch

    return {
        "benchmark": benchmark,
        "tag": tag,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        # the kernel overrides (SALA_SGLANG_KERNELS and the like) reach the server through the
        # environment, not the command
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SALA_SGLANG")},
    }


def device_slug(device: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the model number a result file is named by."""
    if device is None:
        return "cpu"
    model = re.search(r"\b[A-Z]+\d+[A-Z]*\b", device)
    return model.group(0).lower() if model else re.sub(r"\W+", "-", device).strip("-").lower()


def result_name(record: dict, name: str) -> str:
    """`<what>_<device>_<YYYY-MM-DD>`: what the run measured (name), where and when (the record's
    header); the device is not repeated where name already ends with it."""
    device = device_slug(record.get("device"))
    what = name if name.split("_")[-1] == device else f"{name}_{device}"
    return f"{what}_{record['date'][:10]}"


def write_result(record: dict, name: str, out: Path) -> Path:
    """Writes record to out/<name>_<device>_<date>.json (see result_name)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result_name(record, name)}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# ---- the two models ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the FLOP and memory counts need: matmul parameters per token and attention work."""

    name: str
    config_path: Path
    server_flags: tuple[str, ...]

    @functools.cached_property
    def raw_config(self) -> dict:
        return json.loads(self.config_path.read_text())

    @functools.cached_property
    def sala_config(self) -> MiniCPMSALAConfig:
        return MiniCPMSALAConfig(**self.raw_config)

    def matmul_params(self) -> int:
        """Parameters multiplied per prompt token (all but the embedding and the LM head, which
        SGLang applies to the last token only)."""
        c = self.raw_config
        h, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
        mlp = 3 * h * inter
        if self.name == "sala":
            cfg = self.sala_config
            q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
            sparse = h * q + 2 * h * kv + q * h + h * h  # q, k, v, o, output gate
            lin = c["lightning_nh"] * c["lightning_head_dim"]
            linear = 3 * h * lin + lin * h + h * lin  # q, k, v, o, z gate
            return (len(cfg.sparse_layer_ids) * (sparse + mlp)
                    + len(cfg.linear_layer_ids) * (linear + mlp))
        q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        return c["num_hidden_layers"] * (2 * h * q + 2 * h * kv + mlp)

    def attention_flops(self, n: int) -> float:
        """Attention FLOPs of an n-token prefill (QK^T and PV over the keys each token needs)."""
        c = self.raw_config
        per_key = 4 * c["num_attention_heads"] * c["head_dim"]
        if self.name == "sala":
            cfg = self.sala_config
            keys_cap = cfg.sparse.max_sparse_keys
            dense_part = min(n, keys_cap)
            keys = dense_part * (dense_part + 1) / 2 + max(0, n - keys_cap) * keys_cap
            # stage-1 scoring: QK^T against the compressed keys (one per kernel_stride tokens)
            heads, dim = c["num_attention_heads"], c["head_dim"]
            stage1 = 2 * heads * dim * n * n / 2 / cfg.sparse.kernel_stride
            lin = c["lightning_nh"] * c["lightning_head_dim"] * c["lightning_head_dim"]
            return (len(cfg.sparse_layer_ids) * (per_key * keys + stage1)
                    + len(cfg.linear_layer_ids) * 4 * lin * n)
        return c["num_hidden_layers"] * per_key * n * (n + 1) / 2

    def prefill_flops(self, n: int) -> float:
        return 2 * self.matmul_params() * n + self.attention_flops(n)

    def cache_bytes_per_token(self) -> int:
        """KV-cache bytes per token in bf16 (SALA: the 8 sparse layers plus K1)."""
        c = self.raw_config
        if self.name == "sala":
            cfg = self.sala_config
            kv = len(cfg.sparse_layer_ids) * 2 * c["num_key_value_heads"] * c["head_dim"] * 2
            return kv + compressed_key_bytes_per_token(cfg.sparse, kv)
        return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 2

    def state_bytes_per_request(self) -> int:
        if self.name == "sala":
            return self.sala_config.linear_state_bytes_per_request()
        return 0


MODELS = {
    "sala": ModelShape("sala", RELEASED_CONFIG_PATH, ("--dense-as-sparse",)),  # OpenBMB's flags
    "qwen3-8b": ModelShape("qwen3-8b", QWEN3_8B_CONFIG_PATH, ()),
}


def prepare_model_dir(shape: ModelShape, workdir: Path) -> tuple[Path, Path]:
    """A checkpoint directory with the config only (weights: --load-format dummy), and a separate
    tokenizer directory (the tiny BPE, smaller than either vocabulary) for the server and for
    bench_serving's random-id prompts."""
    model, tok = workdir / shape.name, workdir / "tokenizer"
    model.mkdir(parents=True, exist_ok=True)
    tok.mkdir(parents=True, exist_ok=True)
    shutil.copy(shape.config_path, model / "config.json")
    for directory in (model, tok):
        shutil.copy(TOKENIZER_PATH, directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return model, tok


# ---- measurements ---------------------------------------------------------------------------
class GpuMemoryPeak:
    """Highest `nvidia-smi` memory.used (MiB) on GPU 0 while the block runs (the whole server
    process: weights, the preallocated pools, activations and CUDA graphs)."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-i", "0"],
                capture_output=True, text=True, check=False,
            ).stdout.strip()
            if out.isdigit():
                self.peak_mib = max(self.peak_mib, int(out))
            self._stop.wait(self.period_s)

    def __enter__(self) -> GpuMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stream_one(url: str, ids: list[int], new_tokens: int, timeout_s: float = 7200,
               first_token: threading.Event | None = None) -> dict:
    """One greedy streamed request: TTFT from send to first chunk, decode rate over the rest.
    first_token, if given, is set when the first chunk arrives (the request is then decoding)."""
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
        "stream": True,
    }
    t0 = time.perf_counter()
    stamps = []
    with requests.post(url + "/generate", json=body, stream=True, timeout=timeout_s) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                stamps.append(time.perf_counter())
                if first_token is not None:
                    first_token.set()
                chunk = json.loads(line[6:])
                if "error" in chunk:  # SGLang streams a rejection as a data chunk (HTTP 200)
                    return {"error": chunk["error"]}
    if not stamps:
        return {"error": "no tokens streamed"}
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_s": round(stamps[0] - t0, 3),
        "decode_tok_per_s": round((len(stamps) - 1) / decode_s, 2) if len(stamps) > 1 else None,
        "streamed_chunks": len(stamps),
    }


def random_ids_dataset(input_len: int, range_ratio: float, output_len: int) -> list[str]:
    """bench_serving's flags for random token ids, inputs uniform in [len * ratio, len]."""
    return ["--dataset-name", "random-ids", "--tokenize-prompt", "--random-input-len",
            str(input_len), "--random-range-ratio", str(range_ratio), "--random-output-len",
            str(output_len)]


def custom_dataset(path: Path) -> list[str]:
    """bench_serving's flags for a JSONL request set (see write_soar_workload)."""
    return ["--dataset-name", "custom", "--dataset-path", str(path)]


def bench_serving(url: str, tokenizer: Path, dataset: list[str], num_prompts: int,
                  concurrency: int | None, workdir: Path) -> dict:
    """`python -m sglang.bench_serving` over dataset (its flags); its summary line as a dict
    ("duration": the run's wall time in seconds)."""
    out = workdir / f"bench_serving_{concurrency or 'inf'}.jsonl"
    out.unlink(missing_ok=True)  # the output file is appended to
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
           "--base-url", url, *dataset, "--tokenizer", str(tokenizer),
           "--num-prompts", str(num_prompts), "--request-rate", "inf", "--seed", "1",
           "--output-file", str(out), "--disable-tqdm", "--warmup-requests", "0"]
    if concurrency:
        cmd += ["--max-concurrency", str(concurrency)]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        return {"command": cmd, "error": (proc.stdout + proc.stderr)[-2000:]}
    summary = json.loads(out.read_text().strip().splitlines()[-1])
    keep = ("completed", "duration", "total_input_tokens", "total_output_tokens",
            "request_throughput", "input_throughput", "output_throughput", "mean_ttft_ms",
            "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
            "mean_e2e_latency_ms",
            "concurrency")
    return {"command": cmd, **{k: summary[k] for k in keep if k in summary}}


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, vocab) for _ in range(n)]


# ---- the SOAR-style workload ----------------------------------------------------------------
def soar_requests(max_input: int | None = None) -> list[tuple[int, int]]:
    """SOAR_MIX as (input tokens, output tokens) per request; inputs above max_input are cut to
    it (the same requests for a model that cannot hold the longest, e.g. dense at 256K)."""
    return [(min(n, max_input or n), out) for n, out, count in SOAR_MIX for _ in range(count)]


def write_soar_workload(path: Path, seed: int = 0, max_input: int | None = None) -> list[dict]:
    """Writes soar_requests(max_input) as bench_serving's custom JSONL, in an order and with text
    fixed by seed: one {"conversations": [user, assistant]} line per request. The text is words
    of the tiny corpus drawn at random, each " word" its own pre-token, so the tiny tokenizer
    (the one `bench` gives server and client) counts exactly the requested tokens, BOS included;
    bench_serving takes a request's output length from its assistant turn's token count."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_PATH))
    words = [f" {w}" for w in re.findall(r"[A-Za-z]+", CORPUS_PATH.read_text())]
    cost = {w: len(tok.encode(w, add_special_tokens=False).ids) for w in set(words)}
    singles = sorted(w for w in cost if cost[w] == 1)
    rng = random.Random(seed)

    def text(n: int) -> str:  # n tokens with the BOS the tokenizer adds
        out, left = [], n - 1
        while left > 0:
            w = rng.choice(words)
            w = w if cost[w] <= left else rng.choice(singles)
            out.append(w)
            left -= cost[w]
        return "".join(out)

    rows = soar_requests(max_input)
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for n, out in rows:
            turns = [{"role": "user", "content": text(n)},
                     {"role": "assistant", "content": text(out)}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    return [{"input_tokens": n, "output_tokens": out} for n, out in rows]


def run(args: argparse.Namespace) -> Path:
    import torch

    shape = MODELS[args.model]
    backend = args.backend or ("minicpm_flashinfer" if shape.name == "sala" else "fa3")
    soar = args.workload == "soar"
    cap = f"_max{args.soar_max_input // 1024}k" if soar and args.soar_max_input else ""
    tag = args.tag or f"{_workload_name(args)}_{shape.name}_{backend}{cap}"
    lengths = args.lengths if args.lengths is not None else ([] if soar else DEFAULT_LENGTHS)
    work = Path(tempfile.mkdtemp(prefix="sala-bench-"))
    model_dir, tok_dir = prepare_model_dir(shape, work)
    if soar:
        requests_ = write_soar_workload(work / "soar.jsonl", args.seed, args.soar_max_input)
        dataset, concurrency = custom_dataset(work / "soar.jsonl"), SOAR_CONCURRENCY
        prompts = len(requests_)
        longest_input = max([*lengths, *(r["input_tokens"] for r in requests_)])
        longest_output = max(r["output_tokens"] for r in requests_)
    else:
        dataset = random_ids_dataset(args.serving_input_len, args.serving_range,
                                     args.serving_output_len)
        concurrency, prompts = args.concurrency, args.serving_prompts
        longest_input = max([*lengths, args.serving_input_len])
        longest_output = args.serving_output_len
    context = longest_input + max(args.decode_tokens, longest_output) + 64
    flags = [*COMMON_FLAGS, *shape.server_flags, "--attention-backend", backend,
             "--context-length", str(context), "--tokenizer-path", str(tok_dir),
             *args.server_args.split()]
    record = {
        **header(_workload_name(args), tag),
        "model": f"{shape.name}: {shape.config_path.name}, random weights (--load-format dummy)",
        "attention_backend": backend,
        "server_flags": flags,
        "decode_tokens": args.decode_tokens,
        "cache_bytes_per_token": shape.cache_bytes_per_token(),
        "state_bytes_per_request": shape.state_bytes_per_request(),
        "matmul_params": shape.matmul_params(),
        "peaks": args.peaks,
        "batch1": [],
        "bench_serving": [],
    }
    if soar:
        record["workload"] = {"name": "soar", "seed": args.seed,
                              "max_input": args.soar_max_input, "mix": SOAR_MIX,
                              "requests": prompts,
                              "input_tokens": sum(r["input_tokens"] for r in requests_),
                              "output_tokens": sum(r["output_tokens"] for r in requests_)}
    if torch.cuda.is_available():
        record["gpu_total_mib"] = torch.cuda.get_device_properties(0).total_memory // 2**20
    save = lambda: write_result(record, tag, args.out)  # noqa: E731
    print(f"[bench] starting SGLang for {shape.name} ({backend}), context {context}", flush=True)
    server = Server(model_dir, work / "server.log", *flags,
                    env={"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"})
    started = time.perf_counter()
    try:
        server.wait_ready()
        record["startup_s"] = round(time.perf_counter() - started, 1)
        record["max_total_num_tokens"] = _pool_tokens(server.url)
        vocab = TINY_VOCAB_SIZE  # the tokenizer both servers get: every id is valid for both
        # Warm-up: two full prefill chunks and a few decode steps, so that kernel JIT and
        # autotuning are not charged to the first measured point.
        stream_one(server.url, random_ids(16384, vocab, 0), 16)
        for n in lengths:
            print(f"[bench] {shape.name}: {n} input tokens, {args.decode_tokens} output",
                  flush=True)
            with GpuMemoryPeak() as mem:
                row = {"input_tokens": n, **stream_one(server.url, random_ids(n, vocab, n),
                                                      args.decode_tokens)}
            row["gpu_mem_peak_mib"] = mem.peak_mib
            row["context_cache_gib"] = round(
                ((n + args.decode_tokens) * shape.cache_bytes_per_token()
                 + shape.state_bytes_per_request()) / 2**30, 3)
            if "ttft_s" in row:
                row["prefill_tflop"] = round(shape.prefill_flops(n) / 1e12, 1)
                if args.peaks:
                    row["mfu"] = round(shape.prefill_flops(n) / row["ttft_s"]
                                       / (args.peaks["bf16_tflops"] * 1e12), 4)
            print("[bench] " + json.dumps(row), flush=True)
            record["batch1"].append(row)
            save()
            if "error" in row and not server.alive():
                break
        for conc in concurrency:
            if not server.alive():
                break
            print(f"[bench] bench_serving, concurrency {conc or 'unlimited'}", flush=True)
            res = bench_serving(server.url, tok_dir, dataset, prompts, conc, work)
            print("[bench] " + json.dumps({k: v for k, v in res.items() if k != "command"}),
                  flush=True)
            record["bench_serving"].append({"max_concurrency": conc, **res})
            if soar:  # the score: each wall time, and their sum once all three ran
                walls = {str(r["max_concurrency"] or "unlimited"): r.get("duration")
                         for r in record["bench_serving"]}
                record["soar_wall_s"] = walls
                if len(walls) == len(SOAR_CONCURRENCY) and None not in walls.values():
                    record["soar_total_s"] = round(sum(walls.values()), 2)
            save()
    finally:
        server.stop()
        log = server.tail(10**8)
        record["server_log_memory"] = [
            line[-300:] for line in log.splitlines()
            if "max_total_num_tokens" in line or "MiniCPM-SALA memory" in line
            or "KV Cache is allocated" in line or "Memory pool end" in line
        ][:20]
        if not record["batch1"] or args.keep_log:
            record["server_log_tail"] = log[-4000:]
        path = save()
        shutil.rmtree(work, ignore_errors=True)
    print(f"[bench] wrote {path}", flush=True)
    return path


def _pool_tokens(url: str) -> int | None:
    """The KV pool's size in tokens, as the server reports it (None if it does not)."""
    try:
        info = requests.get(url + "/server_info", timeout=30).json()
    except (requests.RequestException, ValueError):
        return None
    states = [info, *(s for s in info.get("internal_states") or [] if isinstance(s, dict))]
    return next((s["max_total_num_tokens"] for s in states if "max_total_num_tokens" in s), None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="sala",
                   help="sala: MiniCPM-SALA's released config; qwen3-8b: the dense baseline")
    p.add_argument("--backend", default=None,
                   help="attention backend (default: minicpm_flashinfer for sala, fa3 for "
                        "qwen3-8b)")
    p.add_argument("--workload", choices=("random", "soar"), default="random",
                   help="random: batch-1 lengths, then bench_serving on random ids at "
                        "--concurrency; soar: the SOAR-style request set (SOAR_MIX) under "
                        "bench_serving at concurrency 1, 8 and unlimited, each wall time recorded")
    p.add_argument("--soar-max-input", type=int, default=None,
                   help="soar: cut longer inputs to this many tokens (262144 to compare with the "
                        "dense model, which cannot hold 512K on an H100)")
    p.add_argument("--seed", type=int, default=0, help="soar: the workload's text and order")
    p.add_argument("--lengths", type=int, nargs="*", default=None,
                   help="batch-1 input lengths (default: 32K-1M for random, none for soar; "
                        "none: only the bench_serving runs)")
    p.add_argument("--decode-tokens", type=int, default=1024)
    p.add_argument("--concurrency", type=int, nargs="*", default=[8, 0],
                   help="bench_serving runs: max concurrency each, 0 = unlimited (none: skip)")
    p.add_argument("--serving-input-len", type=int, default=131072)
    p.add_argument("--serving-range", type=float, default=0.25,
                   help="bench_serving inputs are uniform in [len * range, len]")
    p.add_argument("--serving-output-len", type=int, default=256)
    p.add_argument("--serving-prompts", type=int, default=16)
    p.add_argument("--server-args", default="", help="extra flags for sglang.launch_server")
    p.add_argument("--tag", default=None,
                   help="what the result file is named by, before device and date "
                        "(default long_context_<model>_<backend>)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--no-peaks", dest="measure_peaks", action="store_false",
                   help="skip measuring the GPU's bf16 peak (MFU then not reported)")
    p.add_argument("--keep-log", action="store_true", help="keep the server log tail in the JSON")


def gpu_time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() over iters runs, each timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_bf16_peak() -> dict:
    """bf16 matmul TFLOP/s on this GPU now (8192^3 products): the MFU denominator."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = gpu_time_ms(lambda: a @ b)
    a = b = None
    torch.cuda.empty_cache()
    return {"bf16_tflops": round(2 * n**3 / ms / 1e9, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return bench(args)


def _workload_name(args: argparse.Namespace) -> str:
    return "soar" if args.workload == "soar" else "long_context"


def bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("sala-sglang bench: no CUDA GPU visible; the benchmark serves the real config on "
              "a GPU.",
              file=sys.stderr)
        return 2
    if ((args.concurrency or args.workload == "soar")
            and importlib.util.find_spec("datasets") is None):
        # sglang.bench_serving imports it at startup; found missing only after the server's
        # minutes of startup and the batch-1 points otherwise.
        print("sala-sglang bench: sglang.bench_serving needs the `datasets` package: "
              "pip install datasets, or pass --concurrency with no values to skip it.",
              file=sys.stderr)
        return 2
    # A SIGTERM (e.g. from `timeout`) must still stop the server through run()'s finally:
    # left running, it holds the GPU memory the next run needs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args.peaks = measure_bf16_peak() if args.measure_peaks else None
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
