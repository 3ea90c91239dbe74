"""Server options: what MiniCPM-SALA needs is filled in, what it cannot serve with is refused."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from sala_sglang import plugin  # noqa: E402
from sala_sglang.server_args import (  # noqa: E402
    UnsupportedServerOption,
    adjust_server_args,
    is_minicpm_sala,
)

# Caches, state stores and transfers that would lose the compressed keys or the recurrent states.
UNSUPPORTED_WITH_OR_WITHOUT_THE_PREFIX_CACHE = [
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
    (["--hicache-storage-backend", "file"], "--hicache-storage-backend file"),
    (["--radix-cache-backend", "mine"], "--radix-cache-backend mine"),
    (["--enable-lmcache"], "--enable-lmcache"),
    (["--enable-flexkv"], "--enable-flexkv"),
    (["--enable-int8-mamba-checkpoint"], "--enable-int8-mamba-checkpoint"),
    (["--enable-linear-replayssm"], "--enable-linear-replayssm"),
    (["--enable-gdn-replayssm-spec"], "--enable-gdn-replayssm-spec"),
    (["--enable-unified-memory"], "--enable-unified-memory"),
    (["--disaggregation-mode", "prefill"], "--disaggregation-mode prefill"),
    (["--disaggregation-mode", "decode"], "--disaggregation-mode decode"),
]


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


@pytest.fixture()
def gpu_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """ServerArgs as on a GPU machine: the prefix cache's extra_buffer strategy asserts CUDA."""
    import sglang.srt.server_args as sglang_server_args

    from sala_sglang import server_args as ours

    monkeypatch.setattr(ours, "_gpu_visible", lambda: True)
    monkeypatch.setattr(sglang_server_args, "is_cuda", lambda: True)


def test_prefix_cache_is_on_with_state_snapshots_in_extra_slots(
    tiny_dir: Path, gpu_visible: None
) -> None:
    args = server_args(tiny_dir)
    assert args.disable_radix_cache is False
    assert args.uses_mamba_radix_cache is True
    assert args.mamba_radix_cache_strategy == "extra_buffer"
    assert args.enable_mamba_extra_buffer()


def test_an_explicit_extra_buffer_strategy_is_kept(tiny_dir: Path, gpu_visible: None) -> None:
    args = server_args(tiny_dir, "--mamba-radix-cache-strategy", "extra_buffer")
    assert args.mamba_radix_cache_strategy == "extra_buffer" and args.uses_mamba_radix_cache


def test_disable_radix_cache_still_turns_it_off(tiny_dir: Path, gpu_visible: None) -> None:
    args = server_args(tiny_dir, "--disable-radix-cache")
    assert args.disable_radix_cache is True
    assert args.uses_mamba_radix_cache is False
    assert not args.enable_mamba_extra_buffer()


def test_without_a_gpu_the_prefix_cache_is_off(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sala_sglang import server_args as ours

    monkeypatch.setattr(ours, "_gpu_visible", lambda: False)
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
        (["--speculative-algorithm", "EAGLE"],
         "--speculative-algorithm EAGLE: MiniCPM-SALA has no draft model; use .*NGRAM"),
        (["--speculative-algorithm", "NGRAM", "--speculative-ngram-max-bfs-breadth", "4"],
         "--speculative-ngram-max-bfs-breadth 4: .* chain drafts"),
        # the tiny checkpoint's kernel_size 16 allows chains of up to 14 (the released one's 16)
        (["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "15"],
         "--speculative-num-draft-tokens 15: .* chains of 2 to 14 tokens"),
        (["--tp-size", "3"], "--tp-size 3"),
        (["--tp-size", "4"], "--tp-size 4: it must divide num_key_value_heads"),
        (["--pp-size", "2"], "--pp-size 2"),
        (["--enable-dp-attention", "--dp-size", "2", "--tp-size", "2"], "--enable-dp-attention"),
        (["--attention-backend", "triton"], "--attention-backend triton"),
        (["--chunked-prefill-size", "200"], "--chunked-prefill-size 200: .* use 192 or 208"),
        (["--prefill-attention-backend", "triton"], "--prefill-attention-backend triton"),
        (["--decode-attention-backend", "triton"], "--decode-attention-backend triton"),
        *UNSUPPORTED_WITH_OR_WITHOUT_THE_PREFIX_CACHE,
    ],
)
def test_unsupported_option_is_refused_by_name(
    tiny_dir: Path, gpu_visible: None, flags: list, message: str
) -> None:
    with pytest.raises(UnsupportedServerOption, match=message):
        server_args(tiny_dir, *flags)


@pytest.mark.parametrize("flags, message", UNSUPPORTED_WITH_OR_WITHOUT_THE_PREFIX_CACHE)
def test_unsupported_option_is_refused_without_the_prefix_cache_too(
    tiny_dir: Path, gpu_visible: None, flags: list, message: str
) -> None:
    with pytest.raises(UnsupportedServerOption, match=f"{message}.*; drop it|{message}.*server$"):
        server_args(tiny_dir, "--disable-radix-cache", *flags)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--enable-mixed-chunk"], "--enable-mixed-chunk: .*snapshots"),
        (["--enable-streaming-session"], "--enable-streaming-session"),
        (["--mamba-radix-cache-strategy", "no_buffer"],
         "--mamba-radix-cache-strategy no_buffer: it needs --page-size 1"),
        (["--mamba-radix-cache-strategy", "extra_buffer_lazy"],
         "--mamba-radix-cache-strategy extra_buffer_lazy"),
    ],
)
def test_prefix_cache_clash_is_refused_and_allowed_without_it(
    tiny_dir: Path, gpu_visible: None, flags: list, message: str
) -> None:
    with pytest.raises(UnsupportedServerOption, match=f"{message}.*add --disable-radix-cache"):
        server_args(tiny_dir, *flags)
    assert server_args(tiny_dir, "--disable-radix-cache", *flags).disable_radix_cache is True


def test_cpp_radix_tree_is_refused_with_the_prefix_cache(
    tiny_dir: Path, gpu_visible: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGLANG_EXPERIMENTAL_CPP_RADIX_TREE", "1")
    with pytest.raises(UnsupportedServerOption,
                       match="SGLANG_EXPERIMENTAL_CPP_RADIX_TREE=1: .*unset it, or add "
                             "--disable-radix-cache"):
        server_args(tiny_dir)
    assert server_args(tiny_dir, "--disable-radix-cache").disable_radix_cache is True


def test_the_track_interval_must_be_on_the_state_chunks(tiny_dir: Path, gpu_visible: None) -> None:
    with pytest.raises(UnsupportedServerOption,
                       match="--mamba-track-interval 100: .* multiple of 64; use 64 or 128$"):
        server_args(tiny_dir, "--mamba-track-interval", "100")
    assert server_args(tiny_dir, "--mamba-track-interval", "128").mamba_track_interval == 128
    # Without the prefix cache nothing is snapshot, so the interval is not read.
    assert server_args(tiny_dir, "--disable-radix-cache", "--mamba-track-interval", "100")


@pytest.mark.parametrize("cache", [[], ["--disable-radix-cache"]], ids=["cache", "no-cache"])
def test_ngram_drafts_are_verified_as_chains(tiny_dir: Path, gpu_visible: None,
                                             cache: list) -> None:
    args = server_args(tiny_dir, *cache, "--speculative-algorithm", "NGRAM",
                       "--speculative-num-draft-tokens", "6")
    assert args.speculative_algorithm == "NGRAM"
    assert args.speculative_ngram_max_bfs_breadth == args.speculative_eagle_topk == 1
    assert args.speculative_num_draft_tokens == 6
    assert args.disable_radix_cache is bool(cache)


@pytest.fixture()
def block_64_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint directory whose config pages by the released model's 64-token blocks."""
    config = {"model_type": "minicpm_sala", "sparse_config": {"block_size": 64}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def adjusted(model_dir: Path, **options) -> SimpleNamespace:
    """ServerArgs-like options after `adjust_server_args`, SGLang's defaults for the rest."""
    defaults = {"page_size": None, "chunked_prefill_size": None, "attention_backend": None,
                "disable_radix_cache": False, "disaggregation_mode": "null"}
    args = SimpleNamespace(model_path=str(model_dir), **{**defaults, **options})
    adjust_server_args(args)
    return args


def test_chunked_prefill_size_off_the_blocks_names_the_nearest_multiples(
    block_64_checkpoint: Path,
) -> None:
    with pytest.raises(UnsupportedServerOption) as refused:
        adjusted(block_64_checkpoint, chunked_prefill_size=200)
    assert str(refused.value) == (
        "--chunked-prefill-size 200: MiniCPM-SALA pages its KV cache in blocks of 64 tokens, so "
        "it must be a multiple of 64; use 192 or 256"
    )
    with pytest.raises(UnsupportedServerOption, match="--chunked-prefill-size 40: .*; use 64$"):
        adjusted(block_64_checkpoint, chunked_prefill_size=40)


@pytest.mark.parametrize("size", [None, -1, 64, 8192])
def test_chunked_prefill_size_on_the_blocks_or_off_is_kept(
    block_64_checkpoint: Path, size: int | None
) -> None:
    args = adjusted(block_64_checkpoint, chunked_prefill_size=size)
    assert args.chunked_prefill_size == size and args.page_size == 64


def test_the_track_interval_rule_names_the_64_token_grid(
    block_64_checkpoint: Path, gpu_visible: None
) -> None:
    with pytest.raises(UnsupportedServerOption) as refused:
        adjusted(block_64_checkpoint, mamba_track_interval=200)
    assert str(refused.value) == (
        "--mamba-track-interval 200: MiniCPM-SALA snapshots recurrent states on a 64-token grid "
        "(SGLang's state chunk and the KV page), so it must be a multiple of 64; use 192 or 256"
    )


def test_other_models_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    args = adjusted(tmp_path, chunked_prefill_size=200, enable_hierarchical_cache=True)
    assert args.page_size is None and args.attention_backend is None


@pytest.fixture()
def root_logging():
    """Puts the root logger back: `prepare_server_args` reconfigures it (basicConfig, force)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level


def test_launcher_reports_an_unsupported_option_in_one_line(
    tiny_dir: Path, capsys: pytest.CaptureFixture, root_logging: None
) -> None:
    # The launchers' own parse path, in process: `python -m sglang.launch_server` and `sglang
    # serve` call this same prepare_server_args (the registry rebinds their imported name).
    import sglang.launch_server
    from sglang.srt import server_args as sglang_server_args

    assert sglang.launch_server.prepare_server_args is sglang_server_args.prepare_server_args
    with pytest.raises(SystemExit) as exited:
        sglang_server_args.prepare_server_args(
            ["--model-path", str(tiny_dir), "--device", "cpu", "--chunked-prefill-size", "200"]
        )
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --chunked-prefill-size 200: MiniCPM-SALA pages its KV cache in blocks of 16 "
        "tokens, so it must be a multiple of 16; use 192 or 208"
    ]


def test_server_args_built_in_code_still_raise(tiny_dir: Path) -> None:
    from sglang.srt.server_args import ServerArgs

    with pytest.raises(UnsupportedServerOption, match="--chunked-prefill-size 200"):
        ServerArgs(model_path=str(tiny_dir), device="cpu", chunked_prefill_size=200)
