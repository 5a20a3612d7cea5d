"""Async scheduling (engine/llm/core.py): the core issues step N+1 before it reads step N's tokens.
On CPU it is off by default (the forward pass runs on the host, nothing overlaps) but the same code
runs when it is switched on, so these tests check its bookkeeping on CPU: the placeholder of a token
not read yet is fed from the device, a sequence that a stop token ends is dropped from the step
issued after it, length limits are known ahead, and outputs stay those of `generate`. (The engine
and greedy suites also run whole under both schedulings.)"""

from __future__ import annotations

from engine.llm.types import GenerationRequest
from tests.llm_fixtures import (
    assert_idle,
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    run_all,
    tokens_of,
)
from tests.test_llm_greedy import check_greedy, workload


def test_steps_are_issued_ahead_and_greedy_output_matches_generate(llama, tokenizer):
    prompts, max_new = workload(8, len(tokenizer), seed=21, max_new=(10, 30))
    engine = make_engine(llama, tokenizer, async_scheduling=True)
    counters = engine.core.counters
    check_greedy(llama, engine, prompts, max_new, waves=2)
    assert counters["steps_ahead"] > counters["steps"] // 2


def test_async_scheduling_is_off_on_cpu_unless_asked(llama, tokenizer):
    engine = make_engine(llama, tokenizer, async_scheduling=None)
    try:
        assert not engine.core.async_scheduling
        prompts = random_prompts(2, len(tokenizer), seed=22)
        run_all(engine, [GenerationRequest(f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)])
        assert engine.core.counters["steps_ahead"] == 0
    finally:
        engine.close()


def test_a_stop_token_read_late_drops_the_row_issued_after_it(llama, tokenizer):
    """Each request stops at its 6th token; the step issued before that token was read computed
    the sequence once more, and that row is dropped: the output ends at the stop token, nothing
    after it is streamed, and every block comes back."""
    prompts = random_prompts(4, len(tokenizer), seed=23)
    references = [reference_greedy(llama, p, 24) for p in prompts]
    stops = [ref[5] for ref in references]
    engine = make_engine(llama, tokenizer, async_scheduling=True)
    try:
        results = run_all(engine, [GenerationRequest(f"s{i}", p, greedy(24, stop_token_ids=[stop]))
                                   for i, (p, stop) in enumerate(zip(prompts, stops))])
        for ref, stop, result in zip(references, stops, results):
            deltas = result[0]
            expected = ref[:ref.index(stop) + 1]
            assert tokens_of(deltas) == expected
            assert deltas[-1].finish_reason == "stop"
            assert deltas[-1].completion_tokens == len(expected)
        engine.core.call(lambda: None)  # between steps, after the step in flight is read
        assert engine.core.counters["dropped_rows"] >= len(prompts)
        assert_idle(engine)
    finally:
        engine.close()


def test_length_limits_are_known_ahead(llama, tokenizer):
    """A sequence whose next token reaches max_new_tokens (here also the end of the model's
    context) gets no placeholder, so no step computes past the limit."""
    engine = make_engine(llama, tokenizer, async_scheduling=True, max_model_len=48, block_size=8)
    try:
        prompt = random_prompts(1, len(tokenizer), seed=24, lengths=(44, 44), shared_prefix=0)[0]
        short = random_prompts(1, len(tokenizer), seed=25, lengths=(5, 20), shared_prefix=0)[0]
        near_end, bounded = run_all(engine, [GenerationRequest("end", prompt, greedy(4)),
                                             GenerationRequest("bounded", short, greedy(7))])
        assert tokens_of(near_end[0]) == reference_greedy(llama, prompt, 4)
        assert near_end[0][-1].finish_reason == "length"
        assert tokens_of(bounded[0]) == reference_greedy(llama, short, 7)
        assert len(tokens_of(bounded[0])) == 7  # no stop token: every row computed was needed
        engine.core.call(lambda: None)
        assert engine.core.counters["dropped_rows"] == 0
        assert_idle(engine)
    finally:
        engine.close()


def test_a_sequence_preempted_with_a_token_in_flight_waits_for_it(llama, tokenizer):
    """Decodes that outgrow a tiny cache preempt each other while their next token is still in
    flight; such a sequence is admitted again only once that token is read, then recomputes its
    context including it."""
    block_bytes = 16 * 512  # block_size tokens * (2 layers * 2 kv heads * 16 dims * k,v * fp32)
    engine = make_engine(llama, tokenizer, async_scheduling=True, kv_cache_bytes=10 * block_bytes,
                         enable_prefix_caching=False)
    scheduler = engine.core.scheduler
    preempted_pending = []
    preempt = scheduler._preempt

    def spy(seq):
        preempted_pending.append(seq.num_pending_tokens > 0)
        preempt(seq)

    scheduler._preempt = spy
    prompts = random_prompts(4, len(tokenizer), seed=26, lengths=(30, 30), shared_prefix=0)
    try:
        results = run_all(engine, [GenerationRequest(f"p{i}", p, greedy(40)) for i, p in enumerate(prompts)])
        for prompt, result in zip(prompts, results):
            assert tokens_of(result[0]) == reference_greedy(llama, prompt, 40)
        assert any(preempted_pending)
        assert_idle(engine)
    finally:
        engine.close()


def test_a_step_with_a_constrained_row_is_read_before_the_next(llama, tokenizer):
    """A constraint's mask for the next token needs the token just sampled, so such steps are not
    run ahead; the constrained request still gets every step, beside an unconstrained one."""
    from engine.llm.constraints import ForcedTokensFactory

    forced = [5, 9, 11, 7, 3, 8]
    prompts = random_prompts(2, len(tokenizer), seed=27)
    engine = make_engine(llama, tokenizer, async_scheduling=True)
    try:
        alone = run_all(engine, [GenerationRequest("c0", prompts[0], greedy(10),
                                                   constraint_factory=ForcedTokensFactory(tuple(forced)))])[0]
        assert tokens_of(alone[0]) == forced and alone[0][-1].finish_reason == "stop"
        assert engine.core.counters["steps_ahead"] == 0
        both = run_all(engine, [GenerationRequest("c1", prompts[0], greedy(10),
                                                  constraint_factory=ForcedTokensFactory(tuple(forced))),
                                GenerationRequest("free", prompts[1], greedy(12))])
        assert tokens_of(both[0][0]) == forced
        assert tokens_of(both[1][0]) == reference_greedy(llama, prompts[1], 12)
        assert engine.core.counters["steps_ahead"] > 0  # once the constrained request is done
        assert_idle(engine)
    finally:
        engine.close()
