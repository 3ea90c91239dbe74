"""The whole reference model (SPEC 2): cache, chunking, dense/sparse modes, muP, loading, decode."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sala_sglang.reference import ReferenceModel
from sala_sglang.reference.sparse import block_scores, compress_keys

pytestmark = pytest.mark.usefixtures("single_thread")

ALWAYS_DENSE = 10**9  # dense_len no sequence reaches
N_SEL_TOKENS = 160  # tiny config: (topk 6 + 4 local blocks) * block 16
DENSE_LEN = 256  # tiny config's sparse_config.dense_len


def _ids(n: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _full(model: ReferenceModel, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    return model(ids, model.new_cache(prompt_len))


def _row_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position relative difference [T]."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


# ---- caching and chunking -------------------------------------------------------------------


def test_incremental_decode_equals_full_forward(make_reference_model, relative_error):
    model = make_reference_model()
    ids, prompt_len = _ids(300, seed=1), 150  # decode crosses dense_len (256) and drops blocks
    cache = model.new_cache(prompt_len)
    steps = [model(ids[:prompt_len], cache)] + [
        model(ids[t : t + 1], cache) for t in range(prompt_len, 300)
    ]
    full = _full(model, ids, prompt_len)
    assert cache.length == 300
    assert relative_error(torch.cat(steps), full) < 1e-12


@pytest.mark.parametrize(
    "splits",
    [
        [1, 346],
        [13, 27, 100, 207],  # splits inside compression windows (kernel 16, stride 8)
        [63, 1, 1, 64, 218],
        [170, 30, 147],  # boundaries off the block grid
        [5, 7, 11, 17, 23, 29, 31, 37, 41, 43, 47, 53],
    ],
)
def test_chunked_prefill_at_any_split_equals_one_shot(splits, make_reference_model, relative_error):
    model = make_reference_model(seed=2)
    n = sum(splits)
    ids = _ids(n, seed=3)
    cache = model.new_cache(n)
    outs, start = [], 0
    for size in splits:
        outs.append(model(ids[start : start + size], cache))
        start += size
    assert relative_error(torch.cat(outs), model(ids)) < 1e-12


def test_cache_keeps_compressed_keys_equal_to_compressing_all_cached_keys(make_reference_model):
    model = make_reference_model(seed=4)
    sparse_cfg = model.config.sparse
    ids = _ids(230, seed=5)
    cache = model.new_cache(200)
    for a, b in [(0, 9), (9, 70), (70, 121), (121, 200)] + [(t, t + 1) for t in range(200, 230)]:
        model(ids[a:b], cache)
        for layer_cache in cache.sparse.values():
            keys = layer_cache.keys
            assert keys.shape[0] == b
            assert layer_cache.k1.shape[0] == sparse_cfg.num_k1(b)
            k1 = compress_keys(keys, sparse_cfg.kernel_size, sparse_cfg.kernel_stride)
            assert torch.allclose(layer_cache.k1, k1, rtol=1e-14, atol=1e-14)
    assert set(cache.sparse) == {0, 3, 5} and set(cache.linear_state) == {1, 2, 4}
    assert all(
        s.shape == (4, 16, 16) and s.dtype == torch.float64 for s in cache.linear_state.values()
    )


# ---- dense and sparse modes -----------------------------------------------------------------


def test_sparse_model_equals_dense_model_up_to_selected_tokens(make_reference_model):
    ids = _ids(300, seed=6)
    sparse = make_reference_model(seed=7, dense_as_sparse=True)(ids)
    dense = make_reference_model(seed=7, dense_len=ALWAYS_DENSE)(ids)
    assert _row_err(sparse[:N_SEL_TOKENS], dense[:N_SEL_TOKENS]).max() < 1e-12


def test_sparse_model_differs_from_dense_model_once_blocks_are_dropped(make_reference_model):
    ids = _ids(300, seed=6)
    sparse = make_reference_model(seed=7, dense_as_sparse=True)(ids)
    dense = make_reference_model(seed=7, dense_len=ALWAYS_DENSE)(ids)
    assert (_row_err(sparse[N_SEL_TOKENS:], dense[N_SEL_TOKENS:]) > 1e-6).all()


def test_short_prompt_is_dense_and_its_decode_turns_sparse_at_dense_len(make_reference_model):
    ids, prompt_len = _ids(300, seed=8), 200
    model = make_reference_model(seed=9)
    assert model.dense_len == DENSE_LEN
    cache = model.new_cache(prompt_len)
    mixed = torch.cat(
        [model(ids[:prompt_len], cache)]
        + [model(ids[t : t + 1], cache) for t in range(prompt_len, 300)]
    )
    dense = _full(make_reference_model(seed=9, dense_len=ALWAYS_DENSE), ids, prompt_len)
    sparse = _full(make_reference_model(seed=9, dense_as_sparse=True), ids, prompt_len)
    first_sparse = DENSE_LEN - 1  # position p with p + 1 == dense_len
    assert _row_err(mixed[:first_sparse], dense[:first_sparse]).max() < 1e-12
    assert (_row_err(mixed[first_sparse:], dense[first_sparse:]) > 1e-6).all()
    # Between n_sel * block_size and dense_len the prompt really took the dense path.
    assert (
        _row_err(mixed[N_SEL_TOKENS:first_sparse], sparse[N_SEL_TOKENS:first_sparse]) > 1e-6
    ).all()


def test_prompt_at_least_dense_len_is_sparse_for_all_its_tokens(make_reference_model):
    ids = _ids(300, seed=10)
    long_prompt = make_reference_model(seed=11)(ids)  # prompt_len 300 >= dense_len 256
    sparse = make_reference_model(seed=11, dense_as_sparse=True)(ids)
    dense = make_reference_model(seed=11, dense_len=ALWAYS_DENSE)(ids)
    assert _row_err(long_prompt, sparse).max() < 1e-12
    assert (_row_err(long_prompt[N_SEL_TOKENS:], dense[N_SEL_TOKENS:]) > 1e-6).all()


def test_stage1_scores_every_sparse_layer_once_in_order_when_given(make_reference_model):
    ids = _ids(300, seed=12)
    model = make_reference_model(seed=13, dense_as_sparse=True)
    seen = []

    def recording(layer, q, k1, positions, cfg):
        seen.append(layer)
        return block_scores(q, k1, positions, cfg)

    assert torch.equal(model(ids, model.new_cache(300), stage1=recording), _full(model, ids, 300))
    assert seen == list(range(len(model.config.sparse_layer_ids)))

    def negated_queries(layer, q, k1, positions, cfg):
        return block_scores(-q, k1, positions, cfg)

    perturbed = model(ids, model.new_cache(300), stage1=negated_queries)
    assert (_row_err(perturbed[N_SEL_TOKENS:], _full(model, ids, 300)[N_SEL_TOKENS:]) > 1e-6).any()


@pytest.mark.parametrize("prompt_len,splits", [(300, [170, 30, 100]), (200, [100, 60, 40])])
def test_mode_does_not_depend_on_how_prefill_is_chunked(
    prompt_len, splits, make_reference_model, relative_error
):
    # With P = 300 the chunk ending at 170 (< dense_len) must still be sparse from p = 160 on.
    model = make_reference_model(seed=12)
    ids = _ids(prompt_len, seed=13)
    cache = model.new_cache(prompt_len)
    outs, start = [], 0
    for size in splits:
        outs.append(model(ids[start : start + size], cache))
        start += size
    assert relative_error(torch.cat(outs), model(ids)) < 1e-12


# ---- muP scales and layer wiring: a hand-written forward ------------------------------------


def test_every_lightning_layer_decays_with_the_same_unscaled_alibi_slopes(make_reference_model):
    model = make_reference_model()
    expected = torch.tensor([2.0 ** (-8 * (h + 1) / 4) for h in range(4)], dtype=torch.float64)
    layers = [layer for layer in model.model.layers if layer.mixer_type == "lightning-attn"]
    assert [layer.layer_id for layer in layers] == [1, 2, 4]
    for layer in layers:
        assert torch.equal(layer.self_attn.slopes, expected)


def _hand_forward(sd: dict[str, torch.Tensor], cfg, ids: torch.Tensor) -> torch.Tensor:
    """SPEC 2 written out loop by loop for short sequences (where sparse == dense)."""
    t_len, eps = len(ids), cfg.rms_norm_eps

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def lin(x, name):
        return x @ sd[name].T

    residual = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)
    h = sd["model.embed_tokens.weight"][ids] * cfg.scale_emb
    for i, kind in enumerate(cfg.mixer_types):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        if kind == "minicpm4":
            nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            q = lin(x, p + "self_attn.q_proj.weight").view(t_len, nh, d)
            k = lin(x, p + "self_attn.k_proj.weight").view(t_len, nkv, d)
            v = lin(x, p + "self_attn.v_proj.weight").view(t_len, nkv, d)
            a = torch.zeros(t_len, nh, d, dtype=h.dtype)
            for t in range(t_len):
                for hh in range(nh):
                    g = hh // (nh // nkv)
                    w = torch.softmax(k[: t + 1, g] @ q[t, hh] / math.sqrt(d), 0)
                    a[t, hh] = w @ v[: t + 1, g]
            out = lin(
                a.reshape(t_len, -1) * torch.sigmoid(lin(x, p + "self_attn.o_gate.weight")),
                p + "self_attn.o_proj.weight",
            )
        else:
            nh, d = cfg.lightning_nh, cfg.lightning_head_dim
            q = rms(
                lin(x, p + "self_attn.q_proj.weight").view(t_len, nh, d),
                sd[p + "self_attn.q_norm.weight"],
            )
            k = rms(
                lin(x, p + "self_attn.k_proj.weight").view(t_len, nh, d),
                sd[p + "self_attn.k_norm.weight"],
            )
            v = lin(x, p + "self_attn.v_proj.weight").view(t_len, nh, d)
            for y in (q, k):  # RoPE, rotate-half pairs (j, j + d/2)
                for t in range(t_len):
                    for j in range(d // 2):
                        ang = t * cfg.rope_theta ** (-2 * j / d)
                        y1, y2 = y[t, :, j].clone(), y[t, :, j + d // 2].clone()
                        y[t, :, j] = y1 * math.cos(ang) - y2 * math.sin(ang)
                        y[t, :, j + d // 2] = y2 * math.cos(ang) + y1 * math.sin(ang)
            o = torch.zeros(t_len, nh, d, dtype=h.dtype)
            for hh in range(nh):
                decay = math.exp(-(2.0 ** (-8 * (hh + 1) / nh)))
                state = torch.zeros(d, d, dtype=h.dtype)
                for t in range(t_len):
                    state = decay * state + torch.outer(k[t, hh], v[t, hh])
                    o[t, hh] = q[t, hh] @ state / math.sqrt(d)
            o = rms(o.reshape(t_len, -1), sd[p + "self_attn.o_norm.weight"])
            o = o * torch.sigmoid(lin(x, p + "self_attn.z_proj.weight"))
            out = lin(o, p + "self_attn.o_proj.weight")
        h = h + out * residual
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        mlp = lin(
            torch.nn.functional.silu(lin(x, p + "mlp.gate_proj.weight"))
            * lin(x, p + "mlp.up_proj.weight"),
            p + "mlp.down_proj.weight",
        )
        h = h + mlp * residual
    return lin(
        rms(h, sd["model.norm.weight"]) / (cfg.hidden_size / cfg.dim_model_base), "lm_head.weight"
    )


def test_mup_scales_and_layer_wiring_match_hand_written_forward(
    make_tiny_config, make_state_dict, relative_error
):
    cfg = make_tiny_config(
        num_hidden_layers=3, mixer_types=["minicpm4", "lightning-attn", "minicpm4"]
    )
    assert (cfg.scale_emb, cfg.scale_depth, cfg.hidden_size / cfg.dim_model_base) == (12, 1.4, 4.0)
    sd = make_state_dict(cfg, seed=14)
    ids = _ids(12, seed=15)
    out = ReferenceModel.from_state_dict(cfg, sd, dtype=torch.float64)(ids)
    assert relative_error(out, _hand_forward(sd, cfg, ids)) < 1e-12


# ---- precision, loading, decoding -----------------------------------------------------------


def test_fp32_model_matches_fp64_model(make_reference_model, relative_error):
    ids = _ids(200, seed=16)
    out32 = make_reference_model(seed=17, dtype=torch.float32, dense_as_sparse=True)(ids)
    out64 = make_reference_model(seed=17, dense_as_sparse=True)(ids)
    assert out32.dtype == torch.float32
    assert relative_error(out32, out64) < 1e-5


def test_from_pretrained_reads_config_and_every_safetensors_file(
    tmp_path, make_tiny_config, make_state_dict, relative_error
):
    from safetensors.torch import save_file

    cfg = make_tiny_config()
    sd = {k: v.to(torch.float32).contiguous() for k, v in make_state_dict(cfg, seed=18).items()}
    names = sorted(sd)
    save_file(
        {k: sd[k] for k in names[: len(names) // 2]},
        str(tmp_path / "model-00001-of-00002.safetensors"),
    )
    rest = {k: sd[k] for k in names[len(names) // 2 :]}
    rest["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # skipped if present
    save_file(rest, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded = ReferenceModel.from_pretrained(tmp_path, dtype=torch.float64)
    direct = ReferenceModel.from_state_dict(cfg, sd, dtype=torch.float64)
    assert loaded.config.mixer_types == cfg.mixer_types and loaded.dense_len == DENSE_LEN
    ids = _ids(40, seed=19)
    assert relative_error(loaded(ids), direct(ids)) == 0.0


def test_from_state_dict_names_missing_and_unexpected_weights(make_tiny_config, make_state_dict):
    cfg = make_tiny_config()
    sd = make_state_dict(cfg, seed=20)
    del sd["model.layers.1.self_attn.z_proj.weight"]
    sd["model.layers.0.self_attn.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"z_proj.*bogus"):
        ReferenceModel.from_state_dict(cfg, sd)


def test_greedy_generate_is_deterministic_and_follows_its_own_argmax(make_reference_model):
    model = make_reference_model(seed=21)
    prompt = _ids(30, seed=22).tolist()
    out = model.generate(prompt, max_new_tokens=20)
    assert len(out) == 20 and out == model.generate(prompt, max_new_tokens=20)
    tf = model.teacher_forced(prompt + out, prompt_len=len(prompt))
    assert tf.argmax.tolist() == out
    assert (tf.margin >= 0).all()


def test_generate_stops_after_an_eos_token(make_reference_model):
    model = make_reference_model(seed=21)
    prompt = _ids(30, seed=22).tolist()
    free = model.generate(prompt, max_new_tokens=20)
    eos = free[5]
    stopped = model.generate(prompt, max_new_tokens=20, eos_token_ids=[eos])
    assert stopped == free[: free.index(eos) + 1]


def test_teacher_forced_scores_each_token_given_its_prefix(make_reference_model, relative_error):
    model = make_reference_model(seed=23)
    ids, prompt_len = _ids(50, seed=24), 30
    tf = model.teacher_forced(ids.tolist(), prompt_len, chunk_size=7)
    full = _full(model, ids, prompt_len)
    assert tf.logits.shape == (20, 256)
    assert relative_error(tf.logits, full[prompt_len - 1 : -1]) < 1e-12
    expected = torch.log_softmax(full[prompt_len - 1 : -1], -1).gather(-1, ids[prompt_len:, None])[
        :, 0
    ]
    assert relative_error(tf.token_logprobs, expected) < 1e-12
