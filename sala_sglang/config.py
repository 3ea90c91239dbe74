"""MiniCPM-SALA configuration: parses and validates the released config.json (SPEC section 1).

Besides the raw fields, the config derives what the rest of the package needs: which layers are
sparse (InfLLM-v2) and which are linear (Lightning), the per-request recurrent-state shape, the
InfLLM-v2 block geometry, and the properties SGLang's hybrid memory reads
(`full_attention_layer_ids`, `linear_layer_ids`, `mamba2_cache_params`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # transformers 5 renamed the base class; both names exist in 5.x
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

# The released checkpoint's config.json, shipped for benchmarks on random weights and for tests.
RELEASED_CONFIG_PATH = Path(__file__).resolve().parent / "data" / "minicpm_sala_config.json"

SPARSE_MIXER = "minicpm4"
LINEAR_MIXER = "lightning-attn"

# Spellings seen in configs and ports, mapped to the two canonical mixer names.
MIXER_ALIASES: dict[str, str] = {
    "minicpm4": SPARSE_MIXER,
    "minicpm": SPARSE_MIXER,
    "sparse": SPARSE_MIXER,
    "infllmv2": SPARSE_MIXER,
    "infllm_v2": SPARSE_MIXER,
    "infllm-v2": SPARSE_MIXER,
    "lightning-attn": LINEAR_MIXER,
    "lightning_attn": LINEAR_MIXER,
    "lightning": LINEAR_MIXER,
    "lightning_attention": LINEAR_MIXER,
    "linear": LINEAR_MIXER,
}

SPARSE_CONFIG_KEYS = (
    "kernel_size",
    "kernel_stride",
    "init_blocks",
    "block_size",
    "window_size",
    "topk",
    "use_nope",
    "dense_len",
)

RELEASED_SPARSE_CONFIG: dict[str, Any] = {
    "kernel_size": 32,
    "kernel_stride": 16,
    "init_blocks": 1,
    "block_size": 64,
    "window_size": 2048,
    "topk": 64,
    "use_nope": False,
    "dense_len": 8192,
}

_RELEASED_SPARSE_LAYERS = (0, 9, 16, 17, 22, 29, 30, 31)
RELEASED_MIXER_TYPES: list[str] = [
    SPARSE_MIXER if i in _RELEASED_SPARSE_LAYERS else LINEAR_MIXER for i in range(32)
]


class ConfigError(ValueError):
    """A config.json field has a value this model cannot run with."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(name: str, value: Any) -> int:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"config.json field '{name}' = {value!r}: expected a positive integer",
    )
    return value


@dataclass(frozen=True)
class SparseConfig:
    """InfLLM-v2 geometry (SPEC 2.2), validated; all derived sizes come from here."""

    kernel_size: int
    kernel_stride: int
    init_blocks: int
    block_size: int
    window_size: int
    topk: int
    use_nope: bool
    dense_len: int

    @classmethod
    def from_dict(cls, raw: Any) -> "SparseConfig":
        _require(
            isinstance(raw, dict),
            f"config.json field 'sparse_config' = {raw!r}: expected an object with keys "
            f"{', '.join(SPARSE_CONFIG_KEYS)}",
        )
        missing = [k for k in SPARSE_CONFIG_KEYS if k not in raw]
        _require(
            not missing,
            f"config.json field 'sparse_config' is missing {', '.join(missing)}; "
            f"the released model uses {RELEASED_SPARSE_CONFIG}",
        )
        ints = {}
        for key in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            ints[key] = _positive_int(f"sparse_config.{key}", raw[key])
        for key in ("init_blocks", "dense_len"):
            v = raw[key]
            _require(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                f"config.json field 'sparse_config.{key}' = {v!r}: expected an integer >= 0",
            )
            ints[key] = v
        use_nope = raw["use_nope"]
        _require(
            isinstance(use_nope, bool),
            f"config.json field 'sparse_config.use_nope' = {use_nope!r}: expected true or false",
        )
        _require(
            not use_nope,
            "config.json field 'sparse_config.use_nope' = true is not supported: this model's "
            "sparse layers already use no position encoding (attn_use_rope false); set it to false",
        )
        cfg = cls(use_nope=use_nope, **ints)
        cfg._validate_geometry()
        return cfg

    def _validate_geometry(self) -> None:
        _require(
            self.kernel_size >= self.kernel_stride,
            f"config.json field 'sparse_config.kernel_size' = {self.kernel_size} is smaller than "
            f"kernel_stride = {self.kernel_stride}: compression windows would skip keys",
        )
        _require(
            self.kernel_size % self.kernel_stride == 0,
            f"config.json field 'sparse_config.kernel_size' = {self.kernel_size} is not a multiple "
            f"of kernel_stride = {self.kernel_stride}",
        )
        _require(
            self.block_size % self.kernel_stride == 0,
            f"config.json field 'sparse_config.block_size' = {self.block_size} is not a multiple "
            f"of kernel_stride = {self.kernel_stride}",
        )
        _require(
            self.window_size % self.block_size == 0,
            f"config.json field 'sparse_config.window_size' = {self.window_size} is not a "
            f"multiple of block_size = {self.block_size}",
        )
        _require(
            self.topk >= self.init_blocks + 1,
            f"config.json field 'sparse_config.topk' = {self.topk} must be at least "
            f"init_blocks + 1 = {self.init_blocks + 1} so the forced blocks always fit",
        )

    @property
    def windows_per_block(self) -> int:
        """Compressed keys per block (`r` in SPEC 2.2): the K1 rows stored beside each
        block-sized KV page (windows whose last token lies in that block; see `k1_home`)."""
        return self.block_size // self.kernel_stride

    def k1_home(self, c: int) -> tuple[int, int]:
        """(block, row) where K1 window c is stored: the request's block holding the window's last
        token `kernel_stride * c + kernel_size - 1`, at row `(last % block_size) // kernel_stride`
        (< windows_per_block). The page is that block's page in req_to_token. Twin of the kernels'
        addressing (`infllm_v2._triton.page_of_window`, csrc `locate_k1_rows`)."""
        last = self.kernel_stride * c + self.kernel_size - 1
        return last // self.block_size, (last % self.block_size) // self.kernel_stride

    @property
    def local_blocks(self) -> int:
        """Blocks before the query's own block that are always selected (`w` in SPEC 2.2)."""
        return self.window_size // self.block_size

    @property
    def num_selected_blocks(self) -> int:
        """Blocks each query attends to in sparse mode (`n_sel = topk + w`)."""
        return self.topk + self.local_blocks

    @property
    def max_sparse_keys(self) -> int:
        """Most keys one query sees in sparse mode; shorter sequences are exactly dense."""
        return self.num_selected_blocks * self.block_size

    def num_k1(self, length: int) -> int:
        """Complete K1 windows over `length` cached keys."""
        return complete_windows(length, self.kernel_size, self.kernel_stride)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SPARSE_CONFIG_KEYS}


def complete_windows(length: int, size: int, stride: int) -> int:
    """Windows of `size` keys, `stride` apart, that lie wholly within `length` keys."""
    return 0 if length < size else (length - size) // stride + 1


class MiniCPMSALAConfig(_BaseConfig):
    """Hugging Face config of MiniCPM-SALA; defaults are the released checkpoint's values."""

    model_type = "minicpm_sala"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 73448,
        hidden_size: int = 4096,
        intermediate_size: int = 16384,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 2,
        head_dim: int = 128,
        lightning_nh: int = 32,
        lightning_nkv: int = 32,
        lightning_head_dim: int = 128,
        mixer_types: list[str] | None = None,
        sparse_config: dict[str, Any] | None = None,
        hidden_act: str = "silu",
        attn_use_rope: bool = False,
        attn_use_output_gate: bool = True,
        lightning_use_rope: bool = True,
        qk_norm: bool = True,
        use_output_norm: bool = True,
        use_output_gate: bool = True,
        lightning_scale: str = "1/sqrt(d)",
        scale_emb: float = 12,
        scale_depth: float = 1.4,
        dim_model_base: int = 256,
        mup_denominator: int = 32,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 524288,
        initializer_range: float = 0.1,
        bos_token_id: int = 1,
        eos_token_id: int | list[int] = (2, 73440),
        pad_token_id: int = 2,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.lightning_nh = lightning_nh
        self.lightning_nkv = lightning_nkv
        self.lightning_head_dim = lightning_head_dim
        self.hidden_act = hidden_act
        self.attn_use_rope = attn_use_rope
        self.attn_use_output_gate = attn_use_output_gate
        self.lightning_use_rope = lightning_use_rope
        self.qk_norm = qk_norm
        self.use_output_norm = use_output_norm
        self.use_output_gate = use_output_gate
        self.lightning_scale = lightning_scale
        self.scale_emb = scale_emb
        self.scale_depth = scale_depth
        self.dim_model_base = dim_model_base
        self.mup_denominator = mup_denominator  # present in the release, unused (SPEC: DECIDED)
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        if mixer_types is None:
            mixer_types = (
                list(RELEASED_MIXER_TYPES)
                if num_hidden_layers == len(RELEASED_MIXER_TYPES)
                else [SPARSE_MIXER] * num_hidden_layers
            )
        self.mixer_types = _normalise_mixers(mixer_types, num_hidden_layers)
        self.sparse_config = SparseConfig.from_dict(
            dict(RELEASED_SPARSE_CONFIG) if sparse_config is None else sparse_config
        ).to_dict()
        if isinstance(eos_token_id, tuple):
            eos_token_id = list(eos_token_id)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate()

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "lightning_nh",
            "lightning_nkv",
            "lightning_head_dim",
            "dim_model_base",
        ):
            _positive_int(name, getattr(self, name))
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"config.json field 'num_attention_heads' = {self.num_attention_heads} is not "
            f"divisible by 'num_key_value_heads' = {self.num_key_value_heads}",
        )
        _require(
            self.lightning_nkv == self.lightning_nh,
            f"config.json field 'lightning_nkv' = {self.lightning_nkv} differs from "
            f"'lightning_nh' = {self.lightning_nh}: lightning layers have no GQA; set them equal",
        )
        _require(
            self.hidden_act == "silu",
            f"config.json field 'hidden_act' = {self.hidden_act!r}: only 'silu' is supported",
        )
        _require(
            not self.attn_use_rope,
            "config.json field 'attn_use_rope' = true is not supported: MiniCPM-SALA's sparse "
            "layers are NoPE (compressed keys are position-free); set it to false",
        )
        for flag in ("lightning_use_rope", "qk_norm", "use_output_norm", "use_output_gate"):
            _require(
                getattr(self, flag) is True,
                f"config.json field '{flag}' = {getattr(self, flag)!r} is not supported: "
                "the released model sets it to true and so does this implementation",
            )
        _require(
            self.lightning_scale == "1/sqrt(d)",
            f"config.json field 'lightning_scale' = {self.lightning_scale!r}: only '1/sqrt(d)' "
            "is supported",
        )
        _require(
            self.lightning_head_dim % 2 == 0,
            f"config.json field 'lightning_head_dim' = {self.lightning_head_dim}: RoPE needs an "
            "even head dimension",
        )
        for name in ("scale_emb", "scale_depth", "rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            _require(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                f"config.json field '{name}' = {v!r}: expected a positive number",
            )

    @property
    def sparse(self) -> SparseConfig:
        """The validated InfLLM-v2 geometry (kept out of the serialised attributes)."""
        return SparseConfig.from_dict(self.sparse_config)

    # ---- layer kinds -------------------------------------------------------------------------
    @property
    def sparse_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.mixer_types) if m == SPARSE_MIXER]

    @property
    def linear_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.mixer_types) if m == LINEAR_MIXER]

    @property
    def full_attention_layer_ids(self) -> list[int]:
        """Layers that keep a KV cache (SGLang's name for them)."""
        return self.sparse_layer_ids

    # ---- muP scales (SPEC 2) -----------------------------------------------------------------
    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base

    # ---- linear-layer state --------------------------------------------------------------------
    def linear_state_shape(self, tp_size: int = 1) -> tuple[int, int, int]:
        """Per-layer, per-request recurrent state: [heads / tp, key dim, value dim]."""
        _require(
            self.lightning_nh % tp_size == 0,
            f"tensor parallel size {tp_size} does not divide lightning_nh = {self.lightning_nh}",
        )
        d = self.lightning_head_dim
        return (self.lightning_nh // tp_size, d, d)

    def linear_state_bytes_per_request(self, itemsize: int = 4, tp_size: int = 1) -> int:
        h, dk, dv = self.linear_state_shape(tp_size)
        return len(self.linear_layer_ids) * h * dk * dv * itemsize

    def verify_replay_bytes(self, requests: int, draft_tokens: int, itemsize: int,
                            tp_size: int = 1) -> int:
        """The lightning layers' keys and values of `requests` verified chains of
        `draft_tokens`, kept from the verify to the commit (speculative decoding)."""
        h, dk, dv = self.linear_state_shape(tp_size)
        return len(self.linear_layer_ids) * requests * draft_tokens * h * (dk + dv) * itemsize

    @property
    def mamba2_cache_params(self):
        """SGLang's description of the linear layers' per-request state (no conv state)."""
        from sglang.srt.configs.mamba_utils import Mamba2StateShape, mamba2_state_dtype

        d = self.lightning_head_dim
        shape = Mamba2StateShape.create(
            tp_world_size=_attention_tp_size(),
            intermediate_size=0,
            n_groups=0,
            num_heads=self.lightning_nh,
            head_dim=d,
            state_size=d,
            conv_kernel=1,
        )
        return lightning_cache_params_class()(
            shape=shape, layers=self.linear_layer_ids, dtype=mamba2_state_dtype(self)
        )


@functools.cache
def lightning_cache_params_class() -> type:
    """SGLang's `Mamba2CacheParams`, marked as MiniCPM-SALA's lightning state: its speculative
    verify replays the accepted keys and values instead of keeping a state per draft token, so
    the pools built for it need none (see `hooks.keep_no_state_per_draft_token`)."""
    from sglang.srt.configs.mamba_utils import Mamba2CacheParams

    @dataclass(kw_only=True, frozen=True)
    class LightningCacheParams(Mamba2CacheParams):
        pass

    return LightningCacheParams


def _attention_tp_size() -> int:
    """Attention TP size of the running SGLang process; 1 outside a distributed setup."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().attn_tp_size
    except (ImportError, AssertionError, AttributeError, RuntimeError, TypeError):
        return 1


def _normalise_mixers(mixer_types: Any, num_layers: int) -> list[str]:
    _require(
        isinstance(mixer_types, (list, tuple)),
        f"config.json field 'mixer_types' = {mixer_types!r}: expected a list of "
        f"'{SPARSE_MIXER}' / '{LINEAR_MIXER}', one per layer",
    )
    _require(
        len(mixer_types) == num_layers,
        f"config.json field 'mixer_types' has {len(mixer_types)} entries but "
        f"num_hidden_layers = {num_layers}: give exactly one mixer per layer",
    )
    out = []
    for i, m in enumerate(mixer_types):
        canonical = MIXER_ALIASES.get(str(m).strip().lower()) if isinstance(m, str) else None
        _require(
            canonical is not None,
            f"config.json field 'mixer_types[{i}]' = {m!r} is not a known mixer: accepted are "
            f"{sorted(MIXER_ALIASES)} ('{SPARSE_MIXER}' = sparse InfLLM-v2, "
            f"'{LINEAR_MIXER}' = Lightning linear attention)",
        )
        out.append(canonical)
    return out
