"""The InfLLM-v2 plan (sala_sglang/ops/infllm_v2/plan.py), CPU only: which implementation serves
each op, the CUDA selection's variant, the split counts and the Triton tiling for given batch
sizes, devices and overrides; how an op follows its plan; and the environment read once."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SPARSE

from sala_sglang.config import MiniCPMSALAConfig
from sala_sglang.ops import _cuda
from sala_sglang.ops._cuda import DeviceFacts
from sala_sglang.ops.infllm_v2 import (
    block_sparse_attention,
    compress_new_windows,
    make_plan,
    select_blocks,
)
from sala_sglang.ops.infllm_v2 import plan as sparse_plan
from sala_sglang.ops.infllm_v2.plan import SparsePlan
from sala_sglang.ops.overrides import KernelOverrides

RELEASED = MiniCPMSALAConfig().sparse
H100 = DeviceFacts(name="cuda:0", multiprocessors=132, compiled=True, max_smem=232448)
NO_EXTENSION = DeviceFacts(name="cuda:0", multiprocessors=132, compiled=False)


@pytest.fixture
def smem(monkeypatch):
    """Stands in for torch.ops.sala_sglang.select_blocks_smem_bytes: variant -> bytes (a
    mapping the test may change; what it lacks fits), with the calls it got."""
    sizes: dict = {}
    calls: list[tuple[int, ...]] = []

    def fake(head_dim, tile_tokens, warps, width, segment, num_selected):
        calls.append((head_dim, tile_tokens, warps, width, segment, num_selected))
        return sizes.get((tile_tokens, warps), 1024)

    monkeypatch.setattr(sparse_plan, "_smem_bytes", fake)
    fake.sizes, fake.calls = sizes, calls
    return fake


def released_plan(tokens: int, decode: bool = False, **kwargs) -> SparsePlan:
    """A plan for the released geometry (2 kv heads of 128) on an H100."""
    kwargs = {"width": 2048, "device": H100, **kwargs}
    return make_plan(RELEASED, tokens=tokens, groups=2, head_dim=128, decode=decode, **kwargs)


# ---- which implementation ---------------------------------------------------------------------
def test_measured_choice_per_op(smem) -> None:
    p = released_plan(8192)
    assert (p.compress, p.select, p.attention) == ("cuda", "cuda", "triton")
    assert not p.required
    p = released_plan(32, decode=True)
    assert (p.compress, p.select, p.attention) == ("cuda", "triton", "triton")


@pytest.mark.parametrize("tokens,decode,attention", [
    (1, True, "cuda"), (8, True, "cuda"),  # 2 and 16 (token, kv head) pairs
    (9, True, "triton"), (32, True, "triton"),  # 18 and 64
    (0, True, "cuda"),  # an idle batch: nothing runs either way
    (1, False, "triton"), (8, False, "triton"),  # extend (a short prompt's chunk) stays Triton
])
def test_decode_attention_takes_cuda_for_small_batches(smem, tokens: int, decode: bool,
                                                       attention: str) -> None:
    assert released_plan(tokens, decode=decode).attention == attention
    # the environment's choice and an explicit impl still win
    triton = KernelOverrides(impl="triton")
    assert released_plan(tokens, decode=decode, overrides=triton).attention == "triton"
    assert released_plan(tokens, decode=decode, impl="triton").attention == "triton"
    assert released_plan(tokens, decode=decode, device=NO_EXTENSION).attention == "triton"


def test_selection_takes_cuda_where_8_token_ctas_fill_the_gpu(smem) -> None:
    assert released_plan(8192).select == "cuda"  # a prefill chunk
    assert released_plan(528).select == "cuda"  # 132 CTAs of 8 tokens
    assert released_plan(520).select == "triton"  # 130: fewer CTAs than SMs
    assert released_plan(32, decode=True).select == "triton"  # a decode batch


def test_overrides_force_an_impl_where_it_can_run(smem) -> None:
    cuda, triton = KernelOverrides(impl="cuda"), KernelOverrides(impl="triton")
    p = released_plan(32, decode=True, overrides=cuda)
    assert (p.compress, p.select, p.attention, p.required) == ("cuda", "cuda", "cuda", False)
    p = released_plan(8192, overrides=triton)
    assert (p.compress, p.select, p.attention) == ("triton",) * 3
    # without the extension nothing is CUDA, whatever the environment says
    p = released_plan(8192, overrides=cuda, device=NO_EXTENSION)
    assert (p.compress, p.select, p.attention) == ("triton",) * 3
    # an explicit impl wins over the environment and is required
    p = released_plan(8192, overrides=triton, impl="cuda")
    assert (p.compress, p.select, p.attention, p.required) == ("cuda", "cuda", "cuda", True)
    with pytest.raises(ValueError, match="impl='fast'; expected 'cuda', 'triton' or None"):
        released_plan(8, impl="fast")


def test_a_cpu_plan_runs_triton() -> None:
    facts = DeviceFacts.of("cpu")
    assert not facts.compiled
    p = released_plan(8192, device=facts)
    assert (p.compress, p.select, p.attention) == ("triton",) * 3


# ---- the CUDA selection's variant ---------------------------------------------------------------
def test_selection_tile_and_warps_follow_the_sm_count(smem) -> None:
    p = released_plan(8192)
    assert (p.select_tile_tokens, p.select_warps) == (8, 4)
    # 520 tokens: 130 CTAs of 8, 260 of 4
    assert released_plan(520, impl="cuda").select_tile_tokens == 4
    # decode: per-token CTAs, 8 warps wide while there are fewer than 2 (token, head) per SM
    p = released_plan(32, decode=True, impl="cuda")
    assert (p.select_tile_tokens, p.select_warps) == (0, 8)
    p = released_plan(200, impl="cuda")  # 400 pairs: 4 warps, still too few for tiles
    assert (p.select_tile_tokens, p.select_warps) == (0, 4)


def test_selection_segment_is_the_width_up_to_2048_blocks(smem) -> None:
    assert released_plan(8192, width=8192).select_segment == 2048
    assert released_plan(8192, width=700).select_segment == 700
    assert released_plan(8192, width=10).select_segment == RELEASED.num_selected_blocks


def test_overrides_force_the_selection_tile_and_segment(smem) -> None:
    tile = lambda n: KernelOverrides(select_tile=n)  # noqa: E731
    assert released_plan(8192, overrides=tile(1)).select_tile_tokens == 0
    assert released_plan(8192, overrides=tile(4)).select_tile_tokens == 4
    assert released_plan(8, overrides=tile(8), impl="cuda").select_tile_tokens == 8
    segment = KernelOverrides(select_segment=3)
    assert released_plan(8192, overrides=segment).select_segment == 3
    assert released_plan(8192, width=2, overrides=KernelOverrides(select_segment=5000)
                         ).select_segment == RELEASED.num_selected_blocks


def test_selection_variant_falls_back_to_what_fits_shared_memory(smem) -> None:
    smem.sizes[(8, 4)] = H100.max_smem + 1
    p = released_plan(8192)
    assert (p.select, p.select_tile_tokens, p.select_unfit) == ("cuda", 4, None)
    smem.sizes[(4, 4)] = H100.max_smem + 1
    p = released_plan(8192)
    assert (p.select, p.select_tile_tokens, p.select_unfit) == ("cuda", 0, None)
    assert smem.calls[-1] == (128, 0, 4, 2048, 2048, RELEASED.num_selected_blocks)
    smem.sizes[(0, 4)] = H100.max_smem + 1  # nothing fits: Triton, unless CUDA is required
    assert released_plan(8192).select == "triton"
    p = released_plan(8192, impl="cuda")
    assert p.select == "cuda" and "needs 232449 bytes of shared memory" in p.select_unfit


def test_a_head_dim_the_extension_lacks_takes_triton(monkeypatch) -> None:
    def not_compiled(*args):
        raise RuntimeError("select_blocks_smem_bytes: head dim 96 not compiled: use 64 or 128")

    monkeypatch.setattr(sparse_plan, "_smem_bytes", not_compiled)
    p = make_plan(RELEASED, tokens=8192, groups=2, head_dim=96, width=2048, decode=False,
                  device=H100)
    assert p.select == "triton" and "head dim 96" in p.select_unfit


def test_the_selection_variant_is_asked_only_where_cuda_selects(smem) -> None:
    released_plan(32, decode=True)  # Triton selects: no question to the extension
    released_plan(8192, device=NO_EXTENSION, impl="cuda")
    assert smem.calls == []


# ---- split counts and Triton tiling -------------------------------------------------------------
def test_extend_is_unsplit_and_tiles_tokens(smem) -> None:
    p = released_plan(8192)
    assert (p.attention_splits, p.cuda_attention_splits) == (1, 1)
    assert (p.triton_token_tile, p.triton_select_splits) == (sparse_plan.TRITON_TOKEN_TILE, 1)


def test_decode_splits_and_cuda_attention_fills_the_sms(smem) -> None:
    p = released_plan(32, decode=True)
    assert (p.triton_token_tile, p.triton_select_splits, p.attention_splits) == (1, 8, 8)
    # 32 tokens x 2 heads: 132 CTAs // 64 = 2 splits wanted, below the floor of 8
    assert p.cuda_attention_splits == 8
    # batch 1: 66 wanted, at most 96 // 4 = 24 (4 selected blocks per split)
    assert released_plan(1, decode=True).cuda_attention_splits == 24
    # batch 4: 132 // 8 = 16 splits, one wave
    assert released_plan(4, decode=True).cuda_attention_splits == 16
    assert released_plan(1, decode=True, n_sel=1).cuda_attention_splits == 8  # dense batch
    assert released_plan(0, decode=True).cuda_attention_splits == 8  # idle
    # 70 tokens x 2 heads leave no room to raise 2 splits
    assert released_plan(70, splits=2).cuda_attention_splits == 2
    assert released_plan(1, decode=True, device=DeviceFacts.of("cpu")).cuda_attention_splits == 8


@pytest.mark.parametrize("batch,width,splits", [
    (1, 2052, 128),  # a 128K server: 264 programs per 2 kv heads wanted, 129 window tiles
    (1, 16400, 128),  # a 1M server
    (2, 2052, 64), (4, 2052, 32), (8, 2052, 16), (8, 16400, 16),
    (16, 2052, 8), (32, 2052, 8), (32, 16400, 8),  # enough programs: DECODE_SPLITS
    (1, 1024, 64), (1, 1000, 32),  # 64 window tiles; 63
    (1, 200, 8),  # 13 window tiles: DECODE_SPLITS all the same
])
def test_decode_selection_splits_fill_the_sms(smem, batch: int, width: int, splits: int) -> None:
    """Triton stage-1 in decode splits the windows into the largest power of two that keeps
    tokens x kv heads x splits within 2 programs per SM and every split within the widest row's
    window tiles, never below DECODE_SPLITS; attention keeps the decode split count."""
    p = released_plan(batch, decode=True, width=width)
    assert p.triton_select_splits == splits
    assert (p.attention_splits, p.triton_token_tile) == (sparse_plan.DECODE_SPLITS, 1)


def test_decode_selection_splits_are_capped(smem) -> None:
    huge = DeviceFacts(name="cuda:0", multiprocessors=1024, compiled=True, max_smem=232448)
    p = released_plan(1, decode=True, width=16400, device=huge)
    assert p.triton_select_splits == sparse_plan.SELECT_MAX_SPLITS == 128
    # the same rule wherever splits are asked for; extend runs unsplit, a CPU plan at the floor
    assert released_plan(1, splits=2, width=2052).triton_select_splits == 128
    assert released_plan(1, width=2052).triton_select_splits == 1
    assert released_plan(0, decode=True).triton_select_splits == sparse_plan.DECODE_SPLITS
    cpu = released_plan(1, decode=True, width=16400, device=DeviceFacts.of("cpu"))
    assert cpu.triton_select_splits == sparse_plan.DECODE_SPLITS


@pytest.mark.parametrize("width,chunk", [(16400, 1024), (2052, 1024), (1024, 1024), (700, 1024),
                                         (300, 512), (100, 256), (10, 256)])
def test_top_k_chunk_is_the_width_as_a_power_of_two_up_to_1024(smem, width: int,
                                                               chunk: int) -> None:
    """At least twice the 128 candidates a chunk keeps of the released 96 selected blocks."""
    assert released_plan(1, decode=True, width=width).triton_key_chunk == chunk
    tiny = make_plan(TINY_SPARSE, tokens=1, groups=2, head_dim=64, width=20, decode=True,
                     device=H100)
    assert tiny.triton_key_chunk == 32  # twice the 16 candidates of 10 selected blocks


def test_triton_selection_pieces_bound_the_scratch(smem, monkeypatch) -> None:
    per_token = 2 * 2048 * (4 * RELEASED.windows_per_block + 8)
    rows = sparse_plan.SELECTION_SCRATCH_BYTES // per_token // 16 * 16
    assert released_plan(8192).triton_piece_rows == rows
    monkeypatch.setattr(sparse_plan, "SELECTION_SCRATCH_BYTES", 20 * per_token)
    assert released_plan(8192).triton_piece_rows == 16  # a multiple of 16 tokens, at least 16
    monkeypatch.setattr(sparse_plan, "SELECTION_SCRATCH_BYTES", 1)
    assert released_plan(8192).triton_piece_rows == 16


# ---- ops follow the plan ----------------------------------------------------------------------
def _op_calls(device: str = "cpu"):
    """Each op called on small tensors (on the CPU unless `device` says otherwise), as
    f(plan, impl)."""
    cfg = TINY_SPARSE
    rt = torch.zeros(2, 64, dtype=torch.int32, device=device)
    idx = torch.zeros(1, dtype=torch.int32, device=device)
    tokens = torch.zeros(2, dtype=torch.int32, device=device)
    q = torch.zeros(2, 8, 64, device=device)
    k1 = torch.zeros(4, 2, 2, 64, device=device)
    kv = torch.zeros(64, 2, 64, device=device)
    sel = torch.zeros(2, 2, 4, dtype=torch.int32, device=device)
    return {
        "compress_new_windows": lambda p, impl: compress_new_windows(
            kv, k1.clone(), rt, idx, idx, idx + 40, cfg, 4, p, impl=impl),
        "select_blocks": lambda p, impl: select_blocks(
            q, k1, rt, tokens, tokens, cfg, 16, 0.125, p, impl=impl),
        "block_sparse_attention": lambda p, impl: block_sparse_attention(
            q, kv, kv, rt, tokens, tokens, tokens, sel, cfg, 0.125, p, impl=impl),
    }


OPS = ["compress_new_windows", "select_blocks", "block_sparse_attention"]


@pytest.mark.parametrize("op", OPS)
def test_impl_is_checked_and_cuda_is_refused_with_the_reason(op: str) -> None:
    call = _op_calls()[op]
    with pytest.raises(ValueError, match=f"{op}: impl='fast'; expected 'cuda', 'triton' or None"):
        call(None, "fast")
    with pytest.raises(ValueError, match=f"{op}: impl='cuda' cannot run: .*tensors are on cpu"):
        call(None, "cuda")
    cpu = make_plan(RELEASED, tokens=2, groups=2, head_dim=64, width=16, decode=False,
                    device=DeviceFacts.of("cpu"))
    with pytest.raises(ValueError, match=f"{op}: impl='triton' and a plan"):
        call(cpu, "triton")


@pytest.mark.parametrize("op", OPS)
def test_ops_never_read_the_environment(op: str, device: str, monkeypatch) -> None:
    # overrides are read once, when a backend is built (KernelOverrides.from_env)
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda-please")
    monkeypatch.setenv("SALA_SGLANG_SELECT_TILE", "3")
    _op_calls(device)[op](None, None)


def test_overrides_from_the_environment_are_checked() -> None:
    assert KernelOverrides.from_env({}) == KernelOverrides()
    env = {"SALA_SGLANG_KERNELS": "cuda", "SALA_SGLANG_SELECT_TILE": "1",
           "SALA_SGLANG_SELECT_SEGMENT": "3"}
    assert KernelOverrides.from_env(env) == KernelOverrides("cuda", 1, 3)
    for name, value, expected in (("SALA_SGLANG_KERNELS", "cuda-please", "'cuda', 'triton'"),
                                  ("SALA_SGLANG_SELECT_TILE", "2", r"one of \(1, 4, 8\)"),
                                  ("SALA_SGLANG_SELECT_SEGMENT", "0", "a positive integer"),
                                  ("SALA_SGLANG_SELECT_SEGMENT", "x", "a positive integer")):
        with pytest.raises(ValueError, match=f"{name}='{value}'; expected {expected}"):
            KernelOverrides.from_env({name: value})


@pytest.fixture
def fake_gpu(monkeypatch) -> torch.Tensor:
    """A tensor that passes for a GPU tensor with the extension loaded (only .is_cuda is read)."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(_cuda, "available", lambda: True)
    return torch.empty(0, device="meta")


def test_a_planned_cuda_op_falls_back_where_its_tensors_do_not_fit(fake_gpu, smem) -> None:
    fits, too_big = (lambda: None), (lambda: "width too large")
    p = released_plan(8192)
    assert p.uses_cuda("op", p.compress, fake_gpu, fits)
    assert not p.uses_cuda("op", p.attention, fake_gpu, fits)
    assert not p.uses_cuda("op", p.compress, fake_gpu, too_big)  # falls back, no error
    p = released_plan(8192, overrides=KernelOverrides(impl="cuda"))
    assert p.uses_cuda("op", p.attention, fake_gpu, fits)
    assert not p.uses_cuda("op", p.attention, fake_gpu, too_big)
    p = released_plan(8192, overrides=KernelOverrides(impl="triton"))
    assert not p.uses_cuda("op", p.compress, fake_gpu, fits)
    p = released_plan(8192, overrides=KernelOverrides(impl="triton"), impl="cuda")
    assert p.uses_cuda("op", p.attention, fake_gpu, fits)  # an explicit impl wins
    with pytest.raises(ValueError, match="op: impl='cuda' cannot run: width too large"):
        p.uses_cuda("op", p.attention, fake_gpu, too_big)


def test_required_cuda_selection_names_the_shared_memory_it_lacks(fake_gpu, smem) -> None:
    smem.sizes.update({(t, w): H100.max_smem + 1 for t in (0, 4, 8) for w in (4, 8)})
    p = released_plan(8192, impl="cuda")
    q = torch.zeros(2, 32, 128, dtype=torch.bfloat16)
    k1 = torch.zeros(4, 4, 2, 128, dtype=torch.bfloat16)
    rt = torch.zeros(2, 64, dtype=torch.int32)
    tokens = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="select_blocks: impl='cuda' cannot run: width 2048 "
                                         "needs 232449 bytes of shared memory"):
        select_blocks(q, k1, rt, tokens, tokens, RELEASED, 2048, 0.1, p)
