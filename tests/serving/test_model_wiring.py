"""The SGLang model class on the CPU: weights load by name, and the layers around attention match
the reference model.

The attention itself is delegated to a stand-in backend that runs the reference's attention
functions (the real backends have their own tests), so any difference left is in the model's own
code: fused projection splits, norms, RoPE (the Lightning layers' fused q/k op, in Triton's CPU
interpreter), gates, residual and embedding scales, the logit divisor. The prompt crosses the tiny
checkpoint's dense_len and is fed in two uneven chunks, then decoded token by token, so positions
run on from an offset. With tensor parallelism (gloo on the CPU) each rank attends over its own
heads, and the logits gathered from the vocabulary shards must be the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("sglang")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    # The model runs on the CPU, so its Triton kernels (q/k norm and RoPE) are interpreted, on a
    # GPU machine too; Triton reads this when a kernel is defined.
    os.environ["TRITON_INTERPRET"] = "1"
    from types import SimpleNamespace
    import torch

    # SGLang's RoPE module (the holder of the RoPE table) imports a CUDA-only kernel when built
    # on a machine that is neither CUDA nor its CPU engine.
    import sglang.srt.layers.rotary_embedding.base as rope_base
    rope_base._is_cpu = True
    import sglang.srt.layers.radix_attention as radix_attention
    from sglang.srt.distributed import parallel_state
    from sglang.srt.layers.dp_attention import initialize_dp_attention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    from sala_sglang import plugin
    from sala_sglang.config import SPARSE_MIXER, MiniCPMSALAConfig
    from sala_sglang.reference import ReferenceModel
    from sala_sglang.reference.lightning import lightning_chunked, lightning_slopes
    from sala_sglang.reference.sparse import compress_keys, sparse_layer_attention

    rank, tp, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.set_default_dtype(torch.float64)
    # Plain gloo collectives: SGLang's NCCL and custom all-reduce communicators need GPUs.
    make_group = parallel_state.init_model_parallel_group
    parallel_state.init_model_parallel_group = lambda *args, **kwargs: make_group(
        *args, **{**kwargs, "use_pynccl": False, "use_custom_allreduce": False})
    parallel_state.init_distributed_environment(
        world_size=tp, rank=rank, local_rank=rank, backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{port}")
    parallel_state.initialize_model_parallel(tp)
    plugin.register()

    server_args = ServerArgs(model_path=str(path), device="cpu", tp_size=tp,
                             attention_backend="minicpm_flashinfer")
    set_global_server_args_for_scheduler(server_args)
    config = MiniCPMSALAConfig.from_pretrained(path)
    initialize_dp_attention(server_args, SimpleNamespace(
        hf_config=config, hidden_size=config.hidden_size, dtype=torch.float64))
    from sala_sglang.models.minicpm_sala import MiniCPMSALAForCausalLM

    model = MiniCPMSALAForCausalLM(config).eval()
    reference = ReferenceModel.from_pretrained(path, dtype=torch.float64)
    weights = {k: v.double() for k, v in reference.state_dict().items()}
    loaded = model.load_weights(weights.items())
    unloaded = sorted(set(dict(model.named_parameters())) - loaded)

    class ReferenceAttention:
        # Keeps one request's keys, values and recurrent states; attends as the reference does.
        def __init__(self, prompt_len):
            self.prompt_len, self.kv, self.state = prompt_len, {}, {}

        def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            lid, pos = layer.layer_id, forward_batch.positions
            q = q.view(len(pos), layer.tp_q_head_num, layer.head_dim)
            if config.mixer_types[lid] == SPARSE_MIXER:
                old_k, old_v = self.kv.get(lid, (k[:0], v[:0]))
                keys, values = torch.cat([old_k, k]), torch.cat([old_v, v])
                self.kv[lid] = keys, values
                sp = config.sparse
                k1 = compress_keys(keys, sp.kernel_size, sp.kernel_stride)
                out = sparse_layer_attention(q, keys, values, k1, pos, self.prompt_len, sp,
                                             sp.dense_len, layer.scaling)
            else:
                heads = layer.tp_q_head_num
                slopes = lightning_slopes(heads * tp)[rank * heads:(rank + 1) * heads]
                out, self.state[lid] = lightning_chunked(q, k, v, slopes, layer.scaling,
                                                         initial_state=self.state.get(lid))
            return out.reshape(len(pos), -1)

    torch.manual_seed(0)
    prompt_len, new_tokens = 300, 3
    ids = torch.randint(0, config.vocab_size, (prompt_len + new_tokens,))
    steps = [(0, 131, ForwardMode.EXTEND), (131, prompt_len, ForwardMode.EXTEND)]
    steps += [(t, t + 1, ForwardMode.DECODE) for t in range(prompt_len, prompt_len + new_tokens)]
    backend = ReferenceAttention(prompt_len)
    radix_attention.get_attn_backend = lambda: backend
    logits = []
    with torch.no_grad():
        for start, end, mode in steps:
            pos = torch.arange(start, end)
            batch = SimpleNamespace(forward_mode=mode, positions=pos)
            hidden = model.model(ids[start:end], pos, batch) / config.logit_divisor
            shard = hidden @ model.lm_head.weight.T
            shards = [torch.empty_like(shard) for _ in range(tp)]
            torch.distributed.all_gather(shards, shard)
            logits.append(torch.cat(shards, dim=-1)[:, :config.vocab_size])
        ours = torch.cat(logits)
        cache = reference.new_cache(prompt_len)
        ref = torch.cat([reference.forward(ids[:prompt_len], cache)]
                        + [reference.forward(ids[t:t + 1], cache)
                           for t in range(prompt_len, prompt_len + new_tokens)])
    if rank == 0:
        print(json.dumps({"unloaded": unloaded, "tokens": len(ours),
                          "rel_err": float((ours - ref).norm() / ref.norm())}))
    """
)


@pytest.mark.parametrize("tp", [1, 2])  # the tiny checkpoint has 2 kv heads
def test_sglang_model_matches_reference_around_attention(tp: int, tmp_path: Path) -> None:
    from sala_sglang.testing.server import free_port
    from sala_sglang.tiny import make_tiny

    path = make_tiny(tmp_path)
    port = str(free_port())
    # One process per rank: each joins the gloo group and sets SGLang's process-wide parallel
    # state, which this test process must not keep.
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(rank), str(tp), port, str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(tp)
    ]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    for rank, (_, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err[-3000:]
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert result["unloaded"] == [], result
    assert result["tokens"] == 303, result
    assert result["rel_err"] < 1e-5, result  # SGLang keeps RoPE tables and norms in fp32
