"""The native CPU decode-attention kernel (engine/llm/cpu_kernels.py) against a per-sequence SDPA
reference, and its fallback when it cannot be built."""

from __future__ import annotations

import pytest
import torch

from engine.llm import cpu_kernels


@pytest.fixture(autouse=True)
def _kernels(ember_home):
    """Built (once) at test time, into the tests' EMBER_HOME, not while the module is collected."""
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler to build the CPU kernel")


def _case(dtype, heads, kv_heads, head_dim, block_size, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    widths = [-(-n // block_size) for n in lens]
    num_blocks = sum(widths) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # contexts scattered over the pool
    tables = torch.full((len(lens), max(widths)), num_blocks - 1, dtype=torch.int32)
    for row, width in enumerate(widths):
        tables[row, :width] = torch.tensor([order.pop() for _ in range(width)])
    # queries as the attention layer hands them: rows of a [heads, T, D] tensor transposed (not contiguous)
    query = torch.randn(heads, len(lens), head_dim, generator=gen).to(dtype).transpose(0, 1)
    return query, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (6, 2, 64), (9, 3, 24), (4, 1, 128)])
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_matches_reference(dtype, heads, kv_heads, head_dim, window):
    lens = [1, 7, 16, 17, 70, 33]
    query, k_cache, v_cache, tables, context_lens = _case(dtype, heads, kv_heads, head_dim, 16, lens)
    out = torch.full(query.shape, float("nan"), dtype=dtype)
    assert cpu_kernels.paged_decode(query, k_cache, v_cache, tables, context_lens, out, 0.3, window)
    want = cpu_kernels.reference_decode(query, k_cache, v_cache, tables, context_lens, 0.3, window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


def test_writes_only_its_rows_of_a_larger_output():
    query, k_cache, v_cache, tables, lens = _case(torch.float32, 4, 2, 32, 8, [5, 9, 12])
    out = torch.zeros(5, 4, 32)
    assert cpu_kernels.paged_decode(query, k_cache, v_cache, tables, lens, out.narrow(0, 1, 3), 0.5)
    assert out[0].abs().sum() == 0 and out[4].abs().sum() == 0
    torch.testing.assert_close(out[1:4], cpu_kernels.reference_decode(query, k_cache, v_cache, tables, lens, 0.5))


def test_declines_what_it_cannot_take(monkeypatch):
    query, k_cache, v_cache, tables, lens = _case(torch.float16, 4, 4, 16, 4, [3, 6])
    assert not cpu_kernels.paged_decode(query, k_cache, v_cache, tables, lens, torch.empty_like(query), 0.25)
    query, k_cache, v_cache, tables, lens = _case(torch.float32, 4, 4, 16, 4, [3, 6])
    assert not cpu_kernels.paged_decode(query, k_cache, v_cache, tables.long(), lens, torch.empty_like(query), 0.25)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.paged_decode(query, k_cache, v_cache, tables, lens, torch.empty_like(query), 0.25)


def test_without_a_compiler_attention_stays_on_sdpa(monkeypatch, tmp_path):
    """No compiler: no kernel, and the CPU backend's decode still matches the reference."""
    from engine.llm.attention import SpanGroup
    from engine.llm.attention_cpu import TorchBackend

    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernels, "_library", None)
    assert cpu_kernels.library() is None
    query, k_cache, v_cache, tables, lens = _case(torch.float32, 4, 2, 32, 8, [5, 9, 12])
    group = SpanGroup(0, 3, tables, lens, torch.arange(4, dtype=torch.int32), 1)
    out = torch.empty(query.shape)
    TorchBackend(torch.float32, torch.device("cpu")).attend(group, query, k_cache, v_cache, out, 0.5, None)
    torch.testing.assert_close(out, cpu_kernels.reference_decode(query, k_cache, v_cache, tables, lens, 0.5))
