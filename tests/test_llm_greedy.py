"""Greedy output of the engine equals transformers' model.generate, token for token, whatever the
batching: concurrency, prefix caching, chunked prefill, preemption, block size, architecture."""

from __future__ import annotations

import random

import pytest
import torch

from engine.llm.types import GenerationRequest
from tests.llm_fixtures import (
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    run_all,
    tokens_of,
)


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


def test_greedy_with_padded_decode_path(llama, tokenizer):
    """The CUDA decode path (one padded SDPA over gathered contexts), forced on CPU."""
    prompts, max_new = workload(8, len(tokenizer), seed=7)
    engine = make_engine(llama, tokenizer)
    engine.runner.padded_decode = True
    check_greedy(llama, engine, prompts, max_new, waves=2)


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


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=True, window_size=(-1, -1)):
    """flash_attn_varlen_func's contract in plain PyTorch (causal aligned to the bottom right)."""
    outs = []
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None]
        ki, vi = (t[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None] for t in (k, v))
        q_pos = torch.arange(ki.shape[2] - qi.shape[2], ki.shape[2])[:, None]
        k_pos = torch.arange(ki.shape[2])[None, :]
        mask = k_pos <= q_pos
        if window_size[0] >= 0:
            mask &= k_pos >= q_pos - window_size[0]
        out = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale,
                                                               enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def test_greedy_with_varlen_path(llama, tokenizer, monkeypatch):
    """The CUDA flash-attn path's packing (slots, cu_seqlens), with a PyTorch stand-in for flash."""
    from engine.llm import attention

    monkeypatch.setattr(attention, "flash_attn_varlen_func", _reference_varlen)
    prompts, max_new = workload(8, len(tokenizer), seed=8)
    engine = make_engine(llama, tokenizer, max_num_batched_tokens=50)
    engine.runner.use_flash = True
    check_greedy(llama, engine, prompts, max_new, waves=2)


def test_greedy_with_decode_graphs(llama, tokenizer):
    """The CUDA-graph decode path's static buffers, padding rows and scratch block, with a recorder
    that replays eagerly instead of a captured graph."""
    from engine.llm.cuda_graphs import DecodeGraphs

    class EagerGraphs(DecodeGraphs):
        def _record(self, forward, attn):
            out = forward().clone()

            class Replay:
                def replay(self):
                    attn._masks.clear()
                    out.copy_(forward())

            return Replay(), out

    prompts, max_new = workload(11, len(tokenizer), seed=9)
    engine = make_engine(llama, tokenizer)
    engine.runner.padded_decode = True
    engine.runner.graphs = graphs = EagerGraphs(engine.runner, 64, engine.max_model_len)
    check_greedy(llama, engine, prompts, max_new, waves=2)
    assert graphs.graphs and graphs.enabled
