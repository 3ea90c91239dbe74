"""Server options: what MiniCPM-SALA needs is filled in, what it cannot serve with is refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from sala_sglang import plugin  # noqa: E402
from sala_sglang.server_args import UnsupportedServerOption, is_minicpm_sala  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sala_sglang.tiny import make_tiny

    plugin.register()
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def server_args(model_dir: Path, *extra: str):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", str(model_dir), "--device", "cpu", *extra])
    return ServerArgs.from_cli_args(args)


def test_recognises_a_minicpm_sala_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    assert is_minicpm_sala(str(tiny_dir))
    assert not is_minicpm_sala(str(tmp_path))
    assert not is_minicpm_sala(None)


def test_radix_cache_is_turned_off_for_this_model(tiny_dir: Path) -> None:
    assert server_args(tiny_dir).disable_radix_cache is True


def test_our_backend_is_the_default(tiny_dir: Path) -> None:
    assert server_args(tiny_dir).attention_backend == "minicpm_flashinfer"


def test_kv_pages_are_sparse_blocks(tiny_dir: Path) -> None:
    block_size = json.loads((tiny_dir / "config.json").read_text())["sparse_config"]["block_size"]
    assert server_args(tiny_dir).page_size == block_size
    assert server_args(tiny_dir, "--page-size", str(block_size)).page_size == block_size


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--page-size", "1"], "--page-size 1"),
        (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
        (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm EAGLE"),
        (["--tp-size", "3"], "--tp-size 3"),
        (["--tp-size", "4"], "--tp-size 4: it must divide num_key_value_heads"),
        (["--pp-size", "2"], "--pp-size 2"),
        (["--enable-dp-attention", "--dp-size", "2", "--tp-size", "2"], "--enable-dp-attention"),
        (["--attention-backend", "triton"], "--attention-backend triton"),
    ],
)
def test_unsupported_option_is_refused_by_name(tiny_dir: Path, flags: list, message: str) -> None:
    with pytest.raises(UnsupportedServerOption, match=message):
        server_args(tiny_dir, *flags)
