"""Paged attention plugged into transformers models through their attention interface.

The runner packs a step's tokens into one row, `input_ids` of shape [1, total_tokens]: decode
tokens first, then prefill chunks. It passes no transformers cache; instead every attention layer
receives an `AttentionBatch` through the forward kwargs (`ember_batch=`) and:

1. scatters the step's new keys/values into its cache at `slot_mapping` (one index_copy_); the
   cache of a layer is [1, kv_heads, num_slots, head_dim], slot = block * block_size + offset;
2. attends each sequence's span of queries to its context. A context held in consecutive blocks is
   a plain view of the cache (no copy: on CPU this is several times faster than gathering); other
   contexts are gathered with one index_select into a reused workspace (fresh multi-megabyte
   buffers per layer would cost more in page faults than the copy). A prefill that starts at
   position 0 attends to its own fresh keys with a causal mask.
   On CUDA, where one kernel launch per sequence and layer costs more than the copy, all contexts
   are gathered into one packed buffer and attended in a single flash-attn varlen call (when
   flash-attn is installed and passes a self-check), or else the decode tokens are attended in one
   padded SDPA call (also the shape CUDA graphs capture) and prefill chunks one by one.

Sliding-window layers (Mistral, Qwen2/3 when enabled) pass `sliding_window`; it is applied exactly
as transformers' own masks do (key > query - window). Without `ember_batch` (someone calling
model.generate on the same model) the function falls back to plain SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # optional, CUDA only
    flash_attn_varlen_func = None

ATTN_IMPLEMENTATION = "ember_paged"


@dataclass
class Span:
    """One sequence's queries in the packed row and the context they attend to."""

    start: int  # rows [start, end) of the packed batch
    end: int
    context_len: int  # the queries attend to positions [0, context_len) of their sequence
    view_start: int | None = None  # first slot when the context is contiguous in the cache
    slots: torch.Tensor | None = None  # otherwise: the context's slots, for a gather
    fresh: bool = False  # prefill from position 0: attend to the step's own keys

    @property
    def q_len(self) -> int:
        return self.end - self.start


@dataclass
class PaddedDecode:
    """All decode tokens in one SDPA call: contexts gathered and padded to the longest."""

    num: int
    slots: torch.Tensor  # [num * max_len], padding points at slot 0
    lens: torch.Tensor  # [num]
    max_len: int


@dataclass
class Varlen:
    """Every span's context packed back to back, for one flash-attn varlen call."""

    slots: torch.Tensor  # [total_context] slots of all contexts, span after span
    cu_q: torch.Tensor  # int32 [num_spans + 1] query offsets
    cu_k: torch.Tensor  # int32 [num_spans + 1] context offsets
    max_q: int
    max_k: int


class Workspace:
    """Reusable gather buffers for keys and values, grown geometrically when a step needs more."""

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.k = self.v = torch.empty(0, dtype=dtype, device=device)

    def buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two contiguous [1, kv_heads, n, head_dim] buffers."""
        if n > self.capacity:
            self.capacity = max(n, int(self.capacity * 1.5))
            size = self.num_kv_heads * self.capacity * self.head_dim
            self.k = torch.empty(size, dtype=self.dtype, device=self.device)
            self.v = torch.empty(size, dtype=self.dtype, device=self.device)
        shape = (1, self.num_kv_heads, n, self.head_dim)
        numel = self.num_kv_heads * n * self.head_dim
        return self.k[:numel].view(shape), self.v[:numel].view(shape)


@dataclass
class AttentionBatch:
    k_caches: list[torch.Tensor]  # per layer, [1, num_kv_heads, num_slots, head_dim]
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [total_tokens]: destination slot of every new token
    spans: list[Span]
    workspace: Workspace
    padded_decode: PaddedDecode | None = None  # when set, covers the first `num` spans
    varlen: Varlen | None = None  # when set, covers every span
    _masks: dict = field(default_factory=dict)

    def span_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        """[q_len, context_len] bool mask (True = attend) for span i, or None when the span needs
        none (a single query over its whole context, or a fresh prefill using is_causal)."""
        span = self.spans[i]
        first = span.context_len - span.q_len
        windowed = window is not None and span.context_len > window
        if not windowed and (span.q_len == 1 or span.fresh):
            return None
        key = (i, window if windowed else None)
        if key not in self._masks:
            device = self.slot_mapping.device
            q_pos = torch.arange(first, span.context_len, device=device)[:, None]
            k_pos = torch.arange(span.context_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if windowed:
                mask &= k_pos > q_pos - window
            self._masks[key] = mask
        return self._masks[key]

    def padded_mask(self, window: int | None) -> torch.Tensor:
        """[num, 1, 1, max_len] bool mask for the padded decode call."""
        key = ("padded", window)
        if key not in self._masks:
            pd = self.padded_decode
            pos = torch.arange(pd.max_len, device=pd.lens.device)[None, :]
            last = pd.lens[:, None] - 1
            mask = pos <= last
            if window is not None:
                mask &= pos > last - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]


def _padded_decode(batch: AttentionBatch, query, k_cache, v_cache, scaling, window) -> torch.Tensor:
    pd = batch.padded_decode
    kbuf, vbuf = batch.workspace.buffers(pd.num * pd.max_len)
    shape = (k_cache.shape[1], pd.num, pd.max_len, k_cache.shape[3])
    k = torch.index_select(k_cache, 2, pd.slots, out=kbuf).view(shape).transpose(0, 1)
    v = torch.index_select(v_cache, 2, pd.slots, out=vbuf).view(shape).transpose(0, 1)
    q = query[0, :, :pd.num].transpose(0, 1).unsqueeze(2)  # [num, heads, 1, head_dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.padded_mask(window), scale=scaling,
                                         enable_gqa=True)
    return out[:, :, 0].transpose(0, 1).unsqueeze(0)  # [1, heads, num, head_dim]


def _flash_varlen(batch: AttentionBatch, query, k_cache, v_cache, scaling, window) -> torch.Tensor:
    vl = batch.varlen
    kbuf, vbuf = batch.workspace.buffers(vl.slots.shape[0])
    k = torch.index_select(k_cache, 2, vl.slots, out=kbuf)[0].transpose(0, 1)  # [total, kv_heads, head_dim]
    v = torch.index_select(v_cache, 2, vl.slots, out=vbuf)[0].transpose(0, 1)
    out = flash_attn_varlen_func(query[0].transpose(0, 1), k, v, vl.cu_q, vl.cu_k, vl.max_q, vl.max_k,
                                 softmax_scale=scaling, causal=True,
                                 window_size=(window - 1, 0) if window is not None else (-1, -1))
    return out.unsqueeze(0)  # [1, T, heads, head_dim]


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, ember_batch: AttentionBatch | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] -> [1, T, heads, head_dim]."""
    if ember_batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, sliding_window=sliding_window, **kwargs)
    batch = ember_batch
    k_cache, v_cache = batch.k_caches[module.layer_idx], batch.v_caches[module.layer_idx]
    k_cache.index_copy_(2, batch.slot_mapping, key)
    v_cache.index_copy_(2, batch.slot_mapping, value)

    if batch.varlen is not None:
        return _flash_varlen(batch, query, k_cache, v_cache, scaling, sliding_window), None
    outputs = []
    first = 0
    if batch.padded_decode is not None and batch.padded_decode.num:
        outputs.append(_padded_decode(batch, query, k_cache, v_cache, scaling, sliding_window))
        first = batch.padded_decode.num
    for i in range(first, len(batch.spans)):
        span = batch.spans[i]
        q = query.narrow(2, span.start, span.q_len)
        if span.fresh:
            k, v = key.narrow(2, span.start, span.q_len), value.narrow(2, span.start, span.q_len)
        elif span.view_start is not None:
            k = k_cache.narrow(2, span.view_start, span.context_len)
            v = v_cache.narrow(2, span.view_start, span.context_len)
        else:
            kbuf, vbuf = batch.workspace.buffers(span.context_len)
            k = torch.index_select(k_cache, 2, span.slots, out=kbuf)
            v = torch.index_select(v_cache, 2, span.slots, out=vbuf)
        mask = batch.span_mask(i, sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and span.q_len > 1,
                                             scale=scaling, enable_gqa=True)
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2), None


def register() -> None:
    """Make "ember_paged" a valid attn_implementation for every transformers model."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
