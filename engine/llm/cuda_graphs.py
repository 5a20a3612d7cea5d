"""CUDA graphs for decode-only steps.

Without graphs, a decode step of a large model at small batch is bound by Python and kernel-launch
overhead, not by the GPU. A decode step has a fixed shape once its batch size and the longest
context are rounded up to buckets, so one graph per (batch bucket, context bucket) pair is captured
the first time that pair is needed and replayed afterwards. Padding rows write their keys into a
scratch block (the block after the last real one) and attend only to it.

Graphs share one memory pool and one gather workspace sized for the largest graph; that is why the
batch x context product of a graph is capped (larger decode steps simply run eagerly). Any error
while capturing turns graphs off for the engine's lifetime and the step runs eagerly: graphs are
an optimisation, never a requirement.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.llm.attention import AttentionBatch, PaddedDecode, Span, Workspace
from engine.llm.sequence import Sequence

logger = logging.getLogger("ember.llm")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
CONTEXT_BUCKET = 256
MAX_GRAPH_TOKENS = 64 * 1024  # batch bucket x context bucket


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph  # anything with replay()
    input_ids: torch.Tensor  # [1, B]
    positions: torch.Tensor  # [1, B]
    slot_mapping: torch.Tensor  # [B]
    slots: torch.Tensor  # [B * L]
    lens: torch.Tensor  # [B]
    logits: torch.Tensor  # [B, vocab]
    batch: AttentionBatch  # keeps the captured tensors alive


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int):
        self.runner = runner
        self.buckets = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.max_len = -(-max_model_len // CONTEXT_BUCKET) * CONTEXT_BUCKET
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None
        self.enabled = True
        _, num_kv_heads, head_dim = runner.kv_shape
        self.workspace = Workspace(num_kv_heads, head_dim, runner.dtype, runner.device)
        self.workspace.buffers(MAX_GRAPH_TOKENS)  # allocated once, never grown: graphs hold its address

    def shape_for(self, seqs: list[Sequence]) -> tuple[int, int] | None:
        n = len(seqs)
        batch = next((b for b in self.buckets if b >= n), None)
        longest = max(s.num_computed_tokens + 1 for s in seqs)
        context = -(-longest // CONTEXT_BUCKET) * CONTEXT_BUCKET
        if batch is None or batch * context > MAX_GRAPH_TOKENS:
            return None
        return batch, context

    def run(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Logits [len(seqs), vocab] for a decode-only step, or None to run it eagerly."""
        shape = self.shape_for(seqs) if self.enabled else None
        if shape is None:
            return None
        graph = self.graphs.get(shape)
        if graph is None:
            try:
                graph = self.graphs[shape] = self._capture(*shape)
            except Exception:
                logger.exception("CUDA graph capture failed; decode steps run eagerly from now on")
                self.enabled = False
                self.graphs.clear()
                return None
        self._fill(graph, seqs, *shape)
        graph.graph.replay()
        return graph.logits[:len(seqs)]

    def _fill(self, g: _Graph, seqs: list[Sequence], batch: int, context: int) -> None:
        runner, bs = self.runner, self.runner.block_size
        scratch = runner.scratch_block
        pad = batch - len(seqs)
        positions = [s.num_computed_tokens for s in seqs]
        width = context // bs
        tables = torch.tensor([(s.block_table + [scratch] * width)[:width] for s in seqs] + [[scratch] * width] * pad,
                              dtype=torch.long)
        g.input_ids.copy_(torch.tensor([[s.token_ids[p] for s, p in zip(seqs, positions)] + [0] * pad]))
        g.positions.copy_(torch.tensor([positions + [0] * pad]))
        g.slot_mapping.copy_(torch.tensor([s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
                                          + [scratch * bs] * pad))
        g.slots.copy_((tables[:, :, None] * bs + torch.arange(bs)).reshape(-1))
        g.lens.copy_(torch.tensor([p + 1 for p in positions] + [1] * pad))

    def _capture(self, batch: int, context: int) -> _Graph:
        runner = self.runner
        device, scratch_slot = runner.device, runner.scratch_block * runner.block_size
        long = {"dtype": torch.long, "device": device}
        input_ids = torch.zeros(1, batch, **long)
        positions = torch.zeros(1, batch, **long)
        slot_mapping = torch.full((batch,), scratch_slot, **long)
        slots = torch.full((batch * context,), scratch_slot, **long)
        lens = torch.ones(batch, **long)
        rows = torch.arange(batch, **long)
        attn = AttentionBatch(runner.k_caches, runner.v_caches, slot_mapping,
                              spans=[Span(i, i + 1, 1) for i in range(batch)], workspace=self.workspace,
                              padded_decode=PaddedDecode(batch, slots, lens, context))

        def forward() -> torch.Tensor:
            kwargs = {"input_ids": input_ids, "position_ids": positions, "use_cache": False, "ember_batch": attn}
            if runner.supports_logits_to_keep:
                kwargs["logits_to_keep"] = rows
                return runner.model(**kwargs).logits[0]
            return runner.model(**kwargs).logits[0][rows]

        graph, logits = self._record(forward, attn)
        logger.info("captured a CUDA graph for decode batch %d, context %d", batch, context)
        return _Graph(graph, input_ids, positions, slot_mapping, slots, lens, logits, attn)

    def _record(self, forward, attn: AttentionBatch):
        """Capture `forward` into a graph; returns (graph, its static output tensor)."""
        device = self.runner.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward()  # warm-up: lazy initialisation must not happen during capture
        torch.cuda.current_stream(device).wait_stream(stream)
        attn._masks.clear()  # masks are recomputed from `lens` inside the graph on every replay
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward()
        self.pool = graph.pool()
        return graph, logits
