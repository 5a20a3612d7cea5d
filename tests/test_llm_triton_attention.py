"""The Triton paged-attention kernel, run by Triton's interpreter on CPU tensors, against a plain
PyTorch reference (per sequence, per head, with explicit positions): decode rows, prefill chunks
that continue a cached context, fresh prefills, GQA, sliding windows, block sizes that are not
powers of two, scattered block tables; and the whole engine decoding greedily through it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.llm import triton_paged
from tests.test_llm_attention import make_case, reference

CASES = [
    # block_size, heads, kv_heads, head_dim, [(context_len, q_len)], window
    (16, 4, 2, 16, [(1, 1), (17, 1), (40, 1), (33, 1)], None),  # decode rows, GQA
    (4, 4, 4, 32, [(23, 7), (9, 9), (50, 20)], None),  # prefill continuing a context, fresh prefill
    (12, 6, 2, 24, [(30, 1), (45, 13), (12, 12)], None),  # block size 12, head_dim 24 (padded to 32)
    (8, 4, 1, 16, [(60, 1), (37, 5), (26, 26)], 10),  # sliding window, MQA
    (16, 2, 2, 16, [(70, 40)], 24),  # a long chunk spanning several query tiles, windowed
]


@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim,spans,window", CASES)
def test_kernel_matches_reference(block_size, heads, kv_heads, head_dim, spans, window):
    query, k_cache, v_cache, tables, padded, starts = make_case(1, block_size, heads, kv_heads, head_dim, spans)
    ctx = torch.tensor([c for c, _ in spans], dtype=torch.int32)
    out = torch.full_like(query, float("nan"))
    scale = head_dim ** -0.5
    triton_paged.paged_attention(query, k_cache, v_cache, out, padded, ctx, starts, max(q for _, q in spans),
                                 scale, window)
    expected = reference(query, k_cache, v_cache, tables, [c for c, _ in spans], [q for _, q in spans], scale, window)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_kernel_reads_strided_queries_and_writes_strided_outputs():
    """Queries arrive as a transposed view of [1, heads, T, head_dim]; outputs go to a slice."""
    spans = [(20, 3), (9, 1)]
    query, k_cache, v_cache, tables, padded, starts = make_case(2, 8, 4, 2, 16, spans)
    strided = query.transpose(0, 1).contiguous().transpose(0, 1)
    out = torch.zeros(10, 4, 16)
    ctx = torch.tensor([20, 9], dtype=torch.int32)
    triton_paged.paged_attention(strided, k_cache, v_cache, out[3:7], padded, ctx, starts, 3, 0.25)
    expected = reference(query, k_cache, v_cache, tables, [20, 9], [3, 1], 0.25, None)
    torch.testing.assert_close(out[3:7], expected, atol=1e-4, rtol=1e-4)
    assert out[:3].abs().sum() == 0 and out[7:].abs().sum() == 0


def test_kernel_agrees_with_the_cpu_backend_in_half_precision():
    """float16: Triton's interpreter computes through numpy, which has no bfloat16 (bfloat16 is
    checked on the GPU itself, by the self-check the runner runs at start-up)."""
    from engine.llm.attention import SpanGroup
    from engine.llm.attention_cpu import TorchBackend

    spans = [(33, 1), (21, 6), (5, 5)]
    query, k_cache, v_cache, _, padded, starts = make_case(3, 16, 4, 2, 32, spans, dtype=torch.float16)
    ctx = torch.tensor([c for c, _ in spans], dtype=torch.int32)
    kernel_out, torch_out = torch.zeros_like(query), torch.zeros_like(query)
    triton_paged.paged_attention(query, k_cache, v_cache, kernel_out, padded, ctx, starts, 6, 0.2, 16)
    group = SpanGroup(0, query.shape[0], padded, ctx, starts, 6, query_lens=[q for _, q in spans])
    TorchBackend(torch.float16, torch.device("cpu")).attend(group, query, k_cache, v_cache, torch_out, 0.2, 16)
    torch.testing.assert_close(kernel_out.float(), torch_out.float(), atol=2e-2, rtol=2e-2)


def test_self_check_accepts_the_kernel_and_rejects_a_wrong_one():
    from engine.llm.attention_cuda import TritonBackend, self_check

    cpu = torch.device("cpu")
    assert self_check(TritonBackend(), torch.float32, cpu, 16, 4, 2, 16)
    assert self_check(TritonBackend(), torch.float16, cpu, 12, 8, 8, 32)

    class Wrong(TritonBackend):
        def attend(self, group, query, k_cache, v_cache, out, scale, window):
            super().attend(group, query, k_cache, v_cache, out, scale, None)  # ignores the window

    assert not self_check(Wrong(), torch.float32, cpu, 16, 4, 2, 16)


def test_engine_decodes_greedily_through_the_kernel(llama, tokenizer):
    """The whole engine (chunked prefill, prefix hits, decode graphs' static buffers) with the
    Triton kernel as its attention backend."""
    from engine.llm.attention_cuda import TritonBackend
    from tests.llm_fixtures import make_engine
    from tests.test_llm_greedy import EagerGraphs, check_greedy, with_graphs, workload

    prompts, max_new = workload(5, len(tokenizer), seed=13, lengths=(10, 40), max_new=(4, 10))
    engine = make_engine(llama, tokenizer, max_num_batched_tokens=24, block_size=8)
    engine.runner.backend = TritonBackend()
    graphs = with_graphs(engine, 4, EagerGraphs)
    check_greedy(llama, engine, prompts, max_new)
    assert graphs.replays > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim,spans,window", CASES)
def test_kernel_matches_reference_on_cuda(block_size, heads, kv_heads, head_dim, spans, window, dtype):
    """The compiled kernel on a GPU (bfloat16 included, which the interpreter cannot run)."""
    case = make_case(1, block_size, heads, kv_heads, head_dim, spans, dtype=dtype)
    query, k_cache, v_cache, tables, padded, starts = (t.cuda() if torch.is_tensor(t) else t for t in case)
    ctx = torch.tensor([c for c, _ in spans], dtype=torch.int32, device="cuda")
    out = torch.full_like(query, float("nan"))
    scale = head_dim ** -0.5
    triton_paged.paged_attention(query, k_cache, v_cache, out, padded, ctx, starts, max(q for _, q in spans),
                                 scale, window)
    expected = reference(query.float().cpu(), k_cache.float().cpu(), v_cache.float().cpu(), tables,
                         [c for c, _ in spans], [q for _, q in spans], scale, window)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected, atol=tolerance, rtol=tolerance)
