"""Shared fixtures: an isolated EMBER_HOME with the demo models built once per session, a test
models.yaml, the real app in-process, and the real app under uvicorn on a loopback port."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():  # Triton kernels then run on CPU tensors through its interpreter;
        os.environ["TRITON_INTERPRET"] = "1"  # it must be set before anything imports triton

pytest_plugins = ["tests.llm_fixtures", "tests.video_fixtures", "tests.pg_fixtures"]

# The tiny chat model's engine process computes with one thread (limits below): test machines are
# often shared, and an OpenMP thread that loses its core stalls every step of a multi-thread one.
API_KEY = "sk-test-key-one"
OTHER_KEY = "sk-test-key-two"

TEST_MODELS = """
models:
  ember/tiny-chat:
    description: tiny chat for tests
    versions:
      - weights: demo:tiny-chat
        kind: text-generation
        dtype: float32
        placement: cpu
        default_inputs: {max_new_tokens: 16, temperature: 0.7}
        limits: {max_num_seqs: 32, kv_cache_bytes: 33554432, max_model_len: 512, cpu_threads: 1}
  ember/tiny-i2v:
    versions:
      - weights: demo:tiny-i2v
        kind: image-to-video
        pipeline_class: I2VGenXLPipeline
        dtype: float32
        placement: cpu
        default_inputs: {max_frames: 4, num_inference_steps: 2, width: 32, height: 32, fps: 8}
        limits: {max_batch_size: 4}
  acme/missing:
    versions:
      - weights: acme/not-downloaded@main
        kind: text-generation
flows:
  - id: tiny-chat-flow
    name: Tiny chat
    model: ember/tiny-chat
    system_prompt: You are a helpful assistant.
    settings: {temperature: 0, max_tokens: 12}
    streaming: true
    sessions: true
  - id: locked-flow
    model: ember/tiny-chat
    api_key: flow-secret
    streaming: false
  - id: tiny-video-flow
    model: ember/tiny-i2v
    streaming: false
    sessions: false
"""


@pytest.fixture(scope="session")
def ember_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("ember-home")
    os.environ["EMBER_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def demo_folders(ember_home) -> dict[str, Path]:
    from engine.demo import ensure_demo_models

    return ensure_demo_models(ember_home)


@pytest.fixture(scope="session")
def models_file(ember_home, demo_folders) -> Path:
    path = ember_home / "models.yaml"
    path.write_text(TEST_MODELS)
    return path


def make_settings(home: Path, models_file: Path, **overrides):
    from server.settings import Settings

    values = {"home": home, "models": models_file, "api_keys": [API_KEY, OTHER_KEY],
              "webhook_allow_private": True, **overrides}
    return Settings(**values)


@pytest.fixture(scope="session")
def app_home(tmp_path_factory) -> Path:
    """State (database, files) of the shared test app, apart from the demo model builds."""
    return tmp_path_factory.mktemp("app-home")


@pytest.fixture(scope="session")
def settings(ember_home, demo_folders, models_file, app_home):
    (app_home / "demo").mkdir(exist_ok=True)
    for name, folder in demo_folders.items():
        link = app_home / "demo" / name
        if not link.exists():
            link.symlink_to(folder, target_is_directory=True)
    return make_settings(app_home, models_file)


@pytest.fixture(scope="session")
def client(settings):
    """The real app in-process (its lifespan runs: registry, engine, store)."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"}) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """The app under uvicorn on a loopback port, in a thread; `restart()` keeps its home."""

    def __init__(self, settings_factory):
        self.settings_factory = settings_factory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.thread = None

    def start(self) -> "LiveServer":
        import uvicorn

        from server.app import create_app

        settings = self.settings_factory(self.port)
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def live_server(settings):
    """One uvicorn server for the client tests (openai, replicate, flowise SDKs)."""
    server = LiveServer(lambda port: settings.model_copy(update={"port": port, "public_url": None}))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def fresh_server(tmp_path, demo_folders, models_file):
    """A server with its own home, for restart and persistence tests."""
    (tmp_path / "demo").mkdir()
    for name, folder in demo_folders.items():
        (tmp_path / "demo" / name).symlink_to(folder, target_is_directory=True)
    server = LiveServer(lambda port: make_settings(tmp_path, models_file, port=port))
    server.start()
    yield server
    server.stop()
