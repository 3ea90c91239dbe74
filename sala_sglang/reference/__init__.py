"""Plain-PyTorch reference of MiniCPM-SALA (SPEC section 2): slow, obviously right, CPU fp32/fp64.

Every kernel and the served model are checked against these functions:
`lightning` (linear layers), `sparse` (InfLLM-v2 sparse layers), `model` (the whole network).
"""

from sala_sglang.reference.lightning import lightning_chunked, lightning_recurrent, lightning_slopes
from sala_sglang.reference.model import ReferenceCache, ReferenceModel, TeacherForced
from sala_sglang.reference.norms import rms_norm
from sala_sglang.reference.rope import apply_rope
from sala_sglang.reference.sparse import (
    block_scores,
    compress_keys,
    dense_attention,
    pool_block_scores,
    select_blocks,
    sparse_attention,
    sparse_layer_attention,
    sparse_mode,
    stage1_scores,
)

__all__ = [
    "ReferenceCache",
    "ReferenceModel",
    "TeacherForced",
    "apply_rope",
    "block_scores",
    "compress_keys",
    "dense_attention",
    "lightning_chunked",
    "lightning_recurrent",
    "lightning_slopes",
    "pool_block_scores",
    "rms_norm",
    "select_blocks",
    "sparse_attention",
    "sparse_layer_attention",
    "sparse_mode",
    "stage1_scores",
]
