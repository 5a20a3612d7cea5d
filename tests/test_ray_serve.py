"""Scale-out on a real local Ray cluster: the Serve ingress and model deployments, through HTTP
with the official openai client and the Replicate dialect. Marked `ray` (deselect with -m "not ray")."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, free_port, make_settings
from tests.pg_fixtures import postgres_bindir

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

LIMITS = "{max_num_seqs: 32, kv_cache_bytes: 33554432, max_model_len: 512}"
RAY_MODELS = f"""
models:
  ember/tiny-chat:
    versions:
      - weights: demo:tiny-chat
        dtype: float32
        placement: cpu
        limits: {LIMITS}
        scale: {{replicas: 2, num_cpus: 0.5, max_ongoing_requests: 32}}
  ember/tiny-chat-auto:
    versions:
      - weights: demo:tiny-chat
        dtype: float32
        placement: cpu
        limits: {LIMITS}
        scale: {{min_replicas: 1, max_replicas: 2, target_ongoing_requests: 1, upscale_delay_s: 0,
                 look_back_period_s: 0.5, num_cpus: 0.5, max_ongoing_requests: 8}}
"""
PROMPTS = [f"Tell me about the number {i}." for i in range(16)]


@pytest.fixture(scope="module")
def ray_server(request, tmp_path_factory, demo_folders):
    from ray import serve

    from server.ray_serve import APP_NAME, build_app

    home = tmp_path_factory.mktemp("ray-home")
    (home / "demo").mkdir()
    for name, folder in demo_folders.items():
        (home / "demo" / name).symlink_to(folder, target_is_directory=True)
    models = home / "models.yaml"
    models.write_text(RAY_MODELS)
    port = free_port()
    settings = make_settings(home, models, port=port)
    if postgres_bindir() is not None:  # two ingress replicas over one PostgreSQL store
        database_url = request.getfixturevalue("postgres_server").create_database()
        settings = make_settings(home, models, port=port, database_url=database_url, ingress_replicas=2,
                                 replica_heartbeat_s=0.25)
    # Replicas report their load every 10 s by default: too slow for a test's look-back.
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20,
             _temp_dir=tempfile.mkdtemp(prefix="ember-ray-"), log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        yield settings
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def url(ray_server) -> str:
    return f"http://127.0.0.1:{ray_server.port}"


@pytest.fixture(scope="module")
def openai_client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def model_handle(settings, model: str):
    from ray import serve

    from engine.engine import demo_registry
    from server.ray_serve import APP_NAME, deployment_name

    version = demo_registry(settings.home, settings.models).resolve(model)
    return serve.get_deployment_handle(deployment_name(version), app_name=APP_NAME)


def replica_stats(handle, replicas: int, timeout: float = 60) -> dict[str, dict]:
    """Stats of every replica: ask until `replicas` distinct replicas answered."""
    seen: dict[str, dict] = {}
    deadline = time.time() + timeout
    while len(seen) < replicas and time.time() < deadline:
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
    assert len(seen) == replicas, f"only {len(seen)} of {replicas} replicas answered"
    return seen


def assert_replicas_idle(handle, replicas: int = 2, timeout: float = 30) -> None:
    """Every replica soon runs no job, its LLM holds no request, and all its KV blocks are free."""
    deadline = time.time() + timeout
    while True:
        stats = replica_stats(handle, replicas)
        idle = all(s["running"] == 0 and s["llm"]["active_requests"] == 0
                   and s["llm"]["num_free_blocks"] == s["llm"]["num_total_blocks"] for s in stats.values())
        if idle or time.time() > deadline:
            break
        time.sleep(0.2)
    assert idle, stats


def chat(client, prompt: str, max_tokens: int = 12, model: str = "ember/tiny-chat") -> str:
    answer = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                            messages=[{"role": "user", "content": prompt}])
    return answer.choices[0].message.content


def test_ray_is_not_imported_without_the_flag():
    import subprocess
    import sys

    code = "import sys, server.app, server.cli, engine.engine, engine.remote; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ})
    assert result.stdout.strip() == "False"


def test_ray_flag_takes_an_optional_address():
    from server.cli import LOCAL_RAY, with_ray_address

    assert with_ray_address(["serve", "--ray"]) == ["serve", "--ray", LOCAL_RAY]
    assert with_ray_address(["serve", "--ray", "--port", "9000"]) == ["serve", "--ray", LOCAL_RAY, "--port", "9000"]
    assert with_ray_address(["serve", "--ray", "ray://head:10001"]) == ["serve", "--ray", "ray://head:10001"]
    assert with_ray_address(["serve", "--port", "9000"]) == ["serve", "--port", "9000"]


def test_two_replicas_share_requests_with_one_process_outputs(ray_server, openai_client, client):
    with ThreadPoolExecutor(16) as pool:
        remote = list(pool.map(lambda p: chat(openai_client, p), PROMPTS))
    local = [client.post("/v1/chat/completions", json={
        "model": "ember/tiny-chat", "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": p}]}).json()["choices"][0]["message"]["content"] for p in PROMPTS]
    assert remote == local
    stats = replica_stats(model_handle(ray_server, "ember/tiny-chat"), 2)
    assert all(s["served"] > 0 for s in stats.values()), stats
    assert sum(s["served"] for s in stats.values()) >= len(PROMPTS)


def test_bad_input_is_answered_by_the_replica_in_the_dialect(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        chat(openai_client, "word " * 600, max_tokens=16)
    assert "maximum context length" in str(caught.value)


def test_lifecycle_changes_are_refused_for_serve_managed_versions(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        version = http.get("/v1/models/ember/tiny-chat").json()["latest_version"]["id"]
        response = http.post(f"/v1/models/ember/tiny-chat/versions/{version}/unload")
    assert response.status_code == 409
    assert "scale:" in response.json()["detail"]


def test_scale_block_becomes_serve_options():
    from engine.errors import InvalidInput
    from engine.registry import load_registry
    from server.ray_serve import deployment_options

    def version(scale: str, placement: str = "cpu"):
        text = f"models:\n  a/b:\n    versions:\n      - weights: a/b@main\n        placement: {placement}\n" + \
            (f"        scale: {scale}\n" if scale else "")
        return load_registry("models.yaml", Path(tempfile.mkdtemp()), text=text).resolve("a/b")

    plain = version("")
    fixed = version("{replicas: 3, num_gpus: 2, memory: 16GiB, max_ongoing_requests: 48}")
    assert fixed.id == plain.id  # scale is placement, not identity
    options = deployment_options(fixed, cluster_gpus=0)
    assert options["num_replicas"] == 3 and options["max_ongoing_requests"] == 48
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 2, "memory": 16 * 2**30}
    auto = deployment_options(version("{min_replicas: 0, max_replicas: 4, target_ongoing_requests: 8}"), 0)
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8}
    assert "num_replicas" not in auto
    assert deployment_options(version("", "auto"), cluster_gpus=4)["ray_actor_options"]["num_gpus"] == 1
    assert deployment_options(version("", "auto"), cluster_gpus=0)["ray_actor_options"]["num_gpus"] == 0
    assert deployment_options(version("", "[0, 1]"), cluster_gpus=4)["ray_actor_options"]["num_gpus"] == 2
    for bad in ("{replica: 2}", "{max_replicas: 0}", "{min_replicas: 3, max_replicas: 2}", "{memory: lots}",
                "{num_gpus: -1}", "[1]"):
        with pytest.raises(InvalidInput):
            version(bad)


def test_several_ingress_replicas_need_a_postgresql_store(tmp_path):
    from server.ray_serve import check_ingress_replicas
    from server.settings import Settings

    check_ingress_replicas(Settings(home=tmp_path))
    with pytest.raises(ValueError, match="EMBER_DATABASE_URL"):
        check_ingress_replicas(Settings(home=tmp_path, ingress_replicas=2))
    with pytest.raises(ValueError, match="at least 1"):
        check_ingress_replicas(Settings(home=tmp_path, ingress_replicas=0))
    check_ingress_replicas(Settings(home=tmp_path, ingress_replicas=3, database_url="postgresql://db/ember"))


def test_ingress_replicas_share_one_postgresql_store(ray_server, url):
    """Serve's proxy spreads requests over both ingress replicas; whichever answers sees every
    prediction (the other tests here then run across both replicas too)."""
    if ray_server.ingress_replicas < 2:
        pytest.skip("PostgreSQL is not installed: the Ray app runs one ingress replica over SQLite")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        answered = set()
        for _ in range(40):
            health = http.get("/health").json()
            assert health["replica"]["store"]["backend"] == "postgresql"
            answered.add(health["replica"]["id"])
            if len(answered) == 2:
                break
        assert len(answered) == 2 and set(health["replica"]["replicas"]) == answered
        created = http.post("/v1/models/ember/tiny-chat/predictions",
                            json={"input": {"prompt": "Hi", "max_new_tokens": 24, "temperature": 0}})
        assert created.status_code == 201, created.text
        prediction_id = created.json()["id"]
        deadline = time.time() + 60
        while (record := http.get(f"/v1/predictions/{prediction_id}").json())["status"] != "succeeded":
            assert record["status"] in ("starting", "processing") and time.time() < deadline
            time.sleep(0.05)
        listed = {p["id"] for p in http.get("/v1/predictions").json()["results"]}
        assert prediction_id in listed


def test_cancel_through_the_api_aborts_on_the_replica(ray_server, url):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        created = http.post("/v1/models/ember/tiny-chat/predictions", json={
            "input": {"prompt": "Count slowly.", "max_new_tokens": 480, "temperature": 1.0, "seed": 1}})
        assert created.status_code == 201, created.text
        prediction_id = created.json()["id"]
        deadline = time.time() + 60
        while http.get(f"/v1/predictions/{prediction_id}").json()["status"] == "starting":
            assert time.time() < deadline
            time.sleep(0.05)
        assert http.post(f"/v1/predictions/{prediction_id}/cancel").status_code == 200
        while (record := http.get(f"/v1/predictions/{prediction_id}").json())["status"] not in (
                "canceled", "succeeded", "failed"):
            assert time.time() < deadline
            time.sleep(0.05)
    assert record["status"] == "canceled"
    assert_replicas_idle(model_handle(ray_server, "ember/tiny-chat"))


def test_client_disconnect_aborts_on_the_replica(ray_server, url):
    body = {"model": "ember/tiny-chat", "stream": True, "max_tokens": 480, "temperature": 1.0, "seed": 5,
            "messages": [{"role": "user", "content": "Go on and on."}]}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            job_id = json.loads(first[6:])["id"].removeprefix("chatcmpl-")
        deadline = time.time() + 30
        while (record := http.get(f"/v1/predictions/{job_id}").json())["status"] == "processing":
            assert time.time() < deadline
            time.sleep(0.1)
    assert record["status"] == "canceled"
    assert_replicas_idle(model_handle(ray_server, "ember/tiny-chat"))


def test_autoscaling_from_one_to_two_replicas_under_load(ray_server, openai_client):
    from ray import serve

    from engine.engine import demo_registry
    from server.ray_serve import APP_NAME, deployment_name

    version = demo_registry(ray_server.home, ray_server.models).resolve("ember/tiny-chat-auto")
    name = deployment_name(version)

    def running_replicas() -> int:
        status = serve.status().applications[APP_NAME].deployments[name]
        return status.replica_states.get("RUNNING", 0)

    assert running_replicas() == 1
    peak, loaded = 1, threading.Event()

    def keep_busy(prompt: str) -> None:
        while not loaded.is_set():
            chat(openai_client, prompt, 200, "ember/tiny-chat-auto")

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(keep_busy, p) for p in PROMPTS[:6]]
        deadline = time.time() + 120
        while peak < 2 and time.time() < deadline:
            peak = max(peak, running_replicas())
            time.sleep(0.25)
        loaded.set()
        for future in futures:
            future.result(timeout=120)
    assert peak == 2


def test_a_killed_replica_fails_its_requests_cleanly(ray_server, openai_client, url):
    handle = model_handle(ray_server, "ember/tiny-chat")

    def stream(prompt: str) -> tuple[str, str | None]:
        chunks, job_id = [], None
        try:
            for chunk in openai_client.chat.completions.create(
                    model="ember/tiny-chat", temperature=1.0, seed=3, max_tokens=480, stream=True,
                    messages=[{"role": "user", "content": prompt}]):
                job_id = chunk.id.removeprefix("chatcmpl-")
                chunks.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        except Exception as exc:  # noqa: BLE001 - the failure is what this test looks at
            return job_id, f"{type(exc).__name__}: {exc}"
        return job_id, None

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, p) for p in PROMPTS[:6]]
        deadline = time.time() + 60
        busy = []
        while not busy and time.time() < deadline:
            busy = [s for s in replica_stats(handle, 2).values() if s["llm"]["running"] > 0]
            time.sleep(0.05)
        assert busy, "no replica was generating"
        os.kill(busy[0]["pid"], signal.SIGKILL)
        results = [future.result(timeout=120) for future in futures]
    failed = [(job_id, error) for job_id, error in results if error]
    assert failed, results
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        records = [http.get(f"/v1/predictions/{job_id}").json() for job_id, _ in failed if job_id]
    assert records and all(r["status"] == "failed" and "replica" in r["error"] for r in records), records


def test_prefix_keys_name_what_requests_share():
    from engine.text_task import TextTask, shared_prefix_key

    system = "You are a meticulous assistant for the accounting team of a mid-sized company. " * 2
    a = TextTask(messages=[{"role": "user", "content": "What is a ledger?"}], system_prompt=system)
    b = TextTask(messages=[{"role": "user", "content": "And a journal?"}], system_prompt=system)
    history = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}]
    c = TextTask(messages=[*history, {"role": "user", "content": "one"}])
    d = TextTask(messages=[*history, {"role": "user", "content": "two"}])
    assert shared_prefix_key(a) == shared_prefix_key(b) is not None  # same system prompt, different last turn
    assert shared_prefix_key(c) == shared_prefix_key(d) is not None and shared_prefix_key(c) != shared_prefix_key(a)
    assert shared_prefix_key(TextTask(messages=[{"role": "user", "content": "short"}])) is None
    long_prompt = "x" * 2000
    assert shared_prefix_key(TextTask(prompt=long_prompt + "a")) == shared_prefix_key(
        TextTask(prompt=long_prompt + "b"))
    assert shared_prefix_key(TextTask(prompt_token_ids=list(range(300)))) == shared_prefix_key(
        TextTask(prompt_token_ids=[*range(256), 9, 9]))
    assert shared_prefix_key(TextTask(prompt_token_ids=[1, 2, 3])) is None


def test_router_prefers_the_prefix_owner_unless_it_is_much_busier():
    import asyncio
    from types import SimpleNamespace

    from engine.text_task import TextTask
    from server.prefix_router import PrefixAffinityRouter

    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # no Serve controller needed for the policy
    router.initialize_state(imbalance=2)
    queue = {}
    router._replica_queue_len_cache = SimpleNamespace(get=queue.get)
    replicas = [SimpleNamespace(replica_id=f"r{i}", max_ongoing_requests=8) for i in range(3)]
    system = "You are a meticulous assistant for the accounting team of a mid-sized company."
    request = SimpleNamespace(args=[{"kind": "text-generation", "task": TextTask(
        messages=[{"role": "user", "content": "hi"}], system_prompt=system)}], kwargs={})
    first = asyncio.run(router.choose_replicas(replicas, request))
    assert len(first) == 1 and len(first[0]) == 2  # unknown prefix: two random replicas
    router.on_request_routed(request, "r1", None)
    assert asyncio.run(router.choose_replicas(replicas, request)) == [[replicas[1]]]
    queue.update(r0=0, r1=2, r2=1)
    assert asyncio.run(router.choose_replicas(replicas, request)) == [[replicas[1]]]  # within the imbalance
    queue.update(r1=3)
    assert len(asyncio.run(router.choose_replicas(replicas, request))[0]) == 2  # too busy: spread
    stats = SimpleNamespace(args=[], kwargs={})
    assert len(asyncio.run(router.choose_replicas(replicas, stats))[0]) == 2  # not a job


def test_requests_sharing_a_system_prompt_go_to_one_replica(ray_server, openai_client):
    """Through HTTP: the ingress's router sends a conversation prefix back to the replica that
    cached it (the prefix-affinity router of server.prefix_router)."""
    handle = model_handle(ray_server, "ember/tiny-chat")
    before = {r: s["served"] for r, s in replica_stats(handle, 2).items()}
    system = "You are the support assistant of a bicycle shop; answer in one short sentence, politely. " * 3
    for i in range(6):
        openai_client.chat.completions.create(model="ember/tiny-chat", max_tokens=2, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}])
    after = {r: s["served"] for r, s in replica_stats(handle, 2).items()}
    assert sorted(after[r] - before[r] for r in after) == [0, 6]
