"""Paged attention plugged into transformers models through their attention interface.

The runner packs a step's tokens into one row, `input_ids` of shape [1, total_tokens]: sequences
with a single query token first (decodes, and one-token prefill chunks), then multi-token prefill
chunks. It passes no transformers cache; instead every attention layer receives an
`AttentionBatch` through the forward kwargs (`ember_batch=`) and:

1. writes the step's new keys and values into its cache at `slot_mapping`, one `index_copy_` per
   tensor over the flattened slot dimension. The cache of a layer is a pair of tensors shaped
   [num_blocks + 1, block_size, kv_heads, head_dim] (the layout flash-attn, FlashInfer and vLLM's
   Triton backend read); slot = block * block_size + offset, and the last block is scratch space
   that padding rows write to and attend to;
2. hands the two `SpanGroup`s (single-query rows, multi-query rows) to the runner's backend, which
   attends every query to its sequence's context through the group's block tables:
   attention_cpu.py (SDPA over views of the cache; gathers only for scattered contexts) or
   attention_cuda.py (a Triton paged-attention kernel that reads the cache in place, or
   flash-attn's block-table entry).

Sliding-window layers (Mistral, Qwen2/3 when enabled) pass `sliding_window`; a query at position p
sees keys k with p - window < k <= p, exactly as transformers' own masks do. GQA never expands
K/V in memory. Without `ember_batch` (someone calling model.generate on the same model) the
function falls back to plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import torch

ATTN_IMPLEMENTATION = "ember_paged"


@dataclass
class SpanGroup:
    """Sequences whose queries are consecutive rows [row_start, row_start + num_rows) of the step."""

    row_start: int
    num_rows: int
    block_tables: torch.Tensor  # int32 [S, W]; entries past a context may be any valid block id
    context_lens: torch.Tensor  # int32 [S]: keys each sequence attends to, this step's included
    query_starts: torch.Tensor  # int32 [S + 1]: query offsets, relative to row_start
    max_query_len: int
    query_lens: list[int] | None = None  # host copy, for backends that pad queries (None when all are 1)
    host_tables: list[list[int]] | None = None  # host copies of the tables and lengths, when known
    host_context_lens: list[int] | None = None
    cache: dict = field(default_factory=dict)  # per-step values a backend derives once, reused by every layer

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]


@dataclass
class AttentionBatch:
    k_caches: list[torch.Tensor]  # per layer, [num_blocks + 1, block_size, kv_heads, head_dim]
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # long [total_tokens]: destination slot of every new token
    backend: AttentionBackend
    single: SpanGroup | None = None  # rows with one query each, first in the packed row
    multi: SpanGroup | None = None  # prefill chunks of several queries, after them
    _on_device: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> AttentionBatch:
        """This batch with its index tensors on `device` (a layer placed on another device)."""
        if device == self.slot_mapping.device:
            return self
        if device not in self._on_device:
            def move(group: SpanGroup | None) -> SpanGroup | None:
                if group is None:
                    return None
                tensors = {f.name: getattr(group, f.name).to(device) for f in fields(group)
                           if isinstance(getattr(group, f.name), torch.Tensor)}
                return replace(group, cache={}, **tensors)

            self._on_device[device] = replace(self, slot_mapping=self.slot_mapping.to(device),
                                              single=move(self.single), multi=move(self.multi), _on_device={})
        return self._on_device[device]


class AttentionBackend(Protocol):
    def attend(self, group: SpanGroup, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               out: torch.Tensor, scale: float, window: int | None) -> None:
        """Write attention outputs for the group's rows of `query` [T, heads, head_dim] into the
        same rows of `out` [T, heads, head_dim]."""


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             key: torch.Tensor, value: torch.Tensor) -> None:
    """Scatter the step's keys/values [1, kv_heads, T, head_dim] into their slots."""
    kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, key[0].transpose(0, 1))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, value[0].transpose(0, 1))


def allocate_kv(layer_devices: list[torch.device], num_blocks: int, block_size: int, num_kv_heads: int,
                head_dim: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V caches (one extra scratch block each), each on its layer's device."""
    shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    k_caches, v_caches = [], []
    for device in layer_devices:
        kv = torch.zeros(2, *shape, dtype=dtype, device=device)
        k_caches.append(kv[0])
        v_caches.append(kv[1])
    return k_caches, v_caches


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, ember_batch: AttentionBatch | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] -> [1, T, heads, head_dim]."""
    if ember_batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, sliding_window=sliding_window, **kwargs)
    batch = ember_batch.on(query.device)
    k_cache, v_cache = batch.k_caches[module.layer_idx], batch.v_caches[module.layer_idx]
    write_kv(k_cache, v_cache, batch.slot_mapping, key, value)
    q = query[0].transpose(0, 1)  # [T, heads, head_dim]
    out = torch.empty(q.shape, dtype=query.dtype, device=query.device)
    if q.shape[0] > key.shape[2]:  # query rows past the keys are padding (cpu_forward.py): zeros
        out[key.shape[2]:].zero_()
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    for group in (batch.single, batch.multi):
        if group is not None and group.num_rows:
            batch.backend.attend(group, q, k_cache, v_cache, out, scale, sliding_window)
    return out.unsqueeze(0), None


def register() -> None:
    """Make "ember_paged" a valid attn_implementation for every transformers model."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
