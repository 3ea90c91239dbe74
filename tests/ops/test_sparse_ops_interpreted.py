"""InfLLM-v2 Triton kernels, run by Triton's CPU interpreter, against the reference (fp32).

A paged KV cache with shuffled pages, two requests, compressed keys written in two growth steps
(one ending inside a window), selection at awkward positions, and attention in both modes.
"""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("triton")

from triton_interpreter import run_interpreted  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import json, math, torch
    from sala_sglang.config import SparseConfig
    from sala_sglang.ops.sparse import block_sparse_attention, compress_new_windows, select_blocks
    from sala_sglang.reference import sparse as ref

    torch.manual_seed(0)
    cfg = SparseConfig(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=16,
                       window_size=64, topk=4, use_nope=False, dense_len=256)
    BS, G, HQ, D = cfg.block_size, 2, 8, 32
    lens = [300, 180]
    n_pages = sum(math.ceil(n / BS) for n in lens) + 5
    perm = torch.randperm(n_pages) + 1
    rt = torch.zeros(3, 320, dtype=torch.int32)
    k_buf = torch.randn((n_pages + 2) * BS, G, D)
    v_buf = torch.randn((n_pages + 2) * BS, G, D)
    used = 0
    for r, n in enumerate(lens):
        pages = perm[used: used + math.ceil(n / BS)]
        used += pages.numel()
        pos = torch.arange(n)
        rt[r + 1, :n] = (pages[pos // BS] * BS + pos % BS).to(torch.int32)
    slots = torch.tensor([1, 2], dtype=torch.int32)
    k1 = torch.zeros(n_pages + 2, BS // cfg.kernel_stride, G, D)
    for old, new in (([0, 0], [130, 77]), ([130, 77], lens)):
        compress_new_windows(k_buf, k1, rt, slots, torch.tensor(old), torch.tensor(new),
                             cfg.kernel_size, cfg.kernel_stride, BS, max_new_windows=40)
    compress_err = 0.0
    for r, n in enumerate(lens):
        expect = ref.compress_keys(k_buf[rt[r + 1, :n].long()].double(), cfg.kernel_size,
                                   cfg.kernel_stride)
        for c in range(expect.shape[0]):
            start = c * cfg.kernel_stride
            page = int(rt[r + 1, (start // BS) * BS]) // BS
            got = k1[page, (start % BS) // cfg.kernel_stride].double()
            compress_err = max(compress_err, float((got - expect[c]).abs().max()))

    pos = torch.tensor([0, 15, 31, 100, 127, 128, 200, 255, 299], dtype=torch.int32)
    q = torch.randn(pos.numel(), HQ, D)
    treq = torch.ones(pos.numel(), dtype=torch.int32)
    sel = select_blocks(q, k1, rt, treq, pos, cfg.kernel_size, cfg.kernel_stride, BS,
                        cfg.init_blocks, cfg.local_blocks, cfg.num_selected_blocks, 300 // BS + 1,
                        D ** -0.5, num_splits=2)
    keys, vals = k_buf[rt[1, :300].long()].double(), v_buf[rt[1, :300].long()].double()
    ref_k1 = ref.compress_keys(keys, cfg.kernel_size, cfg.kernel_stride)
    ref_sel = ref.select_blocks(ref.block_scores(q.double(), ref_k1, pos.long(), cfg),
                                cfg.num_selected_blocks)
    ones, zeros = torch.ones_like(pos), torch.zeros_like(pos)
    sparse = block_sparse_attention(q, k_buf, v_buf, rt, treq, pos, ones, sel, BS, D ** -0.5)
    ref_sparse = ref.sparse_attention(q.double(), keys, vals, pos.long(), ref_sel, BS, D ** -0.5)
    dense = block_sparse_attention(q, k_buf, v_buf, rt, treq, pos, zeros, sel, BS, D ** -0.5,
                                   num_splits=4)
    ref_dense = ref.dense_attention(q.double(), keys, vals, pos.long(), D ** -0.5)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    print(json.dumps({
        "compress_err": compress_err,
        "selection_equal": bool(torch.equal(sel.long(), ref_sel.long())),
        "sparse_err": rel(sparse, ref_sparse),
        "dense_err": rel(dense, ref_dense),
        "sparse_vs_dense": rel(ref_sparse, ref_dense),
    }))
    """
)


def test_interpreted_sparse_kernels_match_the_reference() -> None:
    import json

    last_line = run_interpreted(SCRIPT)
    result = json.loads(last_line)
    assert result["compress_err"] < 1e-5, result
    assert result["selection_equal"], result
    assert result["sparse_err"] < 1e-5 and result["dense_err"] < 1e-5, result
    assert result["sparse_vs_dense"] > 1e-2, result  # selection really dropped blocks


def test_selection_kernels_are_not_specialized_on_per_batch_counts() -> None:
    # A new divisibility class of these counts compiled the kernels again in the middle of a
    # long prefill (seconds of TTFT at 128K on an H100).
    from sala_sglang.ops import sparse

    for kernel, counts in ((sparse._stage1_stats_kernel, {"n_tokens"}),
                           (sparse._window_probs_kernel, {"n_tokens", "n_windows"}),
                           (sparse._block_keys_kernel, {"n_windows", "width"})):
        names = {kernel.arg_names[i] if isinstance(i, int) else i
                 for i in kernel.do_not_specialize}
        assert counts <= names, (kernel.fn.__name__, names)


def _op_calls():
    """Each op with a CUDA twin, called on small CPU tensors, as f(impl)."""
    import torch

    from sala_sglang.ops import sparse

    rt = torch.zeros(2, 64, dtype=torch.int32)
    idx = torch.zeros(1, dtype=torch.int32)
    tokens = torch.zeros(2, dtype=torch.int32)
    q = torch.zeros(2, 8, 64)
    k1 = torch.zeros(4, 2, 2, 64)
    kv = torch.zeros(64, 2, 64)
    return {
        "compress_new_windows": lambda impl: sparse.compress_new_windows(
            kv, torch.zeros(4, 2, 2, 64), rt, idx, idx, idx + 40, 16, 8, 16, 4, impl=impl),
        "select_blocks": lambda impl: sparse.select_blocks(
            q, k1, rt, tokens, tokens, 16, 8, 16, 1, 4, 10, 16, 0.125, impl=impl),
        "block_sparse_attention": lambda impl: sparse.block_sparse_attention(
            q, kv, kv, rt, tokens, tokens, tokens, torch.zeros(2, 2, 4, dtype=torch.int32), 16,
            0.125, impl=impl),
    }


@pytest.mark.parametrize("op", ["compress_new_windows", "select_blocks", "block_sparse_attention"])
def test_impl_is_checked_and_cuda_is_refused_with_the_reason(op: str, monkeypatch) -> None:
    call = _op_calls()[op]
    with pytest.raises(ValueError, match=f"{op}: impl='fast'; expected 'cuda', 'triton' or None"):
        call("fast")
    with pytest.raises(ValueError, match=f"{op}: impl='cuda' cannot run: .*tensors are on cpu"):
        call("cuda")
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="SALA_SGLANG_KERNELS='cuda-please'"):
        call(None)


def test_auto_dispatch_follows_the_measured_choice_and_the_override(monkeypatch) -> None:
    import torch

    from sala_sglang.ops import _cuda

    cuda = torch.empty(0, device="meta")  # stands for a GPU tensor: only .is_cuda is read
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(_cuda, "available", lambda: True)
    fits, too_big = (lambda: None), (lambda: "width too large")
    assert _cuda.choose_cuda("op", None, cuda, True, fits)
    assert not _cuda.choose_cuda("op", None, cuda, False, fits)
    assert not _cuda.choose_cuda("op", None, cuda, True, too_big)  # falls back, no error
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda")
    assert _cuda.choose_cuda("op", None, cuda, False, fits)
    assert not _cuda.choose_cuda("op", None, cuda, False, too_big)
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "triton")
    assert not _cuda.choose_cuda("op", None, cuda, True, fits)
    assert _cuda.choose_cuda("op", "cuda", cuda, False, fits)  # an explicit impl wins
    with pytest.raises(ValueError, match="op: impl='cuda' cannot run: width too large"):
        _cuda.choose_cuda("op", "cuda", cuda, True, too_big)


def test_selection_takes_cuda_where_8_token_ctas_fill_the_gpu(monkeypatch) -> None:
    import torch

    from sala_sglang.ops import sparse

    monkeypatch.setattr(sparse, "_multiprocessors", lambda device: 132)  # an H100
    gpu = torch.device("cuda", 0)
    assert sparse._cuda_selection_faster(8192, 2, gpu)  # a prefill chunk
    assert sparse._cuda_selection_faster(528, 2, gpu)  # 132 CTAs of 8 tokens
    assert not sparse._cuda_selection_faster(520, 2, gpu)  # 130: fewer CTAs than SMs
    assert not sparse._cuda_selection_faster(32, 2, gpu)  # a decode batch
