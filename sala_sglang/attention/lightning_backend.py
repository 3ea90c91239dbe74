"""Linear side of the hybrid backend: the 24 Lightning layers (SPEC 2.1).

SGLang's `HybridLinearAttnBackend` routes every layer that is not a sparse layer here (we register
this class through `register_linear_attn_model`). The per-request state lives in SGLang's
`MambaPool` as `temporal[slot, head, key, value]` (fp32 by default); SGLang zeroes a slot when a
request first gets it, and the kernels additionally start from zero when a request has no prefix.
Each forward's `LightningPlan` (decode kernel, prefill segment length) is built with its metadata,
eagerly or before a CUDA graph is captured or replayed, from host facts and what `__init__` read
once (the device, the kernel overrides); the layer calls only read it.

Prefix cache: SGLang's scheduler marks where a request's running state must be snapshotted into
its track slot (`ForwardBatch.mamba_track_*`): in prefill after the last whole 64-token chunk of
the extend (or at a branch point the radix tree asked for), in decode every
`--mamba-track-interval` tokens. The kernels write those snapshots as they go; the metadata here
turns SGLang's per-request lengths into "after how many tokens of this extend" on the device,
without a host sync. A request whose prefix was matched finds the snapshot already copied into
its working slot by SGLang before the forward, and starts from it (`has_initial_state`).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.hybrid_linear_attn_backend import MambaAttnBackendBase
from sglang.srt.layers.attention.mamba.mamba2_metadata import ForwardMetadata
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.runtime_context import get_parallel

from sala_sglang.ops._cuda import DeviceFacts
from sala_sglang.ops.lightning import lightning_decode, lightning_prefill
from sala_sglang.ops.lightning_commit import lightning_commit
from sala_sglang.ops.lightning_plan import PREFILL_LAUNCH, LightningPlan, plan_lightning
from sala_sglang.ops.lightning_verify import lightning_verify
from sala_sglang.ops.overrides import KernelOverrides
from sala_sglang.reference.lightning import lightning_slopes


class LightningBackend(MambaAttnBackendBase):
    """Chunked varlen prefill and a fused decode step over the state pool, in place."""

    # lengths are read on the device only, so the overlap scheduler need not wait for each
    # step's lengths on the host before preparing the next
    needs_cpu_seq_lens = False

    def __init__(self, model_runner, verify: bool = True) -> None:
        """`verify=False`: a backend that never verifies drafts (the plain decode graphs beside
        NGRAM's verify graphs), with no verify buffers."""
        super().__init__(model_runner)
        if self.topk > 1:
            raise NotImplementedError(
                f"MiniCPM-SALA verifies chain drafts; speculative top-k {self.topk} > 1 is not "
                "supported"
            )
        config = model_runner.model_config.hf_config
        tp_size, tp_rank = get_parallel().attn_tp_size, get_parallel().attn_tp_rank
        heads = config.lightning_nh // tp_size
        # Heads are split contiguously across TP ranks, so each rank takes its slice of slopes.
        self.slopes = (
            lightning_slopes(config.lightning_nh)[tp_rank * heads : (tp_rank + 1) * heads]
            .to(torch.float32)
            .to(self.device)
        )
        self.num_heads = heads
        self.head_dim = config.lightning_head_dim
        self.scale = self.head_dim**-0.5
        self.has_initial_state: torch.Tensor | None = None
        # prefill snapshots: after this many tokens of the extend (-1: none), one per request
        self.track_len: torch.Tensor | None = None
        # decode snapshots: (track slots, mask) of this forward; None with the prefix cache off
        self.decode_track: tuple[torch.Tensor, torch.Tensor] | None = None
        # SGLang places prefill snapshots at multiples of this from the extend's start; the
        # kernel can store a state only between its chunks
        self.snapshot_step = model_runner.server_args.mamba_cache_chunk_size
        if self.snapshot_step % PREFILL_LAUNCH["chunk"]:
            raise ValueError(
                f"mamba_cache_chunk_size {self.snapshot_step} is not a multiple of the lightning "
                f"prefill chunk {PREFILL_LAUNCH['chunk']}"
            )
        self.device_facts = DeviceFacts.of(self.device)
        self.prefer_impl = KernelOverrides.from_env().impl
        self.plan: LightningPlan | None = None
        self._init_verify(model_runner, verify)

    def _init_verify(self, model_runner, verify: bool) -> None:
        """Speculative verify: each layer's keys and values of the verified chains, kept until
        the commit replays the accepted ones (`commit_verified_drafts`)."""
        server_args = model_runner.server_args
        self.draft_len = (server_args.speculative_num_draft_tokens
                          if verify and server_args.speculative_algorithm else None)
        self.verify_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.draft_len is None:
            return
        pool = self.req_to_token_pool
        self.layer_index = pool.mamba_map
        # as many chains as request slots: a verify batch never holds more
        shape = (len(pool.mamba_map), pool.size * self.draft_len, self.num_heads, self.head_dim)
        dtype = model_runner.model_config.dtype
        self.verify_kv = (torch.empty(shape, dtype=dtype, device=self.device),
                          torch.empty(shape, dtype=dtype, device=self.device))

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Eager forwards (and prefill under SGLang's breakable graphs, whose attention runs
        outside the captured body): device ops only, no host sync."""
        self._plan(forward_batch)
        fb = forward_batch
        slots = self.req_to_token_pool.get_mamba_indices(fb.req_pool_indices)
        real = fb._original_batch_size
        if real is not None and real < slots.shape[0]:
            slots = slots.clone()
            slots[real:] = -1  # padding rows touch no state
        query_start_loc = None
        if fb.forward_mode.is_extend() and not fb.forward_mode.is_target_verify():
            query_start_loc = torch.zeros(fb.batch_size + 1, dtype=torch.int32, device=self.device)
            torch.cumsum(fb.extend_seq_lens, 0, out=query_start_loc[1:])
            self.has_initial_state = (fb.extend_prefix_lens > 0).to(torch.int32)
            self.track_len = None
            if fb.mamba_track_mask is not None:
                # the scheduler's track length counts the whole sequence; the kernel counts the
                # extend, floored to a snapshot step
                extend_len = fb.mamba_track_seqlens.long() - fb.extend_prefix_lens.long()
                self.track_len = torch.where(
                    fb.mamba_track_mask,
                    extend_len // self.snapshot_step * self.snapshot_step,
                    -1,
                ).to(torch.int32)
        self.forward_metadata = ForwardMetadata(
            query_start_loc=query_start_loc,
            mamba_cache_indices=slots,
            mamba_track_indices=fb.mamba_track_indices,
        )
        self._decode_track(fb)

    def init_forward_metadata_out_graph(
        self, forward_batch: ForwardBatch, in_capture: bool = False
    ) -> None:
        super().init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
        self._plan(forward_batch)
        self._decode_track(forward_batch)

    def _decode_track(self, forward_batch: ForwardBatch) -> None:
        # under CUDA graphs the destinations are the base class's static buffer and the mask is
        # the graph's input slot, both read by the kernels as captured; a replay's batch view
        # carries no mask (nothing runs in Python then)
        slots = self.forward_metadata.mamba_track_indices
        mask = getattr(forward_batch, "mamba_track_mask", None)
        self.decode_track = None if slots is None or mask is None else (slots, mask)

    def _plan(self, forward_batch: ForwardBatch) -> None:
        batch = forward_batch.batch_size
        mode = forward_batch.forward_mode
        extend = mode.is_extend() and not mode.is_target_verify()
        self.plan = plan_lightning(
            int(forward_batch.extend_num_tokens) if extend else batch,
            batch,
            self.num_heads,
            self.head_dim,
            self.device_facts,
            self.prefer_impl,
        )

    def _state(self, layer: RadixAttention) -> torch.Tensor:
        return self.req_to_token_pool.mamba2_layer_cache(layer.layer_id).temporal

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, self.num_heads, self.head_dim)

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        meta = self.forward_metadata
        if forward_batch.forward_mode.is_target_verify():
            return self._verify(q, k, v, layer)
        out = lightning_prefill(
            self._heads(q),
            self._heads(k),
            self._heads(v),
            self._state(layer),
            meta.mamba_cache_indices,
            meta.query_start_loc,
            self.has_initial_state,
            self.slopes,
            self.scale,
            segment_len=self.plan.segment_len,
            track_slots=None if self.track_len is None else meta.mamba_track_indices,
            track_len=self.track_len,
        )
        return out.view(-1, self.num_heads * self.head_dim)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        track_slots, track_mask = self.decode_track or (None, None)
        out = lightning_decode(
            self._heads(q),
            self._heads(k),
            self._heads(v),
            self._state(layer),
            self.forward_metadata.mamba_cache_indices,
            self.slopes,
            self.scale,
            impl=self.plan.decode_impl,
            track_slots=track_slots,
            track_mask=track_mask,
        )
        return out.view(-1, self.num_heads * self.head_dim)

    def _verify(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layer: RadixAttention) -> torch.Tensor:
        """Outputs of every request's chain of drafts, the state pool left as it was; the keys
        and values are kept for the commit."""
        layer_keys, layer_values = (kv[self.layer_index[layer.layer_id]] for kv in self.verify_kv)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        layer_keys[: k.shape[0]].copy_(k)
        layer_values[: v.shape[0]].copy_(v)
        out = lightning_verify(
            q, k, v, self._state(layer), self.forward_metadata.mamba_cache_indices, self.slopes,
            self.scale, self.draft_len,
        )
        return out.view(-1, self.num_heads * self.head_dim)

    def commit_verified_drafts(
        self,
        last_correct_step_indices: torch.Tensor,
        mamba_track_indices: torch.Tensor | None,
        mamba_steps_to_track: torch.Tensor | None,
        model=None,
    ) -> None:
        """After the verify's sampling (SGLang's `update_mamba_state_after_mtp_verify`): advance
        every layer's state by the accepted tokens of each chain (steps 0..last correct), and
        write the state after `mamba_steps_to_track` into the track slot where it is >= 0."""
        requests = last_correct_step_indices.shape[0]
        layers, rows, heads, dim = self.verify_kv[0].shape
        keys, values = (kv.view(layers, rows // self.draft_len, self.draft_len, heads, dim)[
            :, :requests] for kv in self.verify_kv)
        tracked = mamba_track_indices is not None and mamba_steps_to_track is not None
        lightning_commit(
            self.req_to_token_pool.mamba_pool.mamba_cache.temporal,
            self.forward_metadata.mamba_cache_indices[:requests],
            keys,
            values,
            self.slopes,
            last_correct_step_indices + 1,
            track_slots=mamba_track_indices[:requests] if tracked else None,
            track_steps=mamba_steps_to_track if tracked else None,
        )
