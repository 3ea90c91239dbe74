"""The host time SGLang's radix cache takes between two prefill chunks of one long request, on the
CPU: what the GPU waits for between chunks (the prefill profiles' idle time, which grows with the
prefix: 5.6 ms a chunk at 128K, 18.4 at 512K, 58.1 at 1M on an H100).

A chunked request is cached after every chunk (`cache_unfinished_req`): its ids so far are
inserted into the tree and matched again. Each chunk leaves one more node on the request's path,
and each walk down that path slices the rest of the key at every node, so a chunk's cost grows
with prefix x chunks so far, and a whole prompt's with N^3 / chunk^2. Measured here on SGLang's
own UnifiedRadixCache (its full-KV component only: the recurrent-state snapshots of the model's
cache add a copy per insert, not a walk) with CPU tensors and a real `Req`, one request of
`length` random ids cached chunk by chunk as the scheduler does.

    python benchmarks/radix_cache_chunks.py --lengths 131072 524288 1048576 --chunks 8192 16384
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

import torch

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, header, write_result  # noqa: E402


def chunked_caching_times(length: int, chunk: int, seed: int = 0) -> list[float]:
    """Seconds each `cache_unfinished_req` took for one request of `length` ids prefilled in
    `chunk`-token chunks, in order."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.unified_cache_components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
    from sglang.srt.sampling.sampling_params import SamplingParams

    req_pool = ReqToTokenPool(size=1, max_context_len=length, device="cpu",
                              enable_memory_saver=False)
    kv = SimpleNamespace(size=length, dtype=torch.bfloat16, device="cpu")  # slots only
    allocator = TokenToKVPoolAllocator(length, torch.bfloat16, "cpu", kv, False)
    cache = UnifiedRadixCache(CacheInitParams(
        disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
        page_size=1, tree_components=(ComponentType.FULL,)))

    rng = random.Random(seed)
    ids = array("q", (rng.randrange(1, 1 << 16) for _ in range(length)))
    req = Req("radix-cache-chunks", "", ids, SamplingParams(max_new_tokens=1))
    req.req_pool_idx = req_pool.alloc([req])[0]
    req_pool.write((req.req_pool_idx, slice(0, length)), allocator.alloc(length))
    req.full_untruncated_fill_ids = req.origin_input_ids
    req.prefix_indices = torch.empty(0, dtype=torch.int64)
    req.last_node = cache.root_node
    req.cache_protected_len = 0

    times = []
    for end in range(chunk, length + 1, chunk):
        req.set_extend_range(end - chunk, end)
        start = time.perf_counter()
        cache.cache_unfinished_req(req, chunked=True)
        times.append(time.perf_counter() - start)
    if req.cache_protected_len != length - length % chunk:
        raise RuntimeError(f"the tree holds {req.cache_protected_len} of {length} tokens")
    return times


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048576])
    p.add_argument("--chunks", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--tag", default="radix_cache_chunks")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    record = {**header("radix_cache_chunks", args.tag), "cpu": cpu_name(), "rows": []}
    for chunk in args.chunks:
        for length in args.lengths:
            times = chunked_caching_times(length, chunk)
            row = {"length": length, "chunk": chunk, "chunks": len(times),
                   "last_chunk_ms": round(times[-1] * 1e3, 2),
                   "max_chunk_ms": round(max(times) * 1e3, 2),
                   "total_s": round(sum(times), 3)}
            record["rows"].append(row)
            print(row, flush=True)
    return write_result(record, args.tag, args.out)


if __name__ == "__main__":
    main()
