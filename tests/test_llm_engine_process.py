"""The engine core in its own process (engine_process.py): the same answers as the in-process core,
and everything the facade offers working across the pipe: abort, stop strings, grammars, prompt
logprobs, seeds, sleep/wake, close, and a killed engine process."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import threading

import pytest
import torch

from engine.errors import InvalidInput, ModelUnavailable
from engine.llm.constraints import ForcedTokensFactory
from engine.llm.engine import LLMEngine, LLMEngineConfig
from engine.llm.grammar import constraint_factory
from engine.llm.types import GenerationRequest, SamplingParams
from tests.llm_fixtures import (assert_idle, collect, greedy, make_engine, random_prompts, reference_greedy, run_all,
                                text_of, tokens_of)


def process_engine(model, tokenizer, **config) -> LLMEngine:
    config.setdefault("kv_cache_bytes", 8 * 2**20)
    return LLMEngine(model, tokenizer, LLMEngineConfig(process=True, **config))


@pytest.fixture(scope="module")
def engine(llama, tokenizer):
    engine = process_engine(llama, tokenizer)
    yield engine
    engine.close()



def test_cpu_engines_run_their_core_in_a_process_by_default(llama, tokenizer):
    assert LLMEngineConfig().process is None
    engine = LLMEngine(llama, tokenizer, LLMEngineConfig(kv_cache_bytes=1 << 22))
    try:
        assert not engine.in_process and engine.core.process.is_alive()
        assert engine.stats()["num_total_blocks"] > 0  # known before any step
        assert_idle(engine)
        assert engine.core.call("threads") == torch.get_num_threads()  # every core, on its own main thread
        with pytest.raises(AttributeError, match="own process"):
            engine.runner
    finally:
        engine.close()


def test_outputs_match_the_in_process_core(engine, llama, tokenizer):
    """Greedy equals transformers; seeded sampling, n > 1 and prompt logprobs equal the thread core's."""
    prompts = random_prompts(4, len(tokenizer), seed=3)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11, n=2, logprobs=2)
    scored = greedy(3, prompt_logprobs=2)

    def requests(tag):
        return ([GenerationRequest(f"{tag}-g{i}", p, greedy(8)) for i, p in enumerate(prompts)]
                + [GenerationRequest(f"{tag}-s", prompts[0], sampled), GenerationRequest(f"{tag}-p", prompts[1], scored)])

    in_thread = make_engine(llama, tokenizer)
    try:
        expected = run_all(in_thread, requests("t"))
    finally:
        in_thread.close()
    got = run_all(engine, requests("p"))
    for i, prompt in enumerate(prompts):
        assert tokens_of(got[i][0]) == reference_greedy(llama, prompt, 8)
    for choice in (0, 1):
        assert tokens_of(got[4][choice]) == tokens_of(expected[4][choice])
        assert text_of(got[4][choice]) == text_of(expected[4][choice])
        assert [lp.logprob for d in got[4][choice] for lp in d.logprobs] == pytest.approx(
            [lp.logprob for d in expected[4][choice] for lp in d.logprobs], abs=1e-4)
    ours, theirs = got[5][0][0].prompt_logprobs, expected[5][0][0].prompt_logprobs
    assert ours[0] is None and len(ours) == len(prompts[1])
    assert [e.logprob for e in ours[1:]] == pytest.approx([e.logprob for e in theirs[1:]], abs=1e-4)
    assert_idle(engine)


def test_abort_ends_the_stream_and_frees_its_blocks(engine, tokenizer):
    prompt = random_prompts(1, len(tokenizer), seed=5)[0]

    async def main():
        deltas = []
        async for delta in engine.generate(GenerationRequest("long", prompt, greedy(400, ignore_eos=True))):
            deltas.append(delta)
            if len(deltas) == 2:
                engine.abort("long")
        return deltas

    deltas = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert deltas[-1].finish_reason == "abort" and deltas[-1].completion_tokens < 400
    assert_idle(engine)


def test_a_stop_string_ends_the_choice_and_the_engine_frees_it(engine, llama, tokenizer):
    """The stop string is found on the server side; the engine process is told and frees the blocks."""
    prompt = random_prompts(1, len(tokenizer), seed=8)[0]
    full = run_all(engine, [GenerationRequest("free", prompt, greedy(30, ignore_eos=True))])[0][0]
    text = text_of(full)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    cut = run_all(engine, [GenerationRequest("stopped", prompt, greedy(30, ignore_eos=True, stop=[stop]))])[0][0]
    assert cut[-1].finish_reason == "stop"
    assert text_of(cut) == text[:text.index(stop)]
    assert_idle(engine)


def test_constraints_cross_the_pipe(engine, llama, tokenizer):
    """A grammar travels as its spec and is compiled in the engine process; a plain factory object
    travels pickled; a lambda is refused with a clear error."""
    prompt = random_prompts(1, len(tokenizer), seed=9)[0]
    grammar = constraint_factory(tokenizer, {"type": "json_object"}, None, None)
    forced = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    in_thread = make_engine(llama, tokenizer)
    try:
        expected = run_all(in_thread, [GenerationRequest("g", prompt, greedy(12), constraint_factory=grammar)])[0][0]
    finally:
        in_thread.close()
    got, pinned = run_all(engine, [
        GenerationRequest("g", prompt, greedy(12), constraint_factory=grammar),
        GenerationRequest("f", prompt, greedy(30), constraint_factory=ForcedTokensFactory(tuple(forced)))])
    assert text_of(got[0]) == text_of(expected) and text_of(got[0]).startswith("{")
    assert tokens_of(pinned[0]) == forced and pinned[0][-1].finish_reason == "stop"
    with pytest.raises(InvalidInput, match="cannot be sent"):
        run_all(engine, [GenerationRequest("l", prompt, greedy(3), constraint_factory=lambda i: None)])
    assert_idle(engine)


def test_sleep_frees_the_cache_and_wake_serves_again(engine, llama, tokenizer):
    prompt = random_prompts(1, len(tokenizer), seed=10)[0]
    assert engine.memory_bytes()[str(engine.device)] > 0
    engine.sleep()
    try:
        assert engine.memory_bytes() == {}
        with pytest.raises(ModelUnavailable):
            run_all(engine, [GenerationRequest("asleep", prompt, greedy(4))])
    finally:
        engine.wake()
    assert engine.memory_bytes()[str(engine.device)] > 0
    after = run_all(engine, [GenerationRequest("awake", prompt, greedy(4))])[0][0]
    assert tokens_of(after) == reference_greedy(llama, prompt, 4)
    assert engine.stats()["prefix_cache_hit_tokens"] == 0  # a fresh cache
    assert_idle(engine)


def test_a_killed_engine_process_fails_requests_in_flight(llama, tokenizer):
    engine = process_engine(llama, tokenizer)
    prompt = random_prompts(1, len(tokenizer), seed=12)[0]

    async def main():
        deltas = []
        async for delta in engine.generate(GenerationRequest("doomed", prompt, greedy(400, ignore_eos=True))):
            deltas.append(delta)
            if len(deltas) == 1:
                os.kill(engine.core.process.pid, signal.SIGKILL)
        return deltas

    try:
        deltas = asyncio.run(asyncio.wait_for(main(), timeout=60))
        assert deltas[-1].finish_reason == "error"
        assert "exited unexpectedly" in deltas[-1].error and "-9" in deltas[-1].error
        assert not engine.alive
        with pytest.raises(ModelUnavailable):
            run_all(engine, [GenerationRequest("after", prompt, greedy(2))])
    finally:
        engine.close()


def test_close_ends_requests_in_flight_and_refuses_new_ones(llama, tokenizer):
    engine = process_engine(llama, tokenizer, cpu_threads=1)
    assert engine.core.call("threads") == 1  # cpu_threads applies to the engine process's loop
    prompt = random_prompts(1, len(tokenizer), seed=13)[0]

    async def main():
        started = asyncio.Event()

        async def stream(request_id):
            deltas = []
            async for delta in engine.generate(GenerationRequest(request_id, prompt, greedy(400, ignore_eos=True))):
                deltas.append(delta)
                started.set()
            return deltas

        tasks = [asyncio.create_task(stream(f"r{i}")) for i in range(3)]
        await started.wait()
        closer = threading.Thread(target=engine.close)
        closer.start()
        results = await asyncio.gather(*tasks)
        await asyncio.to_thread(closer.join)
        return results

    results = asyncio.run(asyncio.wait_for(main(), timeout=60))
    for deltas in results:
        assert deltas[-1].finish_reason == "abort"
    assert engine.core.process.exitcode == 0 and not engine.alive
    with pytest.raises(ModelUnavailable):  # a request after (or racing) shutdown errors, never hangs
        asyncio.run(asyncio.wait_for(collect(engine, GenerationRequest("late", prompt, greedy(2))), timeout=30))
    engine.close()  # idempotent


# ------------------------------------------------------------------------------ through HTTP


def _llm(server):
    """The served tiny chat model's engine (loaded by a first request)."""
    engine = server.server.config.app.state.engine
    state = engine.pool.states[engine.registry.resolve("ember/tiny-chat").id]
    return state.loaded.worker


def test_http_serving_runs_the_engine_process_and_survives_its_crash(fresh_server):
    """`ember serve` on CPU serves from an engine process: streaming, stop strings and cancel work
    through it; a killed engine process fails the request in flight with an error, the next request
    loads the model again, and shutting the server down stops the process."""
    import openai

    from tests.conftest import API_KEY

    client = openai.OpenAI(base_url=f"{fresh_server.url}/v1", api_key=API_KEY, max_retries=0)
    ask = {"model": "ember/tiny-chat", "messages": [{"role": "user", "content": "Say something."}],
           "temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**ask).choices[0].message.content
    llm = _llm(fresh_server)
    assert not llm.in_process and llm.core.process.is_alive()

    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(**ask, stream=True)
                       if chunk.choices)
    assert streamed == full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = client.chat.completions.create(**ask, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]

    stream = client.chat.completions.create(**{**ask, "max_tokens": 400}, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away: the engine process aborts the request and frees its blocks
    for _ in range(200):
        stats = llm.stats()
        if stats["active_requests"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]:
            break
        threading.Event().wait(0.05)
    assert stats["active_requests"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]

    stream = client.chat.completions.create(**{**ask, "max_tokens": 400}, stream=True)
    chunks = iter(stream)
    next(chunks)
    os.kill(llm.core.process.pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="exited unexpectedly"):
        for _ in chunks:
            pass
    assert client.chat.completions.create(**ask).choices[0].message.content == full  # loaded again
    reloaded = _llm(fresh_server)
    assert reloaded is not llm and reloaded.alive
    fresh_server.stop()
    assert reloaded.core.process.exitcode == 0


def test_bf16_tied_weights_cross_as_one_shared_tensor(tokenizer):
    """The weights reach the engine process through shared memory without a copy: a bf16 model
    with tied embeddings decodes there exactly as transformers does here, and stays tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    prompt = list(range(20, 60))
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None)[0, len(prompt):].tolist()
    engine = process_engine(model, tokenizer)
    try:
        got = run_all(engine, [GenerationRequest("tied", prompt, greedy(12, ignore_eos=True))])[0][0]
        held = engine.memory_bytes()["cpu"]
    finally:
        engine.close()
    assert tokens_of(got) == expected
    from engine.llm.cpu_linear import packable

    if packable(model):  # the engine process's packed copies of the linear weights are charged too
        linear = sum(m.weight.nbytes for m in model.modules() if type(m) is torch.nn.Linear)
        in_process = LLMEngine(copy.deepcopy(model), tokenizer, LLMEngineConfig(process=False, kv_cache_bytes=8 * 2**20))
        try:
            assert held - in_process.memory_bytes()["cpu"] == linear
        finally:
            in_process.close()
    assert model.lm_head.weight.is_shared()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
