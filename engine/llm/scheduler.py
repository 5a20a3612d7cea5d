"""Which sequences run in the next forward pass, and how many tokens each.

Every step has a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs). Running
decodes are served first (one token each, most important first), then unfinished prefills take
what is left of the budget (chunked prefill), most important first: a long prompt, whatever its
priority, never stalls a running decode. A running sequence with nothing to compute (its next token
is still being sampled in a step the core has not read yet) sits the step out. Then waiting
sequences are admitted in (priority, arrival) order while budget, seat and KV blocks last. When a
running sequence needs a block and none is free, the least important running sequence is
preempted: its blocks are freed and it goes back to the waiting queue to be recomputed later (with
prefix caching, often from its own cached blocks). Nothing fails for lack of memory, since
max_model_len never exceeds what the whole cache can hold.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from engine.llm.kv_cache import BlockManager
from engine.llm.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed for each seq this step
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 admission_reserve_blocks: int = 0):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Admission leaves this many blocks free so running decodes rarely need to preempt.
        self.admission_reserve_blocks = admission_reserve_blocks
        self.waiting: list[tuple[tuple[int, int, int], int, Sequence]] = []  # heap, lazy deletion
        self.running: list[Sequence] = []
        self.num_waiting = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        heapq.heappush(self.waiting, (seq.sort_key, seq.seq_id, seq))
        self.num_waiting += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and release its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.num_waiting -= 1  # its heap entry is skipped when reached
        seq.status = SeqStatus.FINISHED
        self.bm.free_seq(seq)

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.sort_key)
        decodes_first = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:  # its next token is still being sampled (async scheduling, core.py)
                continue
            while not self.bm.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
        if not batch.preempted:
            self._admit(batch, budget)
        if not batch.seqs and not self.running and self.num_waiting:
            # Only waiting sequences hold blocks (forked choices) and the head does not fit:
            # release them all; they recompute their prompts when admitted.
            for _, _, seq in self.waiting:
                if seq.status is SeqStatus.WAITING and seq.block_table:
                    self.bm.free_seq(seq)
                    seq.num_computed_tokens = 0
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            _, _, seq = self.waiting[0]
            if seq.status is not SeqStatus.WAITING:
                heapq.heappop(self.waiting)
                continue
            if seq.num_pending_tokens:  # preempted while a token of its was in flight: admitted once it is read
                break
            if not self._allocate_admission(seq, budget):
                break
            heapq.heappop(self.waiting)
            self.num_waiting -= 1
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n

    def _allocate_admission(self, seq: Sequence, budget: int) -> bool:
        reserve = self.admission_reserve_blocks if self.running else 0
        if not seq.needs_prompt_rows:
            return self.bm.allocate(seq, budget, reserve=reserve)
        # Prompt logprobs need every prompt row computed: no prefix-cache hits for this one.
        lookup, self.bm.enable_prefix_caching = self.bm.enable_prefix_caching, False
        try:
            return self.bm.allocate(seq, budget, reserve=reserve)
        finally:
            self.bm.enable_prefix_caching = lookup
