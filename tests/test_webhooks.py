"""Webhooks: delivery to a local receiver, Standard-Webhooks signatures (checked with the official
client's validator), event filters, throttling, retries of `completed`, and the target policy."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from replicate.webhook import WebhookSigningSecret, Webhooks

from engine.errors import InvalidInput
from server import webhooks
from tests.conftest import API_KEY, LiveServer, make_settings
from tests.test_replicate import sdk

SECRET = "whsec_" + base64.b64encode(b"a test signing key of 32 bytes!!").decode()
PROMPT = {"prompt": "Tell me a story", "temperature": 0, "max_new_tokens": 40}


class Receiver:
    """A webhook receiver on loopback that records every request and can fail the first few."""

    def __init__(self, failures: int = 0):
        self.requests: list[tuple[dict, str]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                receiver.requests.append((dict(self.headers), body))
                failing = receiver.failures > 0
                receiver.failures -= failing
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def payloads(self) -> list[dict]:
        return [json.loads(body) for _, body in self.requests]

    def wait_for(self, status: str, count: int = 1, limit_s: float = 30) -> None:
        deadline = time.monotonic() + limit_s
        while sum(p["status"] == status for p in self.payloads()) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def signed_server(tmp_path_factory, demo_folders, models_file):
    home = tmp_path_factory.mktemp("webhooks-home")
    (home / "demo").mkdir()
    for name, folder in demo_folders.items():
        (home / "demo" / name).symlink_to(folder, target_is_directory=True)
    server = LiveServer(lambda port: make_settings(home, models_file, port=port, webhook_secret=SECRET))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


def test_events_are_delivered_signed_and_throttled(signed_server, receiver):
    client = sdk(signed_server)
    prediction = client.models.predictions.create(model="ember/tiny-chat", input=PROMPT, webhook=receiver.url)
    receiver.wait_for("succeeded")
    payloads = receiver.payloads()
    assert payloads[0]["status"] == "processing" and payloads[-1]["status"] == "succeeded"
    assert all(p["id"] == prediction.id for p in payloads)
    assert payloads[-1]["output"] == client.predictions.get(prediction.id).output
    assert len(payloads) < len(payloads[-1]["output"])  # output events were coalesced
    secret = WebhookSigningSecret(key=SECRET)
    for headers, body in receiver.requests:
        Webhooks.validate(headers=headers, body=body, secret=secret, tolerance=300)
    headers, body = receiver.requests[-1]
    forged = {**headers, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}
    with pytest.raises(Exception, match="signature"):
        Webhooks.validate(headers=forged, body=body, secret=secret)


def test_events_filter_completed_only(signed_server, receiver):
    client = sdk(signed_server)
    client.models.predictions.create(model="ember/tiny-chat", input=PROMPT, webhook=receiver.url,
                                     webhook_events_filter=["completed"])
    receiver.wait_for("succeeded")
    time.sleep(webhooks.THROTTLE_S)
    assert [p["status"] for p in receiver.payloads()] == ["succeeded"]


def test_completed_is_retried_with_the_same_message_id(signed_server, monkeypatch):
    monkeypatch.setattr(webhooks, "RETRY_DELAYS_S", (0.05, 0.05, 0.05))
    receiver = Receiver(failures=2)
    try:
        sdk(signed_server).models.predictions.create(model="ember/tiny-chat", input=PROMPT, webhook=receiver.url,
                                                     webhook_events_filter=["completed"])
        receiver.wait_for("succeeded", count=3)
        assert len(receiver.requests) == 3
        assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1
    finally:
        receiver.close()


def test_canceled_predictions_send_completed(signed_server, receiver):
    client = sdk(signed_server)
    prediction = client.models.predictions.create(
        model="ember/tiny-chat", input={**PROMPT, "max_new_tokens": 480}, webhook=receiver.url,
        webhook_events_filter=["completed"])
    client.predictions.cancel(prediction.id)
    receiver.wait_for("canceled")
    assert [p["status"] for p in receiver.payloads()] == ["canceled"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/x",
                                 "http://192.168.0.1/x", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x",
                                 "http://100.64.0.1/x", "ftp://93.184.216.34/x", "/relative"])
def test_policy_refuses_internal_targets(url):
    with pytest.raises(InvalidInput) as error:
        webhooks.check_target(url, allow_private=False)
    assert error.value.param == "webhook"


def test_policy_accepts_public_addresses_and_private_when_configured():
    webhooks.check_target("https://93.184.216.34/hook", allow_private=False)
    webhooks.check_target("http://127.0.0.1:9/x", allow_private=True)


def test_api_refuses_private_webhooks_by_default(tmp_path, demo_folders, models_file):
    from server.app import create_app

    (tmp_path / "demo").mkdir()
    for name, folder in demo_folders.items():
        (tmp_path / "demo" / name).symlink_to(folder, target_is_directory=True)
    settings = make_settings(tmp_path, models_file, webhook_allow_private=False)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        response = client.post("/v1/predictions", json={"version": "ember/tiny-chat", "input": PROMPT,
                                                        "webhook": "http://127.0.0.1:8080/hook"})
        assert response.status_code == 422 and "webhook" in response.json()["detail"]
        assert client.get("/v1/predictions").json()["results"] == []


def test_signature_matches_the_standard_webhooks_scheme():
    headers = webhooks.signature_headers(SECRET, "msg_1", b'{"a":1}', timestamp=1700000000)
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == "1700000000"
    Webhooks.validate(headers=headers, body='{"a":1}', secret=WebhookSigningSecret(key=SECRET))
    assert "webhook-signature" not in webhooks.signature_headers(None, "msg_1", b"{}")
