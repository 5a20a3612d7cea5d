"""Fused RMSNorm, rotary embeddings and silu(gate) * up for CPU models (engine/llm/cpu_fused.py) against the
transformers code they replace, and where they are (not) swapped in."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from transformers.models.llama import modeling_llama

from engine.llm import cpu_fused, cpu_kernels
from tests.llm_fixtures import TEST_DEVICE


@pytest.fixture(autouse=True)
def _kernels(ember_home):
    """Built (once) at test time, into the tests' EMBER_HOME, not while the module is collected."""
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler to build the CPU kernels")


@pytest.fixture(autouse=True)
def _restore_rotary():
    yield
    cpu_fused.unfuse_rotary()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("hidden", [96, 40])  # rows the AVX-512 loop takes (16 | hidden) and rows it does not
def test_rms_norm_matches_llama(dtype, tokens, hidden):
    norm = modeling_llama.LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(tokens)
        norm.weight.copy_(torch.randn(hidden, generator=gen))
    x = (torch.randn(1, tokens, hidden, generator=gen) * 3).to(dtype)
    with torch.no_grad():  # the weight is a Parameter: with autograd on, the native op declines
        want = norm(x)
        got = cpu_fused.rms_norm(x, norm.weight, 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2 * 2**-7  # bfloat16: normalised, rounded, then scaled
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 9, 300])
@pytest.mark.parametrize("head_dim", [32, 64, 24])  # the AVX-512 loop takes halves of 16k elements
def test_rotary_is_exactly_transformers(dtype, tokens, head_dim):
    heads, kv_heads = 6, 2
    q = torch.randn(1, tokens, heads, head_dim).to(dtype).transpose(1, 2)
    k = torch.randn(1, tokens, kv_heads, head_dim).to(dtype).transpose(1, 2)
    angles = torch.rand(1, tokens, head_dim // 2) * 50
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = cpu_fused.rotary(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("width", [200, 1376])  # 1376: chunks of 256 and 96, rounded 16 at a time
def test_silu_mul_matches_torch(dtype, tokens, width):
    gen = torch.Generator().manual_seed(tokens)
    gate = (torch.randn(1, tokens, width, generator=gen) * 4).to(dtype)
    up = torch.randn(1, tokens, width, generator=gen).to(dtype)
    want = torch.nn.functional.silu(gate) * up
    # bfloat16: the silu is rounded before the product, so its last-bit difference can reach two
    # units in the last place of the result (seen: 14.1 vs 14.2)
    tol = 1e-5 if dtype == torch.float32 else 2 * 2**-7
    torch.testing.assert_close(cpu_fused.silu_mul(gate, up), want, rtol=tol, atol=tol)


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="fuses CPU models only")
def test_fused_model_gives_the_same_logits(tiny_chat_dir):
    """The tiny test Llama with its norms, MLPs and rotary fused: the logits of transformers' own forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.inference_mode():
        want = model(ids).logits
        counts = cpu_fused.fuse_cpu_ops(model, max_positions=64)
        got = model(ids).logits
        beyond = torch.arange(60, 72)[None]  # past the tables: the module's own forward
        plain = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
        torch.testing.assert_close(model(ids, position_ids=beyond).logits, plain(ids, position_ids=beyond).logits,
                                   rtol=1e-4, atol=1e-4)
    layers = model.config.num_hidden_layers
    assert counts == {"norms": 2 * layers + 1, "mlps": layers, "rotary": 1, "rotary_tables": 1}
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32 sums of squares in another order
    assert cpu_fused.fuse_cpu_ops(model)["norms"] == 0  # idempotent: nothing left to swap
    clone = pickle.loads(pickle.dumps(model))  # how a model reaches the engine process
    with torch.inference_mode():
        torch.testing.assert_close(clone(ids).logits, got)


class OnePlusWeightNorm(nn.Module):
    """Gemma's RMSNorm variant: scales by (1 + weight). Must not be taken for Llama's."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden))
        self.eps = 1e-6

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


OnePlusWeightNorm.__name__ = "GemmaLikeRMSNorm"


def test_a_norm_that_differs_keeps_its_own_forward():
    norm = OnePlusWeightNorm(64)
    assert not cpu_fused._fuse_norm(norm)
    assert "forward" not in vars(norm)


def test_other_devices_and_dtypes_take_the_original_rotary():
    wrapped = cpu_fused._rotary_wrapper(modeling_llama.apply_rotary_pos_emb)
    q = torch.randn(1, 2, 3, 8, dtype=torch.float16)
    k = torch.randn(1, 2, 3, 8, dtype=torch.float16)
    cos, sin = torch.randn(1, 3, 8, dtype=torch.float16), torch.randn(1, 3, 8, dtype=torch.float16)
    assert cpu_fused.rotary(q, k, cos, sin) is None
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = wrapped(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_switched_off(monkeypatch, llama):
    monkeypatch.setenv(cpu_fused.ENV_SWITCH, "0")
    assert cpu_fused.fuse_cpu_ops(copy.deepcopy(llama), 64) == {"norms": 0, "mlps": 0, "rotary": 0, "rotary_tables": 0}


def test_tensors_that_track_gradients_take_the_originals():
    """The native ops have no backward: with autograd on they decline, so training code keeps working."""
    weight = torch.ones(16, requires_grad=True)
    x = torch.randn(2, 16, requires_grad=True)
    assert cpu_fused.rms_norm(x, weight, 1e-6) is None
    assert cpu_fused.silu_mul(x, x) is None
    with torch.no_grad():
        assert cpu_fused.rms_norm(x, weight, 1e-6) is not None
