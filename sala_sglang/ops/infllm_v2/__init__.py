"""InfLLM-v2 ops over SGLang's paged KV cache (SPEC 2.2), one public op per module, each with its
Triton kernels and its CUDA twin's support check; `plan` decides per forward which runs how."""

from sala_sglang.ops.infllm_v2.attention import block_sparse_attention
from sala_sglang.ops.infllm_v2.compress import compress_new_windows
from sala_sglang.ops.infllm_v2.plan import SparsePlan, make_plan
from sala_sglang.ops.infllm_v2.select import select_blocks

__all__ = [
    "SparsePlan",
    "block_sparse_attention",
    "compress_new_windows",
    "make_plan",
    "select_blocks",
]
