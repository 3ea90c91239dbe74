"""The sparse-layer backend's per-forward logic on a simulated paged KV cache, CPU only.

Several requests are prefilled in shared 64-token batches split at awkward places, then decoded
(or verified in speculative chains) together past the tiny geometry's dense_len; the backend
(metadata, the ops' plan, KV writes, compressed keys, mode switch, selection, attention; Triton
kernels in the CPU interpreter) must give, token by token, the reference's sparse-layer attention
over each whole sequence.
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
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="runs Triton in the CPU interpreter")

from conftest import TINY_SPARSE_CONFIG  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from sala_sglang.attention import sparse_backend  # noqa: E402
from sala_sglang.config import SparseConfig  # noqa: E402
from sala_sglang.ops.infllm_v2 import compress_new_windows, select  # noqa: E402
from sala_sglang.ops.infllm_v2 import plan as sparse_plan  # noqa: E402
from sala_sglang.ops.overrides import KernelOverrides  # noqa: E402
from sala_sglang.reference.sparse import compress_keys, sparse_layer_attention  # noqa: E402

G, HQ, D, LAYER = 2, 8, 32, 3
MAX_LEN = 400


class Pool:
    """SGLang's KV pool as the backend uses it: one K and one V buffer shared by every layer."""

    def __init__(self, pages: int, block: int) -> None:
        self.k = torch.zeros((pages + 1) * block, G, D)
        self.v = torch.zeros_like(self.k)

    def set_kv_buffer(self, layer, loc, k, v):
        self.k[loc.long()] = k.view(-1, G, D)
        self.v[loc.long()] = v.view(-1, G, D)

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


def build_backend(make_tiny_config, monkeypatch, pool: Pool,
                  rt: torch.Tensor) -> sparse_backend.SparseLayerBackend:
    """The backend as SGLang builds it, on the CPU, for a tiny config (sparse layers 0, 3, 5)."""
    config = make_tiny_config(head_dim=D, sparse_config=dict(TINY_SPARSE_CONFIG, topk=4))
    monkeypatch.setattr(sparse_backend, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    monkeypatch.setattr(sparse_backend, "_log_memory_split", lambda runner, backend: None)
    runner = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=config, context_len=MAX_LEN), device="cpu",
        token_to_kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=rt),
        server_args=SimpleNamespace(page_size=16))
    return sparse_backend.SparseLayerBackend(runner)


def paged_requests(total: list[int], block: int) -> tuple[Pool, torch.Tensor]:
    """A pool and a req_to_token table with page-aligned allocations in shuffled order, as
    SGLang's paged allocator gives them."""
    pages = sum(math.ceil(n / block) for n in total) + 4
    rt = torch.zeros(len(total) + 1, MAX_LEN, dtype=torch.int32)
    perm = (torch.randperm(pages) + 1).tolist()
    for r, n in enumerate(total):
        own = [perm.pop() for _ in range(math.ceil(n / block))]
        pos = torch.arange(n)
        rt[r + 1, :n] = (torch.tensor(own)[pos // block] * block + pos % block).to(torch.int32)
    return Pool(pages, block), rt


def forward_batch(mode, items, done, prompts, rt):
    """SGLang's ForwardBatch fields the backend reads, for (request, new tokens) pairs."""
    idx = [r for r, _ in items]
    lens = [n for _, n in items]
    prefix = [done[r] for r in idx]
    pos = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix, lens)])
    loc = torch.cat([rt[r + 1, p : p + n] for r, p, n in zip(idx, prefix, lens)])
    return SimpleNamespace(
        forward_mode=mode, req_pool_indices=torch.tensor([r + 1 for r in idx]),
        seq_lens=torch.tensor([p + n for p, n in zip(prefix, lens)]),
        orig_seq_lens=torch.tensor([max(prompts[r], p + n) for r, p, n in zip(idx, prefix, lens)]),
        extend_seq_lens=torch.tensor(lens), extend_prefix_lens=torch.tensor(prefix),
        extend_seq_lens_cpu=lens, extend_prefix_lens_cpu=prefix, extend_num_tokens=sum(lens),
        positions=pos, out_cache_loc=loc)


def verify_batch(requests: list[int], done: list[int], rt: torch.Tensor, chain: int,
                 pad: int) -> SimpleNamespace:
    """SGLang's TARGET_VERIFY ForwardBatch: each request's chain of `chain` tokens (its last sampled
    one and the drafts) after its done[r] committed ones, then `pad` CUDA-graph padding rows
    (seq_len = the fill value 1, a live request's slot, KV slot 0, positions an earlier replay
    left). The extend fields are None, as SGLang may leave them in this mode."""
    start = [done[r] for r in requests]
    stale = torch.arange(start[0], start[0] + chain)
    return SimpleNamespace(
        forward_mode=ForwardMode.TARGET_VERIFY, spec_info=SimpleNamespace(draft_token_num=chain),
        req_pool_indices=torch.tensor([r + 1 for r in requests] + [requests[0] + 1] * pad),
        seq_lens=torch.tensor(start + [1] * pad), orig_seq_lens=None,
        positions=torch.cat([torch.arange(p, p + chain) for p in start] + [stale] * pad),
        out_cache_loc=torch.cat([rt[r + 1, p : p + chain] for r, p in zip(requests, start)]
                                + [torch.zeros(chain, dtype=torch.int32)] * pad),
        extend_seq_lens=None, extend_prefix_lens=None, extend_num_tokens=None,
        extend_seq_lens_cpu=None, extend_prefix_lens_cpu=None)


class Driver:
    """Runs forwards of (request, new tokens) pairs through the backend's sparse layer LAYER and
    keeps each request's outputs, the prefill widths and the plans."""

    def __init__(self, be, seqs: list[dict], prompts: list[int], rt: torch.Tensor,
                 done: list[int]) -> None:
        self.be, self.seqs, self.prompts, self.rt, self.done = be, seqs, prompts, rt, done
        self.outs = [torch.zeros(s["q"].shape[0], HQ, D) for s in seqs]
        self.widths: list[int] = []
        self.plans: list = []

    def run(self, mode, items: list[tuple[int, int]]) -> None:
        be, done = self.be, self.done
        fb = forward_batch(mode, items, done, self.prompts, self.rt)
        be.init_forward_metadata_in_graph(fb)
        self.plans.append((mode, be.plan))
        if mode != ForwardMode.DECODE:
            self.widths.append(be.meta.width)
        rows = [(r, done[r], n) for r, n in items]
        q, k, v = (torch.cat([self.seqs[r][x][p : p + n] for r, p, n in rows]).flatten(1)
                   for x in ("q", "k", "v"))
        fn = be.forward_decode if mode == ForwardMode.DECODE else be.forward_extend
        o = fn(q, k, v, SimpleNamespace(layer_id=LAYER), fb).view(-1, HQ, D)
        s = 0
        for r, p, n in rows:
            self.outs[r][p : p + n] = o[s : s + n]
            s += n
            done[r] = p + n

    def verify(self, chains: dict[int, dict[str, torch.Tensor]],
               pad: int = 0) -> list[torch.Tensor]:
        """One TARGET_VERIFY forward of each request's chain (its next tokens' q, k, v) and `pad`
        padding rows of random tokens; returns the chains' outputs and commits nothing."""
        first = next(iter(chains.values()))
        chain = first["q"].shape[0]
        fb = verify_batch(list(chains), self.done, self.rt, chain, pad)
        self.be.init_forward_metadata_in_graph(fb)
        self.plans.append((fb.forward_mode, self.be.plan))
        q, k, v = (torch.cat([c[x] for c in chains.values()]
                             + [torch.randn(pad * chain, *first[x].shape[1:])]).flatten(1)
                   for x in ("q", "k", "v"))
        o = self.be.forward_extend(q, k, v, SimpleNamespace(layer_id=LAYER), fb).view(-1, HQ, D)
        return list(o[: len(chains) * chain].split(chain))

    def cache_prompts(self) -> None:
        """The cache a prefill of every prompt leaves, its KV and compressed keys (written by the
        backend's op), without the prompts' attention (the interpreter's slowest part; the first
        test checks a prefill through the backend)."""
        be, rt, prompts = self.be, self.rt, self.prompts
        for r, (seq, p) in enumerate(zip(self.seqs, prompts)):
            be.token_to_kv_pool.set_kv_buffer(None, rt[r + 1, :p], seq["k"][:p], seq["v"][:p])
        cfg, lens = be.sparse, torch.tensor(prompts, dtype=torch.int32)
        compress_new_windows(be.token_to_kv_pool.k, be.k1[LAYER], rt,
                             torch.arange(1, len(prompts) + 1, dtype=torch.int32),
                             torch.zeros_like(lens), lens, cfg,
                             max_new_windows=max(prompts) // cfg.kernel_stride + 2)
        self.done[:] = prompts

def reference(seq: dict[str, torch.Tensor], n: int, prompt: int, cfg: SparseConfig) -> torch.Tensor:
    """The reference's sparse-layer attention (float64) over a sequence's first n tokens."""
    q, k, v = (seq[x][:n].double() for x in ("q", "k", "v"))
    k1 = compress_keys(k, cfg.kernel_size, cfg.kernel_stride)
    return sparse_layer_attention(q, k, v, k1, torch.arange(n), prompt, cfg, cfg.dense_len, D**-0.5)


def test_backend_matches_reference_over_chunked_prefill_and_decode(
    make_tiny_config, monkeypatch, relative_error
) -> None:
    torch.manual_seed(0)
    prompts = [300, 181, 90, 260]
    new_tokens = 20
    total = [p + new_tokens for p in prompts]
    pool, rt = paged_requests(total, 16)
    be = build_backend(make_tiny_config, monkeypatch, pool, rt)
    cfg = be.sparse
    assert set(be.k1) == {0, 3, 5} and be.k1[LAYER].shape[1:] == (cfg.windows_per_block, G, D)

    # a scratch budget of ~20 tokens at the widest prefill, so selection runs in pieces
    monkeypatch.setattr(sparse_plan, "SELECTION_SCRATCH_BYTES",
                        20 * G * 32 * (4 * cfg.windows_per_block + 8))
    pieces: list[int] = []
    piece = select._select_piece

    def recorded(q, *args, **kwargs):
        pieces.append(q.shape[0])
        return piece(q, *args, **kwargs)

    monkeypatch.setattr(select, "_select_piece", recorded)

    seqs = [{"q": torch.randn(n, HQ, D), "k": torch.randn(n, G, D), "v": torch.randn(n, G, D)}
            for n in total]
    done = [0] * len(prompts)
    driver = Driver(be, seqs, prompts, rt, done)
    run, outs, widths, plans = driver.run, driver.outs, driver.widths, driver.plans

    # chunked prefill, 64 tokens per batch shared across requests (awkward splits), then decode
    budget = 64
    while any(done[r] < prompts[r] for r in range(len(prompts))):
        items, left = [], budget
        for r in range(len(prompts)):
            if done[r] < prompts[r] and left > 0:
                n = min(prompts[r] - done[r], left, 37 if r == 1 else 64)
                items.append((r, n))
                left -= n
        run(ForwardMode.EXTEND, items)
    for _ in range(new_tokens):
        run(ForwardMode.DECODE, [(r, 1) for r in range(len(prompts))])

    for r, n in enumerate(total):
        want = reference(seqs[r], n, prompts[r], cfg)
        assert relative_error(outs[r], want) < 1e-5, f"request {r}"
    # Sizes that change from chunk to chunk would compile the selection kernels again: the
    # prefill width is a multiple of 16 blocks and selection pieces start on 16-token boundaries.
    assert all(w % 16 == 0 for w in widths), widths
    assert 16 in pieces and max(pieces) <= 64, pieces
    # one plan per forward: extend unsplit and token-tiled, decode split (CPU: Triton throughout)
    for mode, p in plans:
        decode = mode == ForwardMode.DECODE
        assert (p.compress, p.select, p.attention) == ("triton",) * 3
        assert p.attention_splits == p.triton_select_splits == (8 if decode else 1)
        assert p.triton_token_tile == (1 if decode else sparse_plan.TRITON_TOKEN_TILE)


def test_backend_reads_kernel_overrides_once_when_built(make_tiny_config, monkeypatch) -> None:
    pool, rt = paged_requests([100], 16)
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "triton")
    monkeypatch.setenv("SALA_SGLANG_SELECT_SEGMENT", "3")
    be = build_backend(make_tiny_config, monkeypatch, pool, rt)
    assert be.overrides == KernelOverrides(impl="triton", select_segment=3)
    # later changes reach no plan: every layer call runs on the plan of its forward
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "not-an-impl")
    be.init_forward_metadata_in_graph(forward_batch(ForwardMode.EXTEND, [(0, 40)], [0], [100], rt))
    assert be.plan.select_segment == 3 and be.plan.compress == "triton"
    monkeypatch.setenv("SALA_SGLANG_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="SALA_SGLANG_KERNELS='cuda-please'"):
        build_backend(make_tiny_config, monkeypatch, pool, rt)


def test_a_prefix_hit_reads_the_shared_pages_and_writes_only_its_own(
    make_tiny_config, monkeypatch, relative_error
) -> None:
    # As the prefix cache serves it: B's first 160 tokens (10 pages) are A's pages, B prefills
    # only its own 170 tokens from there, in awkward chunks, while A decodes on; both must be the
    # reference's over their whole sequences (B's compressed keys of the windows that cross into
    # its own pages must not overwrite A's shared rows).
    torch.manual_seed(1)
    block, shared, new_tokens = 16, 160, 12
    prompts = [300, 330]
    total = [p + new_tokens for p in prompts]
    pages = sum(math.ceil(n / block) for n in total) + 4
    rt = torch.zeros(3, MAX_LEN, dtype=torch.int32)
    perm = (torch.randperm(pages) + 1).tolist()
    own = [[perm.pop() for _ in range(math.ceil(n / block))] for n in total]
    own[1][: shared // block] = own[0][: shared // block]
    for r, n in enumerate(total):
        pos = torch.arange(n)
        rt[r + 1, :n] = (torch.tensor(own[r])[pos // block] * block + pos % block).int()
    pool = Pool(pages, block)
    be = build_backend(make_tiny_config, monkeypatch, pool, rt)
    cfg = be.sparse
    seqs = [{"q": torch.randn(n, HQ, D), "k": torch.randn(n, G, D), "v": torch.randn(n, G, D)}
            for n in total]
    for x in ("k", "v"):  # the shared prefix: the same tokens, so the same keys and values
        seqs[1][x][:shared] = seqs[0][x][:shared]
    done = [0, shared]
    driver = Driver(be, seqs, prompts, rt, done)
    run, outs = driver.run, driver.outs

    while done[0] < prompts[0]:  # A, the donor
        run(ForwardMode.EXTEND, [(0, min(64, prompts[0] - done[0]))])
    run(ForwardMode.DECODE, [(0, 1)])
    while done[1] < prompts[1]:  # B from the hit, beside A's decode steps
        run(ForwardMode.EXTEND, [(1, min(37, prompts[1] - done[1]))])
        run(ForwardMode.DECODE, [(0, 1)])
    while done[1] < total[1]:
        run(ForwardMode.DECODE, [(r, 1) for r in range(2) if done[r] < total[r]])
    for r, n in enumerate(total):
        s = seqs[r]
        k1 = compress_keys(s["k"].double(), cfg.kernel_size, cfg.kernel_stride)
        want = sparse_layer_attention(s["q"].double(), s["k"].double(), s["v"].double(), k1,
                                      torch.arange(n), prompts[r], cfg, cfg.dense_len, D**-0.5)
        start = shared if r == 1 else 0  # B computes nothing before its hit
        assert relative_error(outs[r][start:done[r]], want[start:done[r]]) < 1e-5, f"request {r}"


def random_sequences(lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    return [{"q": torch.randn(n, HQ, D), "k": torch.randn(n, G, D), "v": torch.randn(n, G, D)}
            for n in lengths]


@pytest.mark.parametrize("chain", [2, 4])
def test_verify_commits_the_accepted_prefix_and_rejected_drafts_leave_no_trace(
    chain, make_tiny_config, monkeypatch, relative_error
) -> None:
    # Speculative verify forwards (with a CUDA-graph padding row) whose chains cross 16-token
    # pages and dense_len: each accepts a random prefix of its chain; the next verify starts at
    # the new seq_len with the true tokens where drafts were rejected. Rejected drafts wrote KV
    # and compressed-key windows: every accepted token must still be the reference's over the
    # committed sequence, and the compressed-key cache must hold the committed windows only.
    torch.manual_seed(chain)
    prompts = [250, 300, 60]
    total = [p + 10 for p in prompts]
    pool, rt = paged_requests([n + chain for n in total], 16)
    be = build_backend(make_tiny_config, monkeypatch, pool, rt)
    cfg = be.sparse
    seqs = random_sequences([n + chain for n in total])
    done = [0] * len(prompts)
    driver = Driver(be, seqs, prompts, rt, done)
    driver.cache_prompts()
    while any(done[r] < total[r] for r in range(len(prompts))):
        chains, accepted = {}, {}
        for r in (r for r in range(len(prompts)) if done[r] < total[r]):
            accepted[r] = int(torch.randint(1, chain + 1, ()))
            chains[r] = {x: seqs[r][x][done[r] : done[r] + chain].clone() for x in seqs[r]}
            for x in chains[r]:  # the drafts SGLang will reject: not the true tokens
                chains[r][x][accepted[r] :] = 2 * torch.randn_like(chains[r][x][accepted[r] :])
        for r, out in zip(chains, driver.verify(chains, pad=1)):
            driver.outs[r][done[r] : done[r] + accepted[r]] = out[: accepted[r]]
            done[r] += accepted[r]

    bs = cfg.block_size
    for r, (p, n) in enumerate(zip(prompts, done)):
        want = reference(seqs[r], n, p, cfg)
        assert relative_error(driver.outs[r][p:n], want[p:]) < 1e-5, f"request {r}"
        homes = [cfg.k1_home(c) for c in range(cfg.num_k1(n))]
        cached = torch.stack([be.k1[LAYER][rt[r + 1, b * bs] // bs, row] for b, row in homes])
        want_k1 = compress_keys(seqs[r]["k"][:n].double(), cfg.kernel_size, cfg.kernel_stride)
        assert relative_error(cached, want_k1) < 1e-5, f"request {r}"


@pytest.mark.parametrize("requests", [3, 1])
@pytest.mark.parametrize("chain", [2, 4])
def test_verify_gives_each_token_what_decoding_it_alone_gives(
    chain, requests, make_tiny_config, monkeypatch, relative_error
) -> None:
    # One chain per request: across dense_len (request 0; and for chain 4 into a new page), across
    # a page boundary with selection (request 1) and in dense mode (request 2); or request 1's
    # alone (a batch of one, whose per-token arrays the kernels once read past). Then, as if every
    # draft were rejected, the same tokens decode one at a time from the same seq_len.
    torch.manual_seed(10 + chain)
    prompts = [254, 321 - chain, 65 - chain] if requests == 3 else [321 - chain]
    pool, rt = paged_requests([p + chain for p in prompts], 16)
    be = build_backend(make_tiny_config, monkeypatch, pool, rt)
    seqs = random_sequences([p + chain for p in prompts])
    done = [0] * len(prompts)
    driver = Driver(be, seqs, prompts, rt, done)
    driver.cache_prompts()
    verified = driver.verify({r: {x: s[x][p:] for x in s} for r, (s, p) in
                              enumerate(zip(seqs, prompts))})
    for _ in range(chain):
        driver.run(ForwardMode.DECODE, [(r, 1) for r in range(len(prompts))])
    for r, p in enumerate(prompts):
        assert relative_error(verified[r], driver.outs[r][p:]) < 1e-6, f"request {r}"


def test_verify_refuses_a_chain_that_would_complete_a_window_in_a_padding_row(
    make_tiny_config, monkeypatch
) -> None:
    pool, rt = paged_requests([100], 16)
    be = build_backend(make_tiny_config, monkeypatch, pool, rt)
    chain = be.sparse.kernel_size - 1  # keys 1 .. kernel_size of a padding row: window 0
    with pytest.raises(ValueError, match=f"speculative_num_draft_tokens {chain}: .* at most"):
        be.init_forward_metadata_in_graph(verify_batch([0], [50], rt, chain, pad=1))


@pytest.mark.parametrize("chain", [1, 4])
def test_one_requests_chain_gets_dense_token_arrays(chain, make_tiny_config, monkeypatch) -> None:
    # A verify (or decode) batch of one request: its slot expanded over the chain must come out as
    # its own array (a flattened expand of one slot is a stride-0 view the kernels read past; on
    # an H100 this was the NGRAM server's illegal memory access).
    pool, rt = paged_requests([100], 16)
    be = build_backend(make_tiny_config, monkeypatch, pool, rt)
    be.init_forward_metadata_in_graph(verify_batch([0], [50], rt, chain, pad=0))
    meta = be.meta
    for name in ("token_req", "token_pos", "token_sparse"):
        array = getattr(meta, name)
        assert array.is_contiguous() and array.shape == (chain,), name
    assert meta.token_req.tolist() == [1] * chain
    assert meta.token_pos.tolist() == list(range(50, 50 + chain))
