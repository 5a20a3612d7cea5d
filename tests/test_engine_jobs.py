"""The Engine with real models: job lifecycle, event replay, cancellation, errors before queueing."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from engine.engine import Engine, demo_registry
from engine.errors import InvalidInput, ModelUnavailable, PromptTooLong, QueueFull
from engine.files import FileStore
from engine.jobs import Job
from engine.llm.types import SamplingParams
from engine.text_task import TextTask


@pytest.fixture()
async def engine(settings):
    registry = demo_registry(settings.home, settings.models)
    engine = Engine(registry, FileStore(settings.home / "engine-test-files"))
    yield engine
    await engine.close()


def _job(engine, task, ref="ember/tiny-chat") -> Job:
    version = engine.registry.resolve(ref)
    return Job(model=version.model, version=version.id, kind=version.kind, input={}, task=task)


async def test_text_job_runs_to_success_and_replays(engine):
    job = await engine.submit(_job(engine, TextTask(prompt="Hello there", params=SamplingParams(
        max_new_tokens=12, temperature=0, ignore_eos=True))))
    assert await job.wait(60)
    assert job.status == "succeeded" and job.error is None
    assert job.choices[0].completion_tokens == 12
    assert "".join(job.output) == job.choices[0].text and job.choices[0].text
    replayed = [e async for e in job.follow()]
    assert replayed[-1].type == "done" and replayed[-1].data == {"status": "succeeded"}
    assert "".join(e.data for e in replayed if e.type == "output") == job.choices[0].text
    assert job.predict_time is not None and job.total_time >= job.predict_time


async def test_chat_messages_use_the_chat_template(engine):
    job = await engine.submit(_job(engine, TextTask(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        params=SamplingParams(max_new_tokens=4, temperature=0))))
    assert await job.wait(60) and job.status == "succeeded"
    tokenizer = engine.pool.states[job.version].loaded.worker.tokenizer
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    assert job.prompt_tokens == len(expected)


async def test_cancel_stops_a_running_job(engine):
    job = await engine.submit(_job(engine, TextTask(prompt="Go on", params=SamplingParams(
        max_new_tokens=400, temperature=0, ignore_eos=True))))
    async for event in job.follow():
        if event.type == "output":
            break
    engine.cancel(job.id)
    assert await job.wait(30)
    assert job.status == "canceled"
    assert job.choices[0].completion_tokens < 400
    engine.cancel(job.id)  # idempotent
    assert job.status == "canceled"
    llm = engine.pool.states[job.version].loaded.worker
    for _ in range(100):
        stats = llm.stats()
        if stats["num_free_blocks"] == stats["num_total_blocks"]:
            break
        await asyncio.sleep(0.05)
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


async def test_many_jobs_at_once_all_finish(engine):
    jobs = [await engine.submit(_job(engine, TextTask(prompt=f"Request {i}", params=SamplingParams(
        max_new_tokens=4 + i % 5, temperature=0.8, seed=i)))) for i in range(12)]
    await asyncio.gather(*(j.wait(120) for j in jobs))
    assert all(j.status == "succeeded" for j in jobs)


async def test_prompt_over_the_context_fails_before_queueing(engine):
    with pytest.raises(PromptTooLong, match="maximum context length is 512"):
        await engine.submit(_job(engine, TextTask(prompt="word " * 600, params=SamplingParams(max_new_tokens=8))))
    assert not engine.jobs


async def test_clipping_instead_of_failing(engine):
    task = TextTask(prompt="word " * 100, params=SamplingParams(max_new_tokens=5000, temperature=0),
                    max_tokens_clip=True)
    job = await engine.submit(_job(engine, task))
    assert job.prompt_tokens + task.params.max_new_tokens == 512
    engine.cancel(job.id)
    await job.wait(30)


async def test_bad_prompt_template_is_invalid_input(engine):
    with pytest.raises(InvalidInput, match="prompt_template"):
        await engine.submit(_job(engine, TextTask(prompt="x", prompt_template="no placeholder")))


async def test_unavailable_model_fails_cleanly(engine):
    with pytest.raises(ModelUnavailable, match="not on this machine"):
        await engine.submit(_job(engine, TextTask(prompt="x"), ref="acme/missing"))
    job = await engine.submit(_job(engine, TextTask(prompt="x"), ref="acme/missing"), wait_ready=False)
    assert await job.wait(30)
    assert job.status == "failed" and "not on this machine" in job.error


async def test_finished_jobs_leave_memory_after_the_retention_window(engine):
    engine.options.job_retention_s = 0.01
    job = await engine.submit(_job(engine, TextTask(prompt="x", params=SamplingParams(max_new_tokens=2))))
    assert await job.wait(30)
    for _ in range(100):
        if job.id not in engine.jobs:
            break
        await asyncio.sleep(0.02)
    assert job.id not in engine.jobs and job.id not in engine.tasks


async def test_engine_errors_while_running_fail_the_job_with_their_message(settings):
    """An engine error raised while a job runs (here the LLM's queue-full refusal) fails that job
    with the error's own message, not a Python class name."""
    registry = demo_registry(settings.home, settings.models)
    engine = Engine(registry, FileStore(settings.home / "engine-test-files"))
    try:
        version = registry.resolve("ember/tiny-chat")
        llm = (await asyncio.to_thread(engine.pool.acquire, version)).worker
        engine.pool.release(version)

        async def refuse(request):
            raise QueueFull("more than 1 requests are waiting")
            yield  # an async generator, like LLMEngine.generate

        llm.generate = refuse
        job = await engine.submit(_job(engine, TextTask(prompt="Hi", params=SamplingParams(max_new_tokens=4))))
        assert await job.wait(60)
        assert job.status == "failed" and job.error == "more than 1 requests are waiting"
    finally:
        await engine.close()


async def test_a_caller_cancelled_while_the_model_loads_releases_it(settings):
    registry = demo_registry(settings.home, settings.models)
    engine = Engine(registry, FileStore(settings.home / "engine-test-files"))
    try:
        waiting = _job(engine, TextTask(prompt="Hi", params=SamplingParams(max_new_tokens=2)))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(engine.submit(waiting), 0.001)
        version = engine.version_of(waiting)
        await asyncio.to_thread(engine.pool.acquire, version)
        engine.pool.release(version)
        for _ in range(100):
            if engine.pool.states[version.id].in_use == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.pool.states[version.id].in_use == 0
    finally:
        await engine.close()


@pytest.mark.parametrize("interval_s", [0.0, 0.25])
async def test_remote_messages_carry_every_token_once_and_respect_the_interval(engine, interval_s):
    """engine.remote.serve_job (what a Ray replica streams): the events of a job in order, each
    once; with an interval, consecutive messages are at least that far apart and so fewer."""
    from engine.remote import job_spec, serve_job

    spec = job_spec(_job(engine, TextTask(prompt="Hello there", params=SamplingParams(
        max_new_tokens=24, temperature=0, ignore_eos=True))))
    messages, stamps = [], []
    async for kind, payload in serve_job(engine, spec, interval_s):
        messages.append((kind, payload))
        stamps.append(asyncio.get_running_loop().time())
    kinds = [k for k, _ in messages]
    assert kinds[0] == "ready" and kinds[-1] == "end" and set(kinds[1:-1]) == {"events"}
    events = [e for k, p in messages if k == "events" for e in p]
    assert [e.id for e in events] == list(range(len(events)))
    assert "".join(e.data for e in events if e.type == "output") == messages[-1][1]["choices"][0].text
    sent = [t for (k, _), t in zip(messages, stamps) if k == "events"]
    if interval_s:
        assert all(b - a >= interval_s * 0.9 for a, b in zip(sent, sent[1:]))
        assert len(sent) < sum(e.type == "output" for e in events)


def test_new_ids_are_base36_of_the_asked_length_and_every_digit_is_uniform():
    from engine.jobs import new_id

    ids = [new_id() for _ in range(7200)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 26 and set(i) <= set("abcdefghijklmnopqrstuvwxyz0123456789") for i in ids)
    assert len(new_id(12)) == 12
    # every position, including the last (most significant) digit, takes each of 36 values about
    # 200 times: a chi-square over 35 degrees of freedom above 80 happens with probability < 1e-5
    for position in (0, 13, 25):
        counts = Counter(i[position] for i in ids)
        assert len(counts) == 36
        assert sum((c - 200) ** 2 / 200 for c in counts.values()) < 80
