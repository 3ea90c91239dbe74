"""Tiny random MiniCPM-SALA checkpoint for tests (SPEC section 4).

`make_tiny(dir)` writes a complete Hugging Face checkpoint directory with the released model's
layout (both mixer kinds, first and last layers sparse, 2 kv heads for the sparse layers, untied
`lm_head`, every tensor name of SPEC section 1) at a few MB, plus a small byte-level BPE tokenizer
with MiniCPM's special and ChatML tokens. The same seed always gives byte-identical files.

Weight scales keep every activation of order one and the logits of order 1-10 (SPEC 4: bf16
error grows with logit size): see `_init_std`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sala_sglang.config import LINEAR_MIXER, SPARSE_MIXER, MiniCPMSALAConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_PATH = DATA_DIR / "tiny_corpus.txt"
TOKENIZER_PATH = DATA_DIR / "tiny_tokenizer.json"

# Ids 0..4, in this order (MiniCPM's ids for the first three).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
TINY_VOCAB_SIZE = 1280  # the tokenizer's exact size, a multiple of 64

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_S, _L = SPARSE_MIXER, LINEAR_MIXER

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["MiniCPMSALAForCausalLM"],
    "model_type": "minicpm_sala",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": BOS_ID,
    "eos_token_id": [EOS_ID, IM_END_ID],
    "pad_token_id": EOS_ID,
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.1,
    "intermediate_size": 512,
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "num_hidden_layers": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "lightning_nh": 4,
    "lightning_nkv": 4,
    "lightning_head_dim": 64,
    "lightning_use_rope": True,
    "lightning_scale": "1/sqrt(d)",
    "qk_norm": True,
    "use_output_norm": True,
    "use_output_gate": True,
    "attn_use_rope": False,
    "attn_use_output_gate": True,
    "mixer_types": [_S, _L, _L, _S, _L, _S],
    "sparse_config": {
        "kernel_size": 16,
        "kernel_stride": 8,
        "init_blocks": 1,
        "block_size": 16,
        "window_size": 64,
        "topk": 4,
        "use_nope": False,
        "dense_len": 256,
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "scale_emb": 12,
    "scale_depth": 1.4,
    "dim_model_base": 64,  # logits divided by 256 / 64 = 4 (the release divides by 16)
    "mup_denominator": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": TINY_VOCAB_SIZE,
}

# The released model's sparse-attention geometry on the tiny model: GQA group 16 (32 query heads
# over 2 kv heads), head_dim 128, 64-token blocks, compression kernel 32 / stride 16, so the serving
# kernels run with the tile shapes they run with on the real model. Top-k, window and dense_len
# are scaled down (6 selected blocks = 384 keys, dense_len 512) so that selection drops blocks
# within a few thousand tokens.
RELEASED_GEOMETRY: dict[str, Any] = {
    "num_attention_heads": 32,
    "head_dim": 128,
    "sparse_config": {
        **TINY_CONFIG["sparse_config"],
        "kernel_size": 32,
        "kernel_stride": 16,
        "block_size": 64,
        "window_size": 128,
        "topk": 4,
        "dense_len": 512,
    },
}
GEOMETRIES: dict[str, dict[str, Any]] = {"tiny": {}, "released": RELEASED_GEOMETRY}

GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": BOS_ID,
    "eos_token_id": [EOS_ID, IM_END_ID],
    "pad_token_id": EOS_ID,
    "do_sample": True,
    "temperature": 0.9,  # SPEC 1: recommended sampling
    "top_p": 1.0,
}

TOKENIZER_CONFIG: dict[str, Any] = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": SPECIAL_TOKENS[BOS_ID],
    "eos_token": SPECIAL_TOKENS[EOS_ID],
    "unk_token": SPECIAL_TOKENS[UNK_ID],
    "pad_token": SPECIAL_TOKENS[EOS_ID],
    "additional_special_tokens": [SPECIAL_TOKENS[IM_START_ID], SPECIAL_TOKENS[IM_END_ID]],
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": TINY_CONFIG["max_position_embeddings"],
    "chat_template": CHAT_TEMPLATE,
}

SPECIAL_TOKENS_MAP: dict[str, Any] = {
    key: TOKENIZER_CONFIG[key]
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
}

# Weight scales (see `_init_std`): the embedded token has RMS ~1 and the logits a standard
# deviation of ~LOGIT_STD. Projections have std gain / sqrt(fan_in) with gain 1, except in the
# sparse layers, where q and k are larger so attention is peaked enough for block selection to
# matter, and o_proj is larger so those layers weigh as much in the residual as the linear ones.
# Every norm weight is 1 + NORM_NOISE * N(0, 1).
EMBED_RMS = 1.0
LOGIT_STD = 1.5
SPARSE_GAINS = {"q_proj": 1.5, "k_proj": 1.5, "o_proj": 2.0}
NORM_NOISE = 0.05


def checkpoint_shapes(config: MiniCPMSALAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a MiniCPM-SALA checkpoint (SPEC 1) mapped to its shape."""
    h, v = config.hidden_size, config.vocab_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    lin_dim = config.lightning_nh * config.lightning_head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i, mixer in enumerate(config.mixer_types):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, config.intermediate_size)
        a = p + "self_attn."
        if mixer == SPARSE_MIXER:
            shapes[a + "q_proj.weight"] = (q_dim, h)
            shapes[a + "k_proj.weight"] = (kv_dim, h)
            shapes[a + "v_proj.weight"] = (kv_dim, h)
            shapes[a + "o_gate.weight"] = (q_dim, h)
            shapes[a + "o_proj.weight"] = (h, q_dim)
        else:
            for name in ("q_proj", "k_proj", "v_proj", "z_proj"):
                shapes[a + name + ".weight"] = (lin_dim, h)
            shapes[a + "o_proj.weight"] = (h, lin_dim)
            shapes[a + "q_norm.weight"] = (config.lightning_head_dim,)
            shapes[a + "k_norm.weight"] = (config.lightning_head_dim,)
            shapes[a + "o_norm.weight"] = (lin_dim,)
    return shapes


def _init_std(name: str, shape: tuple[int, ...], config: MiniCPMSALAConfig) -> float:
    """Standard deviation of the random weight `name` (norm weights are handled apart)."""
    if name == "model.embed_tokens.weight":
        return EMBED_RMS / config.scale_emb
    if name == "lm_head.weight":
        # The final RMSNorm output has RMS ~1 and is divided by logit_divisor before lm_head.
        return LOGIT_STD * config.logit_divisor / math.sqrt(config.hidden_size)
    layer, proj = int(name.split(".")[2]), name.split(".")[-2]
    gain = SPARSE_GAINS.get(proj, 1.0) if config.mixer_types[layer] == SPARSE_MIXER else 1.0
    return gain / math.sqrt(shape[1])


def random_weights(config: MiniCPMSALAConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random bf16 weights of every tensor of `config`, drawn in sorted name order."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in sorted(checkpoint_shapes(config).items()):
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) == 1:  # RMSNorm weights
            w = 1.0 + NORM_NOISE * noise
        else:
            w = _init_std(name, shape, config) * noise
        weights[name] = w.to(torch.bfloat16).contiguous()
    return weights


def train_tokenizer(corpus: Path = CORPUS_PATH, vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE trained on `corpus`; regenerates the shipped `data/tiny_tokenizer.json`.

    To refresh it: `train_tokenizer().save(str(TOKENIZER_PATH))`. `make_tiny` only copies the
    shipped file, so checkpoints do not depend on the installed `tokenizers` trainer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"tokenizer vocab_size = {vocab_size} is not reachable from {corpus}: training "
            f"stopped at {tok.get_vocab_size()} tokens; pass a smaller vocab_size or a larger "
            "corpus"
        )
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, BOS_ID)]
    )
    return tok


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def make_tiny(out_dir: str | Path, seed: int = 0, geometry: str = "tiny") -> Path:
    """Write the tiny random checkpoint (config, weights, tokenizer) into `out_dir`; return it.
    geometry: "tiny" (scaled-down attention) or "released" (RELEASED_GEOMETRY)."""
    from safetensors.torch import save

    if geometry not in GEOMETRIES:
        raise ValueError(f"make_tiny: geometry {geometry!r}; expected one of {sorted(GEOMETRIES)}")
    config = {**TINY_CONFIG, **GEOMETRIES[geometry]}
    weights = random_weights(MiniCPMSALAConfig(**config), seed)
    files = {
        "config.json": _json_bytes(config),
        "generation_config.json": _json_bytes(GENERATION_CONFIG),
        "model.safetensors": save(weights, metadata={"format": "pt"}),
        "special_tokens_map.json": _json_bytes(SPECIAL_TOKENS_MAP),
        "tokenizer.json": TOKENIZER_PATH.read_bytes(),
        "tokenizer_config.json": _json_bytes(TOKENIZER_CONFIG),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out
