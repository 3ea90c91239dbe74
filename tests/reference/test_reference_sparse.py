"""InfLLM-v2 reference (SPEC 2.2): compressed keys, block scores, selection, attention, modes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_SPARSE

from sala_sglang.config import RELEASED_SPARSE_CONFIG, SparseConfig
from sala_sglang.reference.sparse import (
    block_scores,
    compress_keys,
    dense_attention,
    pool_block_scores,
    select_blocks,
    sparse_attention,
    sparse_layer_attention,
    sparse_mode,
    stage1_scores,
)

pytestmark = pytest.mark.usefixtures("single_thread")

INF = float("inf")
RELEASED = SparseConfig.from_dict(RELEASED_SPARSE_CONFIG)
# r = 2 windows per block, w = 4 local blocks, n_sel = 10.
TINY = TINY_SPARSE


def _randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- compressed keys ------------------------------------------------------------------------


@pytest.mark.parametrize("length,n1", [(31, 0), (32, 1), (47, 1), (48, 2), (6144, 383)])
def test_k1_window_count_for_released_geometry(length, n1):
    assert RELEASED.num_k1(length) == n1
    k = torch.zeros(length, 2, 4)
    assert compress_keys(k, RELEASED.kernel_size, RELEASED.kernel_stride).shape == (n1, 2, 4)


def test_compressed_keys_are_means_of_complete_windows_on_hand_example():
    # k_t = [t, t^2], windows of 4 keys every 2: t = 0..3, 2..5, 4..7 (6..9 is incomplete at L = 9).
    t = torch.arange(9, dtype=torch.float32)
    k = torch.stack([t, t * t], dim=-1)[:, None, :]  # [9, 1, 2]
    expected = torch.tensor([[1.5, 3.5], [3.5, 13.5], [5.5, 31.5]])[:, None, :]
    out = compress_keys(k, 4, 2)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert compress_keys(k[:3], 4, 2).shape == (0, 1, 2)


def test_compressed_keys_accumulate_in_fp32_for_bf16_keys():
    k = (_randn(64, 2, 8, seed=0) * 3).to(torch.bfloat16)
    out = compress_keys(k, 32, 16)
    assert out.dtype == torch.float32
    expected = k.double().unfold(0, 32, 16).mean(-1)
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6)


# ---- stage-1 scores and block pooling -------------------------------------------------------


def test_stage1_softmax_sees_only_windows_ending_at_or_before_query():
    # Window 3 (tokens 24..39 with kernel 16, stride 8) matches the query strongly; it exists in
    # the cache but must stay invisible to p = 38 and visible from p = 39.
    d = 16
    k1 = torch.zeros(5, 1, d, dtype=torch.float64)
    k1[3, 0, 0] = 40.0
    q = torch.zeros(2, 2, d, dtype=torch.float64)
    q[:, :, 0] = 1.0
    s = stage1_scores(
        q, k1, torch.tensor([38, 39]), TINY.kernel_size, TINY.kernel_stride
    )  # [2, 1, 5]
    assert torch.allclose(s[0, 0], torch.tensor([2 / 3, 2 / 3, 2 / 3, 0, 0], dtype=torch.float64))
    assert s[1, 0, 3] > 1.99 and s[1, 0, 4] == 0


def test_stage1_score_sums_each_groups_heads_softmax(relative_error):
    hq, g, d, n1 = 6, 2, 8, 12
    q, k1 = _randn(5, hq, d, seed=1), _randn(n1, g, d, seed=2)
    positions = torch.tensor([20, 40, 55, 80, 200])
    out = stage1_scores(q, k1, positions, TINY.kernel_size, TINY.kernel_stride)
    expected = torch.zeros(5, g, n1, dtype=torch.float64)
    for i, p in enumerate(positions.tolist()):
        visible = [c for c in range(n1) if 8 * c + 16 - 1 <= p]
        for h in range(hq):
            logits = torch.stack([q[i, h] @ k1[c, h // (hq // g)] / math.sqrt(d) for c in visible])
            expected[i, h // (hq // g), visible] += torch.softmax(logits, 0)
    assert relative_error(out, expected) < 1e-13


@pytest.mark.parametrize(
    "c_star,blocks",
    # r = 4: block b pools windows c in [4b - 1, 4b + 4), i.e. 4b - 1 .. 4b + 3.
    [
        (0, {0}),
        (2, {0}),
        (3, {0, 1}),
        (4, {1}),
        (6, {1}),
        (7, {1, 2}),
        (8, {2}),
        (38, {9}),
        (39, {9, 10}),
    ],
)
def test_block_max_pool_window_is_exactly_r_b_minus_1_to_r_b_plus_r(c_star, blocks):
    scores = torch.zeros(1, 1, 40)
    scores[0, 0, c_star] = 1.0
    pooled = pool_block_scores(scores, num_blocks=11, windows_per_block=4)
    assert {b for b in range(11) if pooled[0, 0, b] == 1.0} == blocks


def test_block_scores_pool_stage1_scores_of_neighbouring_windows():
    # Stage 1 concentrates on window 5; with r = 2, block b pools windows 2b-1 .. 2b+1: blocks 2, 3.
    d = 16
    k1 = torch.zeros(30, 1, d, dtype=torch.float64)
    k1[5, 0, 0] = 60.0
    q = torch.zeros(1, 2, d, dtype=torch.float64)
    q[0, :, 0] = 1.0
    scores = block_scores(q, k1, torch.tensor([200]), TINY)[0, 0]  # qb = 12, local 8..12
    assert scores.shape == (13,)
    assert scores[2] > 1.99 and scores[3] > 1.99
    assert all(scores[b] < 1e-6 for b in (1, 4, 5, 6, 7))
    assert scores[0] == INF and all(scores[b] == INF for b in range(8, 13))


def test_forced_blocks_are_inf_and_blocks_after_query_block_minus_inf():
    q, k1 = _randn(3, 8, 16, seed=3), _randn(60, 2, 16, seed=4)
    positions = torch.tensor([100, 250, 479])  # qb = 6, 15, 29
    scores = block_scores(q, k1, positions, TINY)
    assert scores.shape == (3, 2, 30)
    for i, qb in enumerate([6, 15, 29]):
        for b in range(30):
            s = scores[i, :, b]
            if b > qb:
                assert (s == -INF).all()
            elif b < TINY.init_blocks or qb - TINY.local_blocks <= b:
                assert (s == INF).all()
            else:
                assert torch.isfinite(s).all() and (s >= 0).all()


@pytest.mark.parametrize("n1", [0, 3])
def test_query_seeing_no_compressed_window_still_selects_its_blocks_without_nan(n1):
    k1 = _randn(n1, 2, 16, seed=5)  # windows end at 15, 23, 31: none visible to p < 15
    scores = block_scores(_randn(4, 8, 16, seed=6), k1, torch.tensor([0, 5, 13, 14]), TINY)
    assert not torch.isnan(scores).any()
    sel = select_blocks(scores, TINY.num_selected_blocks)
    assert (sel[..., 0] == 0).all() and (sel[..., 1:] == -1).all()


# ---- selection ------------------------------------------------------------------------------


def test_selection_tie_break_prefers_lower_block_index():
    scores = torch.tensor([[[INF, 0.5, 0.9, 0.5, 0.9, 0.5, 0.1, INF, INF]]])
    assert select_blocks(scores, 6).tolist() == [[[0, 7, 8, 2, 4, 1]]]
    assert select_blocks(scores, 8).tolist() == [[[0, 7, 8, 2, 4, 1, 3, 5]]]


def test_selection_pads_with_minus_one_and_never_picks_missing_blocks():
    scores = torch.tensor([[[INF, 0.3, INF, -INF, -INF]]])
    assert select_blocks(scores, 4).tolist() == [[[0, 2, 1, -1]]]
    assert select_blocks(scores[..., :2], 4).tolist() == [[[0, 1, -1, -1]]]


def test_selection_keeps_forced_blocks_and_the_best_others_and_nothing_after_query():
    q, k1 = _randn(64, 8, 16, seed=7), _randn(120, 2, 16, seed=8)
    positions = torch.randint(200, 970, (64,), generator=torch.Generator().manual_seed(9))
    scores = block_scores(q, k1, positions, TINY)
    sel = select_blocks(scores, TINY.num_selected_blocks)
    for i, p in enumerate(positions.tolist()):
        qb = p // TINY.block_size
        forced = set(range(TINY.init_blocks)) | set(range(qb - TINY.local_blocks, qb + 1))
        for g in range(2):
            chosen = set(sel[i, g].tolist())
            assert -1 not in chosen and len(chosen) == TINY.num_selected_blocks
            assert forced <= chosen and max(chosen) <= qb
            others = [b for b in range(qb + 1) if b not in chosen]
            worst_chosen = min(scores[i, g, b] for b in chosen)
            assert all(scores[i, g, b] <= worst_chosen for b in others)


# ---- attention ------------------------------------------------------------------------------


def test_dense_attention_maps_query_head_h_to_kv_head_h_div_group(relative_error):
    hq, g, d, length = 6, 3, 8, 40
    q, k, v = (
        _randn(7, hq, d, seed=10),
        _randn(length, g, d, seed=11),
        _randn(length, g, d, seed=12),
    )
    positions = torch.tensor([0, 3, 10, 20, 33, 38, 39])
    out = dense_attention(q, k, v, positions, 0.3)
    expected = torch.zeros_like(out)
    for i, p in enumerate(positions.tolist()):
        for h in range(hq):
            kv = h // (hq // g)
            w = torch.softmax(0.3 * k[: p + 1, kv] @ q[i, h], 0)
            expected[i, h] = w @ v[: p + 1, kv]
    assert relative_error(out, expected) < 1e-13


def test_sparse_attention_attends_exactly_the_selected_blocks_up_to_the_query(relative_error):
    hq, g, d, length, bs = 4, 2, 8, 100, 16
    q, k, v = (
        _randn(3, hq, d, seed=13),
        _randn(length, g, d, seed=14),
        _randn(length, g, d, seed=15),
    )
    positions = torch.tensor([40, 70, 99])
    sel = torch.tensor([[[2, 0, -1], [1, 2, -1]], [[4, 1, 3], [0, 4, -1]], [[6, 0, 2], [5, 6, -1]]])
    out = sparse_attention(q, k, v, positions, sel, bs, 0.4)
    expected = torch.zeros_like(out)
    for i, p in enumerate(positions.tolist()):
        for h in range(hq):
            kv = h // (hq // g)
            blocks = [b for b in sel[i, kv].tolist() if b >= 0]
            tokens = [t for t in range(p + 1) if t // bs in blocks]
            w = torch.softmax(0.4 * k[tokens, kv] @ q[i, h], 0)
            expected[i, h] = w @ v[tokens, kv]
    assert relative_error(out, expected) < 1e-13


def _released_geometry_case(length: int, positions: torch.Tensor):
    q, k, v = (
        _randn(n, h, 16, seed=s, dtype=torch.float32)
        for n, h, s in [(len(positions), 4, 20), (length, 2, 21), (length, 2, 22)]
    )
    k1 = compress_keys(k, RELEASED.kernel_size, RELEASED.kernel_stride)
    sel = select_blocks(block_scores(q, k1, positions, RELEASED), RELEASED.num_selected_blocks)
    scale = 16**-0.5
    # dense_len 0 (--dense-as-sparse): every token takes the sparse path.
    sparse = sparse_layer_attention(q, k, v, k1, positions, 1, RELEASED, 0, scale)
    return sel, sparse, dense_attention(q, k, v, positions, scale)


def test_sparse_equals_dense_up_to_6144_tokens_with_released_geometry(relative_error):
    # n_sel * block_size = 96 * 64 = 6144: every block b <= qb is selected for p < 6144.
    assert RELEASED.max_sparse_keys == 6144
    extra = torch.randint(0, 6144, (48,), generator=torch.Generator().manual_seed(23))
    positions = torch.cat(
        [torch.tensor([0, 31, 63, 64, 2047, 2111, 4095, 6079, 6080, 6142, 6143]), extra]
    )
    sel, sparse, dense = _released_geometry_case(6144, positions)
    for i, p in enumerate(positions.tolist()):
        for g in range(2):
            chosen = sorted(b for b in sel[i, g].tolist() if b >= 0)
            assert chosen == list(range(p // 64 + 1))
    assert relative_error(sparse, dense) < 1e-6


def test_sparse_differs_from_dense_once_blocks_are_dropped_with_released_geometry(relative_error):
    positions = torch.tensor([6144, 7000, 8191])  # 97, 110, 128 blocks: some must be dropped
    sel, sparse, dense = _released_geometry_case(8192, positions)
    assert (sel >= 0).all()
    for i in range(len(positions)):
        assert relative_error(sparse[i], dense[i]) > 1e-3


# ---- mode switch ----------------------------------------------------------------------------


def test_mode_switch_is_sparse_iff_max_of_prompt_len_and_p_plus_1_reaches_dense_len():
    p = torch.tensor([0, 100, 8190, 8191, 9000])
    assert sparse_mode(p, 100, 8192).tolist() == [False, False, False, True, True]
    assert sparse_mode(p, 8191, 8192).tolist() == [False, False, False, True, True]
    assert sparse_mode(p, 8192, 8192).tolist() == [True] * 5
    assert sparse_mode(p, 1, 0).tolist() == [True] * 5  # --dense-as-sparse


def test_layer_attention_is_dense_before_dense_len_and_sparse_from_it(relative_error):
    length, prompt_len = 300, 200
    q, k, v = (
        _randn(length, 8, 16, seed=30),
        _randn(length, 2, 16, seed=31),
        _randn(length, 2, 16, seed=32),
    )
    k1 = compress_keys(k, TINY.kernel_size, TINY.kernel_stride)
    positions = torch.arange(length)
    out = sparse_layer_attention(q, k, v, k1, positions, prompt_len, TINY, TINY.dense_len, 0.25)
    dense = dense_attention(q, k, v, positions, 0.25)
    sel = select_blocks(block_scores(q, k1, positions, TINY), TINY.num_selected_blocks)
    sparse = sparse_attention(q, k, v, positions, sel, TINY.block_size, 0.25)
    switch = TINY.dense_len - 1  # first p with max(P, p + 1) >= dense_len
    assert relative_error(out[:switch], dense[:switch]) < 1e-14
    assert relative_error(out[switch:], sparse[switch:]) < 1e-14
    assert relative_error(sparse[switch:], dense[switch:]) > 1e-3
