"""InfLLM-v2 ops (sala_sglang/ops/infllm_v2/) against their anchors, on identical inputs, one run:

- compression: ours (K1 of one prefill chunk, and of a whole context) vs a plain torch
  gather + mean-pool (there is no kernel anchor for it);
- selection: ours (the Triton kernels, row "ours"; the fused CUDA kernel of sala_sglang._C,
  row "ours cuda", where it is built) vs OpenBMB's stage-1 + max-pooling + top-k path
  (sparse_anchors.py);
- block-sparse attention: ours vs FlashInfer over the same selected pages, and dense attention
  (FlashInfer fa2/fa3, PyTorch flash SDPA) over the whole context as the no-sparsity anchor.
  "ours" is the Triton kernel (as on main); where `sala_sglang._C` is built, its row also times the
  CUDA op (csrc/sparse_attention.cu) on the same inputs: cuda_ms, cuda_speedup (Triton ms / CUDA
  ms), cuda_rel_err_vs_ours, cuda_ref_rel_err. The layer rows run what serving's plan picks.

Prefill = the last 8192-token chunk of a 32K/128K/512K prompt (what chunked prefill runs), one
request, every token sparse. Decode = batch 1/8/32 of 128K-token requests, one query each, timed
as CUDA-graph replays (as served) where the runner can be captured. Decode selection (section
"decode select", alone with --decode-selection-only): the Triton selection at a server's static
width (--decode-widths: a 128K and a 1M server's), as serving's decode plan runs it, against the
path before the chunked top-k and the stage-1 split fill (`select_before.py`: DECODE_SPLITS,
block keys + torch.topk) on the same inputs, then each half alone (both tails on the same window
probabilities must give identical blocks); with --sweep, the top-k chunk and stage-1 splits.
Decode attention (--decode-attention-only): both kernels at 4-96 splits on batch 1/8/32 at
--decode-context, against the split counts and kernel serving's decode plan picks.
Checks in the same run: attention outputs against a float64 reference on sampled rows and against
each other given the same selection; selected blocks against the reference block scores and as
overlap with the anchor's. Rates count only the needed FLOPs (4 * heads * head_dim * attended keys
per query; 2 * heads * head_dim * visible windows for stage-1) against measured_peaks().

    python benchmarks/kernels/sparse_attention.py [--baseline OLD_SPARSE_PY] [--flashinfer-aot DIR]
    python benchmarks/kernels/sparse_attention.py --decode-selection-only [--sweep]
    python benchmarks/kernels/sparse_attention.py --decode-attention-only --batches 1 8 32
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a file: `benchmarks` imports from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import RESULTS, gpu_time_ms, header, measured_peaks, write_result
from benchmarks.kernels import select_before as before
from benchmarks.kernels import sparse_anchors as anchors
from sala_sglang.config import MiniCPMSALAConfig  # noqa: E402
from sala_sglang.ops import _cuda  # noqa: E402
from sala_sglang.ops._cuda import DeviceFacts  # noqa: E402
from sala_sglang.ops.infllm_v2 import attention, compress, select  # noqa: E402
from sala_sglang.ops.infllm_v2.plan import DECODE_SPLITS, SparsePlan, make_plan  # noqa: E402
from sala_sglang.ops.overrides import KernelOverrides  # noqa: E402
from sala_sglang.reference import sparse as ref  # noqa: E402
from sala_sglang.testing.paged_inputs import SparseInputs, decode_batch, prefill_chunk  # noqa: E402

# A selected block must score at least the reference's n_sel-th block score less this fraction of
# it: at 128K a block score is ~1e-3, so the op test's absolute 2e-2 would pass anything.
SCORE_REL_TOL = 1e-3
CHECK_ROWS = 8
# FlashInfer backends for the selected-pages anchor: fa3's paged kernel ran that one-query-per-
# request pattern 23-30x slower than fa2 (H100, 2026-11-22), so it is left out.
FI_SPARSE = ["fa2"]


class Record:
    """Rows of results, written after every section so a cut-off run still leaves numbers."""

    def __init__(self, args: argparse.Namespace, peaks: dict, model: MiniCPMSALAConfig) -> None:
        self.args = args
        self.peaks = peaks
        self.data = header("kernels_sparse", args.tag)
        sp = model.sparse
        self.data.update(
            peaks=peaks,
            geometry=dict(q_heads=model.num_attention_heads, kv_heads=model.num_key_value_heads,
                          head_dim=model.head_dim, **sp.to_dict(),
                          num_selected_blocks=sp.num_selected_blocks),
            prefill=f"last {args.chunk}-token chunk of one request, all tokens sparse",
            anchors={}, rows=[], sweeps=[],
        )
        self.t0 = time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def add(self, **row) -> dict:
        ms, flops, nbytes = row.get("ms"), row.pop("flops", None), row.pop("bytes", None)
        if ms and flops:
            row["tflops"] = round(flops / ms / 1e9, 1)
            row["pct_peak"] = round(100 * row["tflops"] / self.peaks["bf16_tflops"], 1)
        if ms and nbytes:
            row["gb_per_s"] = round(nbytes / ms / 1e6, 1)
        self.data["rows"].append(row)
        self.log("  " + " ".join(f"{k}={v}" for k, v in row.items() if k not in ("section",)))
        return row

    def save(self) -> None:
        write_result(self.data, self.args.tag, self.args.out)


def timed(fn: Callable[[], object], iters: int) -> float:
    return round(gpu_time_ms(fn, warmup=2, iters=iters), 4)


# Decode rows are timed as CUDA-graph replays, as serving runs them (eager timings of these
# sub-millisecond ops measure Python launch overhead); eager where a runner cannot be captured.
GRAPH_TIMING = {"on": False}


def timed_row(fn: Callable[[], object], iters: int) -> dict:
    if GRAPH_TIMING["on"]:
        try:
            return {"ms": timed(graphed(fn), iters), "timing": "cuda graph"}
        except Exception as e:
            print(f"    (not capturable, timed eagerly: {type(e).__name__})", flush=True)
    return {"ms": timed(fn, iters), "timing": "eager"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def check_rows(inp: SparseInputs) -> torch.Tensor:
    t = inp.q.shape[0]
    return torch.linspace(0, t - 1, min(CHECK_ROWS, t), device=inp.q.device).round().long()


# ---- what a case needs -------------------------------------------------------------------------
def attended_keys(inp: SparseInputs, selected: torch.Tensor) -> torch.Tensor:
    """Keys each (token, kv head) attends to: [T, G]."""
    bs = inp.cfg.block_size
    seen = (inp.token_pos[:, None, None] - selected.long() * bs + 1).clamp(0, bs)
    return torch.where(selected >= 0, seen, 0).sum(-1)


def sparse_cost(inp: SparseInputs, selected: torch.Tensor) -> tuple[float, float]:
    """(FLOPs, K+V bytes) of block-sparse attention over `selected`."""
    _, hq, d = inp.q.shape
    keys = float(attended_keys(inp, selected).sum())
    groups = selected.shape[1]
    return 4 * (hq // groups) * d * keys, keys * d * 2 * inp.k.element_size()


def dense_cost(inp: SparseInputs) -> tuple[float, float]:
    _, hq, d = inp.q.shape
    keys = float((inp.token_pos.double() + 1).sum())
    return 4 * hq * d * keys, keys * inp.k.shape[1] * d * 2 * inp.k.element_size()


def stage1_flops(inp: SparseInputs) -> float:
    cfg = inp.cfg
    _, hq, d = inp.q.shape
    windows = compress.num_windows(inp.token_pos.long() + 1, cfg.kernel_size, cfg.kernel_stride)
    return 2 * hq * d * float(windows.sum())


def width_of(inp: SparseInputs) -> int:
    """Selection width: blocks of the longest request."""
    return -(-max(inp.lengths) // inp.cfg.block_size)


def plan_for(inp: SparseInputs, splits: int, impl: str | None = None, tile: int | None = None,
             n_sel: int | None = None) -> SparsePlan:
    """The plan of these inputs asking for `splits`: impl "triton"/"cuda" forces the kernels
    (None: what serving's plan picks); tile 1 / 4 / 8 forces the CUDA selection's variant."""
    return make_plan(inp.cfg, tokens=inp.q.shape[0], groups=inp.k.shape[1],
                     head_dim=inp.q.shape[2], width=width_of(inp), decode=False, splits=splits,
                     n_sel=n_sel, device=DeviceFacts.of(inp.q.device), impl=impl,
                     overrides=KernelOverrides(select_tile=tile))


def select_ours(inp: SparseInputs, scale: float, splits: int, impl: str | None = None,
                plan: SparsePlan | None = None) -> Callable[[], torch.Tensor]:
    """Our selection under `plan` (default: `plan_for(inp, splits, impl)`)."""
    plan = plan or plan_for(inp, splits, impl)
    return lambda: select.select_blocks(inp.q, inp.k1, inp.rt, inp.token_req, inp.token_pos,
                                        inp.cfg, width_of(inp), scale, plan)


def select_baseline(mod, inp: SparseInputs, scale: float,
                    splits: int) -> Callable[[], torch.Tensor]:
    """A --baseline sparse.py's selection (the 14-argument signature it had)."""
    cfg = inp.cfg
    return lambda: mod.select_blocks(
        inp.q, inp.k1, inp.rt, inp.token_req, inp.token_pos, cfg.kernel_size, cfg.kernel_stride,
        cfg.block_size, cfg.init_blocks, cfg.local_blocks, cfg.num_selected_blocks, width_of(inp),
        scale, num_splits=splits,
    )


def cuda_selection_unsupported(inp: SparseInputs, scale: float) -> str | None:
    """Why the fused CUDA selection cannot run these inputs (None: it can)."""
    if not _cuda.available():
        return "sala_sglang._C is not built"
    tensors = (inp.q, inp.k1, inp.rt, inp.token_req, inp.token_pos)
    return select.cuda_unsupported(tensors, inp.cfg, scale) or plan_for(inp, 1, "cuda").select_unfit


def attend_ours(inp: SparseInputs, selected: torch.Tensor, scale: float, splits: int,
                impl: str = "triton") -> Callable[[], torch.Tensor]:
    """Our attention with the kernel `impl` and the split count the plan gives it."""
    plan = plan_for(inp, splits, impl, n_sel=selected.shape[-1])
    return lambda: attention.block_sparse_attention(
        inp.q, inp.k, inp.v, inp.rt, inp.token_req, inp.token_pos, inp.token_sparse, selected,
        inp.cfg, scale, plan,
    )


def attend_baseline(mod, inp: SparseInputs, selected: torch.Tensor, scale: float,
                    splits: int) -> Callable[[], torch.Tensor]:
    """A --baseline sparse.py's attention (the signature it had; its own default kernel)."""
    return lambda: mod.block_sparse_attention(
        inp.q, inp.k, inp.v, inp.rt, inp.token_req, inp.token_pos, inp.token_sparse, selected,
        inp.cfg.block_size, scale, num_splits=splits,
    )


def cuda_column(inp: SparseInputs, selected: torch.Tensor, scale: float, splits: int,
                timing: Callable[[Callable[[], object]], dict], triton_out: torch.Tensor,
                triton_ms: float, rows: torch.Tensor, want: torch.Tensor | None) -> dict:
    """The CUDA op on the Triton row's inputs, as extra fields of that row ({} when unbuilt)."""
    if not _cuda.available():
        return {}
    fn = attend_ours(inp, selected, scale, splits, impl="cuda")
    try:
        got = fn()
        torch.cuda.synchronize()
    except Exception as e:  # a geometry the op does not take, say: a finding, not a crash
        return {"cuda_error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    ms = timing(fn)["ms"]
    extra = dict(cuda_ms=ms, cuda_speedup=round(triton_ms / ms, 2),
                 cuda_rel_err_vs_ours=round(rel_err(got, triton_out), 5))
    if want is not None:
        extra["cuda_ref_rel_err"] = round(rel_err(got[rows], want), 5)
    return extra


def overlap(a: torch.Tensor, b: torch.Tensor, width: int) -> float:
    """Mean fraction of a's selected blocks that b selects too."""
    def mask(x: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(*x.shape[:2], width + 1, dtype=torch.bool, device=x.device)
        return m.scatter_(-1, torch.where(x >= 0, x, width).long(), True)[..., :width]

    both = (mask(a) & mask(b)).sum(-1).double()
    return round(float((both / (a >= 0).sum(-1).clamp(min=1)).mean()), 4)


def selection_ok(inp: SparseInputs, k1c: torch.Tensor, selected: torch.Tensor,
                 rows: torch.Tensor) -> float:
    """Fraction of sampled selected blocks scoring at least the reference's n_sel-th block score
    (float64 stage-1 over the same stored K1) less SCORE_REL_TOL of it."""
    cfg = inp.cfg
    good = []
    for r in rows.tolist():
        req = int(inp.token_req[r]) - 1
        scores = ref.block_scores(inp.q[r : r + 1].double(), k1c[req].double(),
                                  inp.token_pos[r : r + 1].long(), cfg)
        nth = scores.sort(dim=-1, descending=True).values[..., cfg.num_selected_blocks - 1]
        sel = selected[r : r + 1].long()
        chosen = scores.gather(-1, sel.clamp(min=0))
        floor = nth[..., None] * (1 - SCORE_REL_TOL)
        good.append(((chosen >= floor) | (sel < 0)).double().mean())
    return round(float(torch.stack(good).mean()), 4)


def reference_rows(inp: SparseInputs, rows: torch.Tensor, scale: float,
                   selected: torch.Tensor | None) -> torch.Tensor:
    """Float64 reference output of the sampled rows (sparse over `selected`, or dense)."""
    out, cached = [], {}
    for r in rows.tolist():
        req = int(inp.token_req[r]) - 1
        if req not in cached:
            cached = {req: [x.double() for x in inp.request_keys(req)]}
        keys, vals = cached[req]
        q, pos = inp.q[r : r + 1].double(), inp.token_pos[r : r + 1].long()
        if selected is None:
            out.append(ref.dense_attention(q, keys, vals, pos, scale))
        else:
            out.append(ref.sparse_attention(q, keys, vals, pos, selected[r : r + 1].long(),
                                            inp.cfg.block_size, scale))
    return torch.cat(out)


def try_anchor(rec: Record, name: str, build: Callable[[], Callable[[], torch.Tensor]]):
    """Build an anchor's runner and run it once; None (reason recorded) when unavailable."""
    try:
        fn = build()
        out = fn()
        torch.cuda.synchronize()
        rec.data["anchors"].setdefault(name, "ok")
        return fn, out
    except Exception as e:  # an anchor that cannot run here is a finding, not a crash
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
        rec.data["anchors"][name] = reason
        rec.log(f"  anchor {name} unavailable: {reason}")
        return None, None


# ---- sections ----------------------------------------------------------------------------------
def bench_compression(rec: Record, inp: SparseInputs, chunk: int, ctx: int) -> None:
    cfg = inp.cfg
    slots = inp.slots
    old = torch.tensor([ctx - chunk], dtype=torch.int32, device=slots.device)
    new = old + chunk
    zero = torch.zeros_like(old)
    itemsize = inp.k.element_size()
    per_key = inp.k.shape[1] * inp.k.shape[2] * itemsize

    def ours(lo, keys: int):
        most = keys // cfg.kernel_stride + 2
        return lambda: compress.compress_new_windows(inp.k, inp.k1, inp.rt, slots, lo, new, cfg,
                                                     most)

    n_chunk = cfg.num_k1(ctx) - cfg.num_k1(ctx - chunk)
    rec.add(section="compress", case=f"{ctx // 1024}K chunk {chunk}", impl="ours K1",
            ms=timed(ours(old, chunk), 20),
            bytes=(chunk + cfg.kernel_size) * per_key + n_chunk * per_key)
    rec.add(section="compress", case=f"{ctx // 1024}K whole", impl="ours K1",
            ms=timed(ours(zero, ctx), 10), bytes=ctx * per_key + cfg.num_k1(ctx) * per_key)
    idx = inp.rt[1, :ctx].long()

    def torch_pool():
        return inp.k[idx].unfold(0, cfg.kernel_size, cfg.kernel_stride).float().mean(-1)

    want = anchors.contiguous_windows(inp)[0]
    err = rel_err(torch_pool().to(want.dtype), want)
    rec.add(section="compress", case=f"{ctx // 1024}K whole", impl="torch gather+mean",
            ms=timed(torch_pool, 10), bytes=ctx * per_key + cfg.num_k1(ctx) * per_key,
            rel_err_vs_ours=round(err, 5))


def bench_selection(rec: Record, inp: SparseInputs, case: str, scale: float, splits: int,
                    baseline, iters: int) -> torch.Tensor:
    cfg = inp.cfg
    width = -(-max(inp.lengths) // cfg.block_size)
    rows = check_rows(inp)
    k1c = anchors.contiguous_windows(inp)
    flops = stage1_flops(inp)
    ours_fn = select_ours(inp, scale, splits, impl="triton")
    sel = ours_fn()
    ours = rec.add(section="select", case=case, impl="ours", **timed_row(ours_fn, iters),
                   flops=flops, ref_ok=selection_ok(inp, k1c, sel, rows))
    why = cuda_selection_unsupported(inp, scale)
    if why is None:
        cuda_fn = select_ours(inp, scale, splits, impl="cuda")
        cuda_sel = cuda_fn()
        t = timed_row(cuda_fn, iters)
        rec.add(section="select", case=case, impl="ours cuda", **t, flops=flops,
                overlap_with_ours=overlap(cuda_sel, sel, width),
                ref_ok=selection_ok(inp, k1c, cuda_sel, rows),
                speedup_vs_triton=round(ours["ms"] / t["ms"], 2))
        # the CUDA kernel's variants, forced: one token per CTA, or 4 / 8 tokens per CTA
        for tile in (1, 4, 8):
            tile_fn = select_ours(inp, scale, splits, plan=plan_for(inp, splits, "cuda", tile))
            tile_sel = tile_fn()
            t = timed_row(tile_fn, iters)
            rec.add(section="select", case=case, impl=f"ours cuda tile {tile}", **t, flops=flops,
                    overlap_with_ours=overlap(tile_sel, sel, width),
                    speedup_vs_triton=round(ours["ms"] / t["ms"], 2))
    else:
        rec.data.setdefault("cuda_selection_skipped", {})[case] = why
        rec.log(f"  ours cuda: not run ({why})")
    if baseline is not None:
        old_fn = select_baseline(baseline, inp, scale, splits)
        rec.add(section="select", case=case, impl="ours v0", **timed_row(old_fn, iters),
                flops=flops, overlap_with_ours=overlap(old_fn(), sel, width))
    keys = torch.randint(0, 1 << 62, (*sel.shape[:2], width), device=sel.device)
    rec.add(section="select", case=case, impl="(torch.topk of int64 keys alone)",
            **timed_row(lambda: keys.topk(cfg.num_selected_blocks, dim=-1), iters))
    fn, anchor_sel = try_anchor(
        rec, "torch stage-1 + sgl_kernel max_pooling_1d_varlen + topk",
        lambda: anchors.pool_and_topk(inp, anchors.torch_stage1(inp, k1c, scale)))
    if fn is not None:
        t = timed_row(fn, iters)
        rec.add(section="select", case=case, impl="torch stage-1+sgl pool+topk", **t,
                flops=flops, overlap_with_ours=overlap(anchor_sel, sel, width),
                ref_ok=selection_ok(inp, k1c, anchor_sel, rows),
                ours_speedup=round(t["ms"] / ours["ms"], 2))
    return sel


def bench_decode_selection(rec: Record, inp: SparseInputs, case: str, width: int, scale: float,
                           iters: int, sweep: bool) -> None:
    """Triton decode selection at a static `width` (blocks) under serving's decode plan, against
    the path before (stage-1 at DECODE_SPLITS, `select_before`'s keys + torch.topk), then each
    half alone; with `sweep`, the top-k chunk and the stage-1 split count."""
    cfg = inp.cfg
    plan = make_plan(cfg, tokens=inp.q.shape[0], groups=inp.k.shape[1], head_dim=inp.q.shape[2],
                     width=width, decode=True, device=DeviceFacts.of(inp.q.device), impl="triton")
    old_plan = dataclasses.replace(plan, triton_select_splits=DECODE_SPLITS)
    args = (inp.q, inp.k1, inp.rt, inp.token_req, inp.token_pos, cfg, width, scale)

    def stage1(p: SparsePlan) -> Callable[[], torch.Tensor]:
        return lambda: select._window_probabilities(*args, p)

    def tail(probs: torch.Tensor, chunk: int | None) -> Callable[[], torch.Tensor]:
        """Our top-k in chunks of `chunk` blocks; None: the one before."""
        if chunk is None:
            return lambda: before.top_blocks_before(probs, inp.token_pos, cfg, width)
        return lambda: select._top_blocks(probs, inp.token_pos, cfg, width, chunk)

    def before_fn() -> torch.Tensor:
        return before.top_blocks_before(stage1(old_plan)(), inp.token_pos, cfg, width)

    def ours_fn() -> torch.Tensor:
        return select.select_blocks(*args, plan)

    sel, sel_before = ours_fn(), before_fn()
    t_before = timed_row(before_fn, iters)
    rec.add(section="decode select", case=case,
            impl=f"before: {DECODE_SPLITS} splits, keys + torch.topk", **t_before)
    t = timed_row(ours_fn, iters)
    splits, chunk = plan.triton_select_splits, plan.triton_key_chunk
    rec.add(section="decode select", case=case,
            impl=f"ours: {splits} splits, top-k chunks of {chunk}", **t, splits=splits,
            key_chunk=chunk, speedup_vs_before=round(t_before["ms"] / t["ms"], 2),
            overlap_with_before=overlap(sel, sel_before, width),
            ref_ok=selection_ok(inp, anchors.contiguous_windows(inp), sel, check_rows(inp)))
    for p in (old_plan, plan):
        rec.add(section="decode select", case=case,
                impl=f"stage-1 alone, {p.triton_select_splits} splits",
                **timed_row(stage1(p), iters))
    probs = stage1(plan)()
    want = tail(probs, None)()
    rec.add(section="decode select", case=case, impl="top-k alone, before (keys + torch.topk)",
            **timed_row(tail(probs, None), iters))
    rec.add(section="decode select", case=case, impl=f"top-k alone, ours (chunks of {chunk})",
            **timed_row(tail(probs, chunk), iters),
            tail_identical=torch.equal(tail(probs, chunk)(), want))
    if not sweep:
        return
    for c in (256, 512, 1024, 2048, 4096):
        ms = timed_row(tail(probs, c), iters)["ms"]
        same = torch.equal(tail(probs, c)(), want)
        rec.data["sweeps"].append(dict(op="decode top-k", case=case, key_chunk=c, ms=ms,
                                       identical=same))
        rec.log(f"  sweep decode top-k chunk={c}: {ms} ms, identical {same}")
    for n in (8, 16, 32, 64, 128, 256):
        ms = timed_row(stage1(dataclasses.replace(plan, triton_select_splits=n)), iters)["ms"]
        rec.data["sweeps"].append(dict(op="decode stage-1", case=case, splits=n, ms=ms))
        rec.log(f"  sweep decode stage-1 splits={n}: {ms} ms")


# Split counts of the decode attention sweep: 96 selected blocks give 24 splits of 4 blocks (the
# CUDA plan's floor of ATTENTION_MIN_BLOCKS_PER_SPLIT), 96 splits of one block.
DECODE_ATTENTION_SPLITS = (4, 8, 12, 16, 24, 32, 48, 96)


def sweep_decode_attention(rec: Record, inp: SparseInputs, case: str, scale: float,
                           iters: int) -> None:
    """Both attention kernels on one decode batch at each split count (CUDA-graph replays), against
    what serving's plan picks, each output against the Triton kernel's at DECODE_SPLITS: the data
    for the plan's decode split rules and its CUDA/Triton choice (CUDA_ATTENTION_DECODE_PAIRS)."""
    sel = select_ours(inp, scale, DECODE_SPLITS)()
    served = make_plan(inp.cfg, tokens=inp.q.shape[0], groups=inp.k.shape[1],
                       head_dim=inp.q.shape[2], width=width_of(inp), decode=True,
                       device=DeviceFacts.of(inp.q.device))
    want = attend_planned(inp, sel, scale, plan_for(inp, DECODE_SPLITS, "triton"))
    t = timed_row(lambda: attend_planned(inp, sel, scale, served), iters)
    rec.add(section="decode attend", case=case,
            impl=f"served plan: {served.attention}, {served.attention_splits} / "
                 f"{served.cuda_attention_splits} splits", **t)
    for impl in ("triton", "cuda") if _cuda.available() else ("triton",):
        for n in DECODE_ATTENTION_SPLITS:
            plan = dataclasses.replace(plan_for(inp, n, impl), attention_splits=n,
                                       cuda_attention_splits=n)

            def fn(plan: SparsePlan = plan) -> torch.Tensor:
                return attend_planned(inp, sel, scale, plan)

            t = timed_row(fn, iters)
            err = round(rel_err(fn(), want), 5)
            rec.data["sweeps"].append(dict(op="decode attend", case=case, impl=impl, splits=n,
                                           rel_err_vs_triton=err, **t))
            rec.log(f"  sweep decode attend {impl} splits={n}: {t['ms']} ms (rel err {err})")


def bench_infllm_stage1(rec: Record, inp: SparseInputs, case: str, scale: float) -> None:
    """OpenBMB's CUDA stage-1 as sgl_kernel ships it. Run last: its argument conventions are read
    off OpenBMB's callers, not documented, and a fault there must not cost the other numbers."""
    cfg = inp.cfg
    width = -(-max(inp.lengths) // cfg.block_size)
    k1c = anchors.contiguous_windows(inp)
    k2c = anchors.k2_windows(inp)
    fn, _ = try_anchor(rec, "infllm_ops stage-1 (sgl_kernel 0.4.5)",
                       lambda: anchors.infllm_stage1(inp, k1c, k2c))
    if fn is None:
        return
    sel = select_ours(inp, scale, 1, impl="triton")()
    pooled = anchors.pool_and_topk(inp, fn)
    theirs = pooled()
    rec.add(section="select", case=case, impl="infllm stage-1+sgl pool+topk",
            ms=timed(pooled, 10), flops=stage1_flops(inp),
            overlap_with_ours=overlap(theirs, sel, width),
            ref_ok=selection_ok(inp, k1c, theirs, check_rows(inp)))


def bench_attention(rec: Record, inp: SparseInputs, sel: torch.Tensor, case: str, scale: float,
                    splits: int, baseline, iters: int, fi_backends: list[str],
                    dense: bool = True) -> None:
    rows = check_rows(inp)
    flops, nbytes = sparse_cost(inp, sel)
    want = reference_rows(inp, rows, scale, sel)
    ours_fn = attend_ours(inp, sel, scale, splits)
    out = ours_fn()
    ours_t = timed_row(ours_fn, iters)
    cuda = cuda_column(inp, sel, scale, splits, lambda fn: timed_row(fn, iters), out,
                       ours_t["ms"], rows, want)
    ours = rec.add(section="attend", case=case, impl="ours", **ours_t,
                   flops=flops, bytes=nbytes, ref_rel_err=round(rel_err(out[rows], want), 5),
                   **cuda)
    if baseline is not None:
        old_fn = attend_baseline(baseline, inp, sel, scale, splits)
        rec.add(section="attend", case=case, impl="ours v0", **timed_row(old_fn, iters),
                flops=flops, bytes=nbytes, rel_err_vs_ours=round(rel_err(old_fn(), out), 5))
    for be in FI_SPARSE:
        fn, got = try_anchor(rec, f"flashinfer {be} paged, selected pages",
                             lambda be=be: anchors.flashinfer_sparse(inp, sel, scale, be))
        if fn is not None:
            t = timed_row(fn, iters)
            rec.add(section="attend", case=case, impl=f"flashinfer {be} sparse", **t,
                    flops=flops, bytes=nbytes, rel_err_vs_ours=round(rel_err(got, out), 5),
                    ref_rel_err=round(rel_err(got[rows], want), 5),
                    ours_speedup=round(t["ms"] / ours["ms"], 2))
    if not dense:
        return
    dflops, dbytes = dense_cost(inp)
    want = reference_rows(inp, rows, scale, None)
    dense_fns = [(f"flashinfer {be} dense", lambda be=be: anchors.flashinfer_dense(inp, scale, be))
                 for be in fi_backends]
    dense_fns.append(("sdpa flash dense", lambda: anchors.sdpa_dense(inp, scale)))
    for name, build in dense_fns:
        fn, got = try_anchor(rec, name, build)
        if fn is not None:
            t = timed_row(fn, max(3, iters // 2))
            rec.add(section="attend", case=case, impl=name, **t, flops=dflops, bytes=dbytes,
                    ref_rel_err=round(rel_err(got[rows], want), 5),
                    ours_speedup=round(t["ms"] / ours["ms"], 2))
            del fn, got
            torch.cuda.empty_cache()


def sweep_attention(rec: Record, inp: SparseInputs, sel: torch.Tensor, scale: float) -> None:
    """Launch shapes of our attention kernel, same inputs (restored afterwards)."""
    keep = attention.ATTENTION_WARPS, attention.ATTENTION_STAGES
    flops, _ = sparse_cost(inp, sel)
    for warps, stages in ((4, 1), (4, 2), (4, 4), (8, 2), (8, 3)):
        attention.ATTENTION_WARPS, attention.ATTENTION_STAGES = warps, stages
        try:
            ms = timed(attend_ours(inp, sel, scale, 1), 10)
            rec.data["sweeps"].append(dict(op="attend", warps=warps, stages=stages, ms=ms,
                                           tflops=round(flops / ms / 1e9, 1)))
            rec.log(f"  sweep attend warps={warps} stages={stages}: {ms} ms")
        except Exception as e:
            rec.log(f"  sweep attend warps={warps} stages={stages} failed: {e}")
    attention.ATTENTION_WARPS, attention.ATTENTION_STAGES = keep


def sweep_selection(rec: Record, inp: SparseInputs, scale: float) -> None:
    """Token tile of stage-1 scoring (warps follow the tile: 8 from 128 rows), same inputs."""
    flops = stage1_flops(inp)
    for tm in (1, 8, 16):
        plan = dataclasses.replace(plan_for(inp, 1, "triton"), triton_token_tile=tm)
        try:
            ms = timed(select_ours(inp, scale, 1, plan=plan), 5)
            rec.data["sweeps"].append(dict(op="select", token_tile=tm, ms=ms,
                                           tflops=round(flops / ms / 1e9, 1)))
            rec.log(f"  sweep select token_tile={tm}: {ms} ms")
        except Exception as e:
            rec.log(f"  sweep select token_tile={tm} failed: {e}")


def bench_dense_mode(rec: Record, inp: SparseInputs, case: str, scale: float, baseline,
                     fi_backends: list[str]) -> None:
    """A prompt shorter than dense_len: every token attends to all blocks up to its own, through
    the same kernel (no selection: the backend passes one -1 column)."""
    rows = check_rows(inp)
    inp.token_sparse = torch.zeros_like(inp.token_sparse)
    none = torch.full((inp.q.shape[0], 1, 1), -1, dtype=torch.int32, device=inp.q.device)
    flops, nbytes = dense_cost(inp)
    want = reference_rows(inp, rows, scale, None)
    fn = attend_ours(inp, none, scale, 1)
    out = fn()
    ms = timed(fn, 10)
    cuda = cuda_column(inp, none, scale, 1, lambda f: {"ms": timed(f, 10)}, out, ms, rows, want)
    ours = rec.add(section="attend", case=case, impl="ours", ms=ms, flops=flops,
                   ref_rel_err=round(rel_err(out[rows], want), 5), **cuda)
    if baseline is not None:
        old = attend_baseline(baseline, inp, none, scale, 1)
        rec.add(section="attend", case=case, impl="ours v0", ms=timed(old, 10), flops=flops,
                rel_err_vs_ours=round(rel_err(old(), out), 5))
    for be in fi_backends:
        fn, got = try_anchor(rec, f"flashinfer {be} dense",
                             lambda be=be: anchors.flashinfer_dense(inp, scale, be))
        if fn is not None:
            ms = timed(fn, 10)
            rec.add(section="attend", case=case, impl=f"flashinfer {be} dense", ms=ms,
                    flops=flops, rel_err_vs_ours=round(rel_err(got, out), 5),
                    ours_speedup=round(ms / ours["ms"], 2))


def prefill_layer(inp: SparseInputs, chunk: int, scale: float) -> Callable[[], torch.Tensor]:
    """One sparse layer's attention work for the chunk, as the backend runs it."""
    cfg = inp.cfg
    new = torch.tensor(inp.lengths, dtype=torch.int32, device=inp.q.device)
    old = new - chunk
    plan = plan_for(inp, 1)
    select_fn = select_ours(inp, scale, 1, plan=plan)

    def run() -> torch.Tensor:
        compress.compress_new_windows(inp.k, inp.k1, inp.rt, inp.slots, old, new, cfg,
                                      chunk // cfg.kernel_stride + 2, plan)
        return attend_planned(inp, select_fn(), scale, plan)

    return run


def attend_planned(inp: SparseInputs, selected: torch.Tensor, scale: float,
                   plan: SparsePlan) -> torch.Tensor:
    """Attention as a layer runs it, under the forward's plan."""
    return attention.block_sparse_attention(inp.q, inp.k, inp.v, inp.rt, inp.token_req,
                                            inp.token_pos, inp.token_sparse, selected, inp.cfg,
                                            scale, plan)


def neighbour_overlap(sel: torch.Tensor, width: int) -> float:
    """How much consecutive tokens' selections overlap (a property of the inputs)."""
    return overlap(sel[1:], sel[:-1], width)


def print_table(rec: Record) -> None:
    print(f"\npeaks: {rec.peaks}  (bf16 TFLOP/s, copy GB/s)")
    print(f"{'section':8} {'case':24} {'impl':32} {'ms':>9} {'TFLOP/s':>8} {'%pk':>5} "
          f"{'GB/s':>7} {'ours x':>7} {'cuda ms':>9} {'cuda x':>6}  check")
    for r in rec.data["rows"]:
        check = ", ".join(f"{k}={r[k]}" for k in ("ref_ok", "ref_rel_err", "rel_err_vs_ours",
                                                   "overlap_with_ours", "cuda_ref_rel_err",
                                                   "cuda_rel_err_vs_ours", "cuda_error",
                                                   "speedup_vs_triton", "speedup_vs_before",
                                                   "overlap_with_before", "tail_identical")
                          if k in r)
        impl = r["impl"] + (" [graph]" if r.get("timing") == "cuda graph" else "")
        print(f"{r['section']:8} {r['case']:24} {impl[:32]:32} {r['ms']:9.3f} "
              f"{r.get('tflops', ''):>8} {r.get('pct_peak', ''):>5} {r.get('gb_per_s', ''):>7} "
              f"{r.get('ours_speedup', ''):>7} {r.get('cuda_ms', ''):>9} "
              f"{r.get('cuda_speedup', ''):>6}  {check}")
    for name, state in rec.data["anchors"].items():
        if state != "ok":
            print(f"anchor unavailable: {name}: {state}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 524288])
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--decode-context", type=int, default=131072)
    p.add_argument("--decode-widths", type=int, nargs="+", default=[2052, 16400],
                   help="static selection widths (blocks) of the decode selection rows: a 128K "
                        "and a 1M server's (max context / block size)")
    p.add_argument("--decode-selection-only", action="store_true",
                   help="only the decode selection rows (--batches x --decode-widths)")
    p.add_argument("--decode-attention-only", action="store_true",
                   help="only the decode attention split sweep (--batches at --decode-context)")
    p.add_argument("--shared", type=float, default=0.5,
                   help="query direction shared across tokens for the correlated 128K case")
    p.add_argument("--baseline", type=Path, help="an older sparse.py to time beside ours")
    p.add_argument("--flashinfer-aot", type=Path, help="FlashInfer kernels built ahead")
    p.add_argument("--sweep", action="store_true",
                   help="launch-shape sweeps at 128K, and of the decode selection")
    p.add_argument("--tag", default="kernels_sparse",
                   help="what the result file is named by, before device and date")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    torch.manual_seed(0)
    model = MiniCPMSALAConfig()
    cfg = model.sparse
    hq, g, d = model.num_attention_heads, model.num_key_value_heads, model.head_dim
    scale = d**-0.5
    blocks = -(-args.decode_context // cfg.block_size)
    if min(args.decode_widths) < blocks:
        raise ValueError(f"--decode-widths {args.decode_widths}: each must be at least the "
                         f"{blocks} blocks of --decode-context {args.decode_context}")
    rec = Record(args, measured_peaks(), model)
    rec.log(f"peaks {rec.peaks}")
    baseline = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("sparse_baseline", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    anchors.use_prebuilt_flashinfer(args.flashinfer_aot)
    fi = ["fa2", "fa3"]
    if args.decode_attention_only:
        GRAPH_TIMING["on"] = True
        for batch in args.batches:
            case = f"decode {args.decode_context // 1024}K b{batch}"
            rec.log(case)
            inp = decode_batch(cfg, args.decode_context, batch, hq, g, d, "cuda")
            sweep_decode_attention(rec, inp, case, scale, 20)
            rec.save()
            del inp
            torch.cuda.empty_cache()
        print_table(rec)
        return
    if args.decode_selection_only:
        GRAPH_TIMING["on"] = True
        for batch in args.batches:
            rec.log(f"decode selection {args.decode_context // 1024}K b{batch}")
            inp = decode_batch(cfg, args.decode_context, batch, hq, g, d, "cuda")
            for width in args.decode_widths:
                bench_decode_selection(rec, inp, f"decode {args.decode_context // 1024}K "
                                       f"b{batch} width {width}", width, scale, 20, args.sweep)
            rec.save()
            del inp
            torch.cuda.empty_cache()
        print_table(rec)
        return

    for ctx in args.contexts:
        case = f"prefill {ctx // 1024}K"
        rec.log(case)
        inp = prefill_chunk(cfg, ctx, args.chunk, hq, g, d, "cuda")
        iters = 10 if ctx <= 131072 else 5
        bench_compression(rec, inp, args.chunk, ctx)
        sel = bench_selection(rec, inp, case, scale, 1, baseline, iters)
        if args.sweep and ctx == 131072:
            sweep_selection(rec, inp, scale)
            sweep_attention(rec, inp, sel, scale)
        bench_attention(rec, inp, sel, case, scale, 1, baseline, iters, fi)
        rec.add(section="layer", case=case, impl="ours compress+select+attend",
                ms=timed(prefill_layer(inp, args.chunk, scale), iters))
        rec.save()
        del inp, sel
        torch.cuda.empty_cache()

    case = f"prefill {args.chunk // 1024}K dense-mode"
    rec.log(case)
    inp = prefill_chunk(cfg, args.chunk, args.chunk, hq, g, d, "cuda")
    bench_dense_mode(rec, inp, case, scale, baseline, fi)
    rec.save()
    del inp
    torch.cuda.empty_cache()

    if args.shared > 0 and 131072 in args.contexts:
        case = f"prefill 128K shared={args.shared}"
        rec.log(case)
        inp = prefill_chunk(cfg, 131072, args.chunk, hq, g, d, "cuda", shared=args.shared)
        sel = bench_selection(rec, inp, case, scale, 1, None, 10)
        rec.data["neighbour_overlap"] = {case: neighbour_overlap(sel, 131072 // cfg.block_size)}
        bench_attention(rec, inp, sel, case, scale, 1, baseline, 10, fi, dense=False)
        rec.save()
        del inp, sel
        torch.cuda.empty_cache()

    splits = DECODE_SPLITS
    GRAPH_TIMING["on"] = True
    for batch in args.batches:
        case = f"decode {args.decode_context // 1024}K b{batch}"
        rec.log(case)
        inp = decode_batch(cfg, args.decode_context, batch, hq, g, d, "cuda")
        sel = bench_selection(rec, inp, case, scale, splits, baseline, 20)
        bench_attention(rec, inp, sel, case, scale, splits, baseline, 20, fi)
        plan = plan_for(inp, splits)
        select_fn = select_ours(inp, scale, splits, plan=plan)

        def both(inp=inp, select_fn=select_fn, plan=plan):
            return attend_planned(inp, select_fn(), scale, plan)

        rec.add(section="layer", case=case, impl="ours select+attend eager", ms=timed(both, 20))
        rec.add(section="layer", case=case, impl="ours select+attend CUDA graph",
                ms=timed(graphed(both), 20))
        for width in args.decode_widths:
            bench_decode_selection(rec, inp, f"{case} width {width}", width, scale, 20,
                                   args.sweep)
        rec.save()
        del inp, sel
        torch.cuda.empty_cache()

    GRAPH_TIMING["on"] = False
    if args.contexts:
        ctx = min(args.contexts)
        inp = prefill_chunk(cfg, ctx, args.chunk, hq, g, d, "cuda")
        bench_infllm_stage1(rec, inp, f"prefill {ctx // 1024}K", scale)
    rec.save()
    print_table(rec)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


if __name__ == "__main__":
    main()
