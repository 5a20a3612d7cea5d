"""The Replicate-style API with the official `replicate` client against uvicorn on loopback, plus
validation, error shapes and persistence across restarts."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import replicate
from replicate.exceptions import ModelError, ReplicateError

from tests.conftest import API_KEY, OTHER_KEY

MODEL = "ember/tiny-chat"
GREEDY = {"prompt": "Tell me a story", "temperature": 0, "max_new_tokens": 12}
LONG = {"prompt": "Tell me a story", "temperature": 0, "max_new_tokens": 480}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def sdk(server, key: str = API_KEY) -> replicate.Client:
    client = replicate.Client(api_token=key, base_url=server.url)
    client.poll_interval = 0.05
    return client


def app_of(server):
    return server.server.config.app


@contextmanager
def held_jobs(server):
    """Jobs submitted inside the block wait before running until the yielded event is set."""
    engine = app_of(server).state.engine
    release = threading.Event()
    original = engine._execute

    async def execute(job, version, prepared):
        while not release.is_set():
            await asyncio.sleep(0.02)
        await original(job, version, prepared)

    engine._execute = execute
    try:
        yield release
    finally:
        release.set()
        del engine._execute


def wait_until_done(client: replicate.Client, prediction_id: str, limit_s: float = 60):
    deadline = time.monotonic() + limit_s
    prediction = client.predictions.get(prediction_id)
    while prediction.status not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
        time.sleep(0.05)
        prediction = client.predictions.get(prediction_id)
    return prediction


@pytest.fixture(scope="module")
def version_id(live_server) -> str:
    return sdk(live_server).models.get(MODEL).latest_version.id


def test_run_returns_an_iterator_of_strings(live_server, version_id):
    client = sdk(live_server)
    output = client.run(f"{MODEL}:{version_id}", input=GREEDY)
    chunks = list(output)
    assert chunks and all(isinstance(c, str) for c in chunks)
    assert client.run(MODEL, input=GREEDY) == chunks  # owner/name answers the latest version's list


def test_predictions_create_get_list(live_server, version_id):
    client = sdk(live_server)
    created = client.predictions.create(version=version_id, input=GREEDY)
    assert created.status == "starting" and created.model == MODEL and created.version == version_id
    assert created.urls["get"].startswith(live_server.url)
    done = wait_until_done(client, created.id)
    assert done.status == "succeeded" and done.output and done.error is None
    assert done.metrics["predict_time"] >= 0 and done.metrics["total_time"] >= done.metrics["predict_time"]
    assert done.input == GREEDY and done.started_at and done.completed_at
    page = client.predictions.list()
    assert page.results[0].id == created.id
    assert created.id not in [p.id for p in sdk(live_server, OTHER_KEY).predictions.list()]
    with pytest.raises(ReplicateError) as error:
        sdk(live_server, OTHER_KEY).predictions.get(created.id)
    assert error.value.status == 404


def test_list_paginates_with_a_cursor(live_server, version_id, monkeypatch):
    import server.replicate as api

    client = sdk(live_server)
    created = [client.predictions.create(version=version_id, input={**GREEDY, "max_new_tokens": 1}).id
               for _ in range(3)]
    monkeypatch.setattr(api, "PAGE_SIZE", 2)
    first = client.predictions.list()
    assert [p.id for p in first.results] == created[::-1][:2] and first.next
    second = client.predictions.list(first.next)
    assert second.results[0].id == created[0]
    for prediction_id in created:
        wait_until_done(client, prediction_id)


def test_model_predictions_endpoint_uses_the_latest_version(live_server, version_id):
    client = sdk(live_server)
    prediction = client.models.predictions.create(model=MODEL, input=GREEDY)
    assert prediction.version == version_id
    assert wait_until_done(client, prediction.id).status == "succeeded"


def test_stream_replays_from_the_start_and_matches_the_output(live_server, version_id):
    client = sdk(live_server)
    events = list(client.stream(f"{MODEL}:{version_id}", input=GREEDY))
    assert [e.event.value for e in events][-1] == "done" and events[-1].data == "{}"
    text = "".join(str(e) for e in events)
    assert text == "".join(client.run(f"{MODEL}:{version_id}", input=GREEDY))
    assert len({e.id for e in events}) == len(events)
    prediction = client.predictions.create(version=version_id, input=GREEDY)
    wait_until_done(client, prediction.id)
    late = list(client.predictions.get(prediction.id).stream())
    assert "".join(str(e) for e in late) == text


def test_stream_sends_keepalives_while_waiting(live_server, version_id, monkeypatch):
    import server.replicate as api

    monkeypatch.setattr(api, "PING_S", 0.1)
    with held_jobs(live_server) as release:
        prediction = sdk(live_server).predictions.create(version=version_id, input=GREEDY)
        with httpx.stream("GET", prediction.urls["stream"], headers=AUTH) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith(": ping")
            release.set()
            assert "event: done" in list(lines)


def test_cancel_mid_stream(live_server, version_id):
    client = sdk(live_server)
    prediction = client.predictions.create(version=version_id, input=LONG, stream=True)
    events = []
    for event in prediction.stream():
        events.append(event)
        if len(events) == 1:
            canceled = client.predictions.cancel(prediction.id)
            assert canceled.id == prediction.id
    assert events[-1].event.value == "done" and json.loads(events[-1].data) == {"reason": "canceled"}
    final = wait_until_done(client, prediction.id)
    assert final.status == "canceled"
    again = client.predictions.cancel(prediction.id)
    assert again.status == "canceled"


def test_cancel_a_finished_prediction_keeps_it_finished(live_server, version_id):
    client = sdk(live_server)
    prediction = client.predictions.create(version=version_id, input=GREEDY, wait=True)
    assert prediction.status == "succeeded"
    assert client.predictions.cancel(prediction.id).status == "succeeded"


def test_prefer_wait_answers_starting_when_the_wait_runs_out(live_server, version_id):
    client = sdk(live_server)
    with held_jobs(live_server) as release:
        response = httpx.post(f"{live_server.url}/v1/predictions", headers={**AUTH, "Prefer": "wait=1"},
                              json={"version": version_id, "input": GREEDY}, timeout=30)
        assert response.status_code == 201 and response.headers["preference-applied"] == "wait=1"
        assert response.json()["status"] == "starting"
        output = client.run(f"{MODEL}:{version_id}", input=GREEDY, wait=1)
        release.set()
        assert "".join(output) == "".join(client.run(f"{MODEL}:{version_id}", input=GREEDY))
    finished = client.predictions.create(version=version_id, input=GREEDY, wait=30)
    assert finished.status == "succeeded" and finished.output


def test_cancel_after_header(live_server, version_id):
    with held_jobs(live_server) as release:
        response = httpx.post(f"{live_server.url}/v1/predictions", headers={**AUTH, "Cancel-After": "50ms"},
                              json={"version": version_id, "input": GREEDY})
        assert response.status_code == 201
        job = app_of(live_server).state.engine.jobs[response.json()["id"]]
        while not job.cancel_requested:
            time.sleep(0.02)
        release.set()
        assert wait_until_done(sdk(live_server), job.id).status == "canceled"
    bad = httpx.post(f"{live_server.url}/v1/predictions", headers={**AUTH, "Cancel-After": "soon"},
                     json={"version": version_id, "input": GREEDY})
    assert bad.status_code == 422 and "Cancel-After" in bad.json()["detail"]


def test_versions_endpoints_through_the_client(live_server, version_id):
    model = sdk(live_server).models.get(MODEL)
    assert model.owner == "ember" and model.name == "tiny-chat"
    versions = model.versions.list()
    assert versions.results[0].id == version_id
    version = model.versions.get(version_id)
    assert version.openapi_schema["components"]["schemas"]["Output"]["x-cog-array-type"] == "iterator"


def test_run_endpoint_answers_the_finished_prediction(client, version_id):
    body = client.post("/v1/run", json={"model": f"{MODEL}:{version_id}", "input": GREEDY}).json()
    assert body["status"] == "succeeded" and body["output"] and body["version"] == version_id
    assert "_owner" not in body
    assert client.post("/v1/run", json={"model": MODEL, "input": GREEDY}).json()["output"] == body["output"]


def test_run_caller_hanging_up_cancels_the_job(live_server):
    client = sdk(live_server)
    with held_jobs(live_server) as release:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live_server.url}/v1/run", headers=AUTH, json={"model": MODEL, "input": GREEDY},
                       timeout=httpx.Timeout(5, read=0.5))
        job = app_of(live_server).state.engine.jobs[client.predictions.list().results[0].id]
        while not job.cancel_requested:
            time.sleep(0.02)
        release.set()
        assert wait_until_done(client, job.id).status == "canceled"


def test_run_sse_streams_tokens_then_done(live_server, version_id):
    events = []
    with httpx.stream("POST", f"{live_server.url}/v1/run_sse", headers=AUTH,
                      json={"model": f"{MODEL}:{version_id}", "input": GREEDY}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        current = {}
        for line in response.iter_lines():
            if not line:
                events.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = current[name] + "\n" + value if name in current else value
    assert events[-1]["event"] == "done" and all("id" in e for e in events)
    text = "".join(e["data"] for e in events if e["event"] == "output")
    assert text == "".join(sdk(live_server).run(f"{MODEL}:{version_id}", input=GREEDY))


def test_run_sse_disconnect_cancels_the_job(live_server, version_id):
    with httpx.stream("POST", f"{live_server.url}/v1/run_sse", headers=AUTH,
                      json={"model": MODEL, "input": LONG}) as response:
        for line in response.iter_lines():
            if line.startswith("event: output"):
                break
    client = sdk(live_server)
    newest = client.predictions.list().results[0]
    assert newest.input == LONG
    assert wait_until_done(client, newest.id).status == "canceled"


def test_seed_inputs_reach_the_sampler(client):
    def run(**inputs):
        body = client.post("/v1/run", json={"model": MODEL, "input": {"prompt": "Go on", **inputs}}).json()
        assert body["status"] == "succeeded", body
        return "".join(body["output"]), body["metrics"]["output_token_count"]

    assert run(temperature=0, max_new_tokens=60, min_new_tokens=60)[1] == 60
    text, _ = run(temperature=0, max_new_tokens=24, min_new_tokens=-1)
    stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text) - 3) if "," not in text[i:i + 3])
    assert run(temperature=0, max_new_tokens=24, stop_sequences=f"zzzz,{stop}")[0] == text[:text.index(stop)]
    sampled = dict(temperature=1.2, top_k=-1, top_p=0.95, repetition_penalty=1.1, seed=7, max_new_tokens=16)
    assert run(**sampled) == run(**sampled)
    assert run(prompt_template="{system_prompt}: {prompt}", system_prompt="Be brief", temperature=0,
               max_new_tokens=4)[1] == 4


@pytest.mark.parametrize("inputs, field", [
    ({"prompt": "hi", "bogus": 1}, "bogus"),
    ({"prompt": "hi", "temperature": 9}, "temperature"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": 0.5}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 4, "min_new_tokens": 8}, "min_new_tokens"),
])
def test_invalid_inputs_are_422_naming_the_field(client, inputs, field):
    for path, body in (("/v1/predictions", {"version": MODEL, "input": inputs}),
                       ("/v1/run", {"model": MODEL, "input": inputs})):
        response = client.post(path, json=body)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert field in response.json()["detail"]


def test_invalid_input_through_the_client(live_server, version_id):
    with pytest.raises(ReplicateError) as error:
        sdk(live_server).predictions.create(version=version_id, input={"prompt": "x", "top_p": 3})
    assert error.value.status == 422 and "top_p" in error.value.detail


@pytest.mark.parametrize("body", [{"version": "acme/nope", "input": {}}, {"version": "f" * 64, "input": {}},
                                  {"version": "ember/tiny-chat:" + "0" * 64, "input": {}}])
def test_unknown_model_or_version_is_404_problem_json(client, body):
    response = client.post("/v1/predictions", json=body)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == 404 and problem["title"] and problem["detail"]


def test_unknown_prediction_is_404(client):
    for method, path in (("GET", "/v1/predictions/nope"), ("POST", "/v1/predictions/nope/cancel"),
                         ("GET", "/v1/predictions/nope/stream")):
        response = client.request(method, path)
        assert response.status_code == 404 and response.json()["status"] == 404


def test_unavailable_model_becomes_a_failed_prediction(live_server):
    client = sdk(live_server)
    prediction = client.predictions.create(model="acme/missing", input={"prompt": "hi"})
    final = wait_until_done(client, prediction.id)
    assert final.status == "failed" and final.error
    with pytest.raises(ModelError):
        client.run("acme/missing", input={"prompt": "hi"})
    response = httpx.post(f"{live_server.url}/v1/run", headers=AUTH,
                          json={"model": "acme/missing", "input": {"prompt": "hi"}})
    assert response.status_code == 503 and response.json()["status"] == 503


def test_prediction_survives_a_restart(fresh_server):
    client = sdk(fresh_server)
    done = client.models.predictions.create(model=MODEL, input=GREEDY, wait=True)
    assert done.status == "succeeded"
    with held_jobs(fresh_server):
        interrupted = client.predictions.create(model=MODEL, input=GREEDY)
        fresh_server.restart()
    client = sdk(fresh_server)
    again = client.predictions.get(done.id)
    assert again.status == "succeeded" and again.output == done.output
    assert again.urls["get"].startswith(fresh_server.url)
    failed = client.predictions.get(interrupted.id)
    assert failed.status == "failed" and "interrupted" in failed.error
    with pytest.raises(RuntimeError, match="interrupted"):
        list(failed.stream())
    assert {interrupted.id, done.id} <= {p.id for p in client.predictions.list()}
    replay = list(client.predictions.get(done.id).stream())
    assert "".join(str(e) for e in replay) == "".join(done.output)


def test_interrupted_predictions_are_requeued_when_configured(tmp_path, demo_folders, models_file):
    from tests.conftest import LiveServer, make_settings

    (tmp_path / "demo").mkdir()
    for name, folder in demo_folders.items():
        (tmp_path / "demo" / name).symlink_to(folder, target_is_directory=True)
    server = LiveServer(lambda port: make_settings(tmp_path, models_file, port=port, requeue_interrupted=True))
    server.start()
    try:
        with held_jobs(server):
            pending = sdk(server).predictions.create(model=MODEL, input=GREEDY)
            # Restart once the model is loaded: a job still waiting for its model when the server
            # stops is canceled by the shutdown, not interrupted.
            states = app_of(server).state.engine.pool.states
            deadline = time.monotonic() + 60
            while not any(s.status == "ready" for s in states.values()) and time.monotonic() < deadline:
                time.sleep(0.02)
            server.restart()
        final = wait_until_done(sdk(server), pending.id)
        assert final.status == "succeeded" and final.output and final.created_at == pending.created_at
    finally:
        server.stop()
