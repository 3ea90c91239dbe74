"""MiniCPM-SALA as an SGLang model: 8 sparse (InfLLM-v2) and 24 Lightning layers (SPEC section 2).

The layers only project, normalise and gate; the attention itself (sparse or linear) runs in the
`minicpm_flashinfer` backend, which SGLang's hybrid dispatcher picks per layer id.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from sglang.srt.distributed import tensor_model_parallel_all_reduce
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix
from torch import nn

from sala_sglang.config import SPARSE_MIXER, MiniCPMSALAConfig
from sala_sglang.ops.lightning_output import lightning_output_gate
from sala_sglang.ops.lightning_qk import lightning_qk_norm_rope
from sala_sglang.ops.sigmoid_gate import sigmoid_gate


class MiniCPMSALAMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate x) * up x)."""

    def __init__(
        self, config: MiniCPMSALAConfig, quant_config: Optional[QuantizationConfig], prefix: str
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=add_prefix("gate_up_proj", prefix),
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=add_prefix("down_proj", prefix),
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class MiniCPMSALASparseAttention(nn.Module):
    """InfLLM-v2 layer: NoPE GQA attention (dense or block-sparse, in the backend), sigmoid gate."""

    def __init__(
        self,
        config: MiniCPMSALAConfig,
        layer_id: int,
        quant_config: Optional[QuantizationConfig],
        prefix: str,
    ) -> None:
        super().__init__()
        tp_size = get_parallel().tp_size
        self.head_dim = config.head_dim
        _check_divisible("num_attention_heads", config.num_attention_heads, tp_size)
        # Block selection sums scores over a kv head's whole query group: never split one.
        _check_divisible("num_key_value_heads", config.num_key_value_heads, tp_size)
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = config.num_key_value_heads // tp_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_gate_proj, self.o_proj = _gated_projections(
            config, self.head_dim, config.num_attention_heads, config.num_key_value_heads,
            quant_config, prefix,
        )
        self.attn = _radix_attention(
            self.num_heads, self.head_dim, self.num_kv_heads, layer_id, quant_config, prefix
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        qkvg, _ = self.qkv_gate_proj(hidden_states)
        q, k, v, gate = qkvg.split([self.q_size, self.kv_size, self.kv_size, self.q_size], dim=-1)
        attn = self.attn(q, k, v, forward_batch)
        out, _ = self.o_proj(sigmoid_gate(attn.view(-1, self.q_size), gate))
        return out


class MiniCPMSALALightningAttention(nn.Module):
    """Lightning layer: q/k RMSNorm + RoPE, decayed linear recurrence (backend), norm, gate."""

    def __init__(
        self,
        config: MiniCPMSALAConfig,
        layer_id: int,
        quant_config: Optional[QuantizationConfig],
        prefix: str,
    ) -> None:
        super().__init__()
        self.tp_size = get_parallel().tp_size
        _check_divisible("lightning_nh", config.lightning_nh, self.tp_size)
        self.head_dim = config.lightning_head_dim
        self.num_heads = config.lightning_nh // self.tp_size
        self.inner_size = self.num_heads * self.head_dim
        self.qkv_gate_proj, self.o_proj = _gated_projections(
            config, self.head_dim, config.lightning_nh, config.lightning_nkv, quant_config, prefix
        )
        # per-head weights [head_dim], the same on every TP rank; applied by lightning_qk_norm_rope
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # One RMSNorm over all heads of the layer; each TP rank holds its heads' slice.
        self.o_norm = RMSNorm(self.inner_size, eps=config.rms_norm_eps)
        tp_rank = get_parallel().tp_rank
        self.o_norm.weight.weight_loader = _slice_loader(tp_rank * self.inner_size, self.inner_size)
        # holds SGLang's RoPE table, `cos_sin_cache`; looked up at every forward, since SGLang may
        # replace the tensor (moved, cast or lengthened)
        self.rotary_emb = get_rope(
            self.head_dim,
            rotary_dim=self.head_dim,
            max_position=config.max_position_embeddings,
            base=config.rope_theta,
            is_neox_style=True,
        )
        self.attn = _radix_attention(
            self.num_heads, self.head_dim, self.num_heads, layer_id, quant_config, prefix
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        qkvz, _ = self.qkv_gate_proj(hidden_states)
        q, k, v, z = qkvz.split([self.inner_size] * 4, dim=-1)
        # q and k are read from the projection's output and written once, normalised and
        # rotated; v stays a slice of it, which the backend's kernels read in place
        q, k = lightning_qk_norm_rope(
            q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.variance_epsilon,
            positions, self.rotary_emb.cos_sin_cache,
        )
        o = self.attn(q.view(-1, self.inner_size), k.view(-1, self.inner_size), v, forward_batch)
        o = o.view(-1, self.inner_size)
        if self.tp_size == 1:
            gated = lightning_output_gate(o, z, self.o_norm.weight, self.o_norm.variance_epsilon)
        else:
            gated = sigmoid_gate(self._output_norm(o), z)
        out, _ = self.o_proj(gated)
        return out

    def _output_norm(self, o: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the layer's heads, which tensor parallelism spreads over the ranks."""
        of = o.float()
        sq_sum = tensor_model_parallel_all_reduce(of.pow(2).sum(-1, keepdim=True))
        mean_sq = sq_sum / (self.inner_size * self.tp_size)
        rms = torch.rsqrt(mean_sq + self.o_norm.variance_epsilon)
        return (of * rms).to(o.dtype) * self.o_norm.weight


class MiniCPMSALADecoderLayer(nn.Module):
    def __init__(
        self,
        config: MiniCPMSALAConfig,
        layer_id: int,
        quant_config: Optional[QuantizationConfig],
        prefix: str,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        mixer_cls = (
            MiniCPMSALASparseAttention
            if config.mixer_types[layer_id] == SPARSE_MIXER
            else MiniCPMSALALightningAttention
        )
        self.self_attn = mixer_cls(config, layer_id, quant_config, add_prefix("self_attn", prefix))
        self.mlp = MiniCPMSALAMLP(config, quant_config, add_prefix("mlp", prefix))

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: Optional[torch.Tensor],
        forward_batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: the previous MLP's output (the scaled embedding for layer 0, whose
        residual is None) -> (this MLP's output, the residual stream before it is added).

        Each sublayer's output joins the stream inside SGLang's fused add+RMSNorm; the muP
        residual_scale it is multiplied by first is folded into the weights of the projection
        that ends it (`MiniCPMSALAForCausalLM.load_weights`), so it costs no kernel here. (Keeping
        the stream divided by residual_scale instead, with eps / scale^2, is the same model but
        served the tiny checkpoint with 3x the mean logprob error on the H100, at sparse prompts
        only; see benchmarks/NOTES.md.)"""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class MiniCPMSALAModel(nn.Module):
    def __init__(
        self, config: MiniCPMSALAConfig, quant_config: Optional[QuantizationConfig], prefix: str
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=add_prefix("embed_tokens", prefix)
        )
        self.layers = nn.ModuleList(
            MiniCPMSALADecoderLayer(config, i, quant_config, add_prefix(f"layers.{i}", prefix))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if input_embeds is None:
            input_embeds = self.embed_tokens(input_ids)
        hidden_states = input_embeds * self.config.scale_emb
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, forward_batch)
        # the last MLP's output comes scaled by residual_scale (folded into its down_proj)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# The projections whose outputs join the residual stream.
RESIDUAL_OUTPUT_WEIGHTS = (".self_attn.o_proj.weight", ".mlp.down_proj.weight")


class MiniCPMSALAForCausalLM(nn.Module):
    # Checkpoint names -> fused SGLang parameters. A mixer's output gate is `z_proj` in the
    # Lightning layers and `o_gate` in the sparse ones; either is the fourth part of its layer's
    # q/k/v/gate projection.
    stacked_params_mapping = (
        (".qkv_gate_proj", ".q_proj", 0),
        (".qkv_gate_proj", ".k_proj", 1),
        (".qkv_gate_proj", ".v_proj", 2),
        (".qkv_gate_proj", ".z_proj", 3),
        (".qkv_gate_proj", ".o_gate", 3),
        (".gate_up_proj", ".gate_proj", 0),
        (".gate_up_proj", ".up_proj", 1),
    )
    packed_modules_mapping = {
        "qkv_gate_proj": ["q_proj", "k_proj", "v_proj", "z_proj", "o_gate"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(
        self,
        config: MiniCPMSALAConfig,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.config = config
        self.model = MiniCPMSALAModel(config, quant_config, add_prefix("model", prefix))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=add_prefix("lm_head", prefix),
        )
        self.logits_processor = LogitsProcessor(config)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> LogitsProcessorOutput:
        hidden_states = self.model(input_ids, positions, forward_batch, input_embeds)
        hidden_states = hidden_states / self.config.logit_divisor
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb." in name:
                continue
            for fused, part, shard in self.stacked_params_mapping:
                if part in name:
                    target = name.replace(part, fused)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                if name not in params:
                    raise KeyError(
                        f"checkpoint tensor {name!r} matches no MiniCPM-SALA parameter; "
                        "is this a MiniCPM-SALA checkpoint?"
                    )
                target = name
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        # muP: every sublayer's output is multiplied by residual_scale before it joins the
        # residual stream; folded into the weights of the projections that end the sublayers
        # (one rounding, in the served dtype), the forward spends no kernel on it
        for target in loaded:
            if target.endswith(RESIDUAL_OUTPUT_WEIGHTS):
                params[target].data.mul_(self.config.residual_scale)
        return loaded


def _gated_projections(
    config: MiniCPMSALAConfig,
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    quant_config: Optional[QuantizationConfig],
    prefix: str,
) -> tuple[MergedColumnParallelLinear, RowParallelLinear]:
    """Either mixer's q, k, v and sigmoid output gate as one projection (one GEMM a layer: at
    decode two weight reads of a layer become one), and its output projection; TP-sharded by
    head (num_heads and num_kv_heads are the global counts, which the tp size divides, so each
    rank's k and v rows are whole kv heads)."""
    linear = dict(bias=False, quant_config=quant_config)
    inner, kv = num_heads * head_dim, num_kv_heads * head_dim
    return (
        MergedColumnParallelLinear(
            config.hidden_size, [inner, kv, kv, inner],
            prefix=add_prefix("qkv_gate_proj", prefix), **linear,
        ),
        RowParallelLinear(inner, config.hidden_size, prefix=add_prefix("o_proj", prefix), **linear),
    )


def _radix_attention(
    num_heads: int,
    head_dim: int,
    num_kv_heads: int,
    layer_id: int,
    quant_config: Optional[QuantizationConfig],
    prefix: str,
) -> RadixAttention:
    """The layer's handle on the backend (this rank's head counts; scale 1/sqrt(head_dim))."""
    return RadixAttention(
        num_heads,
        head_dim,
        head_dim**-0.5,
        num_kv_heads=num_kv_heads,
        layer_id=layer_id,
        quant_config=quant_config,
        prefix=add_prefix("attn", prefix),
    )


def _check_divisible(field: str, value: int, tp_size: int) -> None:
    if value % tp_size:
        raise ValueError(
            f"--tp-size {tp_size} does not divide {field} = {value}: choose a tp size that does"
        )


def _slice_loader(start: int, length: int):
    def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded[start : start + length])

    return load


EntryClass = MiniCPMSALAForCausalLM
