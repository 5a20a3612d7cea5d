"""Greedy output of the engine equals transformers' model.generate, token for token, whatever the
batching: concurrency, prefix caching, chunked prefill, preemption, block size, architecture."""

from __future__ import annotations

import random

import pytest
import torch

from engine.llm.cuda_graphs import DecodeGraphs
from engine.llm.types import GenerationRequest
from tests.llm_fixtures import (
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    run_all,
    tokens_of,
)

pytestmark = pytest.mark.usefixtures("both_schedulings")


def check_greedy(model, engine, prompts, max_new, waves: int = 1):
    try:
        for wave in range(waves):
            requests = [GenerationRequest(f"w{wave}-{i}", p, greedy(m)) for i, (p, m) in enumerate(zip(prompts, max_new))]
            results = run_all(engine, requests)
            for prompt, m, result in zip(prompts, max_new, results):
                assert list(result) == [0]
                deltas = result[0]
                assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
                expected = reference_greedy(model, prompt, m)
                assert tokens_of(deltas) == expected
                assert deltas[-1].finish_reason == ("length" if len(expected) == m else "stop")
                assert deltas[-1].completion_tokens == len(expected)
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        assert stats["running"] == 0 and stats["waiting"] == 0
        return stats
    finally:
        engine.close()


def workload(count: int, vocab: int, seed: int, max_new: tuple[int, int] = (1, 24), **kw):
    rng = random.Random(seed + 1)
    return random_prompts(count, vocab, seed=seed, **kw), [rng.randint(*max_new) for _ in range(count)]


@pytest.mark.parametrize("concurrency", [1, 8, 33])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_generate(llama, tokenizer, concurrency, prefix_caching):
    prompts, max_new = workload(concurrency, len(tokenizer), seed=concurrency)
    engine = make_engine(llama, tokenizer, enable_prefix_caching=prefix_caching)
    stats = check_greedy(llama, engine, prompts, max_new, waves=2)
    assert (stats["prefix_cache_hit_tokens"] > 0) == prefix_caching


def test_greedy_with_tiny_chunked_prefill(llama, tokenizer):
    prompts, max_new = workload(8, len(tokenizer), seed=3)
    engine = make_engine(llama, tokenizer, max_num_batched_tokens=7, block_size=4)
    check_greedy(llama, engine, prompts, max_new)


def test_greedy_under_preemption(llama, tokenizer):
    prompts, max_new = workload(12, len(tokenizer), seed=4, lengths=(20, 90))
    block_bytes = 16 * 512  # block_size tokens * (2 layers * 2 kv heads * 16 dims * k,v * fp32)
    engine = make_engine(llama, tokenizer, kv_cache_bytes=14 * block_bytes, max_num_batched_tokens=64)
    assert engine.max_model_len == 14 * 16
    stats = check_greedy(llama, engine, prompts, max_new)
    assert stats["preemptions"] > 0


def test_greedy_with_few_seats(llama, tokenizer):
    prompts, max_new = workload(9, len(tokenizer), seed=5)
    engine = make_engine(llama, tokenizer, max_num_seqs=2, enable_prefix_caching=False)
    check_greedy(llama, engine, prompts, max_new)


def _tiny_config(arch: str, tokenizer):
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    common = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "initializer_range": 0.3, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False,
    }
    if arch == "mistral":  # a window shorter than the prompts exercises the sliding-window masks
        return MistralConfig(sliding_window=24, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    return Qwen3Config(head_dim=16, **common)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_greedy_other_architectures(tokenizer, arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch, tokenizer), attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    prompts, max_new = workload(8, len(tokenizer), seed=6, max_new=(8, 30))
    engine = make_engine(model, tokenizer, max_num_batched_tokens=40, block_size=8)
    check_greedy(model, engine, prompts, max_new, waves=2)


class EagerGraphs(DecodeGraphs):
    """The CUDA-graph bookkeeping (buckets, static buffers, padding rows, scratch block) on CPU:
    "capturing" runs the forward once, "replaying" runs it again on the static buffers."""

    def _record(self, forward, attn):
        out = forward().clone()

        class Replay:
            def replay(self):
                attn.single.cache.clear()
                out.copy_(forward())

        return Replay(), out


def with_graphs(engine, max_num_seqs: int = 64, graphs_class=EagerGraphs):
    engine.runner.graphs = graphs = graphs_class(engine.runner, max_num_seqs, engine.max_model_len)
    return graphs


def test_greedy_with_decode_graphs(llama, tokenizer):
    prompts, max_new = workload(11, len(tokenizer), seed=9)
    engine = make_engine(llama, tokenizer)
    graphs = with_graphs(engine)
    assert sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    check_greedy(llama, engine, prompts, max_new, waves=2)
    assert graphs.enabled and graphs.replays > 0


def test_one_token_prefill_chunks_never_replay_graphs(llama, tokenizer):
    """C1: with max_num_seqs == max_num_batched_tokens, a step can hold decodes plus a one-token
    chunk of someone's prompt; every row has one token, but that row must not sample."""
    prompts, max_new = workload(6, len(tokenizer), seed=10, lengths=(5, 30), max_new=(4, 12))
    engine = make_engine(llama, tokenizer, max_num_seqs=4, max_num_batched_tokens=4, enable_prefix_caching=False)
    graphs = with_graphs(engine, 4)
    mixed_steps = []
    execute = engine.runner.execute

    def spy(seqs, num_tokens, **kwargs):
        if all(n == 1 for n in num_tokens) and not engine.runner.is_decode_step(seqs, num_tokens):
            mixed_steps.append(len(seqs))
        return execute(seqs, num_tokens, **kwargs)

    engine.runner.execute = spy
    check_greedy(llama, engine, prompts, max_new)
    assert mixed_steps, "the workload never produced a one-token prefill chunk beside decodes"
    assert graphs.enabled and graphs.replays > 0


@pytest.mark.parametrize("block_size", [12, 24])
def test_decode_graphs_with_block_sizes_not_dividing_256(llama, tokenizer, block_size):
    """C6: the static block tables are sized in blocks of the engine's own block size."""
    prompts, max_new = workload(9, len(tokenizer), seed=11)
    engine = make_engine(llama, tokenizer, block_size=block_size)
    graphs = with_graphs(engine, 16)
    assert graphs.width == -(-engine.max_model_len // block_size)
    check_greedy(llama, engine, prompts, max_new)
    assert graphs.enabled and graphs.replays > 0


def test_a_failing_replay_turns_graphs_off_and_the_step_runs_eagerly(llama, tokenizer):
    class BrokenGraphs(DecodeGraphs):
        def _record(self, forward, attn):
            class Replay:
                def replay(self):
                    raise RuntimeError("replay failed")

            return Replay(), forward().clone()

    prompts, max_new = workload(5, len(tokenizer), seed=12)
    engine = make_engine(llama, tokenizer)
    graphs = with_graphs(engine, 8, BrokenGraphs)
    check_greedy(llama, engine, prompts, max_new)
    assert not graphs.enabled and not graphs.graphs and graphs.replays == 0


def test_graph_buffers_cover_every_bucket_with_any_context(llama, tokenizer):
    """Graphs are keyed by batch size only: block tables sized for max_model_len are inputs."""
    from engine.llm.sequence import Sequence
    from engine.llm.types import SamplingParams

    engine = make_engine(llama, tokenizer, block_size=16)
    try:
        graphs = with_graphs(engine, 24)
        assert graphs.buckets == [1, 2, 4, 8, 16, 24]
        assert [graphs.bucket_for(n) for n in (1, 3, 9, 17, 24, 25)] == [1, 4, 16, 24, 24, None]
        long_ctx = engine.max_model_len - 1
        seqs = [Sequence(i, f"r{i}", 0, list(range(1, long_ctx + 2 - i * 100)), 5, SamplingParams())
                for i in range(3)]
        for i, s in enumerate(seqs):
            s.num_computed_tokens = s.num_tokens - 1
            s.block_table = list(range(i, i + -(-s.num_tokens // 16)))
        graphs.fill(seqs, 4)
        ctx = graphs.context_lens[:4].tolist()
        assert ctx == [s.num_tokens for s in seqs] + [1]
        assert graphs.block_tables[1, :len(seqs[1].block_table)].tolist() == seqs[1].block_table
        assert graphs.block_tables[3, 0] == engine.runner.scratch_block
        assert graphs.slot_mapping[3] == engine.runner.scratch_block * 16
        assert graphs.input_ids[0, :3].tolist() == [s.token_ids[-1] for s in seqs]
    finally:
        engine.close()
