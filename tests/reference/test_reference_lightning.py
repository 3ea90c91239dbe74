"""Lightning attention reference (SPEC 2.1): slope schedule, recurrence, chunked form."""

from __future__ import annotations

import math

import pytest
import torch

from sala_sglang.reference.lightning import lightning_chunked, lightning_recurrent, lightning_slopes

pytestmark = pytest.mark.usefixtures("single_thread")


def _qkv(t: int, h: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, h, d, generator=g, dtype=dtype) for _ in range(3))


def test_slope_schedule_for_32_heads_is_alibi():
    s = lightning_slopes(32)
    assert s.shape == (32,)
    assert s[0].item() == pytest.approx(2**-0.25) and s[0].item() == pytest.approx(0.8409, abs=1e-4)
    assert s[3].item() == pytest.approx(0.5)
    assert s[31].item() == pytest.approx(2**-8) and s[31].item() == pytest.approx(0.0039, abs=1e-4)
    assert torch.allclose(s, torch.tensor([2 ** (-(h + 1) / 4) for h in range(32)], dtype=s.dtype))


def test_slope_schedule_for_other_head_counts_follows_alibi_rule():
    assert torch.allclose(
        lightning_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)], dtype=torch.float64)
    )
    # 12 heads: the 8-head schedule, then slopes 1, 3, 5, 7 (0-based 0, 2, 4, 6) of the 16-head one.
    expected = [2.0 ** -(h + 1) for h in range(8)] + [2.0 ** (-0.5 * (2 * i + 1)) for i in range(4)]
    assert torch.allclose(lightning_slopes(12), torch.tensor(expected, dtype=torch.float64))


def test_recurrence_decays_state_by_exp_minus_slope_per_token():
    # One head, D = 1, q = k = v = 1: o_t = scale * sum_{j <= t} exp(-slope)^(t - j).
    slope, scale, t = 0.7, 0.5, 9
    ones = torch.ones(t, 1, 1, dtype=torch.float64)
    o, state = lightning_recurrent(
        ones, ones, ones, torch.tensor([slope], dtype=torch.float64), scale
    )
    a = math.exp(-slope)
    expected = torch.tensor(
        [scale * (1 - a ** (i + 1)) / (1 - a) for i in range(t)], dtype=torch.float64
    )
    assert torch.allclose(o[:, 0, 0], expected, rtol=1e-13)
    assert state.item() == pytest.approx((1 - a**t) / (1 - a), rel=1e-13)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 200])
def test_chunked_equals_recurrence(chunk_size, relative_error):
    q, k, v = _qkv(131, 4, 16, seed=chunk_size)
    slopes = lightning_slopes(4)  # 0.25 ... 0.0039
    init = torch.randn(4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ref_o, ref_s = lightning_recurrent(q, k, v, slopes, 0.25, initial_state=init)
    o, s = lightning_chunked(q, k, v, slopes, 0.25, initial_state=init, chunk_size=chunk_size)
    assert relative_error(o, ref_o) < 1e-12
    assert relative_error(s, ref_s) < 1e-12


@pytest.mark.parametrize("chunk_size", [64, 256, 1000])
def test_chunked_stays_finite_with_steep_slope_and_long_chunks(chunk_size, relative_error):
    q, k, v = _qkv(1000, 2, 8, seed=1, dtype=torch.float32)
    slopes = torch.tensor([2**-0.25, 2**-8])  # 0.8409 (head 0 of 32) and 0.0039 (head 31)
    o, s = lightning_chunked(q, k, v, slopes, 8**-0.5, chunk_size=chunk_size)
    ref_o, ref_s = lightning_recurrent(q.double(), k.double(), v.double(), slopes.double(), 8**-0.5)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert relative_error(o, ref_o) < 1e-5
    assert relative_error(s, ref_s) < 1e-5


@pytest.mark.parametrize("impl", [lightning_recurrent, lightning_chunked])
def test_state_carried_across_calls_equals_one_call(impl, relative_error):
    q, k, v = _qkv(150, 4, 16, seed=3)
    slopes = lightning_slopes(4)
    ref_o, ref_s = impl(q, k, v, slopes, 0.25)
    state, outs = None, []
    for a, b in [(0, 1), (1, 38), (38, 100), (100, 150)]:
        o, state = impl(q[a:b], k[a:b], v[a:b], slopes, 0.25, initial_state=state)
        outs.append(o)
    assert relative_error(torch.cat(outs), ref_o) < 1e-12
    assert relative_error(state, ref_s) < 1e-12


def test_state_is_fp32_for_fp32_inputs_and_fp64_for_fp64():
    for dtype in (torch.float32, torch.float64):
        q, k, v = _qkv(10, 2, 4, seed=0, dtype=dtype)
        for impl in (lightning_recurrent, lightning_chunked):
            o, s = impl(q, k, v, lightning_slopes(2), 0.5)
            assert o.dtype == dtype and s.dtype == dtype
