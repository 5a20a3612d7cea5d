"""oneDNN prepacked linear layers on CPU (engine/llm/cpu_linear.py): same outputs as nn.Linear
(padded row counts included), tied embeddings intact and counted, a silent fallback where the ops
are missing, sleep/wake, the warm-up of every step size."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine import residency
from engine.llm import cpu_linear
from engine.llm.cpu_linear import PackedLinear, pack_linears
from tests.llm_fixtures import greedy, make_engine, random_prompts, run_all, tokens_of

needs_ops = pytest.mark.skipif(cpu_linear._ops() is None, reason="this torch build has no oneDNN linear ops")


def tiny_llama(dtype: torch.dtype, tied: bool, vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3, tie_word_embeddings=tied, attention_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (1, 5, 48), (100, 48), (1, 263, 48)])
def test_packed_linear_matches_nn_linear(dtype, bias, shape):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.inference_mode():
        want = layer(x)
        got = PackedLinear(layer, False, cpu_linear._ops())(x)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.bfloat16:  # the same oneDNN kernel eager F.linear uses: bit for bit
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_row_counts_above_64_run_at_a_few_padded_sizes():
    """Each row count is a oneDNN primitive to build: steps of any size up to 2048 tokens map to
    64 exact sizes and 40 padded ones, never 12.5 % or more above the real count."""
    sizes = [cpu_linear.padded_rows(rows) for rows in range(1, 2049)]
    assert sizes[:64] == list(range(1, 65))
    assert all(0 <= padded - rows < rows / 8 for rows, padded in enumerate(sizes, start=1))
    assert len(set(sizes)) == 64 + 40
    assert cpu_linear.padded_rows(263) == 288 and cpu_linear.padded_rows(2048) == 2048


@needs_ops
def test_warm_up_calls_every_shape_but_the_head_at_every_padded_size_up_to_the_budget():
    model = tiny_llama(torch.bfloat16, tied=False)
    pack_linears(model)
    x = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        before = model(x).logits
    head = model.get_output_embeddings()
    shapes = {(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, PackedLinear) and m is not head}
    padded_sizes = [72, 80, 88, 96, 104, 112, 120, 128, 144, 160, 176, 192, 208]
    assert cpu_linear.warm_up(model, max_rows=200) == len(shapes) * len(padded_sizes)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, before)


@needs_ops
@pytest.mark.parametrize("tied", [True, False])
def test_packing_a_bf16_model_keeps_its_logits_and_counts_its_bytes(tied):
    model = tiny_llama(torch.bfloat16, tied)
    reference = copy.deepcopy(model)
    embedding = model.get_input_embeddings().weight
    before = residency.weight_bytes(type("W", (), {"model": model})())["cpu"]

    names = linears(model)
    assert pack_linears(model) == len(names) == 2 * 7 + 1  # q k v o gate up down per layer, lm_head
    assert linears(model) == [] and pack_linears(model) == 0  # idempotent

    head = model.get_output_embeddings()
    assert isinstance(head, PackedLinear) and head.weight.shape == (300, 64)
    assert model.get_input_embeddings().weight is embedding  # the embedding is untouched
    assert (head.tied_weight is embedding) == tied
    # Untied weights are replaced by their packed copies; a tied one stays, so its copy is extra.
    after = residency.weight_bytes(type("W", (), {"model": model})())["cpu"]
    assert after - before == (head.packed_weight.nbytes if tied else 0)

    saved, original = model.state_dict(), reference.state_dict()  # what nn.Linear would save
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)

    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
        clone = copy.deepcopy(model)  # packed modules copy by repacking
        assert torch.equal(clone(ids).logits, model(ids).logits)
    if tied:
        assert clone.get_output_embeddings().tied_weight is clone.get_input_embeddings().weight


@needs_ops
def test_packing_leaves_the_global_rng_alone():
    model = tiny_llama(torch.bfloat16, tied=False)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert pack_linears(model) == 15
    assert torch.equal(torch.rand(3), expected)


def test_float32_models_and_the_off_switch_keep_nn_linear(monkeypatch):
    model = tiny_llama(torch.float32, tied=False)
    assert pack_linears(model) == 0 and len(linears(model)) == 15

    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    model = tiny_llama(torch.bfloat16, tied=False)
    assert pack_linears(model) == 0 and len(linears(model)) == 15


@needs_ops
def test_layers_under_an_accelerate_hook_or_off_the_cpu_stay_as_they_are():
    model = tiny_llama(torch.bfloat16, tied=False)
    hooked = model.model.layers[0].mlp.up_proj
    hooked._hf_hook = object()  # what accelerate's offloading attaches
    model.model.layers[1].mlp.down_proj.to("meta")
    assert pack_linears(model) == 13
    assert linears(model) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("broken", ["missing", "failing"])
def test_without_working_ops_nothing_is_swapped(monkeypatch, tokenizer, broken):
    """Another torch build (no mkldnn ops) or a host whose oneDNN cannot run them: nn.Linear stays
    and the engine serves as before."""
    if broken == "missing":
        monkeypatch.setattr(cpu_linear, "_ops", lambda: None)
    else:
        def fail(*args):
            raise RuntimeError("could not create a primitive")

        monkeypatch.setattr(cpu_linear, "_ops", lambda: (fail, fail))
    model = tiny_llama(torch.bfloat16, tied=True)
    assert pack_linears(model) == 0 and len(linears(model)) == 15
    engine = make_engine(model, tokenizer, max_num_batched_tokens=64, block_size=8)
    try:
        assert engine.runner.packed_linears == 0
        [result] = run_all(engine, [_request("a", [5, 6, 7], 4)])
        assert len(tokens_of(result[0])) == 4
    finally:
        engine.close()


@needs_ops
def test_engine_packs_bf16_models_greedy_output_unchanged_across_sleep_and_wake(monkeypatch, tokenizer):
    model = tiny_llama(torch.bfloat16, tied=True)
    prompts = random_prompts(6, 300, seed=3, shared_prefix=10, lengths=(1, 30))

    def serve(engine, tag):
        return [tokens_of(r[0]) for r in run_all(engine, [_request(f"{tag}{i}", p, 12) for i, p in enumerate(prompts)])]

    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    eager = make_engine(model, tokenizer, max_num_batched_tokens=64, block_size=8)
    try:
        assert eager.runner.packed_linears == 0
        expected = serve(eager, "e")
    finally:
        eager.close()

    monkeypatch.delenv(cpu_linear.ENV_SWITCH)
    engine = make_engine(model, tokenizer, max_num_batched_tokens=64, block_size=8)
    try:
        assert engine.runner.packed_linears == 15 and not linears(engine.model)
        held = residency.measure(engine)["cpu"]
        assert serve(engine, "a") == expected
        engine.sleep()
        engine.wake()
        assert isinstance(engine.model.get_output_embeddings(), PackedLinear)  # still packed, not twice
        assert residency.measure(engine)["cpu"] == held
        assert serve(engine, "b") == expected
    finally:
        engine.close()


def _request(request_id: str, prompt: list[int], n: int):
    from engine.llm.types import GenerationRequest

    return GenerationRequest(request_id, prompt, greedy(n, ignore_eos=True))
