"""The sparse-layer backend's per-forward logic on a simulated paged KV cache, CPU only.

Several requests are prefilled in shared 64-token batches split at awkward places, then decoded
together past the tiny geometry's dense_len; the backend (metadata, KV writes, compressed keys,
mode switch, selection, attention; Triton kernels in the CPU interpreter) must give, token by
token, the reference's sparse-layer attention over each whole sequence.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("sglang")

# conftest.py has Triton interpret its kernels in this process only where no GPU is visible; the
# GPU serving tests cover the backend on a GPU.
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="runs Triton in the CPU interpreter"),
    # Triton 3's interpreter, on every scalar it reads back (thousands per run); not our code.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

BS, G, HQ, D, LAYER = 16, 2, 8, 32, 3
PROMPTS = [300, 181, 90, 260]
NEW_TOKENS = 20


class Pool:
    """The slice of SGLang's KV pool the backend uses: one layer's keys and values by slot."""

    def __init__(self, slots: int) -> None:
        self.k = torch.zeros(slots, G, D)
        self.v = torch.zeros_like(self.k)

    def set_kv_buffer(self, layer, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[loc.long()] = k.view(-1, G, D)
        self.v[loc.long()] = v.view(-1, G, D)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v


def test_backend_matches_reference_over_chunked_prefill_and_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    import sala_sglang.ops.sparse as ops
    from sala_sglang.attention.sparse_backend import SparseLayerBackend
    from sala_sglang.config import SparseConfig
    from sala_sglang.reference.sparse import compress_keys, sparse_layer_attention

    torch.manual_seed(0)
    cfg = SparseConfig(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=BS,
                       window_size=64, topk=4, use_nope=False, dense_len=256)
    total = [p + NEW_TOKENS for p in PROMPTS]
    pages = sum(math.ceil(n / BS) for n in total) + 4

    pool = Pool((pages + 1) * BS)
    rt = torch.zeros(len(PROMPTS) + 1, 400, dtype=torch.int32)
    perm = (torch.randperm(pages) + 1).tolist()
    for r, n in enumerate(total):  # page-aligned allocation, as SGLang's paged allocator does
        own = [perm.pop() for _ in range(math.ceil(n / BS))]
        pos = torch.arange(n)
        rt[r + 1, :n] = (torch.tensor(own)[pos // BS] * BS + pos % BS).to(torch.int32)

    # a scratch budget of ~20 tokens at the widest prefill, so selection runs in pieces
    monkeypatch.setattr(ops, "SELECTION_SCRATCH_BYTES",
                        20 * G * 32 * (4 * (BS // cfg.kernel_stride) + 8))
    pieces, widths = [], []
    select_piece = ops._select_blocks_triton

    def recorded(q, *args, **kwargs):
        pieces.append(q.shape[0])
        return select_piece(q, *args, **kwargs)

    monkeypatch.setattr(ops, "_select_blocks_triton", recorded)

    be = object.__new__(SparseLayerBackend)
    be.sparse, be.token_to_kv_pool = cfg, pool
    be.req_to_token_pool = SimpleNamespace(req_to_token=rt)
    be.dense_len, be.num_heads, be.head_dim, be.scale = cfg.dense_len, HQ, D, D**-0.5
    be.max_blocks = 400 // BS
    be.k1 = {LAYER: torch.zeros(pages + 1, BS // cfg.kernel_stride, G, D)}
    be.k2 = {LAYER: torch.zeros(pages + 1, 1, G, D)}
    layer = SimpleNamespace(layer_id=LAYER)

    seqs = [{"q": torch.randn(n, HQ, D), "k": torch.randn(n, G, D), "v": torch.randn(n, G, D)}
            for n in total]
    outs = [torch.zeros(n, HQ, D) for n in total]
    done = [0] * len(PROMPTS)

    def run(mode: ForwardMode, items: list[tuple[int, int]]) -> None:
        """One forward of (request index, number of new tokens) pairs."""
        idx = [r for r, _ in items]
        lens = [n for _, n in items]
        prefix = [done[r] for r in idx]
        pos = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix, lens)])

        def gathered(key: str) -> torch.Tensor:
            return torch.cat([seqs[r][key][p:p + n] for r, p, n in zip(idx, prefix, lens)])

        loc = torch.cat([rt[r + 1, p:p + n] for r, p, n in zip(idx, prefix, lens)])
        q, k, v = gathered("q"), gathered("k"), gathered("v")
        fb = SimpleNamespace(
            forward_mode=mode, req_pool_indices=torch.tensor([r + 1 for r in idx]),
            seq_lens=torch.tensor([p + n for p, n in zip(prefix, lens)]),
            orig_seq_lens=torch.tensor([max(PROMPTS[r], p + n)
                                        for r, p, n in zip(idx, prefix, lens)]),
            extend_seq_lens=torch.tensor(lens), extend_prefix_lens=torch.tensor(prefix),
            extend_seq_lens_cpu=lens, extend_prefix_lens_cpu=prefix, extend_num_tokens=sum(lens),
            positions=pos, out_cache_loc=loc)
        be.init_forward_metadata_in_graph(fb)
        if mode != ForwardMode.DECODE:
            widths.append(be.meta.width)
        fn = be.forward_decode if mode == ForwardMode.DECODE else be.forward_extend
        o = fn(q.reshape(len(pos), -1), k.reshape(len(pos), -1), v.reshape(len(pos), -1), layer,
               fb).view(-1, HQ, D)
        s = 0
        for r, p, n in zip(idx, prefix, lens):
            outs[r][p:p + n] = o[s:s + n]
            s += n
            done[r] = p + n

    # chunked prefill, 64 tokens per batch shared across requests (awkward splits), then decode
    budget = 64
    while any(done[r] < PROMPTS[r] for r in range(len(PROMPTS))):
        items, left = [], budget
        for r in range(len(PROMPTS)):
            if done[r] < PROMPTS[r] and left > 0:
                n = min(PROMPTS[r] - done[r], left, 37 if r == 1 else 64)
                items.append((r, n))
                left -= n
        run(ForwardMode.EXTEND, items)
    for _ in range(NEW_TOKENS):
        run(ForwardMode.DECODE, [(r, 1) for r in range(len(PROMPTS))])

    worst = 0.0
    for r, n in enumerate(total):
        s = seqs[r]
        k1 = compress_keys(s["k"].double(), cfg.kernel_size, cfg.kernel_stride)
        ref = sparse_layer_attention(s["q"].double(), s["k"].double(), s["v"].double(), k1,
                                     torch.arange(n), PROMPTS[r], cfg, cfg.dense_len, D**-0.5)
        worst = max(worst, float((outs[r].double() - ref).norm() / ref.norm()))
    result = {"worst_rel_err": worst, "widths": sorted(set(widths)),
              "piece_sizes": sorted(set(pieces))}
    assert result["worst_rel_err"] < 1e-5, result
    # Sizes that change from chunk to chunk would compile the selection kernels again: the
    # prefill width is a multiple of 16 blocks and selection pieces start on 16-token boundaries.
    assert all(w % 16 == 0 for w in result["widths"]), result
    assert 16 in result["piece_sizes"] and max(result["piece_sizes"]) <= 64, result
