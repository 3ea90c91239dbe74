"""MiniCPMSALAConfig: the released config.json parses, derived values, and every validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sala_sglang.config import (
    LINEAR_MIXER,
    RELEASED_CONFIG_PATH,
    SPARSE_MIXER,
    ConfigError,
    MiniCPMSALAConfig,
)

RELEASED = json.loads(RELEASED_CONFIG_PATH.read_text())


def released(**changes) -> dict:
    raw = copy.deepcopy(RELEASED)
    raw.update(changes)
    return raw


def with_sparse(**changes) -> dict:
    raw = copy.deepcopy(RELEASED)
    raw["sparse_config"].update(changes)
    return raw


def test_released_config_parses_with_its_layer_split() -> None:
    cfg = MiniCPMSALAConfig(**RELEASED)
    assert cfg.sparse_layer_ids == [0, 9, 16, 17, 22, 29, 30, 31]
    assert cfg.full_attention_layer_ids == cfg.sparse_layer_ids
    assert len(cfg.linear_layer_ids) == 24
    assert sorted(cfg.sparse_layer_ids + cfg.linear_layer_ids) == list(range(32))


def test_released_config_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    MiniCPMSALAConfig(**RELEASED).save_pretrained(tmp_path)
    again = MiniCPMSALAConfig.from_pretrained(tmp_path)
    assert again.mixer_types == MiniCPMSALAConfig(**RELEASED).mixer_types
    assert again.sparse_config == RELEASED["sparse_config"]
    assert again.eos_token_id == [2, 73440]


def test_defaults_are_the_released_model() -> None:
    default, real = MiniCPMSALAConfig(), MiniCPMSALAConfig(**RELEASED)
    for field in ("hidden_size", "vocab_size", "mixer_types", "sparse_config", "head_dim"):
        assert getattr(default, field) == getattr(real, field)


def test_derived_sparse_geometry_of_the_released_model() -> None:
    sp = MiniCPMSALAConfig(**RELEASED).sparse
    assert (sp.windows_per_block, sp.local_blocks, sp.num_selected_blocks) == (4, 32, 96)
    assert sp.max_sparse_keys == 6144
    assert [sp.num_k1(n) for n in (0, 31, 32, 47, 48)] == [0, 0, 1, 1, 2]


def test_mup_scales() -> None:
    cfg = MiniCPMSALAConfig(**RELEASED)
    assert cfg.residual_scale == pytest.approx(1.4 / 32**0.5)
    assert cfg.logit_divisor == 16


def test_recurrent_state_is_48_mib_per_request_in_fp32() -> None:
    cfg = MiniCPMSALAConfig(**RELEASED)
    assert cfg.linear_state_shape() == (32, 128, 128)
    assert cfg.linear_state_shape(tp_size=2) == (16, 128, 128)
    assert cfg.linear_state_bytes_per_request() == 48 * 2**20


def test_mamba2_cache_params_for_sglang() -> None:
    pytest.importorskip("sglang")
    params = MiniCPMSALAConfig(**RELEASED).mamba2_cache_params
    assert params.layers == MiniCPMSALAConfig(**RELEASED).linear_layer_ids
    assert tuple(params.shape.temporal) == (32, 128, 128)
    assert params.mamba_cache_per_req == 48 * 2**20  # no conv state for lightning layers


@pytest.mark.parametrize(
    "alias, canonical",
    [("lightning_attn", LINEAR_MIXER), ("Lightning", LINEAR_MIXER), ("sparse", SPARSE_MIXER)],
)
def test_mixer_aliases_are_normalised(alias: str, canonical: str) -> None:
    mixers = list(RELEASED["mixer_types"])
    mixers[1] = alias
    assert MiniCPMSALAConfig(**released(mixer_types=mixers)).mixer_types[1] == canonical


@pytest.mark.parametrize(
    "raw, message",
    [
        (released(mixer_types=["minicpm4"] * 31),
         r"'mixer_types' has 31 entries but num_hidden_layers = 32"),
        (released(mixer_types=["minicpm4"] * 31 + ["mamba"]),
         r"'mixer_types\[31\]' = 'mamba' is not a known mixer"),
        (released(mixer_types="minicpm4"), r"'mixer_types' = 'minicpm4': expected a list"),
        (released(num_attention_heads=31),
         r"'num_attention_heads' = 31 is not divisible by 'num_key_value_heads' = 2"),
        (released(lightning_nkv=8), r"'lightning_nkv' = 8 differs from 'lightning_nh' = 32"),
        (released(hidden_size=0), r"'hidden_size' = 0: expected a positive integer"),
        (released(hidden_act="gelu"), r"'hidden_act' = 'gelu'"),
        (released(attn_use_rope=True), r"'attn_use_rope' = true is not supported"),
        (released(lightning_scale="1"), r"'lightning_scale' = '1'"),
        (released(scale_depth=-1), r"'scale_depth' = -1: expected a positive number"),
        (released(sparse_config=[1, 2]), r"'sparse_config' = \[1, 2\]: expected an object"),
        (with_sparse(window_size=2000),
         r"'sparse_config.window_size' = 2000 is not a multiple of block_size = 64"),
        (with_sparse(block_size=72),
         r"'sparse_config.block_size' = 72 is not a multiple of kernel_stride = 16"),
        (with_sparse(kernel_size=40),
         r"'sparse_config.kernel_size' = 40 is not a multiple of kernel_stride = 16"),
        (with_sparse(kernel_size=8),
         r"'sparse_config.kernel_size' = 8 is smaller than kernel_stride = 16"),
        (with_sparse(topk=1), r"'sparse_config.topk' = 1 must be at least init_blocks \+ 1 = 2"),
        (with_sparse(topk=0), r"'sparse_config.topk' = 0: expected a positive integer"),
        (with_sparse(dense_len=-5), r"'sparse_config.dense_len' = -5: expected an integer >= 0"),
        (with_sparse(use_nope="no"), r"'sparse_config.use_nope' = 'no': expected true or false"),
        (with_sparse(use_nope=True), r"'sparse_config.use_nope' = true is not supported"),
    ],
)
def test_invalid_config_names_field_value_and_remedy(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MiniCPMSALAConfig(**raw)


def test_missing_sparse_config_keys_are_listed() -> None:
    raw = copy.deepcopy(RELEASED)
    del raw["sparse_config"]["topk"], raw["sparse_config"]["dense_len"]
    with pytest.raises(ConfigError, match="'sparse_config' is missing topk, dense_len"):
        MiniCPMSALAConfig(**raw)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_tp_size_that_does_not_divide_heads_is_rejected() -> None:
    with pytest.raises(ConfigError,
                       match="tensor parallel size 3 does not divide lightning_nh = 32"):
        MiniCPMSALAConfig(**RELEASED).linear_state_shape(tp_size=3)
