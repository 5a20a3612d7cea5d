"""Paged attention pieces that run anywhere: the KV layout and its scatter, per-layer allocation
on each layer's device, the CPU backend's paths (the native decode kernel; where it is off, views of contiguous contexts,
log-sum-exp over a few runs, gathers, the padded batch used by decode graphs and by many short
decode contexts) against a per-head reference, and the
runner's interface (prompt logits, bytes held)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from engine.llm import attention_cpu, cpu_kernels
from engine.llm.attention import SpanGroup, allocate_kv, write_kv
from engine.llm.attention_cpu import MAX_RUNS, TorchBackend, _runs


def reference(query, k_cache, v_cache, tables, ctx_lens, q_lens, scale, window):
    """Attention of each sequence's queries (its last q_len positions) over its context."""
    heads, kv_heads = query.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out, row = [], 0
    for table, ctx, q_len in zip(tables, ctx_lens, q_lens):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(ctx)]
        k = k_cache.reshape(-1, kv_heads, k_cache.shape[3])[slots].float()
        v = v_cache.reshape(-1, kv_heads, v_cache.shape[3])[slots].float()
        q = query[row:row + q_len].float()
        for j in range(q_len):
            pos = ctx - q_len + j
            keys = torch.arange(ctx)
            visible = keys <= pos
            if window is not None:
                visible &= keys > pos - window
            per_head = []
            for h in range(heads):
                kh = h // (heads // kv_heads)
                scores = (k[:, kh] @ q[j, h]) * scale
                scores[~visible] = float("-inf")
                per_head.append(torch.softmax(scores, 0) @ v[:, kh])
            out.append(torch.stack(per_head))
        row += q_len
    return torch.stack(out)


def make_case(seed, block_size, heads, kv_heads, head_dim, spans, dtype=torch.float32, num_blocks=40,
              layout="scattered"):
    """spans: (context_len, q_len) per sequence. layout: "scattered" (random blocks), "contiguous"
    (each table one run), "pairs" (runs of two blocks, in shuffled order)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    free = list(range(num_blocks))
    if layout == "scattered":
        rng.shuffle(free)
    elif layout == "pairs":
        pairs = [free[i:i + 2] for i in range(0, num_blocks, 2)]
        rng.shuffle(pairs)
        free = [b for pair in pairs for b in pair]
    free.reverse()
    tables = [[free.pop() for _ in range(-(-ctx // block_size))] for ctx, _ in spans]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    total = sum(q for _, q in spans)
    query = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0] + list(torch.tensor([q for _, q in spans]).cumsum(0)), dtype=torch.int32)
    return query, k_cache, v_cache, tables, padded, starts




def run_backend(case, spans, window, host_tables: bool, scale=0.25):
    query, k_cache, v_cache, tables, padded, starts = case
    q_lens = [q for _, q in spans]
    ctx = [c for c, _ in spans]
    group = SpanGroup(0, sum(q_lens), padded, torch.tensor(ctx, dtype=torch.int32), starts, max(q_lens),
                      query_lens=q_lens if max(q_lens) > 1 else None,
                      host_tables=tables if host_tables else None, host_context_lens=ctx if host_tables else None)
    out = torch.full_like(query, float("nan"))
    TorchBackend(query.dtype, query.device).attend(group, query, k_cache, v_cache, out, scale, window)
    return out


SPANS = {
    "decode": [(1, 1), (13, 1), (40, 1), (29, 1)],
    "prefill": [(23, 7), (9, 9), (31, 20)],
}


@pytest.mark.parametrize("layout", ["contiguous", "pairs", "scattered"])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("path", ["native", "per-sequence", "by-rule", "no-host-tables"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_torch_backend_matches_reference(monkeypatch, layout, kind, window, path, heads, kv_heads):
    """native: decode through the C kernel where it builds (prefill always takes SDPA); the others
    are the SDPA paths it replaces for decode. by-rule: these short decode contexts go padded
    (prefer_padded), prefill per sequence."""
    if path == "native" and (kind != "decode" or cpu_kernels.library() is None):
        pytest.skip("the native kernel attends decode rows, where it builds")
    if path != "native":
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    if path == "per-sequence":
        monkeypatch.setattr(attention_cpu, "prefer_padded", lambda group, k_cache: False)
    spans = SPANS[kind]
    case = make_case(4, 4, heads, kv_heads, 16, spans, num_blocks=60, layout=layout)
    out = run_backend(case, spans, window, host_tables=path != "no-host-tables")
    query, k_cache, v_cache, tables = case[:4]
    expected = reference(query, k_cache, v_cache, tables, [c for c, _ in spans], [q for _, q in spans], 0.25, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_prompts_attended_at_an_aligned_length_match_the_reference(monkeypatch, layout, dtype):
    """Whole prompts whose length is not a multiple of ALIGN are attended over their last block's
    unused slots too (attention_cpu._aligned_causal): stale NaNs there must not reach any output."""
    monkeypatch.setattr(attention_cpu, "prefer_padded", lambda group, k_cache: False)
    spans = [(21, 21), (16, 16), (37, 37)]
    case = make_case(5, 16, 4, 4, 16, spans, dtype=dtype, num_blocks=12, layout=layout)
    query, k_cache, v_cache, tables = case[:4]
    for table, (ctx, _) in zip(tables, spans):
        k_cache[table[-1], ctx % 16 or 16:] = float("nan")
        v_cache[table[-1], ctx % 16 or 16:] = float("nan")
    aligned = []
    real = attention_cpu._aligned_causal
    monkeypatch.setattr(attention_cpu, "_aligned_causal", lambda q, *a: aligned.append(a[3]) or real(q, *a))
    out = run_backend(case, spans, None, host_tables=True)
    assert sorted(aligned) == [21, 37]  # 16 keys are aligned already
    expected = reference(query, k_cache, v_cache, tables, [c for c, _ in spans], [q for _, q in spans], 0.25, None)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def _decode_group(contexts: list[int], block_size: int = 16, query_len: int = 1):
    tables = [list(range(-(-c // block_size))) for c in contexts]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = torch.arange(0, query_len * len(contexts) + 1, query_len, dtype=torch.int32)
    return SpanGroup(0, query_len * len(contexts), padded, torch.tensor(contexts, dtype=torch.int32), starts,
                     query_len, query_lens=[query_len] * len(contexts) if query_len > 1 else None,
                     host_tables=tables, host_context_lens=contexts)


def test_padded_decode_is_chosen_for_many_short_contexts_only():
    cache = torch.empty(64, 16, 3, 64, dtype=torch.bfloat16)  # 768 bytes of K+V per key
    keys_allowed = attention_cpu.PADDED_MAX_ROW_BYTES // (2 * 3 * 64 * 2)
    short, long_ = keys_allowed // 2, keys_allowed + 16
    assert attention_cpu.prefer_padded(_decode_group([short] * 16), cache)
    assert not attention_cpu.prefer_padded(_decode_group([short] * 16), cache.float())  # twice the bytes per key
    assert not attention_cpu.prefer_padded(_decode_group([short]), cache)  # one row
    assert not attention_cpu.prefer_padded(_decode_group([short] * 15 + [long_]), cache)  # padded to the longest
    assert not attention_cpu.prefer_padded(_decode_group([short] * 16, query_len=3), cache)  # prefill chunks


def test_the_choice_is_made_once_per_step(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    calls = []
    monkeypatch.setattr(attention_cpu, "prefer_padded", lambda group, k_cache: calls.append(1) or True)
    spans = SPANS["decode"]
    query, k_cache, v_cache, tables, padded, starts = make_case(4, 4, 4, 2, 16, spans, num_blocks=60)
    ctx = [c for c, _ in spans]
    group = SpanGroup(0, len(spans), padded, torch.tensor(ctx, dtype=torch.int32), starts, 1,
                      host_tables=tables, host_context_lens=ctx)
    backend, out = TorchBackend(query.dtype, query.device), torch.empty_like(query)
    for _layer in range(3):
        backend.attend(group, query, k_cache, v_cache, out, 0.25, None)
    assert calls == [1] and group.cache["padded"] is True


def test_runs_of_a_block_table():
    assert _runs([3, 4, 5], 4, 0, 10) == [(12, 10)]
    assert _runs([3, 4, 9, 10, 2], 4, 0, 17) == [(12, 8), (36, 8), (8, 1)]
    assert _runs([3, 4, 9, 10], 4, 6, 14) == [(18, 2), (36, 6)]  # a window starting mid-block
    assert len(_runs(list(range(0, 2 * (MAX_RUNS + 1), 2)), 4, 0, 4 * (MAX_RUNS + 1))) == MAX_RUNS + 1


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_bfloat16_paths_agree_with_float32(monkeypatch, kernel):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, kernel)
    spans = SPANS["decode"] + [(26, 5)]
    case = make_case(5, 4, 4, 2, 16, spans, num_blocks=60, layout="pairs")
    low = tuple(t.bfloat16() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in case)
    for host_tables in (True, False):
        torch.testing.assert_close(run_backend(low, spans, None, host_tables).float(),
                                   run_backend(case, spans, None, host_tables), atol=3e-2, rtol=3e-2)


def test_write_kv_scatters_into_block_major_layout():
    k_caches, v_caches = allocate_kv([torch.device("cpu")], num_blocks=3, block_size=4, num_kv_heads=2,
                                     head_dim=8, dtype=torch.float32)
    k_cache, v_cache = k_caches[0], v_caches[0]
    assert k_cache.shape == (4, 4, 2, 8)  # one scratch block after the three real ones
    key = torch.randn(1, 2, 3, 8)
    value = torch.randn(1, 2, 3, 8)
    write_kv(k_cache, v_cache, torch.tensor([5, 0, 15]), key, value)
    torch.testing.assert_close(k_cache[1, 1], key[0, :, 0])
    torch.testing.assert_close(k_cache[0, 0], key[0, :, 1])
    torch.testing.assert_close(v_cache[3, 3], value[0, :, 2])
    assert int((k_cache != 0).any(-1).sum()) == 3 * 2  # three slots x two heads, nothing else


def test_each_layers_cache_lives_on_its_layers_device(llama):
    """C3: a model split across devices keeps each layer's KV next to that layer ("meta" stands
    in for a second device on CPU)."""
    from engine.llm.runner import layer_devices

    model = copy.deepcopy(llama)
    assert layer_devices(model, 2) == [llama.device] * 2
    model.model.layers[1].to("meta")
    devices = layer_devices(model, 2)
    assert devices == [llama.device, torch.device("meta")]
    k_caches, v_caches = allocate_kv(devices, 5, 4, 2, 16, torch.float32)
    assert [k.device.type for k in k_caches] == [v.device.type for v in v_caches] == [llama.device.type, "meta"]


def test_index_tensors_follow_a_layer_to_its_device():
    from engine.llm.attention import AttentionBatch

    int32 = {"dtype": torch.int32}
    group = SpanGroup(0, 2, torch.zeros(2, 3, **int32), torch.ones(2, **int32), torch.arange(3, **int32), 1)
    group.cache["derived"] = 1
    batch = AttentionBatch([], [], torch.arange(2), TorchBackend(torch.float32, torch.device("cpu")), single=group)
    assert batch.on(torch.device("cpu")) is batch
    moved = batch.on(torch.device("meta"))
    assert moved is batch.on(torch.device("meta"))  # derived once per step
    assert moved.single.block_tables.device.type == moved.slot_mapping.device.type == "meta"
    assert moved.single.cache == {} and moved.multi is None and group.block_tables.device.type == "cpu"


def _seq(seq_id, tokens, computed, table):
    from engine.llm.sequence import Sequence
    from engine.llm.types import SamplingParams

    s = Sequence(seq_id, f"r{seq_id}", 0, list(tokens), len(tokens), SamplingParams())
    s.num_computed_tokens, s.block_table = computed, table
    return s


def test_execute_returns_prompt_logits_for_every_computed_token(llama):
    from engine.llm.runner import ModelRunner

    model = copy.deepcopy(llama)
    runner = ModelRunner(model, num_blocks=16, block_size=4)
    prompt = [5, 9, 11, 40, 7, 8, 21]
    a = _seq(0, prompt, 0, [0, 1])
    b = _seq(1, [3, 4, 5], 0, [2])
    logits, sampled, prompt_logits = runner.execute([a, b], [7, 3], frozenset({0}))
    assert sampled == [a, b] and logits.shape == (2, model.config.vocab_size) and logits.dtype == torch.float32
    assert list(prompt_logits) == [0] and prompt_logits[0].shape == (7, model.config.vocab_size)
    with torch.inference_mode():
        full = llama(torch.tensor([prompt], device=llama.device)).logits[0].float()
    torch.testing.assert_close(prompt_logits[0], full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[0], full[-1], atol=1e-4, rtol=1e-4)

    # a chunk that does not reach the end of the prompt samples nothing but still has its logits
    c = _seq(2, prompt, 0, [3, 4])
    logits, sampled, prompt_logits = runner.execute([c], [4], frozenset({2}))
    assert sampled == [] and logits.shape[0] == 0
    torch.testing.assert_close(prompt_logits[2], full[:4], atol=1e-4, rtol=1e-4)
    c.num_computed_tokens = 4
    logits, sampled, prompt_logits = runner.execute([c], [3], frozenset({2}))
    torch.testing.assert_close(prompt_logits[2], full[4:], atol=1e-4, rtol=1e-4)
    assert runner.execute([c], [3])[2] == {}


def test_kv_cache_bytes_counts_the_cache_and_workspaces(llama):
    from engine.llm.runner import ModelRunner, kv_bytes_per_token

    runner = ModelRunner(copy.deepcopy(llama).cpu(), num_blocks=10, block_size=4)  # the CPU backend's workspace
    cache = kv_bytes_per_token(llama, torch.float32) * 4 * 11  # ten blocks and the scratch block
    assert runner.kv_cache_bytes == cache
    runner.backend.workspace.buffers((3, 4, 2, 16))
    assert runner.kv_cache_bytes == cache + 2 * 3 * 4 * 2 * 16 * 4
