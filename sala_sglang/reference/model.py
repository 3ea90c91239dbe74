"""The whole MiniCPM-SALA network in plain PyTorch (SPEC 2), with an incremental-decoding cache.

Module and parameter names mirror the checkpoint (`model.layers.{i}.self_attn.q_proj.weight`, ...),
so a state dict loads as is. `forward(ids, cache)` appends a chunk to the cache; the result does not
depend on how a sequence is split into chunks.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sala_sglang.config import LINEAR_MIXER, SPARSE_MIXER, MiniCPMSALAConfig, SparseConfig
from sala_sglang.reference.lightning import (
    lightning_chunked,
    lightning_output_gate_reference,
    lightning_qk_reference,
    lightning_slopes,
)
from sala_sglang.reference.norms import accumulation_dtype, compute_dtype, rms_norm
from sala_sglang.reference.sparse import (
    BlockScorer,
    block_scores,
    compress_keys,
    sigmoid_gate_reference,
    sparse_layer_attention,
)

# A stage-1 block scoring for every sparse layer: (sparse layer number, 0 = the first of them,
# q [T, Hq, D], k1 [n1, G, D], positions [T], cfg) -> block scores [T, G, blocks].
Stage1 = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, SparseConfig], torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def _extend_compressed(
    compressed: torch.Tensor, keys: torch.Tensor, size: int, stride: int
) -> torch.Tensor:
    """Append the windows completed by the newest keys: [n_old, G, D] -> [n_new, G, D]."""
    n_old = compressed.shape[0]
    new = compress_keys(keys[stride * n_old :], size, stride)  # windows c >= n_old
    return torch.cat([compressed, new.to(compressed.dtype)], dim=0)


@dataclass
class SparseLayerCache:
    """One sparse layer's memory: keys, values [L, G, D]; K1 [n1, G, D]."""

    keys: torch.Tensor
    values: torch.Tensor
    k1: torch.Tensor

    def append(self, k: torch.Tensor, v: torch.Tensor, cfg: SparseConfig) -> None:
        """Append k, v [T, G, D]; K1 gains every window whose last key is now cached."""
        self.keys = torch.cat([self.keys, k], dim=0)
        self.values = torch.cat([self.values, v], dim=0)
        self.k1 = _extend_compressed(self.k1, self.keys, cfg.kernel_size, cfg.kernel_stride)


@dataclass
class ReferenceCache:
    """Per-request memory: sparse-layer KV + compressed keys, linear-layer states [H, Dk, Dv]."""

    prompt_len: int
    length: int = 0
    sparse: dict[int, SparseLayerCache] = field(default_factory=dict)
    linear_state: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class TeacherForced:
    """Reference predictions for a sequence's completion (row i predicts token prompt_len + i)."""

    logits: torch.Tensor  # [n, vocab]
    logprobs: torch.Tensor  # [n, vocab] log-softmax of logits
    token_logprobs: torch.Tensor  # [n] logprob of the token that actually follows
    argmax: torch.Tensor  # [n] greedy choice
    margin: torch.Tensor  # [n] top-1 minus top-2 logit


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., size] -> [..., size]."""
        return rms_norm(x, self.weight, self.eps)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class MLP(nn.Module):
    def __init__(self, config: MiniCPMSALAConfig) -> None:
        super().__init__()
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: x [T, hidden] -> [T, hidden]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseAttention(nn.Module):
    """InfLLM-v2 layer (SPEC 2.2): NoPE GQA, dense or sparse per token, sigmoid output gate."""

    def __init__(self, config: MiniCPMSALAConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sparse_cfg = config.sparse
        hidden, q_size, kv_size = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        self.q_proj = _linear(hidden, q_size)
        self.k_proj = _linear(hidden, kv_size)
        self.v_proj = _linear(hidden, kv_size)
        self.o_gate = _linear(hidden, q_size)
        self.o_proj = _linear(q_size, hidden)

    def new_cache(self, dtype: torch.dtype, device: torch.device) -> SparseLayerCache:
        shape = (0, self.num_kv_heads, self.head_dim)
        cdt = accumulation_dtype(dtype)
        return SparseLayerCache(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            k1=torch.zeros(shape, dtype=cdt, device=device),
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: SparseLayerCache,
        prompt_len: int,
        dense_len: int,
        stage1: BlockScorer = block_scores,
    ) -> torch.Tensor:
        """x [T, hidden] at positions [T]; appends k, v to cache -> [T, hidden]. `stage1` scores
        the blocks (see `sparse_layer_attention`)."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        cache.append(k, v, self.sparse_cfg)
        attn = sparse_layer_attention(
            q,
            cache.keys,
            cache.values,
            cache.k1,
            positions,
            prompt_len,
            self.sparse_cfg,
            dense_len,
            scale=1.0 / math.sqrt(self.head_dim),
            stage1=stage1,
        )
        gated = sigmoid_gate_reference(attn.reshape(t, -1), self.o_gate(x))
        return self.o_proj(gated)


class LightningAttention(nn.Module):
    """Lightning layer (SPEC 2.1): q/k RMSNorm, RoPE, decayed linear attention, out norm, gate."""

    def __init__(self, config: MiniCPMSALAConfig) -> None:
        super().__init__()
        self.num_heads = config.lightning_nh
        self.head_dim = config.lightning_head_dim
        self.rope_theta = config.rope_theta
        hidden, size = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = _linear(hidden, size)
        self.k_proj = _linear(hidden, size)
        self.v_proj = _linear(hidden, size)
        self.z_proj = _linear(hidden, size)
        self.o_proj = _linear(size, hidden)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_norm = RMSNorm(size, config.rms_norm_eps)

    @property
    def slopes(self) -> torch.Tensor:
        """Per-head decay rates [H]: the ALiBi schedule, identical in every layer."""
        return lightning_slopes(self.num_heads).to(self.q_proj.weight.device)

    def new_state(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.zeros(
            self.num_heads,
            self.head_dim,
            self.head_dim,
            dtype=accumulation_dtype(dtype),
            device=device,
        )

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] at positions [T], state [H, D, D] -> (out [T, hidden], new state)."""
        t = x.shape[0]
        q, k = lightning_qk_reference(self.q_proj(x), self.k_proj(x), self.q_norm.weight,
                                      self.k_norm.weight, self.q_norm.eps, positions,
                                      self.rope_theta)
        v = self.v_proj(x).view(t, self.num_heads, self.head_dim)
        o, state = lightning_chunked(
            q, k, v, self.slopes, 1.0 / math.sqrt(self.head_dim), initial_state=state
        )
        o = lightning_output_gate_reference(o.reshape(t, -1), self.z_proj(x), self.o_norm.weight,
                                            self.o_norm.eps)
        return self.o_proj(o), state


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMSALAConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.mixer_type = config.mixer_types[layer_id]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.mixer_type == SPARSE_MIXER:
            self.self_attn: nn.Module = SparseAttention(config)
        elif self.mixer_type == LINEAR_MIXER:
            self.self_attn = LightningAttention(config)
        else:  # pragma: no cover - the config normalises mixer names
            raise ValueError(f"mixer_types[{layer_id}] = {self.mixer_type!r}: unknown mixer")
        self.mlp = MLP(config)


class Backbone(nn.Module):
    def __init__(self, config: MiniCPMSALAConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class ReferenceModel(nn.Module):
    """MiniCPM-SALA for causal LM, one request at a time; fp32 or fp64 on the CPU."""

    def __init__(
        self,
        config: MiniCPMSALAConfig,
        dense_len: int | None = None,
        dense_as_sparse: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        if dense_as_sparse and dense_len not in (None, 0):
            raise ValueError(
                f"dense_as_sparse=True sets dense_len to 0; got dense_len = {dense_len}"
            )
        if dense_len is not None and dense_len < 0:
            raise ValueError(f"dense_len = {dense_len}: expected an integer >= 0")
        # Tokens are sparse iff max(prompt_len, p + 1) >= dense_len (SPEC 2.2, mode switch).
        self.dense_len = (
            0 if dense_as_sparse else (config.sparse.dense_len if dense_len is None else dense_len)
        )
        self.model = Backbone(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls,
        config: MiniCPMSALAConfig,
        state_dict: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> ReferenceModel:
        """Model from checkpoint-named weights (rotary_emb.* ignored); kwargs go to __init__."""
        # Built on the meta device: no throw-away random init; the given tensors become the weights.
        with torch.device("meta"):
            model = cls(config, **kwargs)
        weights = {k: v.to(dtype) for k, v in state_dict.items() if "rotary_emb." not in k}
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the MiniCPM-SALA layout: missing {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        for name, param in model.state_dict().items():
            if weights[name].shape != param.shape:
                raise ValueError(
                    f"checkpoint weight {name} has shape {tuple(weights[name].shape)}; "
                    f"the config implies {tuple(param.shape)}"
                )
        model.load_state_dict(weights, strict=True, assign=True)
        return model.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, **kwargs
    ) -> ReferenceModel:
        """Model from a directory with config.json and *.safetensors; kwargs go to __init__."""
        from safetensors.torch import load_file

        path = Path(path)
        with open(path / "config.json") as f:
            config = MiniCPMSALAConfig(**json.load(f))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(
                {k: v.to(dtype) for k, v in load_file(str(file)).items() if "rotary_emb." not in k}
            )
        return cls.from_state_dict(config, weights, dtype=dtype, **kwargs)

    # ---- inference --------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, prompt_len: int) -> ReferenceCache:
        """Empty cache for a request whose prompt has prompt_len tokens."""
        cache = ReferenceCache(prompt_len=prompt_len)
        for layer in self.model.layers:
            if layer.mixer_type == SPARSE_MIXER:
                cache.sparse[layer.layer_id] = layer.self_attn.new_cache(self.dtype, self.device)
            else:
                cache.linear_state[layer.layer_id] = layer.self_attn.new_state(
                    self.dtype, self.device
                )
        return cache

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor | Sequence[int],
        cache: ReferenceCache | None = None,
        stage1: Stage1 | None = None,
    ) -> torch.Tensor:
        """Logits [T, vocab] of chunk ids [T] appended to cache (None: new cache, prompt = ids).

        `stage1`, when given, scores the blocks of every sparse layer in place of `block_scores`
        (the served-vs-reference comparison perturbs the scores with it).
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if cache is None:
            cache = self.new_cache(prompt_len=ids.numel())
        cfg = self.config
        positions = cache.length + torch.arange(ids.numel(), device=self.device)
        residual_scale = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)

        h = self.model.embed_tokens(ids) * cfg.scale_emb
        for layer in self.model.layers:
            x = layer.input_layernorm(h)
            if layer.mixer_type == SPARSE_MIXER:
                scorer = block_scores if stage1 is None else functools.partial(
                    stage1, cfg.sparse_layer_ids.index(layer.layer_id))
                mixed = layer.self_attn(
                    x, positions, cache.sparse[layer.layer_id], cache.prompt_len, self.dense_len,
                    stage1=scorer,
                )
            else:
                mixed, cache.linear_state[layer.layer_id] = layer.self_attn(
                    x, positions, cache.linear_state[layer.layer_id]
                )
            h = h + mixed * residual_scale
            h = h + layer.mlp(layer.post_attention_layernorm(h)) * residual_scale
        cache.length += ids.numel()
        return self.lm_head(self.model.norm(h) / (cfg.hidden_size / cfg.dim_model_base))

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_ids: Iterable[int] | None = None,
    ) -> list[int]:
        """Greedy decode -> new tokens, up to and including the first EOS (None: no early stop)."""
        eos = set(eos_token_ids or ())
        cache = self.new_cache(prompt_len=len(prompt_ids))
        logits = self.forward(list(prompt_ids), cache)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[-1].argmax())
            out.append(token)
            if token in eos or len(out) == max_new_tokens:
                break
            logits = self.forward([token], cache)
        return out

    @torch.no_grad()
    def teacher_forced(
        self, token_ids: Sequence[int], prompt_len: int, chunk_size: int | None = None
    ) -> TeacherForced:
        """Predictions for token_ids[prompt_len:] (e.g. a served sequence) given their prefixes."""
        n = len(token_ids)
        if not 1 <= prompt_len <= n:
            raise ValueError(
                f"teacher_forced: prompt_len = {prompt_len}: expected 1 <= prompt_len <= {n}"
            )
        cache = self.new_cache(prompt_len=prompt_len)
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)
        step = chunk_size or n
        logits = torch.cat(
            [self.forward(ids[s : s + step], cache) for s in range(0, n, step)], dim=0
        )
        logits = logits[prompt_len - 1 : n - 1]
        logprobs = torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)
        top2 = logits.topk(min(2, logits.shape[-1]), dim=-1).values
        margin = top2[:, 0] - top2[:, -1]
        return TeacherForced(
            logits=logits,
            logprobs=logprobs,
            token_logprobs=logprobs.gather(-1, ids[prompt_len:, None]).squeeze(-1),
            argmax=logits.argmax(dim=-1),
            margin=margin,
        )
