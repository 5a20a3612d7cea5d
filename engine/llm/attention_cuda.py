"""Paged attention on CUDA: kernels that read K/V in place through the block tables, so no layer
copies any context.

Candidates, tried in order at start-up, each used only if it agrees with the PyTorch reference
(attention_cpu.TorchBackend) on a synthetic step with decode rows, a prefill chunk continuing a
cached context and a fresh prefill, under the engine's dtype, block size and head layout:

1. flash-attn's `flash_attn_varlen_func` with `block_table`, when flash-attn is installed and the
   block size is a multiple of 256 (flash-attn 2 requires paged blocks of 256 tokens; the engine's
   default blocks are 16 tokens, so by default this is skipped);
2. our Triton kernel (triton_paged.py), which takes any block size;
3. the PyTorch reference itself (gathers each step's contexts), when neither passes.
"""

from __future__ import annotations

import logging

import torch

from engine.llm import triton_paged
from engine.llm.attention import SpanGroup
from engine.llm.attention_cpu import TorchBackend

logger = logging.getLogger("ember.llm")


class TritonBackend:
    workspace_bytes = 0

    def attend(self, group: SpanGroup, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               out: torch.Tensor, scale: float, window: int | None) -> None:
        rows = (group.row_start, group.num_rows)
        triton_paged.paged_attention(query.narrow(0, *rows), k_cache, v_cache, out.narrow(0, *rows),
                                     group.block_tables, group.context_lens, group.query_starts,
                                     group.max_query_len, scale, window)


class FlashAttnBackend:
    workspace_bytes = 0

    def __init__(self):
        from flash_attn import flash_attn_varlen_func

        self.varlen = flash_attn_varlen_func

    def attend(self, group: SpanGroup, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               out: torch.Tensor, scale: float, window: int | None) -> None:
        if "cu_k" not in group.cache:
            ctx = group.context_lens
            group.cache["cu_k"] = torch.nn.functional.pad(ctx.cumsum(0, dtype=torch.int32), (1, 0))
            lens = group.host_context_lens  # known on the host: no device sync (async scheduling)
            group.cache["max_k"] = max(lens) if lens else int(ctx.max())
        rows = (group.row_start, group.num_rows)
        result = self.varlen(query.narrow(0, *rows), k_cache, v_cache, group.query_starts, group.cache["cu_k"],
                             group.max_query_len, group.cache["max_k"], softmax_scale=scale, causal=True,
                             window_size=(window - 1, 0) if window is not None else (-1, -1),
                             block_table=group.block_tables)
        out.narrow(0, *rows).copy_(result)


def self_check(backend, dtype: torch.dtype, device: torch.device, block_size: int, heads: int, kv_heads: int,
               head_dim: int) -> bool:
    """Does `backend` agree with the PyTorch reference on a small synthetic step (with and
    without a sliding window)?"""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        num_blocks = 3 * -(-64 // block_size) + 1
        cache = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, device=device).to(dtype)
                 for _ in range(2)]
        order = torch.randperm(num_blocks - 1, generator=gen, device=device).to(torch.int32)
        width = -(-64 // block_size)
        tables = order[:3 * width].view(3, width)
        int32 = {"dtype": torch.int32, "device": device}
        single = SpanGroup(0, 2, tables[:2], torch.tensor([40, 7], **int32), torch.tensor([0, 1, 2], **int32), 1)
        multi = SpanGroup(2, 9, tables[1:], torch.tensor([30, 4], **int32), torch.tensor([0, 5, 9], **int32), 5,
                          query_lens=[5, 4])
        query = torch.randn(11, heads, head_dim, generator=gen, device=device).to(dtype)
        reference = TorchBackend(dtype, device)
        for window in (None, 6):
            outs = [torch.zeros_like(query), torch.zeros_like(query)]
            for impl, out in zip((backend, reference), outs):
                for group in (single, multi):
                    impl.attend(group, query, *cache, out, head_dim ** -0.5, window)
            if not torch.allclose(outs[0].float(), outs[1].float(), atol=2e-2, rtol=2e-2):
                return False
        return True
    except Exception:
        logger.debug("attention backend %s failed its self-check", type(backend).__name__, exc_info=True)
        return False


def select_backend(dtype: torch.dtype, device: torch.device, block_size: int, heads: int, kv_heads: int,
                   head_dim: int):
    """The first candidate (see the module docstring) that passes its self-check."""
    candidates = []
    if block_size % 256 == 0 and dtype in (torch.float16, torch.bfloat16):
        try:
            candidates.append(FlashAttnBackend())
        except ImportError:
            pass
    if triton_paged.available():
        candidates.append(TritonBackend())
    for backend in candidates:
        if self_check(backend, dtype, device, block_size, heads, kv_heads, head_dim):
            logger.info("paged attention on %s: %s", device, type(backend).__name__)
            return backend
    logger.warning("no paged-attention kernel passed its self-check on %s; using the PyTorch gather path", device)
    return TorchBackend(dtype, device)
