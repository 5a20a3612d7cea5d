"""The lean CPU forward (engine/llm/cpu_forward.py): taken for plain Llama-shaped models whose
logits it reproduces, refused otherwise. Every engine test on CPU runs through it too (greedy
decoding equals transformers' `generate`)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.llm import cpu_linear
from engine.llm import runner as runner_module
from engine.llm.cpu_forward import LeanForward
from engine.llm.runner import ModelRunner
from tests.llm_fixtures import TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="a CPU path")


def test_taken_for_llama_and_matches_its_logits(llama):
    runner = ModelRunner(copy.deepcopy(llama), num_blocks=8, block_size=16)
    assert runner.lean is not None and runner.lean.fused  # q/k/v and gate/up as one product each
    saved, original = runner.model.state_dict(), llama.state_dict()
    for name in ("self_attn.k_proj.weight", "mlp.up_proj.weight"):  # the separate projections' state
        torch.testing.assert_close(saved[f"model.layers.1.{name}"], original[f"model.layers.1.{name}"])
    from engine.llm.sequence import Sequence
    from engine.llm.types import SamplingParams

    seq = Sequence(0, "r", 0, list(range(3, 40)), 37, SamplingParams(), block_table=[1, 2, 3])
    logits, _, prompt = runner.execute([seq], [37], prompt_logprob_seqs=frozenset({0}))
    with torch.inference_mode():
        want = llama(torch.tensor([seq.token_ids])).logits[0].float()
    torch.testing.assert_close(prompt[0], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[0], want[-1], rtol=1e-4, atol=1e-4)


def test_refused_for_other_structures():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=128)
    assert not LeanForward.supports(Qwen3ForCausalLM(config))  # q_norm / k_norm inside attention
    from transformers import MistralConfig, MistralForCausalLM

    windowed = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, vocab_size=128, sliding_window=24)
    assert not LeanForward.supports(MistralForCausalLM(windowed))


def test_a_rebuilt_runner_takes_the_fused_model_again(llama):
    model = copy.deepcopy(llama)
    first = ModelRunner(model, num_blocks=8, block_size=16)
    again = ModelRunner(model, num_blocks=8, block_size=16)  # e.g. after a wake
    assert first.lean is not None and again.lean is not None and again.lean.fused


def test_refused_when_its_logits_disagree(monkeypatch, llama):
    monkeypatch.setattr(LeanForward, "__call__", lambda self, ids, positions, batch, rows: torch.zeros(
        len(rows), llama.config.vocab_size))
    assert ModelRunner(copy.deepcopy(llama), num_blocks=8, block_size=16).lean is None


def test_switched_off(monkeypatch, llama):
    monkeypatch.setenv(runner_module.LEAN_SWITCH, "0")
    assert ModelRunner(copy.deepcopy(llama), num_blocks=8, block_size=16).lean is None


@pytest.mark.skipif(cpu_linear._ops() is None, reason="this torch build has no oneDNN linear ops")
def test_a_packed_step_of_more_than_64_tokens_runs_padded_and_matches_the_model():
    """Above 64 tokens a step on packed linears runs at a padded row count (cpu_linear.padded_rows):
    the padding rows change no logit and write nothing to the cache."""
    from engine.llm.sequence import Sequence
    from engine.llm.types import SamplingParams
    from tests.test_llm_cpu_linear import tiny_llama

    model = tiny_llama(torch.bfloat16, tied=False)
    runner = ModelRunner(model, num_blocks=16, block_size=16)
    assert runner.packed_linears and runner.lean is not None and runner.lean.packed
    assert cpu_linear.padded_rows(100) == 104
    seq = Sequence(0, "r", 0, [(7 * t + 3) % 300 for t in range(100)], 100, SamplingParams(),
                   block_table=list(range(7)))
    logits, _, prompt = runner.execute([seq], [100], prompt_logprob_seqs=frozenset({0}))
    with torch.inference_mode():
        want = model(torch.tensor([seq.token_ids])).logits[0].float()  # per-call padding, SDPA
    assert prompt[0].shape == want.shape
    torch.testing.assert_close(prompt[0], want, rtol=2e-2, atol=2e-2)
    for cache in runner.k_caches + runner.v_caches:  # block 6 holds positions 96-111
        assert cache[6, :4].any() and not cache[6, 4:].any() and not cache[7:].any()
