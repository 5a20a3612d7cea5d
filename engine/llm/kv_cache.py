"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, reference counts and
prefix caching. The tensors themselves live in the runner; this module only hands out block ids.

Prefix caching: once a block is full and its KV computed, it is registered under a hash that chains
over its tokens and the hash of the block before it, so two sequences share a block only when their
whole prefix up to the end of that block is identical. A freed block keeps its hash and stays
reusable until the allocator needs it for new content.

Contiguity: blocks are interchangeable, but on CPU attention is much cheaper when a sequence's
blocks are consecutive: attention_cpu.py then reads its keys as a plain view of the cache, where a
scattered context costs a gather (on CPU a decode step is bound by memory traffic, and a gather
adds a read and a write of the whole context: measured 1.4-1.8x the attention time of views). CUDA
kernels read blocks in place and do not care. So a sequence starting a new run of blocks gets the best-fitting free run for its expected
length (prompt + max_new_tokens), and the rest of that run is softly reserved for its growth.
Reservations are only preferences: when memory is short any free block is used, and the runner
falls back to a gather for that sequence.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from engine.llm.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0 in eviction order (unhashed ones kept at the front) ...
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # ... and the same set as arrays, for finding free runs quickly.
        self.free_mask = np.ones(num_blocks, dtype=bool)
        self.hashed_mask = np.zeros(num_blocks, dtype=bool)
        self.owner = np.full(num_blocks, -1, dtype=np.int64)  # soft reservation: seq_id or -1
        self.cached: dict[bytes, int] = {}
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- hashing -------------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The content hashes of the sequence's first `num_blocks` full blocks (memoised)."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else b"", seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def _lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the sequence's leading full blocks. At least one token is always
        left to compute, since its logits are what the next sample needs."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        num_full = (seq.num_tokens - 1) // self.block_size
        for h in self._hashes(seq, num_full)[:num_full]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def register_full_blocks(self, seq: Sequence, num_computed: int | None = None) -> None:
        """Publish the sequence's newly completed blocks to the prefix cache: those within its
        first `num_computed` tokens (default: all it has computed). The core passes what a step
        it has read computed, since a later step may already be issued."""
        computed = seq.num_computed_tokens if num_computed is None else min(num_computed, seq.num_computed_tokens)
        num_full = min(computed // self.block_size, len(seq.block_table))
        if not self.enable_prefix_caching or num_full <= seq.num_published_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_published_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                self.cached[hashes[i]] = block.block_id
                self.hashed_mask[block.block_id] = True
        seq.num_published_blocks = num_full

    # -- the free pool -------------------------------------------------------------------------

    def _remove_free(self, block_id: int) -> None:
        del self.free[block_id]
        self.free_mask[block_id] = False
        self.owner[block_id] = -1

    def _claim_new(self, block_id: int) -> int:
        """Take a free block for new content, evicting its cached prefix entry if it has one."""
        self._remove_free(block_id)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
            self.hashed_mask[block_id] = False
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._remove_free(block_id)
        block.ref_count += 1

    def _extend(self, seq: Sequence, block_ids: list[int]) -> None:
        table = seq.block_table
        for b in block_ids:
            if not table or table[-1] + 1 != b:
                seq.num_runs += 1
            table.append(b)

    def _run_start(self, seq: Sequence, need: int) -> int:
        """First block of a new run for `seq`: the smallest unreserved free run that fits `need`
        blocks (unhashed runs first, to keep cached prefixes), else the largest; the rest of the
        run is reserved for the sequence's growth. Without any, the least recently freed block."""
        candidates = self.free_mask & (self.owner < 0)
        for mask in (candidates & ~self.hashed_mask, candidates):
            edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
            starts = np.flatnonzero(edges == 1)
            if len(starts) == 0:
                continue
            lengths = np.flatnonzero(edges == -1) - starts
            fits = lengths >= need
            if not fits.any() and mask is not candidates:
                continue
            i = int(np.argmin(np.where(fits, lengths, np.iinfo(np.int64).max))) if fits.any() else int(np.argmax(lengths))
            start, end = int(starts[i]), int(starts[i] + min(need, lengths[i]))
            self.owner[start + 1:end] = seq.seq_id
            seq.region = (start + 1, end)
            return start
        return next(iter(self.free))

    def _append_new_blocks(self, seq: Sequence, count: int) -> None:
        expected = self.blocks_needed(seq.num_prompt_tokens + seq.params.max_new_tokens)
        for _ in range(count):
            table = seq.block_table
            nxt = table[-1] + 1 if table else -1
            if 0 <= nxt < self.num_blocks and self.free_mask[nxt] and self.owner[nxt] in (-1, seq.seq_id):
                block_id = nxt
            else:
                self._release_region(seq)
                block_id = self._run_start(seq, max(1, expected - len(table)))
            self._extend(seq, [self._claim_new(block_id)])

    def _release_region(self, seq: Sequence) -> None:
        if seq.region is not None:
            start, end = seq.region
            owned = self.owner[start:end]
            owned[owned == seq.seq_id] = -1
            seq.region = None

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        """Make room for up to `num_new_tokens` more tokens after the computed ones (clipped to the
        tokens left to compute). On a sequence with no blocks yet, first reuse cached prefix blocks.
        Returns False (changing nothing) when the free pool, less `reserve` blocks, is too small."""
        hits = self._lookup(seq) if not seq.block_table else []
        num_computed = len(hits) * self.block_size if hits else seq.num_computed_tokens
        num_new_tokens = min(num_new_tokens, seq.num_tokens - num_computed)
        need = self.blocks_needed(num_computed + num_new_tokens) - len(seq.block_table) - len(hits)
        hits_from_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if need + hits_from_free + reserve > len(self.free):
            return False
        for block_id in hits:
            self._ref(block_id)
        if hits:
            self._extend(seq, hits)
            seq.num_computed_tokens = num_computed
            seq.num_published_blocks = len(hits)
            self.prefix_hit_tokens += num_computed
        self._append_new_blocks(seq, max(need, 0))
        return True

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Let `child` share the parent's first `num_blocks` (full, computed) blocks."""
        shared = parent.block_table[:num_blocks]
        for block_id in shared:
            self._ref(block_id)
        self._extend(child, shared)
        child.block_hashes = list(parent.block_hashes[:num_blocks])
        child.num_computed_tokens = num_blocks * self.block_size
        child.num_published_blocks = min(num_blocks, parent.num_published_blocks)

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references. Tail blocks are released first so that, among cached
        blocks, a shared prompt's leading blocks are the last to be evicted."""
        self._release_region(seq)
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                self.free_mask[block_id] = True
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_runs = 0
        seq.num_published_blocks = 0
