"""Key compression (compress_new_windows): CUDA kernel vs its Triton twin, same inputs, one run.

The CUDA kernel is csrc/sparse_compress.cu; the Triton one, sala_sglang/ops/infllm_v2/compress.py.

    python benchmarks/kernels/sparse_compress.py [--out DIR] [--context 131072] [--chunk 8192]
        [--batches 1 8 32] [--max-copies 64]

Released geometry (block 64, 2 kv heads x 128, bf16); each call is one layer's K1 (stride 16,
kernel 32) compression, as SparseLayerBackend runs it.
Cases: the last `--chunk`-token chunk of a `--context`-token prompt (one request), and one decode
step of 1/8/32 requests at `--context` keys, each completing a K1 window (the heaviest decode
step; 15 of 16 steps complete none).
Timing: a CUDA graph of `copies` calls, each on other requests (own keys and pages), replayed
(per call: replay / copies); copies make the graph touch 4x the L2 cache where `--max-copies`
allows, so prefill reads HBM; decode touches too little and runs from L2 (`l2_resident`). Also
eager calls one at a time, launch overhead included (the Triton path computes lo/hi with a few
small torch ops before its kernel; the CUDA path is one launch).
Bytes per call: the keys under the new windows read once, the compressed keys written, and the
req_to_token entries read; GB/s is quoted against the device copy bandwidth measured in the same
run (`floor_ms` = bytes / copy bandwidth). Outputs are checked: CUDA vs Triton, both vs float64.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import RESULTS, gpu_time_ms, header, measured_peaks, write_result
from sala_sglang.config import MiniCPMSALAConfig, complete_windows  # noqa: E402
from sala_sglang.ops import _cuda  # noqa: E402
from sala_sglang.ops.infllm_v2 import compress_new_windows  # noqa: E402

DEVICE = "cuda"


@dataclass
class Compression:
    """The compressed keys' geometry (K1)."""

    name: str
    kernel: int
    stride: int

    def windows(self, length: int) -> int:
        return complete_windows(length, self.kernel, self.stride)


@dataclass
class Inputs:
    """`copies` x `batch` requests growing from old to new keys. Only the positions the new
    windows read (and the pages holding them) are backed by their own cache slots."""

    rt: torch.Tensor  # [copies * batch + 1, new + block] int32; row 0 unused
    k: torch.Tensor  # [slots, G, D]
    slots: list[torch.Tensor]  # per copy: [batch] int32 rows of rt
    old: torch.Tensor  # [batch] int32
    new: torch.Tensor
    pages: int


def build_inputs(old: int, new: int, batch: int, copies: int, block: int, groups: int, dim: int,
                 reach: int, dtype: torch.dtype) -> Inputs:
    """Pages for positions [old - reach, new) of every request, shuffled over the pool; earlier
    positions all point at page 0 (never read: no new window reaches back that far)."""
    first = max(0, (old - reach) // block * block)
    own = math.ceil((new - first) / block)
    requests = copies * batch
    pages = requests * own + 1
    perm = (torch.randperm(pages - 1, device=DEVICE) + 1).view(requests, own)
    rt = torch.zeros(requests + 1, new + block, dtype=torch.int32, device=DEVICE)
    pos = torch.arange(first, new, device=DEVICE)
    rt[1:, first:new] = (perm[:, (pos - first) // block] * block + pos % block).to(torch.int32)
    k = torch.randn(pages * block, groups, dim, device=DEVICE, dtype=dtype)
    slots = [torch.arange(1 + c * batch, 1 + (c + 1) * batch, dtype=torch.int32, device=DEVICE)
             for c in range(copies)]
    lens = [torch.full((batch,), n, dtype=torch.int32, device=DEVICE) for n in (old, new)]
    return Inputs(rt, k, slots, *lens, pages)


def call_bytes(comp: Compression, old: int, new: int, batch: int, groups: int, dim: int,
               itemsize: int) -> int:
    """Bytes one call must move: keys under the new windows once, outputs, slot indices."""
    n = comp.windows(new) - comp.windows(old)
    if n <= 0:
        return 0
    keys = (n - 1) * comp.stride + comp.kernel
    return batch * (keys * groups * dim * itemsize + n * groups * dim * itemsize + keys * 4)


def reference_error(inp: Inputs, out: torch.Tensor, comp: Compression, block: int) -> float:
    """Relative error of copy 0's new windows against a float64 mean of the cached keys."""
    got, want = [], []
    for b, row in enumerate(inp.slots[0].tolist()):
        lo, hi = comp.windows(int(inp.old[b])), comp.windows(int(inp.new[b]))
        starts = torch.arange(lo, hi, device=DEVICE) * comp.stride
        if starts.numel() == 0:
            continue
        pos = starts[:, None] + torch.arange(comp.kernel, device=DEVICE)[None, :]
        want.append(inp.k[inp.rt[row, pos].long()].double().mean(dim=1))
        last = starts + comp.kernel - 1  # a window lives beside the page of its last token
        page = inp.rt[row, last // block * block].long() // block
        got.append(out[page, (last % block) // comp.stride].double())
    got, want = torch.cat(got), torch.cat(want)
    return float((got - want).norm() / want.norm())


def time_graph(step: Callable[[int], None], copies: int) -> float:
    """Milliseconds per call: a CUDA graph of one call per copy, replayed."""
    for c in range(copies):  # compile / warm up outside the capture
        step(c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(copies):
            step(c)
    ms = gpu_time_ms(graph.replay, warmup=3, iters=20) / copies
    del graph
    return ms


def bench_case(case: str, old: int, new: int, batch: int, comps: list[Compression],
               peaks: dict, args: argparse.Namespace, impls: list[str]) -> list[dict]:
    sp = MiniCPMSALAConfig().sparse
    groups, dim, dtype = args.kv_heads, args.head_dim, torch.bfloat16
    itemsize = torch.empty(0, dtype=dtype).element_size()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    rows = []
    for comp in comps:
        nbytes = call_bytes(comp, old, new, batch, groups, dim, itemsize)
        copies = max(1, min(args.max_copies, math.ceil(4 * l2 / max(nbytes, 1))))
        inp = build_inputs(old, new, batch, copies, sp.block_size, groups, dim,
                           max(c.kernel for c in comps), dtype)
        most = (new - old) // comp.stride + 2  # as the backend sizes the grid
        row = {"case": case, "compression": comp.name, "kernel_size": comp.kernel,
               "stride": comp.stride, "block_size": sp.block_size, "batch": batch,
               "old_len": old, "new_len": new, "max_new_windows": most,
               "new_windows_per_request": comp.windows(new) - comp.windows(old),
               "bytes_per_call": nbytes, "graph_copies": copies,
               "l2_resident": copies * nbytes < l2,
               "floor_ms": nbytes / (peaks["copy_gb_per_s"] * 1e6), "impls": {}}
        outs = {}
        for impl in impls:
            out = torch.zeros(inp.pages, sp.windows_per_block, groups, dim, dtype=dtype,
                              device=DEVICE)

            def step(c: int, impl: str = impl, out: torch.Tensor = out) -> None:
                compress_new_windows(inp.k, out, inp.rt, inp.slots[c], inp.old, inp.new, sp,
                                     most, impl=impl)

            entry: dict = {}
            row["impls"][impl] = entry
            try:
                step(0)
                torch.cuda.synchronize()
                outs[impl] = out.clone()
                entry["rel_err_vs_float64"] = reference_error(inp, out, comp, sp.block_size)
                graph_ms = time_graph(step, copies)
                eager_ms = gpu_time_ms(lambda: step(0), warmup=3, iters=20)
            except Exception as exc:  # reported, not fatal: the other impl still runs
                entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
                continue
            entry.update(graph_ms=graph_ms, eager_ms=eager_ms,
                         gb_per_s=nbytes / graph_ms / 1e6 if nbytes else None,
                         x_floor=graph_ms / row["floor_ms"] if nbytes else None)
        if len(outs) == 2:
            a, b = outs["cuda"].double(), outs["triton"].double()
            row["cuda_vs_triton_max_abs"] = float((a - b).abs().max())
        t, c = row["impls"].get("triton", {}), row["impls"].get("cuda", {})
        if "graph_ms" in t and "graph_ms" in c:
            row["cuda_speedup_graph"] = t["graph_ms"] / c["graph_ms"]
            row["cuda_speedup_eager"] = t["eager_ms"] / c["eager_ms"]
        rows.append(row)
        print(table_line(row), flush=True)
        inp = outs = None
        torch.cuda.empty_cache()
    return rows


def table_line(row: dict) -> str:
    parts = [f"{row['case']:>22} {row['compression']}"]
    for impl, e in row["impls"].items():
        if "graph_ms" in e:
            rate = f" {e['gb_per_s']:.0f} GB/s x{e['x_floor']:.1f} floor" if e["gb_per_s"] else ""
            parts.append(f"{impl}: graph {e['graph_ms'] * 1e3:.1f} us eager "
                         f"{e['eager_ms'] * 1e3:.1f} us{rate} err {e['rel_err_vs_float64']:.1e}")
        else:
            parts.append(f"{impl}: {e.get('error', '?')[:80]}")
    return " | ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--context", type=int, default=131072,
                        help="keys cached after the prefill chunk / at the decode step")
    parser.add_argument("--chunk", type=int, default=8192, help="prefill chunk tokens")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32],
                        help="decode batch sizes")
    parser.add_argument("--max-copies", type=int, default=64,
                        help="most distinct request sets one timed CUDA graph cycles through")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tag", default=None, help="result file suffix (default: the GPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sp = MiniCPMSALAConfig().sparse
    comps = [Compression("K1", sp.kernel_size, sp.kernel_stride)]
    impls = (["cuda"] if _cuda.available() else []) + ["triton"]
    device = torch.cuda.get_device_name(0).lower()
    tag = args.tag or next((t for t in ("h100", "h200") if t in device), "gpu")
    record = {**header("kernels_sparse_compress", tag), "peaks": measured_peaks(),
              "ours_cuda_built": _cuda.available(),
              "geometry": {"kv_heads": args.kv_heads, "head_dim": args.head_dim,
                           "dtype": "bfloat16", **sp.to_dict()},
              "rows": []}
    print(f"peaks: {record['peaks']}", flush=True)
    name = f"kernels_sparse_compress_{tag}"
    cases = [(f"prefill {args.context // 1024}K chunk {args.chunk}", args.context - args.chunk,
              args.context, 1)]
    cases += [(f"decode b={b} at {args.context // 1024}K", args.context - 1, args.context, b)
              for b in args.batches]
    for case, old, new, batch in cases:
        record["rows"] += bench_case(case, old, new, batch, comps, record["peaks"], args, impls)
        write_result(record, name, args.out)


if __name__ == "__main__":
    main()
