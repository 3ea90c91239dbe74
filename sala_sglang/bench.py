"""Long-context serving benchmark: MiniCPM-SALA (real config, random weights) and a dense model of
Qwen3-8B's shape, each served by SGLang at batch 1 (TTFT, decode speed, GPU memory) and under
`sglang.bench_serving` at fixed and unlimited concurrency.

`sala-sglang bench` and `benchmarks/long_context.py` run it; results are JSON (device, versions,
date, command) written after every measured point, so a run cut short keeps what it measured.
`--workload soar` runs instead a SOAR-2026-style serving score: a fixed request set (SOAR_MIX)
under bench_serving at concurrency 1, 8 and unlimited, each wall time recorded.
`--workload multiturn` measures the prefix cache: multi-turn conversations about long documents
and bench_serving's generated-shared-prefix set, on a server with the cache and then on one with
`--disable-radix-cache` (see run_multiturn).
`--workload speculative` measures NGRAM speculative decoding: batch-1 decode without speculation,
then at each --draft-tokens, on a prompt that repeats its own spans and on sampled output that no
draft matches (see run_speculative).
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from sala_sglang.config import RELEASED_CONFIG_PATH, MiniCPMSALAConfig
from sala_sglang.hooks import compressed_key_bytes_per_token
from sala_sglang.server_args import MAX_DRAFT_TOKENS, RECOMMENDED_SERVE_FLAGS
from sala_sglang.testing.server import Server, flush_cache
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
# The multiturn workload's documents: the 128K, 512K and 1M tokens.
MULTITURN_LENGTHS = [131072, 524288, 1048576]
# bench_serving's generated-shared-prefix set for the multiturn workload, (groups, questions per
# group, system-prompt tokens): long documents, each asked several questions, as a served
# long-context model sees them. 2 x 4 keeps the run without the cache to 8 cold prefills of
# ~80K tokens (the tiny tokenizer re-encodes the generator's random text ~1.2x longer than
# asked), about half a minute on an H100 by the batch-1 TTFTs.
SHARED_PREFIX_SET = (2, 4, 65536)
# The warm-up conversation's document: two full prefill chunks.
WARMUP_TOKENS = 16384
# The multiturn workload's two servers, in this order: name, the flags added to the common ones.
CACHE_SIDES = (("cache", ()), ("no_cache", ("--disable-radix-cache",)))
# The speculative workload's document lengths.
SPECULATIVE_LENGTHS = [32768, 131072]
# The repeating prompt's last REPEAT_TOKENS: one REPEAT_SPAN-token span, REPEAT_TIMES times.
REPEAT_SPAN, REPEAT_TIMES = 64, 64
REPEAT_TOKENS = REPEAT_SPAN * REPEAT_TIMES
# What SGLang's tokenizer manager puts in a request's meta_info under speculative decoding.
SPEC_META_KEYS = ("spec_verify_ct", "spec_accept_length", "spec_accept_rate")
# never_matching's sampling: the whole vocabulary at temperature 1.
SAMPLED = {"temperature": 1.0, "top_k": -1, "top_p": 1.0}
# The speculative workload's two requests per document length, as its record describes them.
SPECULATIVE_WORKLOADS = {
    "repeating": f"greedy; the prompt: random ids for all but its last {REPEAT_TOKENS} "
                 f"tokens, then one {REPEAT_SPAN}-token random span "
                 f"{REPEAT_TIMES} times (random_ids seeds '<seed>/<length>/repeating/head' and "
                 f"'.../span'). With random weights the greedy output follows those n-grams only "
                 f"as far as it happens to: the acceptance is measured, not set",
    "never_matching": f"the prompt: random ids (seed '<seed>/<length>/never_matching'); sampled "
                      f"at temperature 1.0, top_k and top_p off ({SAMPLED}), unseeded (SGLang "
                      f"reads sampling_seed only under --enable-deterministic-inference, which "
                      f"changes the kernels timed, and "
                      f"NGRAM's verify draws its own coins). A random model's near-uniform "
                      f"distribution almost never samples a draft, so a step keeps one token; "
                      f"where nothing is drafted it runs as a plain decode step",
}


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


def result_path(record: dict, name: str, out: Path) -> Path:
    """out/<name>_<device>_<date>.json (see result_name)."""
    return out / f"{result_name(record, name)}.json"


def write_result(record: dict, name: str, out: Path) -> Path:
    """Writes record to its result_path; returns that."""
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(record, name, out)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


@contextlib.contextmanager
def recorded(record: dict, name: str, out: Path, work: Path) -> Iterator[Callable[[], Path]]:
    """One benchmark run's record: yields save() (write_result), to call after each
    measurement; however the run ends, the record is saved once more and the work folder
    removed, so a run cut short keeps what it measured."""
    save = functools.partial(write_result, record, name, out)
    try:
        yield save
    finally:
        path = save()
        shutil.rmtree(work, ignore_errors=True)
    print(f"[bench] wrote {path}", flush=True)


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


def benchmark_tokenizer(vocab_size: int) -> dict:
    """The tiny BPE's tokenizer.json with an added token for every id of the model's vocabulary
    above its own, so that whatever a random-weight model generates decodes to text:
    bench_serving stops a request's TTFT clock at the first streamed chunk whose text is not
    empty, and ids the tiny BPE lacks decode to nothing. Its base vocabulary (what bench_serving's
    random-id prompts are drawn from) and its encoding of text are the tiny BPE's: the added
    tokens are private-use characters, which no prompt holds."""
    tokenizer = json.loads(TOKENIZER_PATH.read_text())
    tokenizer["added_tokens"] += [
        {"id": i, "content": f"\ue000{i}", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": False}
        for i in range(TINY_VOCAB_SIZE, vocab_size)]
    return tokenizer


def prepare_model_dir(shape: ModelShape, workdir: Path) -> tuple[Path, Path]:
    """A checkpoint directory with the config only (weights: --load-format dummy), and a separate
    tokenizer directory (benchmark_tokenizer's) for the server and for bench_serving's prompts."""
    model, tok = workdir / shape.name, workdir / "tokenizer"
    model.mkdir(parents=True, exist_ok=True)
    tok.mkdir(parents=True, exist_ok=True)
    shutil.copy(shape.config_path, model / "config.json")
    tokenizer = json.dumps(benchmark_tokenizer(shape.raw_config["vocab_size"]))
    for directory in (model, tok):
        (directory / "tokenizer.json").write_text(tokenizer)
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
               first_token: threading.Event | None = None, keep_output: bool = False,
               sampling: dict | None = None, speculative: bool = False) -> dict:
    """One streamed request, greedy unless sampling overrides its sampling params: TTFT from send
    to first chunk, decode rate over the rest. first_token, if given, is set when the first chunk
    arrives (the request is then decoding). keep_output: also the generated ids ("output_ids")
    and how many prompt tokens the server took from its prefix cache ("cached_tokens"), from the
    last chunk. speculative: the decode rate counts tokens (the chunks' completion_tokens), not
    chunks, and the last chunk's SPEC_META_KEYS come too (None from a server without
    speculation)."""
    # No logprob_start_len: with input logprobs asked from position 0 SGLang matches no prefix.
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True,
                            **(sampling or {})},
        "stream": True,
    }
    # Encoded before the clock starts: a 1M-token prompt costs this client's encoder ~0.1 s,
    # which is not the server's latency.
    data = json.dumps(body)
    t0 = time.perf_counter()
    stamps, first, last = [], {}, {}
    with requests.post(url + "/generate", data=data, headers={"Content-Type": "application/json"},
                       stream=True, timeout=timeout_s) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                stamps.append(time.perf_counter())
                if first_token is not None:
                    first_token.set()
                last = json.loads(line[6:])
                if "error" in last:  # SGLang streams a rejection as a data chunk (HTTP 200)
                    return {"error": last["error"]}
                first = first or last
    if not stamps:
        return {"error": "no tokens streamed"}
    decode_s = stamps[-1] - stamps[0]
    meta = last.get("meta_info", {})
    decoded = len(stamps) - 1
    if speculative:  # a verify step streams all the tokens it accepted as one chunk
        decoded = meta["completion_tokens"] - first["meta_info"]["completion_tokens"]
    out = {
        "ttft_s": round(stamps[0] - t0, 3),
        "decode_tok_per_s": round(decoded / decode_s, 2) if len(stamps) > 1 else None,
        "streamed_chunks": len(stamps),
    }
    if keep_output:  # SGLang streams the ids generated so far in every chunk (not increments)
        out["output_ids"] = last.get("output_ids", [])
        out["cached_tokens"] = meta.get("cached_tokens")
    if speculative:
        out.update({key: meta.get(key) for key in SPEC_META_KEYS})
    return out


def random_ids_dataset(input_len: int, range_ratio: float, output_len: int) -> list[str]:
    """bench_serving's flags for random token ids, inputs uniform in [len * ratio, len]."""
    return ["--dataset-name", "random-ids", "--tokenize-prompt", "--random-input-len",
            str(input_len), "--random-range-ratio", str(range_ratio), "--random-output-len",
            str(output_len)]


def custom_dataset(path: Path) -> list[str]:
    """bench_serving's flags for a JSONL request set (see write_soar_workload)."""
    return ["--dataset-name", "custom", "--dataset-path", str(path)]


def shared_prefix_dataset(groups: int, per_group: int, system_tokens: int, question_tokens: int,
                          output_tokens: int) -> list[str]:
    """bench_serving's flags for its generated-shared-prefix set: groups x per_group requests,
    each a group's system prompt and a question of its own, and the cache hit rate reported.
    The set is random text (random ids decoded), so the server's token counts differ from these."""
    return ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(groups),
            "--gsp-prompts-per-group", str(per_group), "--gsp-system-prompt-len",
            str(system_tokens), "--gsp-question-len", str(question_tokens), "--gsp-output-len",
            str(output_tokens), "--cache-report"]


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
            "concurrency", "cache_report")
    return {"command": cmd, **{k: summary[k] for k in keep if k in summary}}


def random_ids(n: int, vocab: int, seed: int | str) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, vocab) for _ in range(n)]


# ---- the SOAR-style workload ----------------------------------------------------------------
def soar_requests(max_input: int | None = None, scale: float = 1.0) -> list[tuple[int, int]]:
    """SOAR_MIX as (input tokens, output tokens) per request; inputs above max_input are cut to
    it (the same requests for a model that cannot hold the longest, e.g. dense at 256K); scale
    multiplies each length's request count (rounded, at least one), keeping the mix's shape for
    a set that must fit fewer minutes (the dense model's prefill at 256K takes a minute)."""
    return [(min(n, max_input or n), out) for n, out, count in SOAR_MIX
            for _ in range(max(1, round(count * scale)))]


def write_soar_workload(path: Path, seed: int = 0, max_input: int | None = None,
                        scale: float = 1.0) -> list[dict]:
    """Writes soar_requests(max_input, scale) as bench_serving's custom JSONL, in an order and
    with text fixed by seed: one {"conversations": [user, assistant]} line per request. The text
    is words of the tiny corpus drawn at random, each " word" its own pre-token, so the tiny
    tokenizer (the one `bench` gives server and client) counts exactly the requested tokens, BOS
    included; bench_serving takes a request's output length from its assistant turn's token
    count."""
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

    rows = soar_requests(max_input, scale)
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for n, out in rows:
            turns = [{"role": "user", "content": text(n)},
                     {"role": "assistant", "content": text(out)}]
            f.write(json.dumps({"conversations": turns}) + "\n")
    return [{"input_tokens": n, "output_tokens": out} for n, out in rows]


# ---- servers ---------------------------------------------------------------------------------
def server_flags(shape: ModelShape, backend: str, context: int, tokenizer: Path,
                 extra: str) -> list[str]:
    """The benchmark server's flags: OpenBMB's, the model's, the backend, a context length and
    the tokenizer; extra (the user's --server-args) last, so that they win."""
    return [*COMMON_FLAGS, *shape.server_flags, "--attention-backend", backend,
            "--context-length", str(context), "--tokenizer-path", str(tokenizer), *extra.split()]


@contextlib.contextmanager
def served(model_dir: Path, log_path: Path, flags: list[str], info: dict,
           keep_log: bool, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A ready server (`env` added to its environment) for the block, stopped after it; its
    startup time, KV pool size and the memory lines of its log go into info, and the log's tail
    too if keep_log or if the server did not start or the block raised."""
    server = Server(model_dir, log_path, *flags,
                    env={"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1", **(env or {})})
    started = time.perf_counter()
    failed = True
    try:
        server.wait_ready()
        info["startup_s"] = round(time.perf_counter() - started, 1)
        info.update(server_state(server.url, "max_total_num_tokens"))
        yield server
        failed = False
    finally:
        server.stop()
        log = server.tail(10**8)
        info["server_log_memory"] = [
            line[-300:] for line in log.splitlines()
            if "max_total_num_tokens" in line or "MiniCPM-SALA memory" in line
            or "KV Cache is allocated" in line or "Memory pool end" in line
        ][:20]
        if keep_log or failed:
            info["server_log_tail"] = log[-4000:]


def server_state(url: str, *keys: str) -> dict:
    """These fields of /server_info (the server's arguments, then the scheduler's state), each
    None where the server does not report it."""
    try:
        info = requests.get(url + "/server_info", timeout=30).json()
    except (requests.RequestException, ValueError):
        info = {}
    states = [info, *(s for s in info.get("internal_states") or [] if isinstance(s, dict))]
    return {key: next((s[key] for s in states if key in s), None) for key in keys}


# ---- the random and SOAR-style workloads ------------------------------------------------------
def run(args: argparse.Namespace) -> Path:
    shape = MODELS[args.model]
    backend = args.backend or _default_backend(shape)
    soar = args.workload == "soar"
    # the default tag names a SOAR set that is cut or scaled
    variant = f"_max{args.soar_max_input // 1024}k" if soar and args.soar_max_input else ""
    variant += f"_x{args.soar_scale:g}" if soar and args.soar_scale != 1 else ""
    tag = args.tag or f"{_workload_name(args)}_{shape.name}_{backend}{variant}"
    lengths = args.lengths if args.lengths is not None else ([] if soar else DEFAULT_LENGTHS)
    work = Path(tempfile.mkdtemp(prefix="sala-bench-"))
    model_dir, tok_dir = prepare_model_dir(shape, work)
    if soar:
        requests_ = write_soar_workload(work / "soar.jsonl", args.seed, args.soar_max_input,
                                        args.soar_scale)
        dataset, concurrency = custom_dataset(work / "soar.jsonl"), args.soar_concurrency
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
    flags = server_flags(shape, backend, context, tok_dir, args.server_args)
    record = {
        **_model_record(_workload_name(args), tag, shape, backend),
        "server_flags": flags,
        "decode_tokens": args.decode_tokens,
        "cache_bytes_per_token": shape.cache_bytes_per_token(),
        "state_bytes_per_request": shape.state_bytes_per_request(),
        "matmul_params": shape.matmul_params(),
        "peaks": args.peaks,
        "batch1": [],
        "bench_serving": [],
        "bench_serving_from_empty_cache": True,  # /flush_cache before each run
    }
    if soar:
        record["workload"] = {"name": "soar", "seed": args.seed,
                              "max_input": args.soar_max_input, "mix": SOAR_MIX,
                              "scale": args.soar_scale, "concurrency": args.soar_concurrency,
                              "requests": prompts,
                              "input_tokens": sum(r["input_tokens"] for r in requests_),
                              "output_tokens": sum(r["output_tokens"] for r in requests_)}
    print(f"[bench] starting SGLang for {shape.name} ({backend}), context {context}", flush=True)
    with recorded(record, tag, args.out, work) as save:
        with served(model_dir, work / "server.log", flags, record, args.keep_log) as server:
            vocab = TINY_VOCAB_SIZE  # the tokenizer both servers get: every id is valid for both
            # Warm-up: two full prefill chunks and a few decode steps, so that kernel JIT and
            # autotuning are not charged to the first measured point.
            stream_one(server.url, random_ids(WARMUP_TOKENS, vocab, 0), 16)
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
                _log(row)
                record["batch1"].append(row)
                save()
                if "error" in row and not server.alive():
                    break
            for conc in concurrency:
                if not server.alive():
                    break
                print(f"[bench] bench_serving, concurrency {conc or 'unlimited'}", flush=True)
                # Each run starts from an empty prefix cache: the runs send the same prompts
                # (SOAR's three levels do), and a later run would otherwise be served from what
                # the earlier one cached, as much as the pool holds (all of it for SALA).
                flush_cache(server.url)
                res = bench_serving(server.url, tok_dir, dataset, prompts, conc, work)
                _log({k: v for k, v in res.items() if k != "command"})
                record["bench_serving"].append({"max_concurrency": conc, **res})
                if soar:  # the score: each wall time, and their sum once all three ran
                    walls = {str(r["max_concurrency"] or "unlimited"): r.get("duration")
                             for r in record["bench_serving"]}
                    record["soar_wall_s"] = walls
                    if len(walls) == len(SOAR_CONCURRENCY) and None not in walls.values():
                        record["soar_total_s"] = round(sum(walls.values()), 2)
                save()
    return result_path(record, tag, args.out)


def _default_backend(shape: ModelShape) -> str:
    return "minicpm_flashinfer" if shape.name == "sala" else "fa3"


def _model_record(benchmark: str, tag: str, shape: ModelShape, backend: str) -> dict:
    """A result record's first fields: the header, the model served and its backend."""
    import torch

    record = {
        **header(benchmark, tag),
        "model": f"{shape.name}: {shape.config_path.name}, random weights (--load-format dummy)",
        "attention_backend": backend,
    }
    if torch.cuda.is_available():
        record["gpu_total_mib"] = torch.cuda.get_device_properties(0).total_memory // 2**20
    return record


def _log(row: dict) -> None:
    print("[bench] " + json.dumps(row), flush=True)


# ---- the prefix-cache workload ----------------------------------------------------------------
@dataclass(frozen=True)
class Conversation:
    """A synthetic conversation about one document: the document and one question per turn,
    random ids, each drawn from its own seed "<seed>/<document length>/<part>", so that
    conversations of other lengths or seeds share no prefix with this one beyond a chance token
    or two (a prefix hit takes whole KV pages: 64 tokens for MiniCPM-SALA)."""

    document: list[int]
    questions: list[list[int]]

    @classmethod
    def make(cls, tokens: int, turns: int, question_tokens: int, vocab: int,
             seed: int | str) -> Conversation:
        return cls(random_ids(tokens, vocab, f"{seed}/{tokens}/document"),
                   [random_ids(question_tokens, vocab, f"{seed}/{tokens}/question{turn}")
                    for turn in range(1, turns + 1)])

    def prompt(self, answers: list[list[int]], turn: int) -> list[int]:
        """Turn `turn`'s prompt (from 1): the document, each earlier turn's question and its
        answer (answers[k - 1]: the ids the server generated at turn k), this turn's question.
        So turn k + 1's prompt is turn k's, then turn k's answer, then a new question."""
        ids = list(self.document)
        for question, answer in zip(self.questions[:turn - 1], answers[:turn - 1], strict=True):
            ids += question + answer
        return ids + self.questions[turn - 1]


def converse(url: str, conversation: Conversation, answer_tokens: int) -> tuple[list[dict],
                                                                                list[list[int]]]:
    """The conversation on the server at url, turn by turn, each prompt built with the answers
    it gave: one row per turn (prompt tokens, TTFT, decode rate, cached tokens) and the answers.
    Stops after a failed turn, or after a turn past the first that took nothing from the cache
    (the later ones would repeat turn 1's cold prefill: minutes at 1M tokens, telling nothing)."""
    rows, answers = [], []
    for turn in range(1, len(conversation.questions) + 1):
        prompt = conversation.prompt(answers, turn)
        result, answer = _turn(url, prompt, answer_tokens)
        if "error" not in result and len(answer) != answer_tokens:
            result["error"] = f"{len(answer)} answer tokens, asked for {answer_tokens}"
        rows.append({"turn": turn, "prompt_tokens": len(prompt), **result})
        _log({"document_tokens": len(conversation.document), **rows[-1]})
        if "error" in result or (turn > 1 and not result.get("cached_tokens")):
            break
        answers.append(answer)
    return rows, answers


def replay(url: str, conversation: Conversation, answers: list[list[int]],
           turns: list[int]) -> list[dict]:
    """Turns of a conversation held before (answers: the ids generated then) sent again to the
    server at url with one new token each: the same prompts, for their TTFT alone. Turn k needs
    the answers of turns 1 to k - 1; a turn past those is left out."""
    rows = []
    for turn in (t for t in turns if t <= len(answers) + 1):
        prompt = conversation.prompt(answers, turn)
        result, _ = _turn(url, prompt, 1)
        rows.append({"turn": turn, "prompt_tokens": len(prompt), **result})
        _log({"document_tokens": len(conversation.document), **rows[-1]})
    return rows


def _turn(url: str, prompt: list[int], new_tokens: int) -> tuple[dict, list[int]]:
    """One turn's measurements (TTFT, decode rate, cached tokens, error) and its answer."""
    result = stream_one(url, prompt, new_tokens, keep_output=True)
    answer = result.pop("output_ids", [])
    keep = ("ttft_s", "decode_tok_per_s", "cached_tokens", "error")
    return {k: result[k] for k in keep if result.get(k) is not None}, answer


def run_multiturn(args: argparse.Namespace) -> Path:
    """Serves the model with the prefix cache, then with --disable-radix-cache, and measures on
    each: a conversation per document length (flushing the cache before each), then
    bench_serving's generated-shared-prefix set at each --concurrency. The server with the cache
    holds the whole conversations (answers generated); the one without replays the same prompts
    of the turns in --no-cache-turns for TTFT. One record: a row per turn with both sides' TTFT
    and their ratio, and the bench_serving summaries."""
    shape = MODELS[args.model]
    backend = args.backend or _default_backend(shape)
    tag = args.tag or f"prefix_cache_{shape.name}"
    lengths = args.lengths if args.lengths is not None else MULTITURN_LENGTHS
    no_cache_turns = args.no_cache_turns or list(range(1, args.turns + 1))
    groups, per_group, system_tokens = SHARED_PREFIX_SET
    work = Path(tempfile.mkdtemp(prefix="sala-bench-"))
    model_dir, tok_dir = prepare_model_dir(shape, work)
    vocab = TINY_VOCAB_SIZE
    conversations = {n: Conversation.make(n, args.turns, args.question_tokens, vocab, args.seed)
                     for n in lengths}
    warmup = Conversation.make(WARMUP_TOKENS, 2, args.question_tokens, vocab, "warm-up")
    # The shared-prefix prompts are random ids decoded to text and tokenized again by the server,
    # which the tiny tokenizer makes ~1.2x longer than asked: twice the length is room enough.
    shared_prefix_longest = (2 * (system_tokens + args.question_tokens) + args.answer_tokens
                             if args.concurrency else 0)
    longest = max([WARMUP_TOKENS, *lengths]) + args.turns * (args.question_tokens
                                                             + args.answer_tokens)
    context = max(longest, shared_prefix_longest) + 64
    dataset = shared_prefix_dataset(groups, per_group, system_tokens, args.question_tokens,
                                    args.answer_tokens)
    record = {
        **_model_record("prefix_cache", tag, shape, backend),
        "workload": {"name": "multiturn", "seed": args.seed, "document_tokens": lengths,
                     "turns": args.turns, "question_tokens": args.question_tokens,
                     "answer_tokens": args.answer_tokens, "no_cache_turns": no_cache_turns},
        "servers": {},
        "turns": [],
        "bench_serving": [],
    }
    if args.concurrency:
        record["workload"]["shared_prefix"] = {
            "groups": groups, "prompts_per_group": per_group,
            "system_prompt_tokens": system_tokens, "question_tokens": args.question_tokens,
            "output_tokens": args.answer_tokens}
    answers: dict[int, list[list[int]]] = {}
    with recorded(record, tag, args.out, work) as save:
        for side, extra in CACHE_SIDES:
            flags = [*server_flags(shape, backend, context, tok_dir, args.server_args), *extra]
            info = record["servers"][side] = {"flags": flags}
            print(f"[bench] starting SGLang for {shape.name} ({backend}, {side}), context "
                  f"{context}", flush=True)
            with served(model_dir, work / f"server_{side}.log", flags, info,
                        args.keep_log) as server:
                # What the server runs with, not what it was asked: the plugin may turn it off.
                info.update(server_state(server.url, "disable_radix_cache"))
                # Kernel JIT and autotuning before anything is measured, the cache's hit path
                # included (turn 2 continues from what turn 1 left in the cache).
                converse(server.url, warmup, args.answer_tokens)
                for n in lengths:
                    flush_cache(server.url)
                    if side == "cache":
                        rows, answers[n] = converse(server.url, conversations[n],
                                                    args.answer_tokens)
                        record["turns"] += [
                            {"document_tokens": n, "turn": row["turn"],
                             "prompt_tokens": row["prompt_tokens"], "cache": _measured(row)}
                            for row in rows]
                    else:
                        for row in replay(server.url, conversations[n], answers[n],
                                          no_cache_turns):
                            _add_no_cache(record["turns"], n, row)
                    save()
                for conc in args.concurrency:
                    flush_cache(server.url)
                    print(f"[bench] bench_serving, shared prefixes, concurrency "
                          f"{conc or 'unlimited'}", flush=True)
                    res = bench_serving(server.url, tok_dir, dataset, groups * per_group, conc,
                                        work)
                    _log({k: v for k, v in res.items() if k != "command"})
                    record["bench_serving"].append({"server": side, "max_concurrency": conc,
                                                    **res})
                    save()
    return result_path(record, tag, args.out)


def _measured(row: dict) -> dict:
    """A turn's measurements, without the turn and prompt length it was sent with."""
    return {k: v for k, v in row.items() if k not in ("turn", "prompt_tokens")}


def _add_no_cache(rows: list[dict], document_tokens: int, row: dict) -> None:
    """Puts a replayed turn's measurements beside the same turn's with the cache, and the TTFT
    ratio without / with the cache."""
    target = next(r for r in rows
                  if r["document_tokens"] == document_tokens and r["turn"] == row["turn"])
    target["no_cache"] = _measured(row)
    cache, no_cache = target["cache"].get("ttft_s"), target["no_cache"].get("ttft_s")
    if cache and no_cache:
        target["ttft_no_cache_over_cache"] = round(no_cache / cache, 2)


# ---- the speculative-decoding workload -------------------------------------------------------
def repeating_prompt(n: int, vocab: int, seed: int | str) -> list[int]:
    """n ids: random ones, then one REPEAT_SPAN-token random span REPEAT_TIMES times, so that
    the prompt's own n-grams draft a continuation of the pattern."""
    if n < REPEAT_TOKENS:
        raise ValueError(f"repeating prompt of {n} tokens: it ends with {REPEAT_TOKENS} "
                         f"repeating tokens, so it needs at least {REPEAT_TOKENS}")
    return (random_ids(n - REPEAT_TOKENS, vocab, f"{seed}/head")
            + random_ids(REPEAT_SPAN, vocab, f"{seed}/span") * REPEAT_TIMES)


def speculative_request(url: str, workload: str, n: int, new_tokens: int,
                        seed: int | str) -> dict:
    """One batch-1 request of a SPECULATIVE_WORKLOADS entry with an n-token prompt: TTFT, decode
    rate in tokens, the speculation fields the server reports, or the error."""
    if workload == "repeating":
        ids, sampling = repeating_prompt(n, TINY_VOCAB_SIZE, f"{seed}/{n}/repeating"), None
    else:
        ids, sampling = random_ids(n, TINY_VOCAB_SIZE, f"{seed}/{n}/never_matching"), SAMPLED
    result = stream_one(url, ids, new_tokens, sampling=sampling, speculative=True)
    keep = ("ttft_s", "decode_tok_per_s", *SPEC_META_KEYS, "error")
    return {k: result[k] for k in keep if result.get(k) is not None}


def run_speculative(args: argparse.Namespace) -> Path:
    """Serves the model without speculation ("plain"), then with NGRAM at each --draft-tokens
    ("ngram_<T>"), the other flags the same, and measures on each, after a warm-up request of
    each workload: per document length, one batch-1 request of --decode-tokens tokens of each
    SPECULATIVE_WORKLOADS entry in --spec-workloads. "repeating": greedy on a prompt of random
    ids whose last REPEAT_TOKENS are one REPEAT_SPAN-token random span repeated REPEAT_TIMES
    times (see repeating_prompt); "never_matching": random ids, sampled at temperature 1 over
    the whole vocabulary, which almost never picks a draft. One record: a row per request, each
    NGRAM row compared with the plain server's (see compare_with_plain)."""
    shape = MODELS[args.model]
    backend = args.backend or _default_backend(shape)
    tag = args.tag or f"speculative_{shape.name}"
    lengths = args.lengths if args.lengths is not None else SPECULATIVE_LENGTHS
    work = Path(tempfile.mkdtemp(prefix="sala-bench-"))
    model_dir, tok_dir = prepare_model_dir(shape, work)
    context = max([WARMUP_TOKENS, *lengths]) + args.decode_tokens + 64
    common = server_flags(shape, backend, context, tok_dir, args.server_args)
    servers = [("plain", None, common)] + [
        (f"ngram_{t}", t, [*common, "--speculative-algorithm", "NGRAM",
                           "--speculative-num-draft-tokens", str(t)])
        for t in args.draft_tokens]
    record = {
        **_model_record("speculative", tag, shape, backend),
        "workload": {"name": "speculative", "seed": args.seed, "document_tokens": lengths,
                     "decode_tokens": args.decode_tokens, "draft_tokens": args.draft_tokens,
                     **{w: SPECULATIVE_WORKLOADS[w] for w in args.spec_workloads}},
        "servers": {},
        "rows": [],
    }
    with recorded(record, tag, args.out, work) as save:
        for name, draft_tokens, flags in servers:
            info = record["servers"][name] = {"flags": flags}
            print(f"[bench] starting SGLang for {shape.name} ({backend}, {name}), context "
                  f"{context}", flush=True)
            with served(model_dir, work / f"server_{name}.log", flags, info,
                        args.keep_log) as server:
                info.update(server_state(server.url, "speculative_algorithm",
                                         "speculative_num_draft_tokens"))
                # Kernel JIT, autotuning and the verify path's first use (greedy and sampled)
                # before anything is measured.
                for workload in args.spec_workloads:
                    speculative_request(server.url, workload, WARMUP_TOKENS, 32, "warm-up")
                for n in lengths:
                    for workload in args.spec_workloads:
                        row = {"server": name, "draft_tokens": draft_tokens,
                               "document_tokens": n, "workload": workload,
                               **speculative_request(server.url, workload, n,
                                                     args.decode_tokens, args.seed)}
                        compare_with_plain(record["rows"], row)
                        _log(row)
                        record["rows"].append(row)
                        save()
    return result_path(record, tag, args.out)


def compare_with_plain(rows: list[dict], row: dict) -> None:
    """Adds to an NGRAM row, where the plain server's row for the same document length and
    workload is among rows and both have a decode rate: speedup_over_plain (its decode rate over
    the plain one's) and step_over_decode_step (one NGRAM step's time over one plain decode
    step's: plain rate x accept length / NGRAM rate). On the repeating workload its steps
    verify, so that is a verify's cost; on never_matching, where nothing is drafted, a step
    runs as a plain decode step, so it is what speculation costs a step that gains nothing."""
    plain = next((r for r in rows if r["server"] == "plain"
                  and r["document_tokens"] == row["document_tokens"]
                  and r["workload"] == row["workload"]), {})
    base, rate = plain.get("decode_tok_per_s"), row.get("decode_tok_per_s")
    if row["draft_tokens"] is None or not (base and rate):
        return
    row["speedup_over_plain"] = round(rate / base, 3)
    accept = row.get("spec_accept_length")
    if accept:
        row["step_over_decode_step"] = round(base * accept / rate, 3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="sala",
                   help="sala: MiniCPM-SALA's released config; qwen3-8b: the dense baseline")
    p.add_argument("--backend", default=None,
                   help="attention backend (default: minicpm_flashinfer for sala, fa3 for "
                        "qwen3-8b)")
    p.add_argument("--workload", choices=("random", "soar", "multiturn", "speculative"),
                   default="random",
                   help="random: batch-1 lengths, then bench_serving on random ids at "
                        "--concurrency; soar: the SOAR-style request set (SOAR_MIX) under "
                        "bench_serving at concurrency 1, 8 and unlimited, each wall time "
                        "recorded; multiturn: the prefix cache, on and off (--disable-radix-"
                        "cache): a conversation of --turns turns about each document length, "
                        "TTFT per turn, then bench_serving's generated-shared-prefix set at "
                        "--concurrency; speculative: batch-1 decode without speculation, then "
                        "with NGRAM at each --draft-tokens, on a prompt repeating its own spans "
                        "(greedy) and on random ids sampled at temperature 1 (no draft matches), "
                        "per document length")
    p.add_argument("--soar-max-input", type=int, default=None,
                   help="soar: cut longer inputs to this many tokens (262144 to compare with the "
                        "dense model, which cannot hold 512K on an H100)")
    p.add_argument("--soar-scale", type=float, default=1.0,
                   help="soar: multiply each input length's request count by this (rounded, at "
                        "least one): 0.5 keeps the mix's shape in 14 requests")
    p.add_argument("--soar-concurrency", type=int, nargs="+", choices=SOAR_CONCURRENCY,
                   default=list(SOAR_CONCURRENCY),
                   help="soar: which of its bench_serving runs to make (1, 8, 0 = unlimited; "
                        "default all three), so that a long set can be measured over several "
                        "runs; the score is the sum of the three wall times")
    p.add_argument("--seed", type=int, default=0,
                   help="soar: the workload's text and order; multiturn: the documents and "
                        "questions; speculative: the prompts")
    p.add_argument("--lengths", type=int, nargs="*", default=None,
                   help="batch-1 input lengths, multiturn: document lengths (default: 32K-1M "
                        "for random, none for soar, 128K, 512K and 1M for multiturn, 32K and "
                        "128K for speculative; none: only the bench_serving runs)")
    p.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation")
    p.add_argument("--question-tokens", type=int, default=1024,
                   help="multiturn: tokens of each turn's question (and of each shared-prefix "
                        "request's)")
    p.add_argument("--answer-tokens", type=int, default=256,
                   help="multiturn: tokens generated per turn (and per shared-prefix request)")
    p.add_argument("--no-cache-turns", type=int, nargs="+", default=None,
                   help="multiturn: the turns sent again to the server without the cache "
                        "(default: all); each is a cold prefill of the whole conversation")
    p.add_argument("--decode-tokens", type=int, default=1024,
                   help="tokens generated per batch-1 request (random, speculative)")
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[4, 8],
                   help="speculative: one NGRAM server per value, its "
                        "--speculative-num-draft-tokens: a chain of the last accepted token and "
                        f"value - 1 drafts, 2 to {MAX_DRAFT_TOKENS}")
    p.add_argument("--spec-workloads", nargs="+", choices=tuple(SPECULATIVE_WORKLOADS),
                   default=list(SPECULATIVE_WORKLOADS),
                   help="speculative: which workloads each server runs (default both); "
                        "repeating alone measures a verify step's cost over a decode step at "
                        "more draft depths for less device time")
    p.add_argument("--concurrency", type=int, nargs="*", default=[8, 0],
                   help="bench_serving runs: max concurrency each, 0 = unlimited (none: skip; "
                        "speculative runs none)")
    p.add_argument("--serving-input-len", type=int, default=131072)
    p.add_argument("--serving-range", type=float, default=0.25,
                   help="bench_serving inputs are uniform in [len * range, len]")
    p.add_argument("--serving-output-len", type=int, default=256)
    p.add_argument("--serving-prompts", type=int, default=16)
    p.add_argument("--server-args", default="", help="extra flags for sglang.launch_server")
    p.add_argument("--tag", default=None,
                   help="what the result file is named by, before device and date "
                        "(default long_context_<model>_<backend>; multiturn: "
                        "prefix_cache_<model>; speculative: speculative_<model>)")
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

    wrong = [t for t in args.no_cache_turns or [] if not 1 <= t <= args.turns]
    if wrong:
        print(f"sala-sglang bench: --no-cache-turns {' '.join(map(str, wrong))}: a conversation "
              f"has turns 1 to {args.turns} (--turns)", file=sys.stderr)
        return 2
    wrong = [t for t in args.draft_tokens if not 2 <= t <= MAX_DRAFT_TOKENS]
    if wrong:
        print(f"sala-sglang bench: --draft-tokens {' '.join(map(str, wrong))}: a chain verifies "
              f"2 to {MAX_DRAFT_TOKENS} tokens (the last accepted token and 1 to "
              f"{MAX_DRAFT_TOKENS - 1} drafts)", file=sys.stderr)
        return 2
    if args.soar_scale <= 0:
        print(f"sala-sglang bench: --soar-scale {args.soar_scale:g}: give a positive factor of "
              "the request counts (1 is the whole set)", file=sys.stderr)
        return 2
    short = [n for n in args.lengths or [] if n < REPEAT_TOKENS]
    if args.workload == "speculative" and "repeating" in args.spec_workloads and short:
        print(f"sala-sglang bench: --lengths {' '.join(map(str, short))}: the speculative "
              f"workload's repeating prompt ends with {REPEAT_TOKENS} repeating tokens; give "
              f"lengths of at least {REPEAT_TOKENS}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("sala-sglang bench: no CUDA GPU visible; the benchmark serves the real config on "
              "a GPU.",
              file=sys.stderr)
        return 2
    serving = args.workload == "soar" or (args.concurrency and args.workload != "speculative")
    if serving and importlib.util.find_spec("datasets") is None:
        # sglang.bench_serving imports it at startup; found missing only after the server's
        # minutes of startup and the batch-1 points otherwise.
        print("sala-sglang bench: sglang.bench_serving needs the `datasets` package: "
              "pip install datasets, or pass --concurrency with no values to skip it.",
              file=sys.stderr)
        return 2
    # A SIGTERM (e.g. from `timeout`) must still stop the server through run()'s finally:
    # left running, it holds the GPU memory the next run needs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.workload == "multiturn":  # TTFT ratios: no MFU, so no peak to measure
        run_multiturn(args)
    elif args.workload == "speculative":  # decode rates alone
        run_speculative(args)
    else:
        args.peaks = measure_bf16_peak() if args.measure_peaks else None
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
