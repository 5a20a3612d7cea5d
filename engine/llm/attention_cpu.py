"""Paged attention in plain PyTorch: the CPU path (and the reference the CUDA kernels are checked
against at start-up; it runs on any device).

On CPU a decode step is bound by memory traffic: every step reads each sequence's whole context
once, and any copy of it (a gather) costs another read and write of the same bytes. Measured on
this repo's benchmark model (64 decode rows, contexts of 200-400 tokens, one layer, fp32, one
thread, noisy machine): attending each sequence to a view of its context in the cache 30-50 ms;
one batched SDPA over contexts gathered into a padded buffer 53-85 ms; per-sequence gathers
50-95 ms. So with host block tables (every eager step):

- a context held in one run of consecutive blocks is a plain view of the cache;
- a decode row whose context spans a few runs (up to MAX_RUNS, e.g. a cached prefix shared with
  other sequences, then private blocks) attends to each run's view and merges the partial results
  by their log-sum-exp, still without copying;
- other contexts are gathered block by block into a small reused workspace that stays in cache.

Without host block tables (the static buffers of decode graphs), and for decode groups of many
short contexts where one copy costs less than a call per row (`prefer_padded`), a group is
attended in one batched call: one `index_select` of whole blocks gathers every context, padded to
the widest block table, and one SDPA call attends all sequences under a boolean mask derived once
per step.

GQA is handled by folding the query heads that share a KV head into the query-length dimension
([S, kv_heads, group * q_len, head_dim]) instead of expanding K/V or passing `enable_gqa`: with a
boolean mask this keeps PyTorch on its fused CPU flash kernel (fold 3.0 ms vs enable_gqa 4.5 ms
per call at 64 decode rows x 384 keys, fp32; the math kernel takes 120 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.llm import cpu_kernels
from engine.llm.attention import SpanGroup

ALIGN = 16  # fresh prompts are attended at a multiple of this many keys (_aligned_causal)
MAX_RUNS = 4  # decode contexts in up to this many runs of blocks are attended without a copy
PADDED_MIN_ROWS = 4  # decode groups of this many rows or more whose padded K/V per row stay under
PADDED_MAX_ROW_BYTES = 256 * 2**10  # this run padded in one call (see prefer_padded)
_flash_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class Workspace:
    """Reusable gather buffers for keys and values, grown geometrically when a step needs more
    (fresh multi-megabyte buffers per layer would cost more in page faults than the copy)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.capacity = 0  # elements per buffer
        self.k = self.v = torch.empty(0, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.capacity * self.k.element_size()

    def buffers(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        numel = 1
        for n in shape:
            numel *= n
        if numel > self.capacity:
            self.capacity = max(numel, int(self.capacity * 1.5))
            self.k = torch.empty(self.capacity, dtype=self.dtype, device=self.device)
            self.v = torch.empty(self.capacity, dtype=self.dtype, device=self.device)
        return self.k[:numel].view(shape), self.v[:numel].view(shape)


def _query_rows(group: SpanGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a group with several queries per sequence: the packed row of every padded query
    [S * Q] (padding repeats the sequence's first row), which of them are real, and the real
    queries' packed rows in padded order."""
    device = group.block_tables.device
    q_max = group.max_query_len
    starts, rows, valid = 0, [], []
    for n in group.query_lens:
        first = group.row_start + starts
        rows.extend(range(first, first + n))
        rows.extend([first] * (q_max - n))
        valid.extend([True] * n + [False] * (q_max - n))
        starts += n
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    valid_t = torch.tensor(valid, dtype=torch.bool, device=device)
    return rows_t, valid_t, rows_t[valid_t]


def _mask(group: SpanGroup, num_keys: int, window: int | None) -> torch.Tensor:
    """[S, 1, Q, num_keys] bool (True = attend): causal over each sequence's context, within the
    window if any. Padded query rows see their context's first key only."""
    device = group.block_tables.device
    q_max = group.max_query_len
    ctx = group.context_lens.long()[:, None]  # [S, 1]
    q_lens = (group.query_starts[1:] - group.query_starts[:-1]).long()[:, None]
    offs = torch.arange(q_max, device=device)[None, :]
    q_pos = torch.where(offs < q_lens, ctx - q_lens + offs, 0)[:, :, None]  # [S, Q, 1]
    k_pos = torch.arange(num_keys, device=device)[None, None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask[:, None]


@dataclass
class _SeqPlan:
    row: int  # first packed row of its queries
    q_len: int
    first_key: int  # keys [first_key, context_len) are visible to its last query
    context_len: int
    runs: list[tuple[int, int]] | None  # (first slot, length) views covering the visible keys
    blocks: torch.Tensor | None = None  # otherwise: blocks to gather, covering [0, context_len)
    mask: torch.Tensor | None = None  # [fold * q_len, keys] for multi-query rows
    aligned: bool = False  # attended at its length rounded up to ALIGN (_aligned_causal)


def _runs(table: list[int], block_size: int, first: int, end: int) -> list[tuple[int, int]]:
    """Runs of consecutive slots covering positions [first, end) of a sequence."""
    runs: list[list[int]] = []
    for i in range(first // block_size, -(-end // block_size)):
        lo, hi = max(first, i * block_size), min(end, (i + 1) * block_size)
        slot = table[i] * block_size + lo % block_size
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1][1] += hi - lo
        else:
            runs.append([slot, hi - lo])
    return [(a, n) for a, n in runs]


def _plan(group: SpanGroup, block_size: int, window: int | None, fold: int, device: torch.device) -> list[_SeqPlan]:
    plans = []
    q_lens = group.query_lens or [1] * group.num_seqs
    row = group.row_start
    for table, ctx, q_len in zip(group.host_tables, group.host_context_lens, q_lens):
        first = max(0, ctx - window) if window is not None and q_len == 1 else 0
        runs = _runs(table, block_size, first, ctx)
        plan = _SeqPlan(row, q_len, first, ctx, runs)
        limit = MAX_RUNS if q_len == 1 and _flash_with_lse is not None else 1
        if len(runs) > limit:
            plan.runs = None
            plan.blocks = torch.tensor(table[:-(-ctx // block_size)], dtype=torch.long, device=device)
        if q_len > 1 and (window is not None or q_len != ctx or fold > 1):
            q_pos = torch.arange(ctx - q_len, ctx, device=device)[:, None]
            k_pos = torch.arange(ctx, device=device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            plan.mask = mask.repeat(fold, 1)
        # a whole fresh prompt (its queries are all its keys) in one run or gathered copy starting
        # at a block, without a mask (no window, no folded GQA heads), whose last block holds the
        # rounded length
        plan.aligned = (q_len > 1 and plan.mask is None and q_len == ctx and q_len % ALIGN != 0
                        and block_size % ALIGN == 0 and (plan.runs is None or len(plan.runs) == 1))
        plans.append(plan)
        row += q_len
    return plans


def _aligned_causal(q: torch.Tensor, k_source: torch.Tensor, v_source: torch.Tensor, first_slot: int,
                    length: int, scale: float) -> torch.Tensor:
    """Causal attention of a fresh prompt's `length` queries [1, kv_heads, length, D] to its keys,
    computed at the length rounded up to ALIGN: PyTorch's CPU flash kernel takes ~1.3x as long
    for 257-265 keys as for 272 (bfloat16, 8 heads of 64). The extra keys are the unused slots of
    the prompt's own last block (private to it: only full blocks are shared), zeroed so they are
    finite; the causal mask keeps every real query from them, and the extra queries' rows are
    dropped."""
    padded = -(-length // ALIGN) * ALIGN
    _heads_view(k_source, first_slot + length, padded - length).zero_()
    _heads_view(v_source, first_slot + length, padded - length).zero_()
    q_padded = q.new_zeros(q.shape[:2] + (padded, q.shape[3]))
    q_padded[:, :, :length] = q
    o = F.scaled_dot_product_attention(q_padded, _heads_view(k_source, first_slot, padded),
                                       _heads_view(v_source, first_slot, padded), is_causal=True, scale=scale)
    return o[:, :, :length]


def _heads_view(cache: torch.Tensor, first_slot: int, length: int) -> torch.Tensor:
    """Slots [first_slot, first_slot + length) of a [blocks, block_size, kv_heads, D] cache (or
    workspace) as a [1, kv_heads, length, D] view, in one op."""
    kv_heads, head_dim = cache.shape[2:]
    row = kv_heads * head_dim
    return cache.as_strided((1, kv_heads, length, head_dim), (length * row, head_dim, row, 1),
                            cache.storage_offset() + first_slot * row)


def _merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Combine attention over disjoint key sets from each part's output and log-sum-exp."""
    weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)  # [R, 1, kv_heads, rows, 1]
    return (torch.stack(outs).float() * weights).sum(0)


def prefer_padded(group: SpanGroup, k_cache: torch.Tensor) -> bool:
    """Whether a decode group with host block tables runs faster padded than per sequence.

    The per-sequence path pays a fixed cost per row (Python, one SDPA call: ~20-25 us); the padded
    path pays one copy of every row's context, padded to the longest. So padding wins when a row's
    padded K/V are small next to that fixed cost, and with enough rows to spread its own per-call
    work; one row never gains. Measured on a noisy 2-core machine, one thread, bf16, head_dim 64,
    padded / per-sequence time of a whole decode step (`benchmarks/cpu_decode.py`, contiguous
    contexts, 16 and 64 rows):
    hidden 512 x 8 layers, 8 q/8 kv heads (2 KiB of K+V per key): 96 keys 0.95-1.0, 192 keys
    1.05-1.08, 320 keys 1.11-1.22; SmolLM2's shape, 30 layers, 9 q/3 kv heads (768 B per key):
    128 keys 0.85-0.94, 320 keys 0.95-0.98, 512 keys 1.01. So the line is at about 256 KiB of padded
    K/V per row. One layer alone (`benchmarks/cpu_attention.py`) puts it lower (~160 KiB), and with
    32 q/8 kv heads similar. Multi-query groups (prefill chunks) stay per sequence: forced padded,
    the SmolLM2-shaped model's prefill steps took 1.5x longer.
    """
    if group.max_query_len != 1 or group.num_seqs < PADDED_MIN_ROWS:
        return False
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    row_bytes = 2 * group.block_tables.shape[1] * block_size * kv_heads * head_dim * k_cache.element_size()
    return row_bytes <= PADDED_MAX_ROW_BYTES


class TorchBackend:
    """Decode groups on CPU through the native kernel (cpu_kernels.py) where it is available. Other
    groups, and every group without it: per-sequence attention over views of the cache when host
    block tables are known, else (or for many short decode contexts, see prefer_padded) one padded,
    masked SDPA call per span group and layer."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.workspace = Workspace(dtype, device)
        # the native decode kernel (cpu_kernels.py), decided once: it is called on every layer of every step
        native = device.type == "cpu" and cpu_kernels.enabled(dtype)
        self.native_decode = cpu_kernels.library() if native else None

    @property
    def workspace_bytes(self) -> int:
        return self.workspace.nbytes

    def attend(self, group: SpanGroup, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               out: torch.Tensor, scale: float, window: int | None) -> None:
        if group.max_query_len == 1 and self.native_decode is not None and cpu_kernels.decode_into(
                self.native_decode, query.narrow(0, group.row_start, group.num_rows), k_cache, v_cache,
                group.block_tables, group.context_lens, out.narrow(0, group.row_start, group.num_rows), scale,
                window):
            return
        if "padded" not in group.cache:  # decided once per step, for every layer
            group.cache["padded"] = group.host_tables is None or prefer_padded(group, k_cache)
        if group.cache["padded"]:
            self.attend_padded(group, query, k_cache, v_cache, out, scale, window)
        else:
            self.attend_each(group, query, k_cache, v_cache, out, scale, window)

    def attend_each(self, group: SpanGroup, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    out: torch.Tensor, scale: float, window: int | None) -> None:
        block_size, kv_heads, head_dim = k_cache.shape[1:]
        heads = query.shape[1]
        fold = heads // kv_heads
        key = ("plan", window)
        if key not in group.cache:
            group.cache[key] = _plan(group, block_size, window, fold, k_cache.device)
        single = group.max_query_len == 1
        outputs = []
        for plan in group.cache[key]:
            if single:  # [heads, D] -> [1, kv_heads, fold, D], a view
                q = query[plan.row].reshape(1, kv_heads, fold, head_dim)
            else:
                q = query.narrow(0, plan.row, plan.q_len).view(plan.q_len, kv_heads, fold, head_dim)
                q = q.permute(1, 2, 0, 3).reshape(1, kv_heads, fold * plan.q_len, head_dim)
            if plan.runs is None:
                width = plan.blocks.shape[0]
                kbuf, vbuf = self.workspace.buffers((width, block_size, kv_heads, head_dim))
                torch.index_select(k_cache, 0, plan.blocks, out=kbuf)
                torch.index_select(v_cache, 0, plan.blocks, out=vbuf)
                source, run = (kbuf, vbuf), (plan.first_key, plan.context_len - plan.first_key)
                views = [(_heads_view(kbuf, *run), _heads_view(vbuf, *run))]
            else:
                source, run = (k_cache, v_cache), plan.runs[0]
                views = [(_heads_view(k_cache, a, n), _heads_view(v_cache, a, n)) for a, n in plan.runs]
            if plan.aligned:
                o = _aligned_causal(q, *source, run[0], plan.q_len, scale)
            elif len(views) == 1:
                causal = plan.q_len > 1 and plan.mask is None
                o = F.scaled_dot_product_attention(q, *views[0], attn_mask=plan.mask, is_causal=causal, scale=scale)
            else:
                parts = [_flash_with_lse(q, k, v, scale=scale)[:2] for k, v in views]
                o = _merge([p[0] for p in parts], [p[1] for p in parts])
            if single:
                outputs.append(o)
            else:  # [1, kv_heads, fold * q_len, D] -> [q_len, heads, D]
                o = o.view(kv_heads, fold, plan.q_len, head_dim).permute(2, 0, 1, 3)
                out.narrow(0, plan.row, plan.q_len).copy_(o.reshape(plan.q_len, heads, head_dim))
        if single:
            out.narrow(0, group.row_start, group.num_rows).copy_(torch.cat(outputs).view(-1, heads, head_dim))

    def attend_padded(self, group: SpanGroup, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      out: torch.Tensor, scale: float, window: int | None) -> None:
        num_seqs, width = group.block_tables.shape
        block_size, kv_heads, head_dim = k_cache.shape[1:]
        num_keys = width * block_size
        heads = query.shape[1]
        fold, q_max = heads // kv_heads, group.max_query_len

        workspace = self.workspace if k_cache.device == self.workspace.device else Workspace(k_cache.dtype,
                                                                                           k_cache.device)
        kbuf, vbuf = workspace.buffers((num_seqs * width, block_size, kv_heads, head_dim))
        blocks = group.block_tables.reshape(-1)
        k = torch.index_select(k_cache, 0, blocks, out=kbuf).view(num_seqs, num_keys, kv_heads, head_dim)
        v = torch.index_select(v_cache, 0, blocks, out=vbuf).view(num_seqs, num_keys, kv_heads, head_dim)

        key = ("mask", window, num_keys)
        if key not in group.cache:
            mask = _mask(group, num_keys, window)
            group.cache[key] = mask.repeat(1, 1, fold, 1) if q_max > 1 and fold > 1 else mask
        if q_max == 1:
            q = query.narrow(0, group.row_start, num_seqs)
        else:
            if "rows" not in group.cache:
                group.cache["rows"] = _query_rows(group)
            rows, _, _ = group.cache["rows"]
            q = query.index_select(0, rows)
        # [S * Q, heads, D] -> [S, kv_heads, fold * Q, D]: query heads sharing a KV head become rows
        q = q.view(num_seqs, q_max, kv_heads, fold, head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(num_seqs, kv_heads, fold * q_max, head_dim)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=group.cache[key],
                                           scale=scale)
        o = o.view(num_seqs, kv_heads, fold, q_max, head_dim).permute(0, 3, 1, 2, 4).reshape(-1, heads, head_dim)
        if q_max == 1:
            out.narrow(0, group.row_start, num_seqs).copy_(o)
        else:
            _, valid, real_rows = group.cache["rows"]
            out.index_copy_(0, real_rows, o[valid])
