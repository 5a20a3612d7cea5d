"""Two ember server processes (uvicorn replicas) over one real PostgreSQL database and one shared
file folder, used through HTTP with the official replicate client: a prediction created on
replica A is read, streamed and canceled through replica B; a file uploaded to A is served by B;
replica A killed with SIGKILL mid-job leaves its prediction to B, which runs it to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import replicate

from tests.conftest import API_KEY, free_port

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parent.parent
MODEL = "ember/tiny-chat"
MODELS = """
models:
  ember/tiny-chat:
    versions:
      - weights: demo:tiny-chat
        kind: text-generation
        dtype: float32
        placement: cpu
        limits: {max_num_seqs: 8, kv_cache_bytes: 33554432, max_model_len: 512}
"""
GREEDY = {"prompt": "Tell me a story", "temperature": 0, "max_new_tokens": 12}
MEDIUM = {"prompt": "Tell me a story", "temperature": 0, "max_new_tokens": 160, "min_new_tokens": 160}
# Long enough (forced length) that the test can act while it runs.
LONG = {"prompt": "Tell me a story", "temperature": 0, "max_new_tokens": 480, "min_new_tokens": 480}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENDED = ("succeeded", "failed", "canceled")


@dataclass
class Replica:
    name: str
    url: str
    process: subprocess.Popen

    def sdk(self) -> replicate.Client:
        client = replicate.Client(api_token=API_KEY, base_url=self.url)
        client.poll_interval = 0.05
        return client

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", headers=AUTH, timeout=10)


def start_replica(name: str, root: Path, database_url: str, shared_files: Path, demo_folders: dict) -> Replica:
    home = root / name
    (home / "demo").mkdir(parents=True)
    for model, folder in demo_folders.items():
        (home / "demo" / model).symlink_to(folder, target_is_directory=True)
    models = home / "models.yaml"
    models.write_text(MODELS)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "EMBER_HOME": str(home), "EMBER_MODELS": str(models),
           "EMBER_API_KEYS": API_KEY, "EMBER_DATABASE_URL": database_url, "EMBER_STORAGE_DIR": str(shared_files),
           "EMBER_REQUEUE_INTERRUPTED": "true", "EMBER_REPLICA_HEARTBEAT_S": "0.25",
           "EMBER_REPLICA_LEASE_S": "2", "EMBER_WEBHOOK_ALLOW_PRIVATE": "true", "OMP_NUM_THREADS": "1"}
    log = open(root / f"{name}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                                "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return Replica(name, f"http://127.0.0.1:{port}", process)


def wait_healthy(replica: Replica, root: Path, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            raise RuntimeError(f"replica {replica.name} exited: {(root / f'{replica.name}.log').read_text()}")
        try:
            if replica.health().status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"replica {replica.name} did not start: {(root / f'{replica.name}.log').read_text()}")


@pytest.fixture(scope="module")
def replicas(postgres_server, demo_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    database_url = postgres_server.create_database()
    shared = root / "shared-files"
    pair = [start_replica(name, root, database_url, shared, demo_folders) for name in ("a", "b")]
    try:
        for replica in pair:
            wait_healthy(replica, root)
        yield pair
    finally:
        for replica in pair:
            if replica.process.poll() is None:
                replica.process.terminate()
        for replica in pair:
            try:
                replica.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                replica.process.kill()


@pytest.fixture()
def webhook_receiver():
    """A local webhook target; yields (url, the JSON bodies it received)."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def poll(client: replicate.Client, prediction_id: str, until, limit_s: float = 60):
    deadline = time.monotonic() + limit_s
    prediction = client.predictions.get(prediction_id)
    while not until(prediction) and time.monotonic() < deadline:
        time.sleep(0.05)
        prediction = client.predictions.get(prediction_id)
    return prediction


def test_health_reports_each_replica_over_the_shared_store(replicas):
    a, _ = replicas
    ids = set()
    for replica in replicas:
        body = replica.health().json()
        assert body["status"] == "ok"
        store = body["replica"]["store"]
        assert store["backend"] == "postgresql" and store["reachable"] is True
        assert "password" not in store["database"]
        ids.add(body["replica"]["id"])
        assert httpx.get(f"{replica.url}/health").json() == {"status": "ok"}  # anonymous: status only
    assert len(ids) == 2 and set(a.health().json()["replica"]["replicas"]) == ids


def test_a_prediction_created_on_one_replica_is_read_streamed_and_listed_on_the_other(replicas):
    a, b = replicas
    created = a.sdk().models.predictions.create(model=MODEL, input=MEDIUM)
    seen = b.sdk().predictions.get(created.id)  # at once: the create answered after its record committed
    assert seen.id == created.id and seen.created_at == created.created_at
    assert seen.status in ("starting", "processing")  # so B streams it while A runs it
    streamed = "".join(str(event) for event in seen.stream())
    done = poll(b.sdk(), created.id, lambda p: p.status in ENDED)
    assert done.status == "succeeded" and done.metrics["output_token_count"] == 160
    assert streamed == "".join(done.output)
    assert created.id in {p.id for p in b.sdk().predictions.list()}
    reference = b.sdk().models.predictions.create(model=MODEL, input=GREEDY, wait=True)
    again = poll(b.sdk(), a.sdk().models.predictions.create(model=MODEL, input=GREEDY).id,
                 lambda p: p.status in ENDED)
    assert reference.output == again.output  # greedy: the same text whichever replica runs it


def test_a_prediction_running_on_one_replica_is_canceled_through_the_other(replicas):
    a, b = replicas
    created = a.sdk().models.predictions.create(model=MODEL, input=LONG)
    running = poll(b.sdk(), created.id, lambda p: p.status in ("processing", *ENDED))
    assert running.status == "processing"
    started = time.monotonic()
    answered = b.sdk().predictions.cancel(created.id)
    final = poll(a.sdk(), created.id, lambda p: p.status in ENDED, limit_s=10)
    assert final.status == "canceled", final.status
    assert answered.status == "canceled" and time.monotonic() - started < 5
    assert final.metrics.get("output_token_count", 0) < 480  # stopped, not run to its end


def test_a_file_uploaded_to_one_replica_is_served_by_the_other(replicas):
    a, b = replicas
    uploaded = httpx.post(f"{a.url}/v1/files", headers=AUTH, files={"content": ("note.txt", b"shared bytes", "text/plain")})
    assert uploaded.status_code == 201
    file_id = uploaded.json()["id"]
    assert httpx.get(f"{b.url}/v1/files/{file_id}", headers=AUTH).json()["size"] == len(b"shared bytes")
    assert httpx.get(f"{b.url}/v1/files/{file_id}/content").content == b"shared bytes"


def test_a_replica_killed_mid_job_leaves_its_prediction_to_the_other(replicas, webhook_receiver):
    """Last in this module: replica A does not come back."""
    a, b = replicas
    hook, received = webhook_receiver
    created = a.sdk().models.predictions.create(model=MODEL, input=LONG, webhook=hook,
                                                webhook_events_filter=["completed"])
    running = poll(b.sdk(), created.id, lambda p: p.status in ("processing", *ENDED))
    assert running.status == "processing"
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(timeout=10)
    killed_at = time.monotonic()
    assert b.sdk().predictions.get(created.id).status == "processing"  # A died before finishing it
    final = poll(b.sdk(), created.id, lambda p: p.status in ENDED, limit_s=90)
    assert final.status == "succeeded", (final.status, final.error)
    assert final.created_at == created.created_at and final.id == created.id
    assert final.metrics["output_token_count"] == 480  # re-run from the start on B: every token, once
    assert time.monotonic() - killed_at > 1.0  # adopted only once A's lease (2 s) ran out
    assert b.health().json()["replica"]["replicas"] == [b.health().json()["replica"]["id"]]
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # room for a second delivery, which must not come
    assert [(body["id"], body["status"]) for body in received] == [(created.id, "succeeded")]
