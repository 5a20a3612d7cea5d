"""A Triton paged-attention kernel that reads K/V in place through block tables.

One program handles one sequence and one KV head, and BLOCK_M rows of (query position, query head
of that KV head's group) pairs, so the query heads sharing a KV head read each key once (for a
decode row of Llama-3-8B, all 4 query heads of a group fill one tile). It walks the sequence's
context BLOCK_N keys at a time, looking every key's block up in the block table (so any block size
works, powers of two or not), with an online softmax in float32. It covers decode rows (one query
over the whole context) and prefill chunks that continue a cached context: a sequence's queries
are its last `q_len` positions, so query j sits at position context_len - q_len + j and sees keys
k <= that position (and, with a sliding window, k > position - window). GQA maps query head h to
KV head h // (heads // kv_heads); K/V are never expanded.

With `TRITON_INTERPRET=1` set before this module is imported, Triton's interpreter runs the
kernel on CPU tensors (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the CUDA path is the only user
    triton = tl = None


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def paged_attention_kernel(
        Q, K, V, O, block_tables, context_lens, query_starts, scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_bt, block_size, group_size, head_dim,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SLIDING: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        m_block = tl.program_id(2)
        q_start = tl.load(query_starts + seq)
        q_len = tl.load(query_starts + seq + 1) - q_start
        if m_block * BLOCK_M < q_len * group_size:
            ctx = tl.load(context_lens + seq)
            offs_r = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row = query index * group + head in group
            offs_m = offs_r // group_size
            head = kv_head * group_size + offs_r % group_size
            offs_d = tl.arange(0, BLOCK_D)
            m_valid = offs_m < q_len
            d_valid = offs_d < head_dim
            q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=m_valid[:, None] & d_valid[None, :], other=0.0)
            q_pos = ctx - q_len + offs_m
            hi = tl.minimum(ctx, ctx - q_len + ((m_block + 1) * BLOCK_M - 1) // group_size + 1)
            lo = 0
            if SLIDING:
                lo = tl.maximum(0, ctx - q_len + (m_block * BLOCK_M) // group_size - window + 1)
                lo = (lo // BLOCK_N) * BLOCK_N
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
            acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
            for start in range(lo, hi, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                n_valid = offs_n < hi
                block = tl.load(block_tables + seq * stride_bt + offs_n // block_size, mask=n_valid, other=0)
                block = block.to(tl.int64)
                within = offs_n % block_size
                kv_mask = n_valid[:, None] & d_valid[None, :]
                k = tl.load(K + (block * stride_kb + within * stride_ks + kv_head * stride_kh)[:, None]
                            + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(V + (block * stride_vb + within * stride_vs + kv_head * stride_vh)[:, None]
                            + offs_d[None, :], mask=kv_mask, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
                allowed = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
                if SLIDING:
                    allowed = allowed & (offs_n[None, :] > q_pos[:, None] - window)
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
                m_i = m_new
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(O + (q_start + offs_m)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, query_starts: torch.Tensor,
                    max_query_len: int, scale: float, window: int | None = None) -> None:
    """Attend query rows [T, heads, head_dim] (sequence i owns rows query_starts[i]:query_starts[i+1])
    to the paged caches [num_blocks, block_size, kv_heads, head_dim]; write the result to `out`
    [T, heads, head_dim]. Launches a fixed grid for a given (num_seqs, max_query_len), so a decode
    launch is CUDA-graph capturable."""
    num_seqs = block_tables.shape[0]
    heads, head_dim = query.shape[1:]
    block_size, kv_heads = k_cache.shape[1:3]
    for t in (query, out, k_cache, v_cache):
        assert t.stride(-1) == 1, "the last dimension must be contiguous"
    block_m = 16
    grid = (num_seqs, kv_heads, triton.cdiv(max_query_len * (heads // kv_heads), block_m))
    paged_attention_kernel[grid](
        query, k_cache, v_cache, out, block_tables, context_lens, query_starts, scale,
        window if window is not None else 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_size, heads // kv_heads, head_dim,
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        SLIDING=window is not None,
        # float32 caches get full-precision products: tl.dot would otherwise round them to TF32
        # (about 1e-2 off on logits, enough to change greedy tokens against the model's own forward)
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
