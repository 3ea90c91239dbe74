"""The lightning plan's rules (host only): which decode kernel runs, and how a prefill is cut into
parallel segments."""

from __future__ import annotations

import pytest

from sala_sglang.ops._cuda import DeviceFacts
from sala_sglang.ops.lightning_plan import plan_lightning, prefill_segment_len
from sala_sglang.ops.overrides import KernelOverrides

H100 = DeviceFacts(name="cuda:0", multiprocessors=132, compiled=True)
H100_WITHOUT_EXTENSION = DeviceFacts(name="cuda:0", multiprocessors=132, compiled=False)
CPU = DeviceFacts.of("cpu")
HEADS, DIM = 32, 128  # the released checkpoint's lightning geometry


def decode_impl(device: DeviceFacts, head_dim: int = DIM, prefer: str | None = None) -> str:
    return plan_lightning(1, 1, HEADS, head_dim, device, prefer).decode_impl


def test_decode_takes_cuda_where_it_can_run() -> None:
    assert decode_impl(H100) == "cuda"


@pytest.mark.parametrize(("device", "head_dim"), [(H100_WITHOUT_EXTENSION, DIM), (CPU, DIM),
                                                  (H100, 48)])
def test_decode_takes_triton_where_cuda_cannot_run(device: DeviceFacts, head_dim: int) -> None:
    assert decode_impl(device, head_dim) == "triton"


@pytest.mark.parametrize(("variable", "device", "expected"), [
    ("triton", H100, "triton"),
    ("cuda", H100, "cuda"),
    ("cuda", H100_WITHOUT_EXTENSION, "triton"),  # forced where it can run, as for every op
    ("", H100, "cuda"),
])
def test_kernels_variable_forces_decode_where_it_can_run(variable: str, device: DeviceFacts,
                                                         expected: str) -> None:
    prefer = KernelOverrides.from_env({"SALA_SGLANG_KERNELS": variable}).impl
    assert decode_impl(device, prefer=prefer) == expected


def test_plan_names_an_unknown_preference() -> None:
    with pytest.raises(ValueError, match="prefer='fast'; expected 'cuda', 'triton' or None"):
        decode_impl(H100, prefer="fast")


def test_device_facts_of_the_cpu() -> None:
    assert (CPU.multiprocessors, CPU.compiled) == (0, False)
    assert CPU.why_not_compiled() == "sala_sglang._C is not built or the tensors are on cpu"


@pytest.mark.parametrize(("multiprocessors", "segment_len"), [
    (132, 14592),  # 528 programs wanted, 64 per segment: 9 segments of 228 chunks
    (78, 26240),  # 312 programs: 5 segments of 410 chunks
    (16, 131072),  # 64 programs: one segment fills them
])
def test_segments_fill_the_device_for_one_long_prompt(multiprocessors: int,
                                                      segment_len: int) -> None:
    assert prefill_segment_len(131072, 1, HEADS, DIM, multiprocessors) == segment_len


def test_segments_are_at_least_four_chunks() -> None:
    assert prefill_segment_len(300, 1, HEADS, DIM, 132) == 4 * 64


def test_a_batch_that_fills_the_device_keeps_one_segment_per_sequence() -> None:
    # 16 sequences x 32 heads x 2 value blocks = 1024 programs >= 4 x 132
    assert prefill_segment_len(20000, 16, HEADS, DIM, 132) == 20032


@pytest.mark.parametrize(("tokens", "batch"), [(1000, 2), (0, 0)])
def test_without_a_gpu_prefill_runs_one_segment(tokens: int, batch: int) -> None:
    assert prefill_segment_len(tokens, batch, HEADS, DIM, 0) == max(-(-tokens // 64), 1) * 64


def test_plan_of_a_batch_carries_its_segment_length() -> None:
    plan = plan_lightning(131072, 1, HEADS, DIM, H100)
    assert plan.segment_len == prefill_segment_len(131072, 1, HEADS, DIM, 132)
