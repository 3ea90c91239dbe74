"""Where one prefill chunk's GPU time goes: MiniCPM-SALA (released config, random weights) served
by SGLang with OpenBMB's flags (8192-token chunks), one chunk profiled at each context depth by
SGLang's torch profiler. Reports, per chunk, the GPU time of each kind of kernel (KINDS: GEMMs
with their achieved TFLOP/s, lightning, compression, selection, sparse attention,
norms/elementwise, ...), the chunk's wall span, and the idle time between kernels.

How one chunk is isolated: a request of `context` random tokens is prefilled first and left in
SGLang's prefix cache (on by default); then a request of the same tokens plus one chunk of new
ones takes `context` tokens from the cache (its `cached_tokens` proves it) and runs one extend
forward of chunk tokens over that prefix: the last chunk of a (context + chunk)-token prompt.
The profiler runs from just before the second request until it has answered.

    python benchmarks/profile_prefill.py --contexts 131072 524288 1048576
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import requests

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.profile_decode import (  # noqa: E402
    TRACE_WAIT_S,
    durations_by_name,
    gpu_events,
    load_events,
    span_us,
    start_profile,
    wait_for_trace,
)
from sala_sglang.bench import (  # noqa: E402
    COMMON_FLAGS,
    MODELS,
    WARMUP_TOKENS,
    flush_cache,
    header,
    prepare_model_dir,
    random_ids,
    served,
    server_flags,
    stream_one,
    write_result,
)
from sala_sglang.server_args import BACKEND_NAMES  # noqa: E402
from sala_sglang.tiny import TINY_VOCAB_SIZE  # noqa: E402

DEFAULT_CONTEXTS = [131072, 524288, 1048576]
# The GPU activity counted: kernels, and the driver's copies and fills (the prompt's ids in, the
# sampled token out).
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# Kinds of GPU work by kernel name: re.search in this order, the first match wins, "other" takes
# the rest (each kind's costliest names are in the result, so a misfiled kernel shows). Triton
# kernels appear under their function's name, CUDA ones demangled ("void (anonymous
# namespace)::compress_kernel<...>(...)"). Torch ops issued around our kernels (the lightning
# output norm's reductions) count as norms/elementwise.
KINDS: tuple[tuple[str, str], ...] = (
    # sala_sglang/ops/lightning*.py (Triton), csrc/lightning.cu
    ("lightning", r"^_(prefill|segment_kv|segment_scan|decode|verify|commit)_kernel"
                  r"|lightning_\w*kernel"),
    # ops/infllm_v2/compress.py (Triton), csrc/sparse_compress.cu
    ("compression", r"^_compress_kernel|compress_kernel<"),
    # ops/infllm_v2/select.py (Triton), csrc/sparse_selection.cu
    ("selection", r"^_(stage1_stats|window_probs|block_topk|merge_topk)_kernel"
                  r"|select_blocks\w*kernel"),
    # ops/infllm_v2/attention.py (Triton), csrc/sparse_attention.cu (split-K and its merge)
    ("sparse_attention", r"^_block_attention_kernel|block_sparse_attention_kernel"
                         r"|merge_splits_kernel"),
    # cuBLASLt on Hopper (nvjet_*), CUTLASS and cuBLAS kernels (*gemm*), split-K reductions
    ("gemm", r"nvjet|[gG]emm|gemv|splitKreduce"),
    # RMSNorm and fused add+RMSNorm (FlashInfer), RoPE, the Lightning layers' q/k norm + RoPE
    # (ops/lightning_qk.py, where the norm, RoPE and copy kernels it replaced were filed),
    # SiLU-and-mul, torch's elementwise, reduction, copy, fill, cat and index kernels, and
    # Inductor's fused Triton kernels
    ("norms_elementwise", r"[Nn]orm|rope|[Rr]otary|act_and_mul|silu|sigmoid|elementwise"
                          r"|reduce_kernel|[Cc]opy|[Ff]ill|CatArray|index|scatter|gather"
                          r"|^triton_(poi|red|per)_"),
    # cudaMemcpy / cudaMemset (the GPU_CATEGORIES beyond kernels)
    ("memcpy_memset", r"^Mem(cpy|set)\b"),
    ("other", r""),
)
_KIND_PATTERNS = [(kind, re.compile(pattern)) for kind, pattern in KINDS]
TOP_PER_KIND = 3  # costliest kernel names kept per kind
GAPS = 5  # largest idle gaps kept per chunk
GEMM_FLOP_COUNTS = ("2 x chunk tokens x matmul parameters (ModelShape.matmul_params: the q/k/v/o "
                    "and gate projections of every layer and the MLPs; not the embedding, nor "
                    "the LM head, which SGLang applies to the last token only)")


def classify(name: str) -> str:
    """The kind (KINDS) of a GPU event by its name."""
    return next(kind for kind, pattern in _KIND_PATTERNS if pattern.search(name))


def busy_us(events: list[dict]) -> float:
    """Time (us) with at least one of the events running: kernels that overlap (on two streams)
    count once."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e["ts"]):
        start, stop = e["ts"], e["ts"] + e["dur"]
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def largest_gaps(events: list[dict], n: int = GAPS) -> list[dict]:
    """The n longest stretches (ms) with nothing running, each with the event that ended before
    it (the last to end) and the one that started after it."""
    gaps, last = [], None
    for e in sorted(events, key=lambda e: e["ts"]):
        if last is not None and e["ts"] > last["ts"] + last["dur"]:
            gaps.append((e["ts"] - last["ts"] - last["dur"], last["name"], e["name"]))
        if last is None or e["ts"] + e["dur"] > last["ts"] + last["dur"]:
            last = e
    gaps.sort(key=lambda g: -g[0])
    return [{"ms": round(us / 1e3, 3), "after": previous[:100], "before": following[:100]}
            for us, previous, following in gaps[:n]]


def gemm_tflops(tokens: int, matmul_params: int, gemm_ms: float) -> float:
    """Achieved GEMM rate (TFLOP/s): the chunk's matmul FLOPs (GEMM_FLOP_COUNTS) over the GPU
    time of the gemm kind."""
    return 2 * tokens * matmul_params / (gemm_ms * 1e-3) / 1e12


def chunk_summary(events: list[dict], tokens: int, matmul_params: int) -> dict:
    """Where one chunk's GPU time went, from its Chrome trace's events (times in us): the span
    from the first GPU event's start to the last one's end, the time busy and idle within it,
    and each kind's time (share of the span), calls and costliest names."""
    gpu = gpu_events(events, GPU_CATEGORIES)
    if not gpu:
        return {"error": "the trace holds no GPU kernels"}
    span, busy = span_us(gpu), busy_us(gpu)
    by_kind: dict[str, list[tuple[str, list[float]]]] = {kind: [] for kind, _ in KINDS}
    for name, durations in durations_by_name(gpu).items():
        by_kind[classify(name)].append((name, durations))
    kinds = {}
    for kind, names in by_kind.items():
        us = sum(sum(d) for _, d in names)
        kinds[kind] = {
            "ms": round(us / 1e3, 3), "share": round(us / span, 4),
            "calls": sum(len(d) for _, d in names),
            "top": [{"name": name[:160], "ms": round(sum(d) / 1e3, 3), "calls": len(d)}
                    for name, d in names[:TOP_PER_KIND]],
        }
    kernel_us = sum(e["dur"] for e in gpu)
    gemm_ms = kinds["gemm"]["ms"]
    return {
        "tokens": tokens,
        "gpu_events": len(gpu),
        "span_ms": round(span / 1e3, 3),
        "gpu_busy_ms": round(busy / 1e3, 3),
        "idle_ms": round((span - busy) / 1e3, 3),
        "busy_fraction": round(busy / span, 4),
        # kernel time that ran alongside other kernels (0 on one stream): the kinds' ms add up to
        # span - idle + overlap
        "overlap_ms": round((kernel_us - busy) / 1e3, 3),
        "kinds": kinds,
        "gemm_tflop": round(2 * tokens * matmul_params / 1e12, 2),
        "gemm_tflops": round(gemm_tflops(tokens, matmul_params, gemm_ms), 1) if gemm_ms else None,
        "largest_gaps": largest_gaps(gpu),
    }


def chunk_tokens(flags: list[str]) -> int:
    """The server's --chunked-prefill-size: its last value in flags (later flags win)."""
    name, value = "--chunked-prefill-size", None
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    if value is None:
        raise ValueError(f"no {name} in the server flags {flags}")
    return int(value)


def extend_cached_prefix(url: str, context: int, chunk: int, matmul_params: int,
                         traces: Path | None) -> dict:
    """Prefills `context` random tokens, then sends them again with chunk new ones: an extend of
    one chunk over a cached prefix of `context` tokens, profiled into traces/<context> unless
    traces is None. The row: both requests' TTFTs, the prefix hit, and chunk_summary."""
    flush_cache(url)  # nothing an earlier context left is matched, or evicted meanwhile
    ids = random_ids(context + chunk, TINY_VOCAB_SIZE, f"profile_prefill/{context}")
    row: dict = {"context": context}
    first = stream_one(url, ids[:context], 1)
    if "error" in first:
        return {**row, "error": f"prefilling the context: {first['error']}"}
    row["context_prefill_s"] = first["ttft_s"]
    folder = None if traces is None else traces / str(context)
    if folder is not None:
        # No Python stacks or shapes: their recording slows the host and lengthens launch gaps.
        start_profile(url, folder, activities=["CPU", "GPU"], with_stack=False,
                      record_shapes=False)
    try:
        second = stream_one(url, ids, 1, keep_output=True)
    finally:
        if folder is not None:  # the scheduler writes the trace before it answers
            requests.post(url + "/stop_profile", timeout=TRACE_WAIT_S).raise_for_status()
    if "error" in second:
        return {**row, "error": f"the chunk: {second['error']}"}
    row.update(chunk_ttft_s=second["ttft_s"], cached_tokens=second["cached_tokens"])
    if second["cached_tokens"] != context:
        row["error"] = (f"cached_tokens {second['cached_tokens']}, expected {context}: the "
                        f"forward profiled is not one {chunk}-token chunk over the context")
    elif folder is not None:
        row["chunk"] = chunk_summary(load_events(wait_for_trace(folder)), chunk, matmul_params)
    return row


def label(tokens: int) -> str:
    """131072 -> '128K', 1048576 -> '1M'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def table(rows: list[dict]) -> str:
    """One line per kind, then idle, span and the GEMM rate; a column per context: ms and share
    of the span."""
    done = [r for r in rows if "chunk" in r]
    lines = [f"{'':18}" + "".join(f"{label(r['context']):>18}" for r in done)]
    for kind, _ in KINDS:
        cells = [r["chunk"]["kinds"][kind] for r in done]
        lines.append(f"{kind:18}" + "".join(f"{c['ms']:>10.1f} ms {c['share']:>4.0%}"
                                             for c in cells))
    lines.append(f"{'idle':18}" + "".join(
        f"{r['chunk']['idle_ms']:>10.1f} ms {1 - r['chunk']['busy_fraction']:>4.0%}"
        for r in done))
    lines.append(f"{'span':18}" + "".join(f"{r['chunk']['span_ms']:>10.1f} ms     "
                                           for r in done))
    lines.append(f"{'gemm TFLOP/s':18}" + "".join(f"{r['chunk']['gemm_tflops'] or 0:>18.0f}"
                                                   for r in done))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS,
                   help="tokens already prefilled before the profiled chunk, one server for all")
    p.add_argument("--server-args", default="", help="extra flags for sglang.launch_server")
    p.add_argument("--tag", default="profile_prefill_sala")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    page = MODELS["sala"].sala_config.sparse.block_size
    for n in args.contexts:
        if n <= 0 or n % page:
            p.error(f"--contexts {n}: the prefix cache matches whole {page}-token pages (the "
                    f"sparse block size), so each context must be a positive multiple of {page}, "
                    f"e.g. {max(page, n // page * page)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = MODELS["sala"]
    chunk = chunk_tokens([*COMMON_FLAGS, *args.server_args.split()])
    work = Path(tempfile.mkdtemp(prefix="sala-profile-prefill-"))
    model_dir, tok_dir = prepare_model_dir(shape, work)
    page = shape.sala_config.sparse.block_size
    # the longest prompt, and a page of room for its one new token
    flags = server_flags(shape, BACKEND_NAMES[0], max(args.contexts) + chunk + page, tok_dir,
                         args.server_args)
    record = {
        **header("profile_prefill", args.tag),
        "model": f"sala: {shape.config_path.name}, random weights (--load-format dummy)",
        "server_flags": flags,
        "chunk_tokens": chunk,
        "matmul_params": shape.matmul_params(),
        "gemm_flop_counts": GEMM_FLOP_COUNTS,
        "kind_patterns": dict(KINDS),
        "rows": [],
    }
    try:
        with served(model_dir, work / "server.log", flags, record, keep_log=False) as server:
            # Kernel compilation and autotuning, and the prefix-hit path, before anything is timed;
            # a miss here would miss at every context, each after a cold prefill: stop instead
            # (raising keeps the server log's tail in the record).
            warmup = extend_cached_prefix(server.url, WARMUP_TOKENS, chunk,
                                          shape.matmul_params(), None)
            if "error" in warmup:
                record["warmup"] = warmup
                raise RuntimeError(f"warm-up with {WARMUP_TOKENS} tokens: {warmup['error']}")
            for context in args.contexts:
                row = extend_cached_prefix(server.url, context, chunk, shape.matmul_params(),
                                           work / "traces")
                record["rows"].append(row)
                c = row.get("chunk", {})
                print(f"[profile] {label(context)}: span_ms {c.get('span_ms')}, gpu_busy_ms "
                      f"{c.get('gpu_busy_ms')}, idle_ms {c.get('idle_ms')}, gemm "
                      f"{c.get('kinds', {}).get('gemm', {}).get('ms')} ms at "
                      f"{c.get('gemm_tflops')} TFLOP/s, cached_tokens {row.get('cached_tokens')}"
                      + (f", error: {row['error']}" if "error" in row else ""), flush=True)
                write_result(record, args.tag, args.out)
                if "error" in row and not server.alive():
                    break
    finally:
        path = write_result(record, args.tag, args.out)
        shutil.rmtree(work, ignore_errors=True)
    print(table(record["rows"]))
    print(f"wrote {path}", flush=True)
    ok = len(record["rows"]) == len(args.contexts)
    return 0 if ok and not any("error" in r for r in record["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
