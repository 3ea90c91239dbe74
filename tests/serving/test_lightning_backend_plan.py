"""The lightning backend plans each forward from host facts and what it read once when built."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from sglang.srt.layers.attention.hybrid_linear_attn_backend import (  # noqa: E402
    MambaAttnBackendBase,
)

from sala_sglang.attention import lightning_backend  # noqa: E402
from sala_sglang.ops._cuda import DeviceFacts  # noqa: E402

GPU = DeviceFacts(name="cuda:0", multiprocessors=132, compiled=True)


def build(monkeypatch: pytest.MonkeyPatch, make_tiny_config) -> lightning_backend.LightningBackend:
    """The backend over a stand-in model runner: SGLang's base sets only what the plan reads."""

    def base_init(self, runner) -> None:
        self.device, self.topk = runner.device, 0

    monkeypatch.setattr(MambaAttnBackendBase, "__init__", base_init)
    monkeypatch.setattr(lightning_backend, "get_parallel",
                        lambda: SimpleNamespace(attn_tp_size=1, attn_tp_rank=0))
    runner = SimpleNamespace(device="cpu", server_args=SimpleNamespace(speculative_algorithm=None),
                             model_config=SimpleNamespace(hf_config=make_tiny_config()))
    return lightning_backend.LightningBackend(runner)


def batch(extend: bool, requests: int, tokens: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(batch_size=requests, extend_num_tokens=tokens,
                           forward_mode=SimpleNamespace(is_extend=lambda: extend))


def test_extend_is_planned_by_tokens_and_decode_by_requests(monkeypatch, make_tiny_config) -> None:
    backend = build(monkeypatch, make_tiny_config)  # 4 heads of 16 on the CPU: one segment
    backend._plan(batch(extend=True, requests=3, tokens=300))
    assert backend.plan.segment_len == 320
    backend._plan(batch(extend=False, requests=3))
    assert backend.plan.segment_len == 64
    assert backend.plan.decode_impl == "triton"


@pytest.mark.parametrize(("variable", "decode"), [("", "cuda"), ("triton", "triton")])
def test_kernel_overrides_are_read_once_when_the_backend_is_built(
    monkeypatch, make_tiny_config, variable: str, decode: str
) -> None:
    monkeypatch.setenv("SALA_SGLANG_KERNELS", variable)
    backend = build(monkeypatch, make_tiny_config)
    backend.device_facts, backend.head_dim = GPU, 128  # as if on a GPU, with a compiled head dim
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda" if variable else "triton")  # read no more
    backend._plan(batch(extend=False, requests=8))
    assert backend.plan.decode_impl == decode
