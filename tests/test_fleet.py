"""The model lifecycle: load -> ready -> sleep -> wake -> unload with the memory charged to each
device checked at every step (weights and the LLM's KV cache), keep_alive, pinning, LRU sleep and
eviction under a budget, and the management API over HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

from engine.engine import EngineOptions, build_worker
from engine.errors import ModelBusy, ModelUnavailable
from engine.llm.types import GenerationRequest, SamplingParams
from engine.loading import Loaded, ModelPool, estimate_bytes
from engine.registry import load_registry, parse_keep_alive
from engine.residency import weight_bytes

KV = 4 * 2**20

CHATS = f"""
models:
  a/one:
    versions: [{{weights: demo:tiny-chat, placement: cpu, dtype: float32, keep_alive: 5m,
                limits: {{kv_cache_bytes: {KV}, max_model_len: 256, max_num_seqs: 4}}}}]
  a/two:
    versions: [{{weights: demo:tiny-chat, placement: cpu, dtype: bfloat16,
                limits: {{kv_cache_bytes: {2 * KV}, max_model_len: 256, max_num_seqs: 4}}}}]
  a/pinned:
    versions: [{{weights: demo:tiny-chat, placement: cpu, dtype: float16, pin: true,
                limits: {{kv_cache_bytes: {KV}, max_model_len: 256, max_num_seqs: 4}}}}]
"""


@pytest.fixture()
def chats(tmp_path, demo_folders):
    registry = load_registry(tmp_path / "m.yaml", tmp_path, demo_folders, text=CHATS)
    return {name.split("/")[1]: registry.resolve(name) for name in ("a/one", "a/two", "a/pinned")}


def real_pool(budget: int) -> ModelPool:
    return ModelPool(lambda v: build_worker(v, EngineOptions()), {"cpu": budget})


def kv_bytes(llm) -> int:
    return sum(llm.memory_bytes().values())


def greedy(llm, prompt: list[int]) -> list[int]:
    async def run():
        request = GenerationRequest(request_id=f"r{time.monotonic_ns()}", prompt_token_ids=prompt,
                                    params=SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
        return [t for delta in [d async for d in llm.generate(request)] for t in delta.token_ids]

    return asyncio.run(run())


def test_load_sleep_wake_unload_with_exact_accounting(chats):
    one = chats["one"]
    pool = real_pool(budget=1 << 30)
    assert pool.state(one).status == "unloaded" and pool.used("cpu") == 0

    llm = pool.acquire(one).worker
    pool.release(one)
    weights = sum(p.nbytes for p in llm.model.parameters()) + sum(b.nbytes for b in llm.model.buffers())
    cache = kv_bytes(llm)
    assert cache >= KV  # the KV cache is charged, not only the weights
    assert pool.state(one).status == "ready"
    assert pool.state(one).memory == {"cpu": weights + cache} == {"cpu": pool.used("cpu")}
    before = greedy(llm, [5, 6, 7, 8])

    pool.sleep(one.id)
    assert pool.state(one).status == "sleeping"
    assert llm.memory_bytes() == {}  # CPU host: the cache is freed, weights stay
    assert pool.state(one).memory == {"cpu": weights} == {"cpu": pool.used("cpu")}

    assert pool.acquire(one) is pool.state(one).loaded  # acquiring a sleeping version wakes it
    pool.release(one)
    assert pool.state(one).status == "ready"
    assert kv_bytes(llm) == cache  # a cache of the same size, re-allocated
    assert pool.state(one).memory == {"cpu": weights + kv_bytes(llm)} == {"cpu": pool.used("cpu")}
    assert greedy(llm, [5, 6, 7, 8]) == before  # same answers after waking

    pool.unload(one.id)
    assert pool.state(one).status == "unloaded" and pool.state(one).memory == {} and pool.used("cpu") == 0


def test_a_busy_version_cannot_sleep_or_unload(chats):
    one = chats["one"]
    pool = real_pool(budget=1 << 30)
    pool.acquire(one)
    with pytest.raises(ModelBusy, match="serving 1 request"):
        pool.sleep(one.id)
    with pytest.raises(ModelBusy):
        pool.unload(one.id)
    pool.release(one)
    pool.unload(one.id)


def test_lru_sleeps_before_it_evicts_and_counts_the_kv_cache(chats):
    """The second model does not fit beside the first one's KV cache: the first is put to sleep
    (frees its cache), and when that is still not enough, the least recently used is unloaded."""
    one, two, pinned = chats["one"], chats["two"], chats["pinned"]
    probe = real_pool(budget=1 << 30)
    probe.acquire(one)
    one_size = probe.state(one).bytes
    one_weights = weight_bytes(probe.state(one).loaded.worker)["cpu"]
    probe.release(one)
    probe.close()

    # one (weights + cache) plus two's estimate is over budget; one's weights plus two's estimate fit.
    budget = one_weights + estimate_bytes(two) + KV // 2
    assert one_size + estimate_bytes(two) > budget
    pool = real_pool(budget)
    pool.acquire(one)
    pool.release(one)
    pool.acquire(two)
    pool.release(two)
    assert pool.state(one).status == "sleeping" and pool.state(one).memory == {"cpu": one_weights}
    assert pool.state(two).status == "ready"
    assert pool.used("cpu") == sum(s.bytes for s in pool.states.values()) <= budget

    # A third needs more than sleeping frees: the LRU (one, asleep) is unloaded; pinned is never chosen.
    pool.acquire(pinned)
    pool.release(pinned)
    assert pool.state(one).status == "unloaded" and pool.state(one).memory == {}
    assert pool.state(pinned).status == "ready"
    assert pool.used("cpu") <= budget
    pool.acquire(one)  # now two (older than pinned) must make room; pinned stays
    pool.release(one)
    assert pool.state(pinned).status == "ready"
    assert pool.state(two).status in ("sleeping", "unloaded")
    assert pool.used("cpu") <= budget
    pool.close()


def _fake_pool(budget: int):
    def build(version):
        return Loaded(version=version, worker=None, devices=["cpu"], bytes=estimate_bytes(version))

    return ModelPool(build, {"cpu": budget})


def test_pinned_versions_are_never_evicted(chats):
    one, pinned = chats["one"], chats["pinned"]
    pool = _fake_pool(budget=int(estimate_bytes(one) * 1.5))
    pool.acquire(pinned)
    pool.release(pinned)
    with pytest.raises(ModelUnavailable, match="busy or pinned"):
        pool.acquire(one)
    assert pool.state(pinned).status == "ready"
    pool.unload(pinned.id)  # an explicit unload still works
    pool.acquire(one)
    assert pool.state(one).status == "ready"


def test_keep_alive_zero_unloads_after_the_request(chats):
    one = chats["one"]
    pool = _fake_pool(budget=1 << 30)
    pool.acquire(one)
    pool.release(one, keep_alive=0)
    deadline = time.time() + 10
    while pool.state(one).status != "unloaded" and time.time() < deadline:
        time.sleep(0.02)
    assert pool.state(one).status == "unloaded" and pool.used("cpu") == 0


def test_keep_alive_counts_idle_time_and_minus_one_never_expires(chats):
    one, two = chats["one"], chats["two"]
    assert one.keep_alive == 300.0 and two.keep_alive is None
    pool = _fake_pool(budget=1 << 30)
    for version in (one, two):
        pool.acquire(version)
        pool.release(version)
    now = time.monotonic()
    assert pool.reap(now + 10) == []  # not yet
    assert pool.reap(now + 301) == [one.id]
    assert pool.state(one).status == "unloaded" and pool.state(two).status == "ready"
    pool.acquire(two)
    pool.release(two, keep_alive=-1)
    assert pool.reap(now + 10**6) == [] and pool.state(two).status == "ready"
    pool.acquire(one)
    assert pool.reap(now + 10**6) == []  # in use: never expires under a request


@pytest.mark.parametrize("raw, seconds", [(300, 300.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
                                          (-1, -1.0), ("0", 0.0), (None, None)])
def test_keep_alive_durations(raw, seconds):
    assert parse_keep_alive(raw) == seconds


def test_bad_keep_alive_in_models_yaml_names_the_entry(tmp_path, demo_folders):
    from engine.errors import InvalidInput

    text = "models:\n  a/x: {versions: [{weights: demo:tiny-chat, keep_alive: soon}]}\n"
    with pytest.raises(InvalidInput, match=r"a/x versions\[0\]: keep_alive"):
        load_registry(tmp_path / "m.yaml", tmp_path, demo_folders, text=text)


# ---------------------------------------------------------------- the management API over HTTP


def _chat_paths(client) -> tuple[str, str]:
    version = client.get("/v1/models/ember/tiny-chat").json()["latest_version"]["id"]
    return version, f"/v1/models/ember/tiny-chat/versions/{version}"


def test_management_needs_auth(client):
    _, base = _chat_paths(client)
    bare = TestClient(client.app)
    for method, path in [("get", "/status"), ("post", "/load"), ("post", "/unload"), ("post", "/sleep"),
                         ("post", "/wake")]:
        assert getattr(bare, method)(base + path).status_code == 401


def test_management_lifecycle_over_http(client):
    version, base = _chat_paths(client)
    loaded = client.post(base + "/load")
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    assert body["status"] == "ready" and body["version"] == version and body["memory"]["cpu"] > 0
    assert body["last_used_at"].endswith("Z")

    asleep = client.post(base + "/sleep").json()
    assert asleep["status"] == "sleeping" and asleep["memory"]["cpu"] < body["memory"]["cpu"]
    health = {m["version"]: m for m in client.get("/health").json()["models"]}
    assert health[version]["status"] == "sleeping" and health[version]["memory"] == asleep["memory"]

    awake = client.post(base + "/wake").json()
    assert awake["status"] == "ready" and awake["memory"] == body["memory"]
    chat = client.post("/v1/chat/completions", json={"model": "ember/tiny-chat", "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200

    metrics = client.get("/metrics").text
    assert 'ember_model_wakes_total{model="ember/tiny-chat"}' in metrics
    assert f'ember_model_memory_bytes{{device="cpu",model="ember/tiny-chat",status="ready",version="{version}"}}' \
        in metrics
    assert "ember_model_load_seconds_bucket" in metrics

    gone = client.post(base + "/unload").json()
    assert gone["status"] == "unloaded" and gone["memory"] == {}
    assert client.get(base + "/status").json()["status"] == "unloaded"


def test_load_streams_progress(client):
    _, base = _chat_paths(client)
    client.post(base + "/unload")
    with client.stream("POST", base + "/load?stream=true") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    events = [(lines[i][len("event: "):], json.loads(lines[i + 1][len("data: "):]))
              for i, line in enumerate(lines) if line.startswith("event: ")]
    phases = [data["phase"] for name, data in events if name == "progress"]
    assert phases[0] == "queued" and "loading weights" in phases and "warming up" in phases
    assert events[-1][0] == "done" and events[-1][1]["status"] == "ready"


def test_management_errors_are_clear(client):
    _, base = _chat_paths(client)
    client.post(base + "/unload")
    not_loaded = client.post(base + "/sleep")
    assert not_loaded.status_code == 409 and "not loaded" in not_loaded.json()["detail"]
    missing = client.get("/v1/models/acme/missing").json()["latest_version"]["id"]
    unavailable = client.post(f"/v1/models/acme/missing/versions/{missing}/load")
    assert unavailable.status_code == 503 and "not on this machine" in unavailable.json()["detail"]
    bad = client.post(base + "/load", json={"keep_alive": "soon"})
    assert bad.status_code == 422 and "keep_alive" in bad.json()["detail"]
    assert client.post("/v1/models/ember/tiny-chat/versions/nope/load").status_code == 404


@pytest.mark.parametrize("dialect", ["replicate", "openai"])
def test_keep_alive_zero_per_request_unloads_after_it(client, dialect):
    version, base = _chat_paths(client)
    client.post(base + "/load")
    assert client.get(base + "/status").json()["status"] == "ready"
    if dialect == "replicate":
        made = client.post("/v1/predictions", json={"version": f"ember/tiny-chat:{version}", "keep_alive": 0,
                                                    "input": {"prompt": "hello", "max_new_tokens": 2}},
                           headers={"Prefer": "wait=30"})
        assert made.json()["status"] == "succeeded", made.text
    else:
        made = client.post("/v1/chat/completions", json={"model": "ember/tiny-chat", "max_tokens": 2, "keep_alive": "0s",
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert made.status_code == 200, made.text
    deadline = time.time() + 10
    while client.get(base + "/status").json()["status"] != "unloaded" and time.time() < deadline:
        time.sleep(0.05)
    assert client.get(base + "/status").json()["status"] == "unloaded"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sleep_parks_gpu_weights_in_pinned_host_memory(tmp_path, demo_folders):
    text = f"models:\n  a/g: {{versions: [{{weights: demo:tiny-chat, placement: 'cuda:0', dtype: float16, " \
           f"limits: {{kv_cache_bytes: {KV}, max_model_len: 256, max_num_seqs: 4}}}}]}}\n"
    version = load_registry(tmp_path / "m.yaml", tmp_path, demo_folders, text=text).resolve("a/g")
    pool = ModelPool(lambda v: build_worker(v, EngineOptions()), {"cpu": 1 << 30, "cuda:0": 1 << 30})
    llm = pool.acquire(version).worker
    pool.release(version)
    before = greedy(llm, [5, 6, 7, 8])
    awake = pool.state(version).memory
    pool.sleep(version.id)
    assert "cuda:0" not in pool.state(version).memory
    assert pool.state(version).memory["cpu"] == sum(awake.values()) - kv_bytes_on(awake, llm)
    assert all(p.is_pinned() for p in llm.model.parameters())
    pool.acquire(version)
    pool.release(version)
    assert pool.state(version).memory == awake
    assert greedy(llm, [5, 6, 7, 8]) == before
    pool.close()


def kv_bytes_on(awake: dict, llm) -> int:
    return awake["cuda:0"] - sum(p.nbytes for p in llm.model.parameters()) - sum(
        b.nbytes for b in llm.model.buffers())


def test_a_worker_whose_charge_grows_is_measured_again_after_each_use(chats):
    """A video worker learns its activation peak from its first call; the pool charges it from
    the next release on (and only while the weights are awake)."""
    one = chats["one"]

    class GrowingWorker:
        memory_grows = True

        def __init__(self):
            self.model = torch.nn.Linear(8, 8)
            self.peak = 0

        def memory_bytes(self):
            return {"cpu": self.peak} if self.peak else {}

    worker = GrowingWorker()
    pool = ModelPool(lambda v: Loaded(version=v, worker=worker, devices=["cpu"], bytes=1), {"cpu": 1 << 30})
    weights = sum(p.nbytes for p in worker.model.parameters())
    pool.acquire(one)
    assert pool.state(one).memory == {"cpu": weights}
    worker.peak = 12345  # what the call that just ran needed
    pool.release(one)
    assert pool.state(one).memory == {"cpu": weights + 12345} == {"cpu": pool.used("cpu")}
    pool.close()
