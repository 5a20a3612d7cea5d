"""CUDA graphs for decode steps, captured at start-up, one per batch-size bucket.

Without graphs, a decode step of a large model at small batch is bound by Python and kernel-launch
overhead, not by the GPU. A decode step's kernel shapes depend only on its batch size: the paged
attention kernel reads block tables and context lengths from tensors, so those are graph inputs
held in static buffers sized for `max_model_len`, and one graph per batch bucket (up to
`max_num_seqs`) serves any mix of context lengths (batch 64 at 4K or batch 256 at 1K alike).
Padding rows write their key into the scratch block (the block after the last real one) and
attend to it alone.

The runner sends a step here only when every sequence computes its last token (see
`ModelRunner.is_decode_step`); any error while capturing or replaying turns graphs off for the
engine's lifetime and the step runs eagerly: graphs are an optimisation, never a requirement.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.llm.attention import AttentionBatch, SpanGroup
from engine.llm.sequence import Sequence

if TYPE_CHECKING:
    from engine.llm.runner import TokenFeed

logger = logging.getLogger("ember.llm")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def batch_buckets(max_num_seqs: int) -> list[int]:
    return [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph  # anything with replay()
    logits: torch.Tensor  # [B, vocab], written by every replay
    batch: AttentionBatch  # keeps the captured tensors alive


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int):
        self.runner = runner
        self.buckets = batch_buckets(max_num_seqs)
        self.width = -(-max_model_len // runner.block_size)  # block-table columns
        largest, device = self.buckets[-1], runner.device
        scratch = runner.scratch_block
        long = {"dtype": torch.long, "device": device}
        int32 = {"dtype": torch.int32, "device": device}
        # Static graph inputs, shared by every bucket (a bucket of size B reads their first B rows).
        self.input_ids = torch.zeros(1, largest, **long)
        self.positions = torch.zeros(1, largest, **long)
        self.slot_mapping = torch.full((largest,), scratch * runner.block_size, **long)
        self.block_tables = torch.full((largest, self.width), scratch, **int32)
        self.context_lens = torch.ones(largest, **int32)
        self.query_starts = torch.arange(largest + 1, **int32)
        self.rows = torch.arange(largest, **long)
        # Host staging for one copy per buffer per step; table columns past a context keep stale
        # (still valid) block ids, which neither the kernel nor the mask ever reads.
        pinned = device.type == "cuda"
        self.host_tables = torch.full((largest, self.width), scratch, dtype=torch.int32, pin_memory=pinned).numpy()
        self.host_small = torch.zeros(4, largest, dtype=torch.long, pin_memory=pinned).numpy()  # ids, positions, slots, lens
        self.copied: torch.cuda.Event | None = None  # recorded after each step's host-to-device copies
        self.graphs: dict[int, _Graph] = {}
        self.pool = None
        self.enabled = True
        self.replays = 0
        self.capture_all()

    @property
    def buffer_bytes(self) -> int:
        tensors = (self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.context_lens)
        return sum(t.numel() * t.element_size() for t in tensors)

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def capture_all(self) -> None:
        """Capture every bucket, largest first (smaller graphs then fit in the larger ones' pool)."""
        try:
            for batch in reversed(self.buckets):
                self.graphs[batch] = self._capture(batch)
            logger.info("captured decode graphs for batch sizes %s (contexts up to %d blocks)",
                        self.buckets, self.width)
        except Exception:
            logger.exception("CUDA graph capture failed; decode steps run eagerly")
            self._disable()

    def _disable(self) -> None:
        self.enabled = False
        self.graphs.clear()

    def run(self, seqs: list[Sequence], feed: TokenFeed | None = None) -> torch.Tensor | None:
        """Logits [len(seqs), vocab] for a decode step, or None to run it eagerly."""
        batch = self.bucket_for(len(seqs)) if self.enabled else None
        if batch is None or batch not in self.graphs:
            return None
        try:
            self.fill(seqs, batch, feed)
            graph = self.graphs[batch]
            graph.graph.replay()
        except Exception:
            logger.exception("CUDA graph replay failed; decode steps run eagerly from now on")
            self._disable()
            return None
        self.replays += 1
        return graph.logits[:len(seqs)]

    def fill(self, seqs: list[Sequence], batch: int, feed: TokenFeed | None = None) -> None:
        """Write the step's inputs into the static buffers; rows past len(seqs) are padding.

        The host staging buffers are pinned and copied without blocking: before they are written
        again, wait until the device has taken the previous step's copies (with async scheduling
        the host prepares a step while the one before may still be queued)."""
        bs, scratch, n = self.runner.block_size, self.runner.scratch_block, len(seqs)
        small, tables = self.host_small, self.host_tables
        if self.copied is not None:
            self.copied.synchronize()
        for row, s in enumerate(seqs):
            p = s.num_computed_tokens
            width = p // bs + 1
            tables[row, :width] = s.block_table[:width]
            small[:, row] = (s.token_ids[p], p, s.block_table[p // bs] * bs + p % bs, p + 1)
        small[:, n:batch] = np.array([[0], [0], [scratch * bs], [1]])
        tables[n:batch, 0] = scratch
        self.input_ids[0, :batch].copy_(torch.from_numpy(small[0, :batch]), non_blocking=True)
        self.positions[0, :batch].copy_(torch.from_numpy(small[1, :batch]), non_blocking=True)
        self.slot_mapping[:batch].copy_(torch.from_numpy(small[2, :batch]), non_blocking=True)
        self.context_lens[:batch].copy_(torch.from_numpy(small[3, :batch]), non_blocking=True)
        self.block_tables[:batch].copy_(torch.from_numpy(tables[:batch]), non_blocking=True)
        if self.runner.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()
        if feed is not None:
            feed.fill(self.input_ids, [(row, s.seq_id) for row, s in enumerate(seqs)])

    def _capture(self, batch: int) -> _Graph:
        runner = self.runner
        group = SpanGroup(0, batch, self.block_tables[:batch], self.context_lens[:batch],
                          self.query_starts[:batch + 1], 1)
        attn = AttentionBatch(runner.k_caches, runner.v_caches, self.slot_mapping[:batch], runner.backend,
                              single=group)
        input_ids, positions, rows = self.input_ids[:, :batch], self.positions[:, :batch], self.rows[:batch]

        def forward() -> torch.Tensor:
            kwargs = {"input_ids": input_ids, "position_ids": positions, "use_cache": False, "ember_batch": attn}
            if runner.supports_logits_to_keep:
                kwargs["logits_to_keep"] = rows
                return runner.model(**kwargs).logits[0]
            return runner.model(**kwargs).logits[0][rows]

        with torch.inference_mode():
            graph, logits = self._record(forward, attn)
        return _Graph(graph, logits, attn)

    def _record(self, forward, attn: AttentionBatch):
        """Capture `forward` into a graph; returns (graph, its static output tensor)."""
        device = self.runner.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward()  # warm-up: lazy initialisation (Triton compilation too) must not happen during capture
        torch.cuda.current_stream(device).wait_stream(stream)
        attn.single.cache.clear()  # values derived from the inputs are recomputed inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward()
        self.pool = graph.pool()
        return graph, logits
