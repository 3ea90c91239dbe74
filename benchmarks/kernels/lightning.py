"""Lightning kernels against their anchors, on the same inputs in one run (real config dims).

    python benchmarks/kernels/lightning.py [--out DIR] [--batches 1 8 32] [--prefill-tokens ...]
    python benchmarks/kernels/lightning.py --qk-only [--out DIR]    # under a minute

Decode: one decode step of all Lightning layers = one call per layer (24), each on its own layer's
state pool, captured in one CUDA graph as SGLang serves decode, timed as graph replays. State
pools rotate among copies larger than the L2 cache together, so every step reads HBM. Bytes per
step: state read + write (fp32) and q, k, v, o (bf16); floor = bytes / measured copy bandwidth.
Prefill: one sequence, fresh state; FLOPs of the chunked form (chunk 64):
T * H * (4 * 64 * D + 4 * D^2); floor = max(bytes / copy bandwidth, FLOPs / bf16 peak).
Each anchor's output and final state are compared with ours and with the reference.
--qk-only: the layer's q/k preparation alone, the chain it replaced (two reshape copies of the
qkv slices, SGLang's RMSNorm on q and on k, SGLang's RoPE, a copy of v) against
ops/lightning_qk.py (v left a slice), each also followed by the recurrence, for one
--chunked-prefill-size chunk (one layer, eager) and a batch-1 decode step (every Lightning
layer, one CUDA graph); the fused outputs are compared with the chain's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import (
    RELEASED_CONFIG,
    RESULTS,
    gpu_time_ms,
    header,
    measured_peaks,
    write_result,
)
from sala_sglang.ops import _cuda, lightning  # noqa: E402
from sala_sglang.ops.lightning_plan import PREFILL_LAUNCH  # noqa: E402
from sala_sglang.ops.lightning_qk import lightning_qk_norm_rope  # noqa: E402
from sala_sglang.reference.lightning import lightning_chunked, lightning_slopes  # noqa: E402
from sala_sglang.server_args import RECOMMENDED_SERVE_FLAGS  # noqa: E402

CHUNK = 64
DEVICE = "cuda"
# Launch shapes of our prefill timed next to the default (lightning_plan.PREFILL_LAUNCH).
PREFILL_VARIANTS = [
    {"chunk": c, "block_v": bv, "num_warps": w, "num_stages": 2}
    for c, bv, w in [(64, 64, 4), (64, 64, 8), (64, 32, 8), (64, 128, 8), (32, 64, 4),
                     (32, 64, 8), (32, 128, 8)]
]


@dataclass
class Impl:
    """`step` is what is timed; `result(raw, state)` -> (o [.., H, D] scaled, state after)."""

    step: Callable
    result: Callable = lambda raw, state: (raw, state)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm())


def anchors() -> dict:
    """The third-party kernels that import here: name -> module-level callables, or the error."""
    found = {}
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        found["fla"] = (chunk_simple_gla, fused_recurrent_simple_gla)
    except ImportError as exc:
        found["fla"] = exc
    try:
        from sglang.kernels.ops.attention.linear.seg_la import SegLaMeta, seg_la_fwd

        found["seg_la"] = (SegLaMeta, seg_la_fwd)
    except ImportError as exc:
        found["seg_la"] = exc
    try:
        from sglang.kernels.ops.attention.linear.lightning_attn import (
            BailingLinearKernel,
            linear_decode_forward_triton,
        )

        found["minimax"] = (BailingLinearKernel, linear_decode_forward_triton)
    except ImportError as exc:
        found["minimax"] = exc
    return found


def decode_impls(found: dict, slopes: torch.Tensor, scale: float, batch: int) -> dict:
    heads = slopes.numel()
    slots = torch.arange(batch, device=DEVICE, dtype=torch.int32)
    impls = {}

    def ours(impl: str) -> Impl:
        return Impl(lambda st, q, k, v: lightning.lightning_decode(
            q, k, v, st, slots, slopes, scale, impl=impl))

    if _cuda.available():
        impls["ours_cuda"] = ours("cuda")
    impls["ours_triton"] = ours("triton")
    # What 24 launches cost without the recurrence: an in-place scale of the state (the same
    # bytes read and written by one plain elementwise kernel), and a one-element kernel (the
    # launch and latency alone). Not lightning steps: no accuracy is computed for them.
    impls["reference_state_rw"] = Impl(lambda st, q, k, v: st.mul_(0.5))
    tiny = torch.zeros(1, device=DEVICE)
    impls["reference_one_element"] = Impl(lambda st, q, k, v: tiny.add_(1.0))
    if isinstance(found["fla"], tuple):
        fused = found["fla"][1]
        # fla's g_gamma is the per-head log decay: S_t = exp(g_gamma) S_{t-1} + k^T v
        impls["fla_fused_recurrent_simple_gla"] = Impl(
            lambda st, q, k, v: fused(q[:, None], k[:, None], v[:, None], g_gamma=-slopes,
                                      scale=scale, initial_state=st, output_final_state=True),
            lambda raw, st: (raw[0][:, 0], raw[1]),
        )
    if isinstance(found["seg_la"], tuple):
        meta_cls, seg_la = found["seg_la"]
        ones = torch.ones(batch, device=DEVICE, dtype=torch.int32)
        meta = meta_cls(batch_size=batch, max_q_length=1, s_offsets=slots, q_lengths=ones,
                        q_offsets=torch.arange(batch + 1, device=DEVICE, dtype=torch.int32),
                        s_scales=ones)
        impls["sglang_seg_la"] = Impl(lambda st, q, k, v: seg_la(
            q, k, v, st, slopes, meta, softmax_scale=scale, decouple=True))
    if isinstance(found["minimax"], tuple):
        minimax_decode = found["minimax"][1]
        # no softmax scale inside SGLang's minimax decode kernel: applied outside the timing
        impls["sglang_minimax_decode"] = Impl(
            lambda st, q, k, v: minimax_decode(q[:, :, None], k[:, :, None], v[:, :, None], st,
                                               slopes, slots, 32),
            lambda raw, st: (raw.view(batch, heads, -1) * scale, st),
        )
    return impls


def bench_decode(found: dict, peaks: dict, heads: int, dim: int, layers: int, batch: int) -> dict:
    slopes = lightning_slopes(heads).float().to(DEVICE)
    scale = dim**-0.5
    impls = decode_impls(found, slopes, scale, batch)
    state_bytes = batch * heads * dim * dim * 4
    step_bytes = layers * (2 * state_bytes + 4 * batch * heads * dim * 2)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    copies = max(1, math.ceil(4 * l2 / (layers * state_bytes)))
    row = {"batch": batch, "layers": layers, "calls_per_step": layers, "timed": "CUDA graph replay",
           "state_copies_rotated": copies, "bytes_per_step": step_bytes,
           "floor_ms": step_bytes / (peaks["copy_gb_per_s"] * 1e6), "impls": {}}

    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    q, k, v = (torch.randn(layers, batch, heads, dim, device=DEVICE, dtype=torch.bfloat16,
                           generator=gen) for _ in range(3))
    state0 = torch.randn(batch, heads, dim, dim, device=DEVICE, generator=gen)
    # reference for layer 0 in fp64: S' = exp(-slope) S + k^T v, o = scale q S'
    ref_state = (torch.exp(-slopes.double())[:, None, None] * state0.double()
                 + k[0].double()[..., :, None] * v[0].double()[..., None, :])
    ref_o = scale * torch.einsum("bhk,bhkv->bhv", q[0].double(), ref_state)
    pools = torch.randn(copies, layers, batch, heads, dim, dim, device=DEVICE, generator=gen)

    for name, impl in impls.items():
        entry: dict = {}
        row["impls"][name] = entry
        try:
            if not name.startswith("reference_"):
                st = state0.clone()
                o, new_state = impl.result(impl.step(st, q[0], k[0], v[0]), st)
                entry["rel_err_o_vs_reference"] = rel_err(o, ref_o)
                entry["rel_err_state_vs_reference"] = rel_err(new_state, ref_state)
            for layer in range(layers):  # compile / autotune before capture
                impl.step(pools[0, layer], q[layer], k[layer], v[layer])
            graphs = []
            for c in range(copies):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for layer in range(layers):
                        impl.step(pools[c, layer], q[layer], k[layer], v[layer])
                graphs.append(graph)
            turn = itertools.count()
            ms = gpu_time_ms(lambda: graphs[next(turn) % copies].replay(), warmup=3, iters=20)
            graphs = None
        except Exception as exc:  # an anchor that fails is reported, not fatal
            entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
            continue
        entry.update(ms=ms, gb_per_s=step_bytes / ms / 1e6, x_floor=ms / row["floor_ms"])
    base = row["impls"].get("ours_cuda", {}).get("ms")
    for entry in row["impls"].values():
        if base and "ms" in entry:
            entry["ours_cuda_speedup"] = entry["ms"] / base
    del pools
    torch.cuda.empty_cache()
    return row


def prefill_impls(found: dict, slopes: torch.Tensor, scale: float, tokens: int,
                  segment_lens: list[int]) -> dict:
    dev = DEVICE
    slots = torch.zeros(1, device=dev, dtype=torch.int32)
    cu = torch.tensor([0, tokens], device=dev, dtype=torch.int32)
    fresh = torch.zeros(1, device=dev, dtype=torch.int32)

    def ours(segment_len: int | None = None, launch: dict = PREFILL_LAUNCH) -> Impl:
        return Impl(lambda st, q, k, v: lightning.lightning_prefill(
            q, k, v, st, slots, cu, fresh, slopes, scale, segment_len, launch),
            lambda raw, st: (raw, st[0]))

    impls = {"ours_triton": ours(),
             "ours_triton_unsplit": ours(math.ceil(tokens / CHUNK) * CHUNK)}
    impls.update({f"ours_triton_segment_{n}": ours(n) for n in segment_lens if n < tokens})
    impls.update({
        "ours_triton_c{chunk}_v{block_v}_w{num_warps}".format(**launch): ours(launch=launch)
        for launch in PREFILL_VARIANTS if launch != PREFILL_LAUNCH
    })
    if isinstance(found["fla"], tuple):
        chunk = found["fla"][0]
        impls["fla_chunk_simple_gla"] = Impl(
            lambda st, q, k, v: chunk(q[None], k[None], v[None], g_gamma=-slopes, scale=scale,
                                      output_final_state=True),
            lambda raw, st: (raw[0][0], raw[1][0]),
        )
    if isinstance(found["seg_la"], tuple):
        meta_cls, seg_la = found["seg_la"]
        meta = meta_cls(batch_size=1, max_q_length=tokens, q_offsets=cu, s_offsets=slots,
                        q_lengths=cu[1:] - cu[:1], s_scales=fresh)
        impls["sglang_seg_la"] = Impl(
            lambda st, q, k, v: seg_la(q, k, v, st, slopes, meta, softmax_scale=scale,
                                       decouple=True),
            lambda raw, st: (raw, st[0]))
    if isinstance(found["minimax"], tuple):
        bailing = found["minimax"][0]
        # SGLang's minimax path takes [H, T, D] per sequence and applies no softmax scale
        impls["sglang_minimax_lightning_attention"] = Impl(
            lambda st, q, k, v: bailing.jit_linear_forward_prefix(
                *(x.transpose(0, 1).contiguous() for x in (q, k, v)), st[0], slopes, 256),
            lambda raw, st: (raw.view(tokens, slopes.numel(), -1) * scale, st[0]),
        )
    return impls


def bench_prefill(found: dict, peaks: dict, heads: int, dim: int, tokens: int,
                  reference_max: int, segment_lens: list[int]) -> dict:
    slopes = lightning_slopes(heads).float().to(DEVICE)
    scale = dim**-0.5
    flops = tokens * heads * (4 * CHUNK * dim + 4 * dim * dim)
    io_bytes = 4 * tokens * heads * dim * 2
    floor_ms = max(io_bytes / (peaks["copy_gb_per_s"] * 1e6), flops / (peaks["bf16_tflops"] * 1e9))
    row = {"tokens": tokens, "sequences": 1, "flops": flops, "io_bytes": io_bytes,
           "floor_ms": floor_ms, "impls": {}}
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    q, k, v = (torch.randn(tokens, heads, dim, device=DEVICE, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    ref = None
    if tokens <= reference_max:  # fp32 chunked reference (tested against the recurrence on CPU)
        ref = lightning_chunked(q.float(), k.float(), v.float(), slopes, scale)
    ours = None
    for name, impl in prefill_impls(found, slopes, scale, tokens, segment_lens).items():
        entry: dict = {}
        row["impls"][name] = entry
        try:
            st = torch.zeros(1, heads, dim, dim, device=DEVICE)
            o, final = impl.result(impl.step(st, q, k, v), st)
            if ref is not None:
                entry["rel_err_o_vs_reference"] = rel_err(o, ref[0])
                entry["rel_err_state_vs_reference"] = rel_err(final, ref[1])
            if ours is None:
                ours = (o, final.clone())
            else:
                entry["rel_err_o_vs_ours"] = rel_err(o, ours[0])
                entry["rel_err_state_vs_ours"] = rel_err(final, ours[1])
            del o, final
            ms = gpu_time_ms(lambda: impl.step(st, q, k, v), warmup=2, iters=7)
        except Exception as exc:  # an anchor that fails (or runs out of memory) is reported
            entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
            torch.cuda.empty_cache()
            continue
        entry.update(ms=ms, tflops=flops / ms / 1e9, x_floor=ms / floor_ms)
        torch.cuda.empty_cache()
    base = row["impls"].get("ours_triton", {}).get("ms")
    for entry in row["impls"].values():
        if base and "ms" in entry:
            entry["ours_speedup"] = entry["ms"] / base
    q = k = v = ref = ours = None
    torch.cuda.empty_cache()
    return row


# ---- the layer's q/k preparation (--qk-only) --------------------------------------------------

PrepareQKV = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# where the timed chunk and decode step sit in the sequence (the RoPE table is read there)
QK_CONTEXT = 131072


def qk_preparations(config: dict) -> dict[str, PrepareQKV]:
    """(qkv [T, 3*H*D], positions [T]) -> q, k, v [T, H, D] as the recurrence gets them: the
    chain the layer ran before ops/lightning_qk.py ("chain", SGLang's modules as the layer built
    them, bf16 weights, the fp32 RoPE table) and the fused op ("fused"), same weights and table."""
    from types import SimpleNamespace

    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang.srt.runtime_context import get_context

    # building SGLang's RoPE reads one server argument; no server runs here
    get_context().set_server_args(SimpleNamespace(rl_on_policy_target=None))
    heads, dim = config["lightning_nh"], config["lightning_head_dim"]
    width = heads * dim
    gen = torch.Generator().manual_seed(0)
    with torch.device(DEVICE):
        q_norm, k_norm = (RMSNorm(dim, eps=config["rms_norm_eps"]).to(torch.bfloat16)
                          for _ in range(2))
        rope = get_rope(dim, rotary_dim=dim, max_position=config["max_position_embeddings"],
                        base=config["rope_theta"], is_neox_style=True, dtype=torch.bfloat16)
    for norm in (q_norm, k_norm):
        norm.weight.data.copy_(1.0 + 0.1 * torch.randn(dim, generator=gen))

    def chain(qkv: torch.Tensor, positions: torch.Tensor):
        q, k, v = qkv.split(width, -1)
        q = q_norm(q.reshape(-1, dim)).view(-1, width)
        k = k_norm(k.reshape(-1, dim)).view(-1, width)
        q, k = rope(positions, q, k)
        return q.view(-1, heads, dim), k.view(-1, heads, dim), v.contiguous().view(-1, heads, dim)

    def fused(qkv: torch.Tensor, positions: torch.Tensor):
        q, k, v = qkv.split(width, -1)
        q, k = lightning_qk_norm_rope(q, k, q_norm.weight, k_norm.weight, q_norm.variance_epsilon,
                                      positions, rope.cos_sin_cache)
        return q, k, v.view(-1, heads, dim)

    return {"chain": chain, "fused": fused}


def bench_qk_prefill(preps: dict[str, PrepareQKV], peaks: dict, heads: int, dim: int,
                     tokens: int) -> dict:
    """One layer on one chunk: the preparation alone, then followed by the prefill (fresh
    state, the segment length the plan would choose); outputs of the fused path against the
    chain's."""
    slopes = lightning_slopes(heads).float().to(DEVICE)
    slots = torch.zeros(1, device=DEVICE, dtype=torch.int32)
    cu = torch.tensor([0, tokens], device=DEVICE, dtype=torch.int32)
    fresh = torch.zeros(1, device=DEVICE, dtype=torch.int32)
    state = torch.zeros(1, heads, dim, dim, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    qkv = torch.randn(tokens, 3 * heads * dim, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    positions = torch.arange(QK_CONTEXT, QK_CONTEXT + tokens, device=DEVICE)

    def prefill(prep: PrepareQKV) -> torch.Tensor:
        return lightning.lightning_prefill(*prep(qkv, positions), state, slots, cu, fresh, slopes,
                                           dim**-0.5)

    # q and k read and written once, in bf16
    fused_bytes = 4 * tokens * heads * dim * 2
    row = {"tokens": tokens, "context": QK_CONTEXT, "fused_prep_bytes": fused_bytes,
           "fused_prep_floor_ms": fused_bytes / (peaks["copy_gb_per_s"] * 1e6), "ms": {}}
    outputs = {name: (*prep(qkv, positions)[:2], prefill(prep)) for name, prep in preps.items()}
    row["rel_err_fused_vs_chain"] = {
        part: rel_err(fused, chain)
        for part, fused, chain in zip(("q", "k", "o"), outputs["fused"], outputs["chain"])}
    for name, prep in preps.items():
        row["ms"][f"{name}_prep"] = gpu_time_ms(lambda: prep(qkv, positions), warmup=3, iters=20)
        row["ms"][f"{name}_prep_prefill"] = gpu_time_ms(lambda: prefill(prep), warmup=2, iters=10)
    return row


def bench_qk_decode(preps: dict[str, PrepareQKV], heads: int, dim: int, layers: int,
                    batch: int) -> dict:
    """A decode step of every Lightning layer, each with its own qkv rows and state, captured in
    one CUDA graph as SGLang serves decode: the preparation alone, then with the decode step
    (the implementation lightning_decode picks)."""
    slopes = lightning_slopes(heads).float().to(DEVICE)
    slots = torch.arange(batch, device=DEVICE, dtype=torch.int32)
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    qkv = torch.randn(layers, batch, 3 * heads * dim, device=DEVICE, dtype=torch.bfloat16,
                      generator=gen)
    states = torch.randn(layers, batch, heads, dim, dim, device=DEVICE, generator=gen)
    positions = torch.full((batch,), QK_CONTEXT, device=DEVICE)

    def step(prep: PrepareQKV, decode: bool) -> None:
        for layer in range(layers):
            q, k, v = prep(qkv[layer], positions)
            if decode:
                lightning.lightning_decode(q, k, v, states[layer], slots, slopes, dim**-0.5)

    row = {"batch": batch, "layers": layers, "timed": "CUDA graph replay", "ms": {}}
    for name, prep in preps.items():
        for decode in (False, True):
            step(prep, decode)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(prep, decode)
            row["ms"][f"{name}_prep" + ("_decode" if decode else "")] = gpu_time_ms(
                graph.replay, warmup=3, iters=50)
            graph = None
    return row


@torch.no_grad()  # as SGLang runs the model
def bench_qk(config: dict, layers: int, out: Path, tag: str) -> None:
    heads, dim = config["lightning_nh"], config["lightning_head_dim"]
    flags = list(RECOMMENDED_SERVE_FLAGS)
    chunk = int(flags[flags.index("--chunked-prefill-size") + 1])
    preps = qk_preparations(config)
    peaks = measured_peaks()
    record = {**header("kernels_lightning_qk", tag), "peaks": peaks,
              "config": {"heads": heads, "head_dim": dim, "lightning_layers": layers},
              "prefill": bench_qk_prefill(preps, peaks, heads, dim, chunk),
              "decode": bench_qk_decode(preps, heads, dim, layers, batch=1)}
    write_result(record, f"kernels_lightning_qk_{tag}", out)
    prefill, decode = record["prefill"], record["decode"]
    lines = ["| case | chain ms | fused ms | chain / fused |", "|---|---|---|---|"]
    for label, row, part in (
        (f"prefill T={chunk}, one layer: q/k prep", prefill, "prep"),
        (f"prefill T={chunk}, one layer: prep + prefill", prefill, "prep_prefill"),
        (f"decode b=1, {layers} layers: q/k prep", decode, "prep"),
        (f"decode b=1, {layers} layers: prep + decode", decode, "prep_decode"),
    ):
        chain, fused = row["ms"][f"chain_{part}"], row["ms"][f"fused_{part}"]
        lines.append(f"| {label} | {chain:.4f} | {fused:.4f} | {chain / fused:.2f} |")
    lines.append(f"fused prep at {prefill['fused_prep_floor_ms']:.4f} ms of copy bandwidth; "
                 f"rel err fused vs chain: {prefill['rel_err_fused_vs_chain']}")
    print("\n".join(lines), flush=True)


def table(record: dict) -> str:
    lines = ["| kernel | case | ms | GB/s or TFLOP/s | x floor | ours faster by | rel err vs ref |",
             "|---|---|---|---|---|---|---|"]
    for row in record["decode"]:
        for name, e in row["impls"].items():
            if "ms" in e:
                lines.append(f"| {name} | decode b={row['batch']} x{row['layers']} layers | "
                             f"{e['ms']:.4f} | {e['gb_per_s']:.0f} GB/s | {e['x_floor']:.2f} | "
                             f"{e.get('ours_cuda_speedup', float('nan')):.2f} | "
                             f"{e.get('rel_err_o_vs_reference', float('nan')):.1e} |")
            else:
                lines.append(f"| {name} | decode b={row['batch']} | error: {e['error'][:80]} |")
    for row in record["prefill"]:
        for name, e in row["impls"].items():
            if "ms" in e:
                err = e.get("rel_err_o_vs_reference", e.get("rel_err_o_vs_ours", float("nan")))
                lines.append(f"| {name} | prefill T={row['tokens']} | {e['ms']:.3f} | "
                             f"{e['tflops']:.1f} TFLOP/s | {e['x_floor']:.2f} | "
                             f"{e.get('ours_speedup', float('nan')):.2f} | {err:.1e} |")
            else:
                lines.append(f"| {name} | prefill T={row['tokens']} | error: {e['error'][:80]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--prefill-tokens", type=int, nargs="*", default=[32768, 131072, 524288])
    parser.add_argument("--reference-max-tokens", type=int, default=131072)
    parser.add_argument("--segment-lens", type=int, nargs="*", default=[],
                        help="also time our prefill at these fixed segment lengths (tuning)")
    parser.add_argument("--qk-only", action="store_true",
                        help="only the layer's q/k preparation: SGLang's chain against "
                             "ops/lightning_qk.py (one chunk, one batch-1 decode step)")
    args = parser.parse_args()

    config = json.loads(RELEASED_CONFIG.read_text())
    heads, dim = config["lightning_nh"], config["lightning_head_dim"]
    layers = config["mixer_types"].count("lightning-attn")
    device = torch.cuda.get_device_name(0).lower()
    tag = next((t for t in ("h100", "h200") if t in device), "gpu")
    if args.qk_only:
        bench_qk(config, layers, args.out, tag)
        return
    found = anchors()
    record = {**header("kernels_lightning", tag), "peaks": measured_peaks(),
              "prefill_launch": PREFILL_LAUNCH,
              "config": {"heads": heads, "head_dim": dim, "lightning_layers": layers},
              "ours_cuda_built": _cuda.available(),
              "anchors_unavailable": {n: str(a) for n, a in found.items()
                                      if not isinstance(a, tuple)},
              "decode": [], "prefill": []}
    print(json.dumps(record["peaks"]), flush=True)
    for batch in args.batches:
        record["decode"].append(bench_decode(found, record["peaks"], heads, dim, layers, batch))
        write_result(record, f"kernels_lightning_{tag}", args.out)
    for tokens in args.prefill_tokens:
        record["prefill"].append(
            bench_prefill(found, record["peaks"], heads, dim, tokens, args.reference_max_tokens,
                          args.segment_lens))
        write_result(record, f"kernels_lightning_{tag}", args.out)
    print(table(record), flush=True)


if __name__ == "__main__":
    main()
