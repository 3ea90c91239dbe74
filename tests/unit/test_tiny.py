"""The tiny random test checkpoint: released layout at small sizes, deterministic, loads offline."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sala_sglang.cli import main
from sala_sglang.config import LINEAR_MIXER, RELEASED_CONFIG_PATH, SPARSE_MIXER, MiniCPMSALAConfig
from sala_sglang.tiny import DATA_DIR, TINY_CONFIG, make_tiny

CHECKPOINT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def weights(tiny) -> dict[str, torch.Tensor]:
    return load_file(str(tiny / "model.safetensors"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny, local_files_only=True)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---- determinism ---------------------------------------------------------------------------


def test_same_seed_writes_byte_identical_files(tiny, tmp_path):
    again = _files(make_tiny(tmp_path / "again", seed=0))
    assert set(again) == CHECKPOINT_FILES
    assert again == _files(tiny)


def test_different_seed_changes_every_weight_and_nothing_else(tiny, weights, tmp_path):
    other = make_tiny(tmp_path / "seed1", seed=1)
    other_weights = load_file(str(other / "model.safetensors"))
    assert set(other_weights) == set(weights)
    for name, w in weights.items():
        assert not torch.equal(w, other_weights[name]), name
    for name in CHECKPOINT_FILES - {"model.safetensors"}:
        assert (other / name).read_bytes() == (tiny / name).read_bytes(), name


# ---- config --------------------------------------------------------------------------------


def test_config_has_every_field_of_the_released_config(tiny):
    written = json.loads((tiny / "config.json").read_text())
    released = json.loads(RELEASED_CONFIG_PATH.read_text())
    assert written == TINY_CONFIG
    assert set(written) == set(released)
    assert written["architectures"] == ["MiniCPMSALAForCausalLM"]
    assert written["model_type"] == "minicpm_sala"


def test_config_loads_with_both_mixer_kinds_first_and_last_layers_sparse(tiny):
    config = MiniCPMSALAConfig.from_pretrained(tiny)
    assert config.num_hidden_layers == len(config.mixer_types) == 6
    assert set(config.mixer_types) == {SPARSE_MIXER, LINEAR_MIXER}
    assert config.mixer_types[0] == config.mixer_types[-1] == SPARSE_MIXER
    assert config.num_key_value_heads == 2 < config.num_attention_heads
    assert config.lightning_nh == config.lightning_nkv
    assert config.tie_word_embeddings is False
    assert config.bos_token_id == 1 and config.pad_token_id == 2
    assert config.eos_token_id == [2, 4]


def test_sparse_config_drops_blocks_at_a_few_thousand_tokens(tiny):
    sparse = MiniCPMSALAConfig.from_pretrained(tiny).sparse
    assert sparse.to_dict() == {
        "kernel_size": 16,
        "kernel_stride": 8,
        "init_blocks": 1,
        "block_size": 16,
        "window_size": 64,
        "topk": 4,
        "use_nope": False,
        "dense_len": 256,
    }
    assert sparse.max_sparse_keys == 128  # (topk + window / block) blocks of 16 tokens
    assert sparse.dense_len < 2000


def test_config_loads_through_autoconfig(tiny):
    from transformers import AutoConfig

    AutoConfig.register("minicpm_sala", MiniCPMSALAConfig, exist_ok=True)
    config = AutoConfig.from_pretrained(tiny, local_files_only=True)
    assert isinstance(config, MiniCPMSALAConfig)
    assert config.max_position_embeddings >= 65536


def test_generation_config_samples_at_temperature_0_9(tiny):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(tiny, local_files_only=True)
    assert gen.do_sample is True and gen.temperature == 0.9
    assert gen.bos_token_id == 1 and gen.eos_token_id == [2, 4]


# ---- weights -------------------------------------------------------------------------------


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """SPEC section 1's tensor list at the tiny sizes, written out independently of tiny.py."""
    h, inter, v = 256, 512, 1280
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(6):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        a = p + "self_attn."
        if i in (0, 3, 5):  # sparse: 8 query heads, 2 kv heads, head_dim 64
            shapes |= {
                a + "q_proj.weight": (512, h),
                a + "k_proj.weight": (128, h),
                a + "v_proj.weight": (128, h),
                a + "o_gate.weight": (512, h),
                a + "o_proj.weight": (h, 512),
            }
        else:  # linear: 4 heads of 64
            shapes |= {
                a + "q_proj.weight": (256, h),
                a + "k_proj.weight": (256, h),
                a + "v_proj.weight": (256, h),
                a + "z_proj.weight": (256, h),
                a + "o_proj.weight": (h, 256),
                a + "q_norm.weight": (64,),
                a + "k_norm.weight": (64,),
                a + "o_norm.weight": (256,),
            }
    return shapes


def test_weights_have_exactly_the_released_tensor_names_and_shapes(weights):
    assert {name: tuple(w.shape) for name, w in weights.items()} == _expected_shapes()


def test_weights_are_bf16_with_norm_weights_near_one(weights):
    for name, w in weights.items():
        assert w.dtype == torch.bfloat16, name
        assert torch.isfinite(w.float()).all(), name
        if w.dim() == 1:
            assert (w.float() - 1).abs().max() < 0.5, name


def test_checkpoint_is_a_few_megabytes(tiny):
    assert (tiny / "model.safetensors").stat().st_size < 16 * 2**20


def test_logits_are_of_order_one_to_ten(tiny):
    from sala_sglang.reference import ReferenceModel

    model = ReferenceModel.from_pretrained(tiny, dtype=torch.float32)
    ids = torch.randint(5, 1280, (200,), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    assert 0.5 < logits.abs().mean() < 3
    assert 2 < logits.abs().max() < 12


def test_sparse_selection_changes_logits_beyond_128_tokens(tiny):
    from sala_sglang.reference import ReferenceModel

    sparse = ReferenceModel.from_pretrained(tiny, dtype=torch.float32, dense_as_sparse=True)
    dense = ReferenceModel.from_pretrained(tiny, dtype=torch.float32, dense_len=10**9)
    ids = torch.randint(5, 1280, (400,), generator=torch.Generator().manual_seed(0))
    a, b = sparse(ids), dense(ids)
    assert torch.allclose(a[:128], b[:128], atol=1e-4)  # at most 8 blocks of 16: sparse == dense
    assert (a[-1] - b[-1]).norm() > 0.1 * b[-1].norm()


# ---- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_size_equals_vocab_size(tiny, tokenizer):
    assert len(tokenizer) == MiniCPMSALAConfig.from_pretrained(tiny).vocab_size


def test_tokenizer_has_minicpm_special_tokens(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2, 3, 4]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 2


@pytest.mark.parametrize(
    "text",
    [
        "The keeper walked out to the lighthouse before the sun went down.",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "Numbers 12345, symbols #@%&, and unicode: café, naïve, 東京, 🙂",
    ],
)
def test_tokenizer_round_trips_text_after_a_bos(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_keeps_chat_markers_as_single_tokens(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == 3 and ids[-1] == 4


def test_chat_template_produces_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hello!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")


def test_tokenizer_and_corpus_ship_inside_the_package():
    assert (DATA_DIR / "tiny_tokenizer.json").is_file()
    assert (DATA_DIR / "tiny_corpus.txt").is_file()
    assert DATA_DIR.parent.name == "sala_sglang"


# ---- command line --------------------------------------------------------------------------


def test_cli_make_tiny_writes_the_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["make-tiny", str(out)]) == 0
    assert _files(out) == _files(tiny)
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "parameters" in printed


def test_python_m_sala_sglang_make_tiny_with_seed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "module"
    monkeypatch.setattr(sys, "argv", ["sala_sglang", "make-tiny", str(out), "--seed", "3"])
    with pytest.raises(SystemExit) as exited:  # what `python -m sala_sglang ...` runs
        runpy.run_module("sala_sglang", run_name="__main__")
    assert exited.value.code == 0
    assert set(p.name for p in out.iterdir()) == CHECKPOINT_FILES
    assert "seed 3" in capsys.readouterr().out


def test_the_released_geometry_checkpoint_has_the_real_attention_shapes(tmp_path) -> None:
    from sala_sglang.config import MiniCPMSALAConfig

    config = MiniCPMSALAConfig.from_pretrained(make_tiny(tmp_path, geometry="released"))
    assert config.num_attention_heads // config.num_key_value_heads == 16
    assert config.head_dim == 128
    sparse = config.sparse
    assert (sparse.block_size, sparse.kernel_size, sparse.kernel_stride) == (64, 32, 16)
    assert sparse.max_sparse_keys < sparse.dense_len  # selection drops blocks past dense_len
    with pytest.raises(ValueError, match="geometry 'huge'"):
        make_tiny(tmp_path, geometry="huge")
