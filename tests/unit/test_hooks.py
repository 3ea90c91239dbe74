"""Pool sizing counts the compressed keys that live beside each KV page."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sala_sglang.config import MiniCPMSALAConfig
from sala_sglang.hooks import add_compressed_keys_to_cell_size, compressed_key_bytes_per_token


def test_released_model_adds_a_sixteenth_of_k() -> None:
    # 8 layers x 2 kv heads x 128 x (K + V) x 2 B = 8 KiB/token; K1 = 1/16 of K.
    assert compressed_key_bytes_per_token(MiniCPMSALAConfig().sparse, 8192) == 256


def test_hook_adds_compressed_keys_only_for_minicpm_sala() -> None:
    ours = SimpleNamespace(model_config=SimpleNamespace(hf_config=MiniCPMSALAConfig()))
    other = SimpleNamespace(model_config=SimpleNamespace(hf_config=object()))
    assert add_compressed_keys_to_cell_size(8192, None, ours, 8) == 8192 + 256
    assert add_compressed_keys_to_cell_size(8192, None, other, 8) == 8192


def test_sglang_pool_configurator_uses_the_hook() -> None:
    pytest.importorskip("sglang")
    from sala_sglang import plugin

    plugin.register()
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    fn = DefaultPoolConfigurator._compute_cell_size
    assert "add_compressed_keys_to_cell_size" in repr(getattr(fn, "__wrapped__", fn)) or any(
        "add_compressed_keys_to_cell_size" in repr(c.cell_contents)
        for c in (fn.__closure__ or ())
        if hasattr(c, "cell_contents")
    )
