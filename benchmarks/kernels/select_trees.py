"""The CUDA prefill selection of one source tree (the `sala_sglang` on PYTHONPATH): one
8192-token chunk at 128K and 512K of context, the real config's geometry, ms per call (median of 7
after 2 warm-ups, CUDA events). Run once per tree on the same GPU for a before/after of a kernel
change; each run prints one `SELTIME {json}` line (the numbers here: `results/
kernels_sparse_selection_trees_h100_2026-12-07.json`, benchmarks/README.md):

    PYTHONPATH=/path/to/tree python benchmarks/kernels/select_trees.py NAME
"""

from __future__ import annotations

import json
import sys

import sala_sglang
from sala_sglang.bench import gpu_time_ms
from sala_sglang.config import MiniCPMSALAConfig
from sala_sglang.ops.infllm_v2 import select_blocks
from sala_sglang.testing.paged_inputs import prefill_chunk

CONTEXTS = (131072, 524288)
CHUNK = 8192


def time_tree(name: str) -> dict:
    """{tree, path, context: {ms}} for the tree whose sala_sglang is imported."""
    model = MiniCPMSALAConfig()
    cfg = model.sparse
    out: dict = {"tree": name, "path": sala_sglang.__file__}
    for ctx in CONTEXTS:
        inp = prefill_chunk(cfg, ctx, CHUNK, model.num_attention_heads,
                            model.num_key_value_heads, model.head_dim, "cuda")
        args = (inp.q, inp.k1, inp.rt, inp.token_req, inp.token_pos, cfg,
                ctx // cfg.block_size + 1, model.head_dim ** -0.5)
        out[ctx] = {"ms": gpu_time_ms(lambda: select_blocks(*args, impl="cuda"), warmup=2,
                                       iters=7)}
    return out


if __name__ == "__main__":
    print("SELTIME", json.dumps(time_tree(sys.argv[1] if len(sys.argv) > 1 else "tree")))
