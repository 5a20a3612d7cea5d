"""Engine behaviour: seeds, stop strings, abort and disconnects, limits, n > 1, logprobs,
constraints, priorities, error isolation, shutdown."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.errors import InvalidInput, ModelUnavailable, PromptTooLong, QueueFull
from engine.llm.constraints import ForcedTokens
from engine.llm.engine import LLMEngine, LLMEngineConfig
from engine.llm.types import GenerationRequest, SamplingParams
from tests.llm_fixtures import (
    NothingAllowed,
    assert_idle,
    collect,
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    run_all,
    text_of,
    tokens_of,
)

pytestmark = pytest.mark.usefixtures("both_schedulings")


@pytest.fixture
def engine(llama, tokenizer):
    engine = make_engine(llama, tokenizer)
    yield engine
    engine.close()



async def wait_idle(engine):
    """Wait (by polling, bounded by steps not time) until the engine has nothing in flight."""
    for _ in range(10_000):
        if engine.stats()["active_requests"] == 0 and engine.stats()["running"] == 0:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("engine never went idle")


def test_seeded_sampling_is_reproducible_alone_and_in_a_busy_batch(engine, tokenizer):
    prompt = random_prompts(1, len(tokenizer), seed=11)[0]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    alone = tokens_of(run_all(engine, [GenerationRequest("alone", prompt, params)])[0][0])
    others = [GenerationRequest(f"o{i}", p, SamplingParams(max_new_tokens=30, temperature=1.3))
              for i, p in enumerate(random_prompts(12, len(tokenizer), seed=12))]
    results = run_all(engine, others[:6] + [GenerationRequest("busy", prompt, params)] + others[6:])
    assert tokens_of(results[6][0]) == alone
    other_seed = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=8)
    assert tokens_of(run_all(engine, [GenerationRequest("s8", prompt, other_seed)])[0][0]) != alone
    assert_idle(engine)


def test_stop_strings_are_never_emitted(engine, llama, tokenizer):
    prompt = tokenizer("The weather today is")["input_ids"]
    full = text_of(run_all(engine, [GenerationRequest("full", prompt, greedy(40))])[0][0])
    stop = full[12:15]
    assert len(stop) == 3 and stop.strip()
    result = run_all(engine, [GenerationRequest("stopped", prompt, greedy(40, stop=["zzzz-not-there", stop]))])[0][0]
    text = text_of(result)
    assert text == full[:full.find(stop)]
    assert result[-1].finish_reason == "stop"
    seen = ""
    for delta in result:
        seen += delta.text
        assert stop not in seen and full.startswith(seen)
    assert_idle(engine)


def test_stop_strings_wait_for_min_new_tokens(engine, tokenizer):
    prompt = tokenizer("The weather today is")["input_ids"]
    first = run_all(engine, [GenerationRequest("first", prompt, greedy(40))])[0][0]
    stop = text_of(first[:3])
    assert stop.strip()
    early = text_of(run_all(engine, [GenerationRequest("early", prompt, greedy(40, stop=[stop]))])[0][0])
    assert early == ""
    late = run_all(engine, [GenerationRequest("late", prompt, greedy(40, stop=[stop], min_new_tokens=6))])[0][0]
    assert len(tokens_of(late)) >= 6 and text_of(late).startswith(stop)
    assert_idle(engine)


def test_abort_and_disconnect_free_every_block(engine, tokenizer):
    prompts = random_prompts(10, len(tokenizer), seed=13)

    async def main():
        long = SamplingParams(max_new_tokens=300, ignore_eos=True, temperature=0.8)
        finished = [asyncio.create_task(collect(engine, GenerationRequest(f"f{i}", p, greedy(5))))
                    for i, p in enumerate(prompts[:4])]
        aborted = [asyncio.create_task(collect(engine, GenerationRequest(f"a{i}", p, long)))
                   for i, p in enumerate(prompts[4:7])]
        gone = []
        for i, p in enumerate(prompts[7:]):  # consumers that stop reading after two deltas
            stream = engine.generate(GenerationRequest(f"d{i}", p, long))
            gone.append([await stream.__anext__(), await stream.__anext__()])
            await stream.aclose()
        for i in range(3):
            engine.abort(f"a{i}")
        engine.abort("no-such-request")
        done = await asyncio.gather(*finished, *aborted)
        await wait_idle(engine)
        return done

    done = asyncio.run(main())
    for result in done[:4]:
        assert result[0][-1].finish_reason in ("length", "stop")
    for result in done[4:]:
        finals = [d for d in result[0] if d.finish_reason]
        assert len(finals) == 1 and finals[0] is result[0][-1] and finals[0].finish_reason == "abort"
    assert_idle(engine)


def test_cancelled_task_aborts_its_request(engine, tokenizer):
    async def main():
        task = asyncio.create_task(collect(engine, GenerationRequest(
            "c", [5, 6, 7], SamplingParams(max_new_tokens=500, ignore_eos=True))))
        while engine.stats()["running"] == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)

    asyncio.run(main())
    assert_idle(engine)


def test_prompt_too_long_is_raised_before_queueing(engine):
    async def main(prompt_len, max_new):
        request = GenerationRequest("long", [5] * prompt_len, SamplingParams(max_new_tokens=max_new))
        return await collect(engine, request)

    with pytest.raises(PromptTooLong) as info:
        asyncio.run(main(engine.max_model_len - 10, 11))
    assert info.value.max_model_len == engine.max_model_len and info.value.prompt_tokens == engine.max_model_len - 10
    with pytest.raises(InvalidInput):
        asyncio.run(main(3, 0))
    assert asyncio.run(main(engine.max_model_len - 2, 2))[0][-1].finish_reason is not None
    assert engine.stats()["waiting"] == 0


def test_queue_full(llama, tokenizer):
    engine = make_engine(llama, tokenizer, max_num_seqs=1, max_queue=3)

    async def main():
        params = SamplingParams(max_new_tokens=400, ignore_eos=True)
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(collect(engine, GenerationRequest(f"q{i}", [5, 6], params))))
            await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await collect(engine, GenerationRequest("q4", [5, 6], params))
        for i in range(4):
            engine.abort(f"q{i}")
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert sum(isinstance(r, dict) for r in results) >= 3
    finally:
        engine.close()


def test_duplicate_request_ids_are_refused(engine):
    async def main():
        task = asyncio.create_task(collect(engine, GenerationRequest("dup", [5], SamplingParams(max_new_tokens=300))))
        await asyncio.sleep(0)
        with pytest.raises(InvalidInput):
            await collect(engine, GenerationRequest("dup", [6], SamplingParams(max_new_tokens=3)))
        engine.abort("dup")
        await task

    asyncio.run(main())


def test_n_choices_share_the_prompt(engine, llama, tokenizer):
    prompt = random_prompts(1, len(tokenizer), seed=14, lengths=(50, 50))[0]
    result = run_all(engine, [GenerationRequest("n-greedy", prompt, greedy(12, n=3))])[0]
    assert engine.stats()["prefix_cache_hit_tokens"] == 0  # shared by forking, not by lookup
    assert sorted(result) == [0, 1, 2]
    expected = reference_greedy(llama, prompt, 12)
    for deltas in result.values():
        assert tokens_of(deltas) == expected
        assert [d.finish_reason is not None for d in deltas].count(True) == 1
    sampled = run_all(engine, [GenerationRequest("n-sampled", prompt, SamplingParams(
        max_new_tokens=16, temperature=1.0, n=4, seed=3))])[0]
    assert len({tuple(tokens_of(d)) for d in sampled.values()}) == 4
    assert_idle(engine)


def test_logprobs(engine, llama, tokenizer):
    prompt = random_prompts(1, len(tokenizer), seed=15)[0]
    deltas = run_all(engine, [GenerationRequest("lp", prompt, greedy(6, logprobs=3))])[0][0]
    for delta in deltas:
        (lp,) = delta.logprobs
        assert lp.token_id == delta.token_ids[0] == lp.top[0][0]
        assert lp.logprob == pytest.approx(lp.top[0][2]) and lp.logprob <= 0
        assert [t[2] for t in lp.top] == sorted((t[2] for t in lp.top), reverse=True) and len(lp.top) == 3
        assert lp.token == tokenizer.decode([lp.token_id])


def test_constraint_hook(engine, tokenizer):
    forced = tokenizer("steamed hams", add_special_tokens=False)["input_ids"]
    calls = []

    def factory(index):
        calls.append(index)
        return ForcedTokens(forced)

    request = GenerationRequest("json", [5, 6, 7], SamplingParams(max_new_tokens=50, temperature=1.0, n=2),
                                constraint_factory=factory)
    result = run_all(engine, [request])[0]
    assert sorted(calls) == [0, 1]
    for deltas in result.values():
        assert tokens_of(deltas) == forced
        assert text_of(deltas) == "steamed hams" and deltas[-1].finish_reason == "stop"
    assert_idle(engine)


def test_priority_orders_waiting_requests(llama, tokenizer):
    engine = make_engine(llama, tokenizer, max_num_seqs=1)

    async def main():
        order = []

        async def run(rid, priority, n):
            await collect(engine, GenerationRequest(rid, [5, 6], SamplingParams(max_new_tokens=n, ignore_eos=True),
                                                    priority=priority))
            order.append(rid)

        first = asyncio.create_task(run("first", 0, 200))
        while engine.stats()["running"] == 0:
            await asyncio.sleep(0.001)
        await asyncio.gather(first, run("low", 5, 2), run("high", 1, 2), run("low-2", 5, 2))
        return order

    try:
        assert asyncio.run(main()) == ["first", "high", "low", "low-2"]
    finally:
        engine.close()


def test_a_failing_step_fails_only_its_requests(engine, llama, tokenizer):
    real_execute = engine.runner.execute
    failed_once = []

    def flaky(seqs, num_tokens, **kwargs):
        # the first step that carries all three requests fails (they may join on different steps)
        if not failed_once and {s.request_id for s in seqs} == {"e0", "e1", "e2"}:
            failed_once.append(True)
            raise RuntimeError("simulated device failure")
        return real_execute(seqs, num_tokens, **kwargs)

    engine.runner.execute = flaky
    prompts = random_prompts(3, len(tokenizer), seed=16)
    failed = run_all(engine, [GenerationRequest(f"e{i}", p, greedy(10)) for i, p in enumerate(prompts)])
    for result in failed:
        assert result[0][-1].finish_reason == "error" and "simulated device failure" in result[0][-1].error
    after = run_all(engine, [GenerationRequest("after", prompts[0], greedy(10))])[0][0]
    assert tokens_of(after) == reference_greedy(llama, prompts[0], 10)
    assert engine.stats()["failed_steps"] == 1
    assert_idle(engine)


def test_close_ends_streams_with_abort(llama, tokenizer):
    engine = make_engine(llama, tokenizer)

    async def main():
        task = asyncio.create_task(collect(engine, GenerationRequest(
            "x", [5, 6], SamplingParams(max_new_tokens=1000, ignore_eos=True))))
        while engine.stats()["running"] == 0:
            await asyncio.sleep(0.001)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        return await task

    assert asyncio.run(main())[0][-1].finish_reason == "abort"


def test_a_failing_constraint_factory_fails_only_its_request(engine, llama, tokenizer):
    def broken(index):
        raise RuntimeError("no grammar for you")

    bad = GenerationRequest("bad", [5, 6, 7], SamplingParams(max_new_tokens=5, n=2), constraint_factory=broken)
    good = GenerationRequest("good", [5, 6, 7], greedy(5))
    bad_result, good_result = run_all(engine, [bad, good])
    assert sorted(bad_result) == [0, 1]
    assert all(d[-1].finish_reason == "error" and "no grammar" in d[-1].error for d in bad_result.values())
    assert tokens_of(good_result[0]) == reference_greedy(llama, [5, 6, 7], 5)
    assert_idle(engine)


def test_repetition_penalty_matches_transformers(engine, llama, tokenizer):
    prompt = random_prompts(1, len(tokenizer), seed=21, lengths=(20, 20))[0]
    with torch.inference_mode():
        out = llama.generate(torch.tensor([prompt], device=llama.device), attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=llama.device),
                             max_new_tokens=16, do_sample=False, repetition_penalty=1.8)
    expected = out[0, len(prompt):].tolist()
    got = run_all(engine, [GenerationRequest("rep", prompt, greedy(16, repetition_penalty=1.8)),
                           GenerationRequest("plain", prompt, greedy(16))])
    assert tokens_of(got[0][0]) == expected
    assert tokens_of(got[1][0]) == reference_greedy(llama, prompt, 16)
    assert_idle(engine)


def test_choice_seeds_do_not_collide_with_other_requests(engine, tokenizer):
    prompt = random_prompts(1, len(tokenizer), seed=22)[0]
    params = dict(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    two = run_all(engine, [GenerationRequest("s1", prompt, SamplingParams(n=2, seed=1, **params))])[0]
    seed2 = run_all(engine, [GenerationRequest("s2", prompt, SamplingParams(seed=2, **params))])[0]
    again = run_all(engine, [GenerationRequest("s1b", prompt, SamplingParams(n=2, seed=1, **params))])[0]
    assert tokens_of(two[1]) != tokens_of(seed2[0])
    assert [tokens_of(two[i]) for i in (0, 1)] == [tokens_of(again[i]) for i in (0, 1)]


def test_a_failing_row_fails_only_its_request(engine, llama, tokenizer):
    prompts = random_prompts(3, len(tokenizer), seed=23)
    bad_forced = tokenizer("steamed", add_special_tokens=False)["input_ids"]

    class Refuses(ForcedTokens):  # its mask allows one token, then refuses it when sampled
        def accept(self, token_id):
            raise ValueError("private detail of request bad-accept")

    requests = [GenerationRequest("good-0", prompts[0], greedy(8)),
                GenerationRequest("bad-mask", prompts[1], greedy(8), constraint_factory=lambda i: NothingAllowed()),
                GenerationRequest("bad-accept", prompts[2], greedy(8), constraint_factory=lambda i: Refuses(bad_forced)),
                GenerationRequest("good-1", prompts[2], greedy(8))]
    good0, mask, accept, good1 = run_all(engine, requests)
    assert mask[0][-1].finish_reason == "error" and "allows no token" in mask[0][-1].error
    assert accept[0][-1].finish_reason == "error" and "bad-accept" in accept[0][-1].error
    for result, prompt in ((good0, prompts[0]), (good1, prompts[2])):
        assert tokens_of(result[0]) == reference_greedy(llama, prompt, 8)
        assert all(d.error is None for d in result[0])
    assert engine.stats()["failed_steps"] == 0
    assert_idle(engine)


def test_a_request_racing_shutdown_ends_with_an_error(llama, tokenizer):
    engine = make_engine(llama, tokenizer)
    core = engine.core
    real_add = core.add

    def add_after_shutdown(state):  # the engine shuts down between generate()'s checks and the add
        core.close()
        real_add(state)

    core.add = add_after_shutdown

    async def main():
        return await asyncio.wait_for(collect(engine, GenerationRequest("late", [5, 6], greedy(3))), timeout=30)

    with pytest.raises(ModelUnavailable):
        asyncio.run(main())


def prompt_logprob_reference(model, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([prompt], device=model.device)).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("chunk", [2048, 16])
def test_prompt_logprobs_match_the_model(llama, tokenizer, chunk):
    engine = make_engine(llama, tokenizer, max_num_batched_tokens=chunk)
    try:
        prompt = random_prompts(1, len(tokenizer), seed=24, lengths=(45, 45))[0]
        run_all(engine, [GenerationRequest("warm", prompt, greedy(2))])  # the prompt's blocks are now cached
        reference = prompt_logprob_reference(llama, prompt)
        score, gen = run_all(engine, [
            GenerationRequest("score", prompt, greedy(0, prompt_logprobs=2)),
            GenerationRequest("gen", prompt, SamplingParams(max_new_tokens=3, temperature=1.0, n=2, seed=5,
                                                            prompt_logprobs=0)),
        ])
        (final,) = score[0]
        assert final.finish_reason == "length" and final.token_ids == [] and final.completion_tokens == 0
        entries = final.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for i, entry in enumerate(entries[1:], start=1):
            assert entry.token_id == prompt[i]
            assert entry.logprob == pytest.approx(reference[i - 1, prompt[i]].item(), abs=1e-4)
            top = reference[i - 1].topk(2)
            assert [t[0] for t in entry.top] == top.indices.tolist()
            assert [t[2] for t in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert entry.token == tokenizer.decode([prompt[i]])
        for deltas in gen.values():
            assert [d.prompt_logprobs is not None for d in deltas] == [True] + [False] * (len(deltas) - 1)
            assert [e.logprob for e in deltas[0].prompt_logprobs[1:]] == pytest.approx([e.logprob for e in entries[1:]], abs=1e-4)
        assert_idle(engine)
    finally:
        engine.close()


def test_max_new_tokens_zero_needs_prompt_logprobs(engine):
    with pytest.raises(InvalidInput):
        run_all(engine, [GenerationRequest("zero", [5, 6], greedy(0))])


def test_kv_budget_is_a_share_of_total_device_memory():
    from engine.llm.engine import kv_budget_bytes

    gib = 2**30
    # 80 GiB device, 0.9 of it for this engine, 14 GiB already held by its weights, 66 GiB free
    assert kv_budget_bytes(80 * gib, 66 * gib, 14 * gib, 0.9) == 58 * gib
    # someone else filled the device: never more than is free
    assert kv_budget_bytes(80 * gib, 10 * gib, 14 * gib, 0.9) == 10 * gib
    assert kv_budget_bytes(80 * gib, 66 * gib, 79 * gib, 0.9) == 0


def test_memory_bytes_sleep_and_wake(llama, tokenizer):
    engine = make_engine(llama, tokenizer)
    try:
        from engine.llm.runner import kv_bytes_per_token

        (size,) = engine.memory_bytes().values()
        per_token = kv_bytes_per_token(llama, torch.float32)
        assert size >= engine.stats()["num_total_blocks"] * engine.config.block_size * per_token
        prompt = random_prompts(1, len(tokenizer), seed=25, lengths=(40, 40))[0]
        run_all(engine, [GenerationRequest("before", prompt, greedy(4))])
        engine.sleep()
        assert engine.memory_bytes() == {}
        with pytest.raises(ModelUnavailable):
            run_all(engine, [GenerationRequest("asleep", prompt, greedy(4))])
        engine.wake()
        after = run_all(engine, [GenerationRequest("after", prompt, greedy(4))])[0][0]
        assert tokens_of(after) == reference_greedy(llama, prompt, 4)
        assert engine.stats()["prefix_cache_hit_tokens"] == 0  # the cache started empty again
        assert_idle(engine)
    finally:
        engine.close()


def test_the_step_thread_uses_the_configured_cpu_threads(llama, tokenizer):
    """On CPU the step thread runs its own intra-op thread count (LLMEngineConfig.cpu_threads),
    leaving the caller's setting alone."""
    if llama.device.type != "cpu":
        pytest.skip("a CPU setting")
    caller = torch.get_num_threads()
    for threads in (1, 2):
        engine = LLMEngine(llama, tokenizer, LLMEngineConfig(kv_cache_bytes=1 << 22, cpu_threads=threads,
                                                             process=False))
        try:
            assert engine.core.call(torch.get_num_threads) == threads
        finally:
            engine.close()
    assert torch.get_num_threads() == caller


def test_close_releases_the_kv_cache(llama, tokenizer):
    """A closed engine holds no reference to its cache, so the next engine's budget (measured from
    what the process's live tensors hold, on a GPU) is not charged for it."""
    import gc
    import weakref

    engine = make_engine(llama, tokenizer)
    run_all(engine, [GenerationRequest("r", [5, 6, 7], greedy(3))])
    cache = weakref.ref(engine.runner.k_caches[0])
    engine.close()
    gc.collect()
    assert cache() is None
