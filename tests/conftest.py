"""Shared test helpers: small MiniCPM-SALA configs, randomly initialised reference models, the
relative-error helper, the `gpu` marker's skip and the `impl` / `device` fixtures of op tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

# Triton decides between compiling and interpreting a kernel when it is defined, so this is set
# before any test imports one: without a GPU every Triton kernel runs in the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sala_sglang.config import MiniCPMSALAConfig, SparseConfig

S, L = "minicpm4", "lightning-attn"

# Scaled-down InfLLM-v2 geometry: r = 2 windows per block, w = 4 local blocks, n_sel = 10 blocks,
# so sparse attention equals dense up to 160 tokens and drops blocks beyond.
TINY_SPARSE_CONFIG: dict[str, Any] = {
    "kernel_size": 16,
    "kernel_stride": 8,
    "block_size": 16,
    "window_size": 64,
    "topk": 6,
    "init_blocks": 1,
    "use_nope": False,
    "dense_len": 256,
}
# The same geometry as the ops and the reference take it; tests vary it with dataclasses.replace.
TINY_SPARSE = SparseConfig.from_dict(TINY_SPARSE_CONFIG)


def tiny_config(**overrides: Any) -> MiniCPMSALAConfig:
    """Small config: hidden 64, 6 layers (first, last sparse), 8 q / 2 kv heads, lightning 4x16."""
    fields: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        lightning_nh=4,
        lightning_nkv=4,
        lightning_head_dim=16,
        mixer_types=[S, L, L, S, L, S],
        sparse_config=dict(TINY_SPARSE_CONFIG),
        dim_model_base=16,  # logit divisor 4
        eos_token_id=[2],
    )
    fields.update(overrides)
    if "mixer_types" not in overrides and fields["num_hidden_layers"] != 6:
        n = fields["num_hidden_layers"]
        fields["mixer_types"] = [S if i in (0, n - 1) else L for i in range(n)]
    return MiniCPMSALAConfig(**fields)


def random_state_dict(config: MiniCPMSALAConfig, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint-named random weights keeping activations O(1) and logits of order 1-10 (fp64)."""
    from sala_sglang.reference import ReferenceModel

    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in ReferenceModel(config).state_dict().items()}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif name == "model.embed_tokens.weight":
            w = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif name == "lm_head.weight":
            w = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            w = torch.randn(shape, generator=gen, dtype=torch.float64) / shape[1] ** 0.5
        out[name] = w
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, on the CPU in float64, NaN-proof (a NaN anywhere gives inf)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip where no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def extension_built() -> bool:
    """Whether the compiled kernels (`sala_sglang._C`) load on a visible CUDA GPU."""
    from sala_sglang.ops import _cuda

    return torch.cuda.is_available() and _cuda.available()


# Tests that call an op of `sala_sglang._C` directly.
needs_extension = pytest.mark.skipif(not extension_built(), reason="sala_sglang._C is not built")


def child_stdout(script: str) -> str:
    """Run script in a fresh interpreter and return what it printed: an error path of `_C` that
    brings the interpreter down (a segfault was seen on the H100 image) then fails one test
    instead of ending the whole session."""
    # Unbuffered, and both streams in the message: what was printed before a crash says which
    # call brought it down (or that all returned and the interpreter died on its way out).
    out = subprocess.run([sys.executable, "-u", "-X", "faulthandler", "-c", script],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, \
        f"exit {out.returncode}; stdout: {out.stdout[-2000:]!r}; stderr: {out.stderr[-2000:]}"
    return out.stdout


@pytest.fixture(params=["triton", "cuda"])
def impl(request: pytest.FixtureRequest) -> str:
    """Each implementation of an op: Triton (the CPU interpreter without a GPU) and CUDA (skipped
    unless `sala_sglang._C` is built and a GPU is visible)."""
    if request.param == "cuda" and not extension_built():
        pytest.skip("sala_sglang._C is not built or no CUDA GPU")
    return request.param


@pytest.fixture
def device() -> str:
    """Where op tests put their tensors: the GPU when there is one, else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def make_tiny_config() -> Callable[..., MiniCPMSALAConfig]:
    return tiny_config


@pytest.fixture
def make_reference_model() -> Callable[..., Any]:
    """Factory: (config=None, seed=0, dtype=float64, **model kwargs) -> ReferenceModel."""
    from sala_sglang.reference import ReferenceModel

    def make(
        config: MiniCPMSALAConfig | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> ReferenceModel:
        config = config or tiny_config()
        return ReferenceModel.from_state_dict(
            config, random_state_dict(config, seed), dtype=dtype, **kwargs
        )

    return make


@pytest.fixture
def make_state_dict() -> Callable[[MiniCPMSALAConfig, int], dict[str, torch.Tensor]]:
    """Factory: (config, seed) -> checkpoint-named random fp64 weights."""
    return random_state_dict


@pytest.fixture
def relative_error() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return rel_err


@pytest.fixture
def single_thread():
    """Small CPU ops run fastest on one thread (and do not fight other jobs on a 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny random checkpoint (`sala_sglang.tiny`), written once per test module."""
    from sala_sglang.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def references(tiny_dir) -> dict:
    """The reference model of the tiny checkpoint, with and without --dense-as-sparse, in float64
    on the GPU: the same math as on the CPU, 100x sooner for 1000-token prompts."""
    from sala_sglang.reference.model import ReferenceModel

    return {
        flag: ReferenceModel.from_pretrained(tiny_dir, dtype=torch.float64, dense_as_sparse=flag)
        .to("cuda")
        for flag in (False, True)
    }


@pytest.fixture(scope="module")
def server_logs(tmp_path_factory: pytest.TempPathFactory):
    """Where a test module's servers write their logs."""
    return tmp_path_factory.mktemp("logs")


def server_mode_params(modes: dict, marks: dict) -> list:
    """A module-scoped server fixture's params: each server mode with its markers."""
    return [pytest.param(m, marks=marks[m]) for m in sorted(modes)]


@pytest.fixture(autouse=True)
def distribution_over_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test is one test of `sala_sglang.testing.compare`: SPEC section 4's fp16 mean and
    p99 are held over all the positions its served requests scored (a prefix-cache hit's request
    may score a dozen)."""
    from sala_sglang.testing.compare import begin_test, end_test

    failed = request.session.testsfailed
    positions = begin_test()
    yield
    end_test(positions)
    # a test that already failed has said why; its partial distribution would only add noise
    if request.session.testsfailed == failed:
        summary = positions.check()
        if summary["positions"]:
            print({"test_positions": summary})
