"""The InfLLM-v2 ops' plan for one forward (FlashInfer's plan/run split).

`make_plan` runs once per forward on the host, from sizes the scheduler already holds and a
device description read once per device; every sparse layer then runs its ops with the plan. It
fixes which implementation serves each op and every launch choice that depends on the batch, so
no layer call reads the environment or queries the device, and each rule is written here only
(the C++ ops run exactly the variant they are given). Decode shapes are static per captured
batch size, so a plan built while a CUDA graph is captured holds for every replay of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sala_sglang.config import SparseConfig
from sala_sglang.ops import _cuda
from sala_sglang.ops._cuda import DeviceFacts
from sala_sglang.ops.overrides import IMPLS, KernelOverrides

# Split-K count of decode (one token per request leaves most SMs idle), a floor the Triton stage-1
# and the CUDA attention raise to fill the SMs; extend runs unsplit.
DECODE_SPLITS = 8
# Which kernel serves compression and attention when both can, measured on an H100 (see
# benchmarks/README.md, "CUDA kernels against our Triton ones"): CUDA compression is 2.4-4.9x
# faster everywhere, Triton attention ~2x faster in prefill.
CUDA_FASTER = {"compress": True, "attention": False}
# In decode and verify the CUDA attention, whose split-K is raised to fill the SMs, is faster while
# a batch has at most this many (token, kv head) pairs: 1.22x at batch 1 (2 pairs), 1.16x at
# batch 8 (16), 0.96x at batch 32 (64), at 128K on an H100.
CUDA_ATTENTION_DECODE_PAIRS = 16
# Tokens per CTA of the CUDA selection's token-tiled kernel (its compiled variants, largest
# first). The fused CUDA selection wins once 8-token CTAs fill every SM (prefill chunks); below
# that the Triton kernels win (decode batches). See benchmarks/NOTES.md.
CUDA_SELECT_TILES = (8, 4)
# Blocks of scores the token-tiled CUDA selection keeps per token at a time: the 128K width, two
# 8-token CTAs per SM at head dim 128 (see csrc/sparse_selection.cu).
CUDA_SELECT_SEGMENT = 2048
# Tokens per Triton stage-1 program in extend (one K1 tile read for 4 tokens); decode splits K
# instead. See benchmarks/NOTES.md.
TRITON_TOKEN_TILE = 4
# Bytes of Triton selection scratch (window probabilities + top-k candidates) one launch may use;
# longer batches are selected in pieces of a multiple of 16 tokens.
SELECTION_SCRATCH_BYTES = 512 << 20
# Windows per stage-1 tile of the Triton selection (select.py's kernels).
WINDOW_TILE = 64
# Most blocks per top-k program of the Triton selection (it keeps the best next_power_of_2(n_sel)
# of them; a wider row is cut in chunks whose best a second kernel merges). 1024: compiled for
# sm_90 it takes 56 registers at 4 warps without spills (2048 would need 95, or 8 warps); a 128K
# server's 2052 blocks make 3 chunks a row, 6 programs at batch 1, then a merge of 3 lists.
# `sparse_attention.py --decode-selection-only --sweep` times chunks of 256 to 4096 on a GPU.
TRITON_KEY_CHUNK = 1024
# Triton stage-1 in decode splits the windows further, up to this many programs per SM, at most
# SELECT_MAX_SPLITS: the probability kernel reads every split's (max, sum) of its 16 padded heads,
# 16 KiB per program at 128 splits, as much as the K1 tile it scores.
SELECT_PROGRAMS_PER_SM = 2
SELECT_MAX_SPLITS = 128
# CUDA attention in decode splits further, up to this many CTAs per SM, each split keeping at least
# this many selected blocks. One wave: at 128K on an H100, batch 8 took 34.9 us at 8 splits (128
# CTAs) against 37.1 us at 16, and batch 1 19.2-19.5 us at 24-32 splits against 20.4 at 48
# (benchmarks/results/kernels_decode_attention_splits_h100_2026-12-07.json).
ATTENTION_CTAS_PER_SM = 1
ATTENTION_MIN_BLOCKS_PER_SPLIT = 4


@dataclass(frozen=True)
class SparsePlan:
    """How this forward's InfLLM-v2 ops run (built by `make_plan`)."""

    compress: str  # "cuda" or "triton": the implementation of each op
    select: str
    attention: str
    required: bool  # an explicit impl: an op that cannot run it raises instead of falling back
    select_tile_tokens: int  # CUDA selection: 0 the per-token kernel, 4 / 8 tokens per CTA
    select_warps: int  # CUDA per-token selection: warps per CTA (4 or 8)
    select_segment: int  # CUDA token-tiled selection: blocks of scores kept at a time
    select_unfit: str | None  # why no CUDA selection variant fits shared memory, or None
    triton_token_tile: int  # Triton stage-1: tokens per program
    triton_select_splits: int  # Triton stage-1: split-K over the windows (raised to fill SMs)
    triton_piece_rows: int  # Triton selection: most tokens per launch (scratch bound)
    triton_key_chunk: int  # Triton selection: blocks per top-k program (a power of two)
    attention_splits: int  # Triton attention: split-K over the selected blocks
    cuda_attention_splits: int  # CUDA attention: the same, raised to fill the SMs

    def uses_cuda(self, op: str, impl: str, x: torch.Tensor,
                  unsupported: Callable[[], str | None]) -> bool:
        """Whether `op`, planned to run `impl`, runs its CUDA kernel on these tensors:
        `unsupported()` (host metadata only) may still send it to Triton, or raise where the plan
        was required (ValueError naming why)."""
        return _cuda.choose_cuda(op, impl if self.required else None, x, impl == "cuda",
                                 unsupported)


def make_plan(
    cfg: SparseConfig,
    *,
    tokens: int,
    groups: int,
    head_dim: int,
    width: int,
    decode: bool,
    device: DeviceFacts,
    overrides: KernelOverrides = KernelOverrides(),
    n_sel: int | None = None,
    impl: str | None = None,
    splits: int | None = None,
) -> SparsePlan:
    """The plan of one forward of `tokens` query tokens over `groups` kv heads.

    width: selection width in blocks; n_sel: blocks per token of the selection attention reads
    (cfg.num_selected_blocks, or 1 when nothing is selected); overrides: the environment's, read
    once per backend (an impl there falls back where it cannot run); impl: "cuda" or "triton"
    for every op, required (tests, benchmarks); splits: the split-K count asked for (default
    DECODE_SPLITS in decode, 1 in extend)."""
    if impl not in (None, *IMPLS):
        raise ValueError(f"impl={impl!r}; expected 'cuda', 'triton' or None")
    splits = splits or (DECODE_SPLITS if decode else 1)
    width = max(width, cfg.num_selected_blocks)
    n_sel = cfg.num_selected_blocks if n_sel is None else n_sel

    def choose(op: str, cuda_faster: bool) -> str:
        if impl is not None:  # required: an op that cannot run it says why, naming itself
            return impl
        return _cuda.planned_impl(op, overrides.impl, cuda_faster, device.why_not_compiled)

    select = choose("select_blocks", _fills_sms(tokens, CUDA_SELECT_TILES[0], groups, device))
    tile, warps, segment, unfit = _cuda_selection_variant(
        cfg, tokens, groups, head_dim, width, device, overrides,
        fit=select == "cuda" and device.compiled)
    if unfit is not None and impl is None:
        select = "triton"
    # fp32 window probabilities plus at most one int64 top-k candidate per block, per token and
    # kv head
    per_token = groups * width * (4 * cfg.windows_per_block + 8)
    return SparsePlan(
        compress=choose("compress_new_windows", CUDA_FASTER["compress"]),
        select=select,
        attention=choose("block_sparse_attention", CUDA_FASTER["attention"] or (
            decode and tokens * groups <= CUDA_ATTENTION_DECODE_PAIRS)),
        required=impl is not None,
        select_tile_tokens=tile,
        select_warps=warps,
        select_segment=segment,
        select_unfit=unfit,
        triton_token_tile=1 if splits > 1 else TRITON_TOKEN_TILE,
        triton_select_splits=_triton_select_splits(cfg, splits, tokens, groups, width, device),
        triton_piece_rows=max(16, SELECTION_SCRATCH_BYTES // per_token // 16 * 16),
        triton_key_chunk=_triton_key_chunk(cfg, width),
        attention_splits=splits,
        cuda_attention_splits=_cuda_attention_splits(splits, tokens, groups, n_sel, device),
    )


def _cuda_selection_variant(
    cfg: SparseConfig, tokens: int, groups: int, head_dim: int, width: int, device: DeviceFacts,
    overrides: KernelOverrides, fit: bool,
) -> tuple[int, int, int, str | None]:
    """(tile_tokens, warps, segment, why none fits or None) of the CUDA selection. Tiles of 8
    (else 4) tokens once that makes at least one CTA per SM; below that the per-token kernel keeps
    more SMs busy, 8 warps wide while there are fewer (token, kv head) pairs than 2 per SM. A
    tiled variant that does not fit shared memory falls back to 4 tokens, then to the per-token
    kernel (asked only where `fit`: the extension is loaded)."""
    if overrides.select_tile is not None:
        tile = 0 if overrides.select_tile == 1 else overrides.select_tile
    else:
        tile = next((t for t in CUDA_SELECT_TILES if _fills_sms(tokens, t, groups, device)), 0)
    warps = 8 if tokens * groups < 2 * device.multiprocessors else 4
    segment = min(width, overrides.select_segment or CUDA_SELECT_SEGMENT)
    if not fit:
        return tile, warps, segment, None
    n_sel = cfg.num_selected_blocks
    try:
        for tiled in CUDA_SELECT_TILES:
            if tile >= tiled and _smem_bytes(head_dim, tiled, warps, width, segment,
                                             n_sel) <= device.max_smem:
                return tiled, warps, segment, None
        need = _smem_bytes(head_dim, 0, warps, width, segment, n_sel)
    except RuntimeError as exc:  # the op names what csrc does not compile (a head dim)
        return 0, warps, segment, str(exc).splitlines()[0]
    if need > device.max_smem:
        return 0, warps, segment, (f"width {width} needs {need} bytes of shared memory, the "
                                   f"device allows {device.max_smem}")
    return 0, warps, segment, None


def _fills_sms(tokens: int, per_cta: int, groups: int, device: DeviceFacts) -> bool:
    """Whether CTAs of `per_cta` tokens of one kv head make at least one per SM."""
    return -(-tokens // per_cta) * groups >= device.multiprocessors


def _smem_bytes(head_dim: int, tile_tokens: int, warps: int, width: int, segment: int,
                num_selected: int) -> int:
    """Dynamic shared memory of a CUDA selection variant (csrc/sparse_selection.cu's layouts)."""
    return int(torch.ops.sala_sglang.select_blocks_smem_bytes(head_dim, tile_tokens, warps, width,
                                                              segment, num_selected))


def _cuda_attention_splits(splits: int, tokens: int, groups: int, n_sel: int,
                           device: DeviceFacts) -> int:
    """A split-K count above 1 is a floor: split further while there are fewer CTAs than
    ATTENTION_CTAS_PER_SM per SM and each split keeps ATTENTION_MIN_BLOCKS_PER_SPLIT blocks."""
    if splits <= 1 or tokens * groups == 0:
        return splits
    want = ATTENTION_CTAS_PER_SM * device.multiprocessors // (tokens * groups)
    most = max(1, n_sel // ATTENTION_MIN_BLOCKS_PER_SPLIT)
    return max(splits, min(want, most))


def _triton_select_splits(cfg: SparseConfig, splits: int, tokens: int, groups: int, width: int,
                          device: DeviceFacts) -> int:
    """A split-K count above 1 is a floor: the Triton stage-1 splits further, in powers of two
    (its probability kernel merges the splits over tl.arange), while there are fewer programs than
    SELECT_PROGRAMS_PER_SM per SM, every split of a row `width` blocks long keeps a tile of
    windows, and at most SELECT_MAX_SPLITS."""
    if splits <= 1 or tokens * groups == 0:
        return splits
    want = SELECT_PROGRAMS_PER_SM * device.multiprocessors // (tokens * groups)
    tiles = -(-width * cfg.windows_per_block // WINDOW_TILE)
    most = min(want, tiles, SELECT_MAX_SPLITS)
    return max(splits, 1 << (most.bit_length() - 1)) if most > 0 else splits


def _triton_key_chunk(cfg: SparseConfig, width: int) -> int:
    """Blocks per Triton top-k program: the width's next power of two (a narrow width sorts no
    padding), at least twice the candidates a chunk keeps (so chunks' candidates take less
    scratch than one per block) and at most TRITON_KEY_CHUNK (or that floor)."""
    kept = 1 << (cfg.num_selected_blocks - 1).bit_length()
    return max(2 * kept, min(TRITON_KEY_CHUNK, 1 << (width - 1).bit_length()))


def plan_for_call(op: str, plan: SparsePlan | None, impl: str | None, cfg: SparseConfig,
                  x: torch.Tensor, **facts: int) -> SparsePlan:
    """`plan`, or for a call made without one (tests, benchmarks) the plan of an extend batch of
    these sizes on x's device with no overrides and `impl` (None: the measured choice)."""
    if impl not in (None, *IMPLS):
        raise ValueError(f"{op}: impl={impl!r}; expected 'cuda', 'triton' or None")
    if plan is not None:
        if impl is not None:
            raise ValueError(f"{op}: impl={impl!r} and a plan; the plan already fixes the impl")
        return plan
    facts = {"tokens": 0, "groups": 1, "head_dim": x.shape[-1], "width": 0, **facts}
    return make_plan(cfg, decode=False, device=DeviceFacts.of(x.device), impl=impl, **facts)
