"""Block manager and scheduler in isolation: ref counts, prefix hashing, eviction, chunked
prefill, admission limits and preemption order."""

from __future__ import annotations

from engine.llm.kv_cache import BlockManager
from engine.llm.scheduler import Scheduler
from engine.llm.sequence import SeqStatus, Sequence
from engine.llm.types import SamplingParams

_ids = iter(range(10**6))


def seq(tokens, priority=0, arrival=None) -> Sequence:
    sid = next(_ids)
    return Sequence(seq_id=sid, request_id=f"r{sid}", index=0, token_ids=list(tokens),
                    num_prompt_tokens=len(tokens), params=SamplingParams(), priority=priority,
                    arrival=sid if arrival is None else arrival)


def compute(bm: BlockManager, s: Sequence, n: int):
    assert bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.register_full_blocks(s)


def test_prefix_blocks_are_shared_and_ref_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10))
    compute(bm, a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    b = seq(list(range(8)) + [99, 98, 97])
    assert bm.allocate(b, 100)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free_seq(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    bm.free_seq(b)
    assert bm.num_free_blocks == 10


def test_hash_chains_over_the_prefix():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a, 9)
    other_first_block = seq([0, 0, 0, 0, 5, 6, 7, 8, 9])  # same second block, different prefix
    assert bm.allocate(other_first_block, 9)
    assert other_first_block.num_computed_tokens == 0


def test_last_token_is_always_recomputed():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(8))
    compute(bm, a, 8)
    b = seq(range(8))
    assert bm.allocate(b, 8)
    assert b.num_computed_tokens == 4  # the second block would leave nothing to compute


def test_freed_cached_blocks_survive_until_needed_then_are_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(9))
    compute(bm, a, 9)
    bm.free_seq(a)
    again = seq(range(9))
    assert bm.allocate(again, 9) and again.num_computed_tokens == 8
    bm.free_seq(again)
    filler = seq(range(100, 116))
    compute(bm, filler, 16)  # needs every block: the cached ones are evicted
    bm.free_seq(filler)
    late = seq(range(9))
    assert bm.allocate(late, 9) and late.num_computed_tokens == 0


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(range(9))
    compute(bm, a, 9)
    b = seq(range(20, 40))
    assert not bm.allocate(b, 20)
    assert b.block_table == [] and bm.num_free_blocks == 0


def test_chunked_prefill_keeps_decodes_running():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    short = seq(range(3))
    sched.add(short)
    batch = sched.schedule()
    assert batch.num_tokens == [3]
    short.num_computed_tokens += 3
    short.token_ids.append(7)  # its first sampled token
    long = seq(range(30))
    sched.add(long)
    seen = []
    for _ in range(4):
        batch = sched.schedule()
        assert sum(batch.num_tokens) <= 10
        assert batch.seqs[0] is short and batch.num_tokens[0] == 1  # the decode is never stalled
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed_tokens += n
            if s is short:
                s.token_ids.append(7)
        seen.append(long.num_computed_tokens)
    assert seen == [9, 18, 27, 30]


def test_a_higher_priority_prefill_never_stalls_running_decodes():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    low = seq(range(3), priority=5)
    sched.add(low)
    sched.schedule()
    low.num_computed_tokens += 3
    low.token_ids.append(7)
    urgent = seq(range(40), priority=0)
    sched.add(urgent)
    for _ in range(5):
        batch = sched.schedule()
        assert low in batch.seqs and batch.num_tokens[batch.seqs.index(low)] == 1
        assert sum(batch.num_tokens) <= 10
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed_tokens += n
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(7)
    assert urgent.num_computed_tokens == 40


def test_max_num_seqs_and_priority_order_admission():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    low, high, mid = seq([1, 2], priority=5), seq([3, 4], priority=0), seq([5, 6], priority=1)
    for s in (low, high, mid):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [high, mid] and low.status is SeqStatus.WAITING


def test_preemption_frees_the_newest_sequence():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    old, new = seq(range(4)), seq(range(10, 14))
    for s in (old, new):
        sched.add(s)
    first = sched.schedule()
    for s, n in zip(first.seqs, first.num_tokens):
        s.num_computed_tokens += n
    # grow both until the 4 blocks run out
    for step in range(6):
        for s in list(sched.running):
            s.token_ids.append(1)
        batch = sched.schedule()
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed_tokens += n
        if batch.preempted:
            assert batch.preempted == [new]
            assert new.status is SeqStatus.WAITING and new.num_computed_tokens == 0 and not new.block_table
            assert batch.seqs == [old]
            return
    raise AssertionError("no preemption happened")


def test_growing_sequences_stay_contiguous_while_memory_allows():
    bm = BlockManager(num_blocks=64, block_size=4)
    seqs = [seq(range(i * 100, i * 100 + 5)) for i in range(4)]
    for s in seqs:
        s.params = SamplingParams(max_new_tokens=40)
        assert bm.allocate(s, 5)
        s.num_computed_tokens = 5
    for _ in range(30):  # interleaved growth, one token each per step
        for s in seqs:
            s.token_ids.append(1)
            assert bm.allocate(s, 1)
            s.num_computed_tokens += 1
    assert all(s.num_runs == 1 for s in seqs)
    for s in seqs:
        bm.free_seq(s)
    assert bm.num_free_blocks == 64 and (bm.owner == -1).all()


def test_contiguity_is_only_a_preference():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(range(4)), seq(range(10, 14))
    for s in (a, b):
        s.params = SamplingParams(max_new_tokens=100)  # each would like the whole cache
        assert bm.allocate(s, 4)
        s.num_computed_tokens = 4
    for _ in range(12):
        for s in (a, b):
            s.token_ids.append(1)
            assert bm.allocate(s, 1)
            s.num_computed_tokens += 1
    assert bm.num_free_blocks == 0 and a.num_runs + b.num_runs > 2
