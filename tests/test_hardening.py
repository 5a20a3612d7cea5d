"""Hardening through HTTP: bodies before authentication, inputs that must never be a 5xx, file
headers, quotas and expiry, sessions, JWT rules and what anonymous callers can learn."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import jwt
import psutil
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import API_KEY, OTHER_KEY, free_port

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def own_home(tmp_path, demo_folders):
    """A state folder of its own (for counting files and sessions), with the demo models."""
    (tmp_path / "demo").mkdir()
    for name, folder in demo_folders.items():
        (tmp_path / "demo" / name).symlink_to(folder, target_is_directory=True)
    return tmp_path


@contextmanager
def app_client(settings, **overrides):
    from server.app import create_app

    with TestClient(create_app(settings.model_copy(update=overrides)), headers=AUTH) as client:
        yield client


@contextmanager
def uvicorn_app(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw_request(url: str, head: str, body_chunks, read_timeout: float = 20.0) -> tuple[bytes, int]:
    """Send `head` then body chunks on a socket until the server answers; (answer, bytes sent)."""
    port = int(url.rsplit(":", 1)[1])
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + read_timeout
        for chunk in body_chunks:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer or time.monotonic() > deadline:
                break
            try:
                sent += sock.send(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
        sock.settimeout(read_timeout)
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except (socket.timeout, ConnectionResetError):
            pass
        return answer, sent


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ------------------------------------------------------------------ bodies before authentication


@pytest.mark.parametrize("path", [CHAT, "/v1/predictions", "/v1/files", "/api/v1/prediction/tiny-chat-flow"])
def test_an_anonymous_huge_body_is_refused_before_it_is_read(live_server, path):
    """A 1 GB body without a key: 401 while the client is still sending, memory untouched."""
    process = psutil.Process()
    before = process.memory_info().rss
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {2**30}\r\n\r\n")
    answer, sent = raw_request(live_server.url, head, (b"[" * 65536 for _ in range(2**14)))
    assert status_of(answer) == 401, answer[:300]
    assert b"connection: close" in answer.lower()
    assert sent < 256 * 2**20  # answered long before the body could have been read
    assert process.memory_info().rss - before < 200 * 2**20


@pytest.mark.parametrize("path, dialect", [(CHAT, "openai"), ("/v1/predictions", "replicate"),
                                           ("/api/v1/prediction/tiny-chat-flow", "flowise")])
def test_a_declared_length_over_the_cap_is_413_in_the_dialect(settings, path, dialect):
    with app_client(settings, max_json_bytes=1000) as client:
        response = client.post(path, content=b"{" + b" " * 2000 + b"}", headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    body = response.json()
    assert {"openai": "error", "replicate": "detail", "flowise": "statusCode"}[dialect] in body


def test_a_streamed_body_is_cut_at_the_cap(settings):
    """No Content-Length (chunked): counted as it arrives, for JSON and for uploads."""
    def chunks(total: int):
        yield b'{"messages": "'
        for _ in range(total // 1000):
            yield b"x" * 1000
        yield b'"}'

    with app_client(settings, max_json_bytes=5000, max_upload_bytes=5000) as client:
        response = client.post(CHAT, content=chunks(20_000), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

        boundary = "b0undary"

        def upload():
            yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"content\"; filename=\"a.bin\"\r\n" \
                  f"Content-Type: application/octet-stream\r\n\r\n".encode()
            for _ in range(20):
                yield b"y" * 1000
            yield f"\r\n--{boundary}--\r\n".encode()

        response = client.post("/v1/files", content=upload(),
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 413, response.text


def test_a_stalled_body_times_out(settings):
    from server.app import create_app

    app = create_app(settings.model_copy(update={"body_timeout_s": 0.5}))
    with uvicorn_app(app) as url:
        head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        answer, _ = raw_request(url, head, iter(()), read_timeout=10)
    assert status_of(answer) == 408


# ------------------------------------------------------------------ no 5xx for any input


def post_raw(client, path: str, text: str, **headers):
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_in_every_dialect(client, constant):
    openai = post_raw(client, CHAT, f'{{"messages": [{{"role": "user", "content": "hi"}}], "temperature": {constant}}}')
    assert openai.status_code == 422 and openai.json()["error"]["type"] == "invalid_request_error"
    replicate = post_raw(client, "/v1/models/ember/tiny-chat/predictions",
                         f'{{"input": {{"prompt": "hi", "temperature": {constant}}}}}')
    assert replicate.status_code == 422 and replicate.json()["status"] == 422
    versioned = post_raw(client, "/v1/predictions", f'{{"version": "ember/tiny-chat", "input": {{"temperature": {constant}}}}}')
    assert versioned.status_code == 422
    assert versioned.headers["content-type"].startswith("application/problem+json")
    video = post_raw(client, "/v1/models/ember/tiny-i2v/predictions",
                     f'{{"input": {{"prompt": "hi", "image": "x", "guidance_scale": {constant}}}}}')
    assert video.status_code == 422
    flowise = post_raw(client, "/api/v1/prediction/tiny-chat-flow",
                       f'{{"question": "hi", "overrideConfig": {{"temperature": {constant}}}}}')
    assert flowise.status_code == 422 and flowise.json()["success"] is False
    form = client.post("/api/v1/prediction/tiny-chat-flow", data={"question": "hi", "temperature": constant})
    assert form.status_code in (200, 400)  # an override this flow does not allow is ignored, as in Flowise


def test_json_relatives_are_checked_too(client):
    """`+json` media types are parsed as JSON by the routes, so they are checked as JSON."""
    response = client.post(CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                           headers={"Content-Type": "application/merge-patch+json"})
    assert response.status_code == 422


def test_deeply_nested_json_is_400(client):
    deep = "[" * 5000 + "]" * 5000
    for path in ("/api/v1/prediction/tiny-chat-flow", "/api/v1/feedback", CHAT, "/v1/predictions"):
        response = post_raw(client, path, f'{{"question": "hi", "overrideConfig": {deep}}}')
        assert response.status_code == 400, (path, response.text)
    form = client.post("/api/v1/prediction/tiny-chat-flow", data={"question": "hi", "overrideConfig": deep})
    assert form.status_code == 400


def test_inputs_that_used_to_be_5xx(client):
    bias = client.post(CHAT, json={"messages": MESSAGES, "logit_bias": {"²": 1}, "max_tokens": 2})
    assert bias.status_code == 422 and bias.json()["error"]["param"] == "logit_bias"
    prefer = client.post("/v1/models/ember/tiny-chat/predictions", json={"input": {"prompt": "hi", "max_new_tokens": 2}},
                         headers={"Prefer": "wait=²".encode("latin-1")})
    assert prefer.status_code == 201
    empty = client.post("/v1/completions", json={"prompt": "", "max_tokens": 2})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
    seed = client.post("/api/v1/prediction/tiny-chat-flow", json={"question": "hi", "overrideConfig": {"seed": 2**64}})
    assert seed.status_code in (200, 400)
    replicate_seed = client.post("/v1/models/ember/tiny-chat/predictions", json={"input": {"prompt": "hi", "seed": 2**64}})
    assert replicate_seed.status_code == 201  # any integer seed is taken modulo 2**63 (engine/sampling_bounds.py)
    from server.flowise import SAMPLING

    with pytest.raises(Exception, match="must be a finite number"):
        SAMPLING["temperature"][1](float("nan"), "overrideConfig.temperature")


def test_field_rules(client):
    ordered = client.post(CHAT, json={"messages": MESSAGES, "min_tokens": 5, "max_tokens": 2})
    assert ordered.status_code == 422 and ordered.json()["error"]["param"] == "min_tokens"
    cursor = client.get("/v1/predictions", params={"cursor": "not-a-cursor"})
    assert cursor.status_code == 400
    cursor = client.get("/v1/predictions", params={"cursor": base64.urlsafe_b64encode(b"garbage").decode()})
    assert cursor.status_code == 400
    too_long = client.post("/v1/completions", json={"prompt": "hello " * 20, "max_tokens": 500})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    huge = client.post("/v1/completions", json={"prompt": "x" * (512 * 16 + 1), "max_tokens": 2})
    assert huge.status_code in (400, 422) and huge.json()["error"]["param"] == "prompt"


def test_priority_is_bounded_and_reserved(settings):
    with app_client(settings, priority_api_keys=[OTHER_KEY]) as client:
        body = {"messages": MESSAGES, "max_tokens": 2, "priority": -5}
        assert client.post(CHAT, json=body).status_code == 403
        assert client.post(CHAT, json={**body, "priority": 10**9}).status_code == 422
        allowed = client.post(CHAT, json=body, headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert allowed.status_code == 200


def test_after_an_unhandled_error_the_next_pooled_request_works(settings):
    from server.app import create_app

    app = create_app(settings)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    with uvicorn_app(app) as url, httpx.Client(base_url=url) as pooled:
        failed = pooled.get("/boom")
        assert failed.status_code == 500 and failed.headers["connection"] == "close"
        assert pooled.get("/health").status_code == 200


# ------------------------------------------------------------------ files


def upload(client, data: bytes, name: str, content_type: str):
    return client.post("/v1/files", files={"content": (name, data, content_type)})


@pytest.mark.parametrize("name, content_type, disposition", [
    ("page.html", "text/html", "attachment"), ("drawing.svg", "image/svg+xml", "attachment"),
    ("script.js", "application/javascript", "attachment"), ("notes.txt", "text/plain", "inline"),
    ("photo.png", "image/png", "inline")])
def test_user_files_are_never_interpreted(client, name, content_type, disposition):
    stored = upload(client, b"<script>alert(1)</script>", name, content_type).json()
    response = client.get(stored["urls"]["content"])
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert response.headers["content-disposition"].startswith(disposition)


def test_file_quotas_per_key(settings, own_home):
    with app_client(settings, home=own_home, max_files_per_key=2, max_file_bytes_per_key=100) as client:
        assert upload(client, b"a" * 10, "a.txt", "text/plain").status_code == 201
        over_bytes = upload(client, b"b" * 95, "b.txt", "text/plain")
        assert over_bytes.status_code == 429 and over_bytes.json()["status"] == 429
        assert upload(client, b"c" * 10, "c.txt", "text/plain").status_code == 201
        assert upload(client, b"d", "d.txt", "text/plain").status_code == 429
        other = client.post("/v1/files", files={"content": ("e.txt", b"e", "text/plain")},
                            headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert other.status_code == 201  # quotas are per key


def test_expired_files_are_gone_and_swept(settings):
    with app_client(settings, file_ttl_hours=1 / 3600) as client:
        stored = upload(client, b"short-lived", "a.txt", "text/plain").json()
        files = client.app.state.files
        blob = files.root / stored["id"]
        assert blob.exists()
        time.sleep(1.1)
        assert client.get(f"/v1/files/{stored['id']}").status_code == 404
        assert client.get(stored["urls"]["content"]).status_code == 404
        assert stored["id"] not in [f["id"] for f in client.get("/v1/files").json()["results"]]
        assert files.delete_expired() >= 1
        assert not blob.exists() and not blob.with_suffix(".json").exists()


# ------------------------------------------------------------------ URL inputs at creation


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 120, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_bad_image_urls_are_422_at_creation(client):
    """URL inputs are on by default, through the guarded fetcher, and checked before queueing."""
    path = "/v1/models/ember/tiny-i2v/predictions"
    for image in ("http://127.0.0.1:9/cat.png", "http://169.254.169.254/latest/meta-data", "ftp://x/y.png",
                  "data:image/png;base64,bm90IGFuIGltYWdl"):
        response = client.post(path, json={"input": {"prompt": "a cat", "image": image}})
        assert response.status_code == 422, (image, response.text)
        assert response.json()["detail"].startswith("image")
    assert client.app.state.settings.allow_http_inputs is True


# ------------------------------------------------------------------ sessions


def test_session_history_is_trimmed_to_the_context(client):
    """Long turns in one session: the oldest are left out of the prompt so every turn fits
    (the stored conversation keeps them all)."""
    session = None
    long_turn = "Tell me about the weather and the sea and the mountains and the rivers. " * 8
    for turn in range(6):
        body = {"messages": [{"role": "user", "content": f"{turn}: {long_turn}"}], "max_tokens": 8,
                **({"session_id": session} if session else {})}
        response = client.post(CHAT, json=body)
        assert response.status_code == 200, (turn, response.text)
        session = response.json()["session_id"]
    stored = client.get(f"/v1/sessions/{session}").json()["messages"]
    assert len(stored) == 12


def test_session_limit_listing_and_idle_expiry(settings, own_home):
    with app_client(settings, home=own_home, max_sessions_per_key=3) as client:
        store = client.app.state.store
        ids = []
        for _ in range(3):
            response = client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 1})
            assert response.status_code == 200
            ids.append(response.json()["session_id"])
        # a stateless client goes on past the limit: its least recently used session makes room
        fourth = client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 1})
        assert fourth.status_code == 200
        assert client.get(f"/v1/sessions/{ids[0]}").status_code == 404
        ids = ids[1:] + [fourth.json()["session_id"]]
        first = client.get("/v1/sessions", params={"limit": 2}).json()
        assert len(first["data"]) == 2 and first["has_more"] is True
        rest = client.get("/v1/sessions", params={"limit": 2, "after": first["last_id"]}).json()
        assert rest["has_more"] is False
        assert {s["id"] for s in first["data"] + rest["data"]} == set(ids)
        assert client.get("/v1/sessions", params={"limit": 0}).status_code == 422
        assert store.expire_sessions(0) >= 3
        assert client.get("/v1/sessions").json()["data"] == []


# ------------------------------------------------------------------ auth rules


SECRET = "a-test-secret-of-at-least-32-bytes!!"


def test_jwt_rules(settings):
    now = int(time.time())
    with app_client(settings, jwt_secret=SECRET, jwt_max_lifetime_s=3600, jwt_audience="ember",
                    jwt_issuer="https://issuer.example") as client:
        def whoami(claims):
            token = jwt.encode(claims, SECRET, algorithm="HS256")
            return client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})

        good = {"sub": "alice", "exp": now + 600, "aud": "ember", "iss": "https://issuer.example"}
        assert whoami(good).json() == {"identity": "jwt:alice"}
        assert whoami({k: v for k, v in good.items() if k != "exp"}).status_code == 401
        assert whoami({**good, "exp": now + 7200}).status_code == 401
        assert whoami({**good, "sub": ""}).status_code == 401
        assert whoami({**good, "aud": "someone-else"}).status_code == 401
        assert whoami({k: v for k, v in good.items() if k != "iss"}).status_code == 401
        assert whoami({**good, "exp": now - 10}).status_code == 401


def test_what_anonymous_callers_learn(settings):
    with app_client(settings, metrics_require_key=True) as client:
        anonymous = client.get("/health", headers={"Authorization": ""})
        assert anonymous.json() == {"status": "ok"}
        assert "models" in client.get("/health").json()
        assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
        assert client.get("/metrics").status_code == 200


def test_flow_keys_hide_flows_when_server_auth_is_off(settings):
    with app_client(settings, api_keys=[]) as client:
        listed = [f["id"] for f in client.get("/api/v1/chatflows", headers={"Authorization": ""}).json()]
        assert "tiny-chat-flow" in listed and "locked-flow" not in listed
        keyed = client.get("/api/v1/chatflows", headers={"Authorization": "Bearer flow-secret"}).json()
        assert "locked-flow" in [f["id"] for f in keyed]
        streaming = client.get("/api/v1/chatflows-streaming/locked-flow", headers={"Authorization": ""})
        unknown = client.get("/api/v1/chatflows-streaming/no-such-flow", headers={"Authorization": ""})
        assert streaming.status_code == unknown.status_code == 200 and streaming.json() == unknown.json()
        refused = client.post("/api/v1/prediction/locked-flow", json={"question": "hi"},
                              headers={"Authorization": ""})
        assert refused.status_code == 401
        answer = client.post("/api/v1/prediction/tiny-chat-flow", json={"question": "hi"},
                             headers={"Authorization": ""}).json()
        rated = client.post("/api/v1/feedback", json={"chatflowid": "tiny-chat-flow", "messageId": answer["chatMessageId"],
                                                      "rating": "THUMBS_UP"}, headers={"Authorization": ""})
        assert rated.status_code == 200, rated.text  # open flows stay open beside keyed ones


def test_flowise_form_urlencoded_prediction(client):
    response = client.post("/api/v1/prediction/tiny-chat-flow", data={"question": "hello", "chatId": "form-chat"})
    assert response.status_code == 200, response.text
    assert response.json()["chatId"] == "form-chat" and isinstance(response.json()["text"], str)


def test_openapi_documents_errors_and_flowise_bodies(client):
    schema = client.get("/openapi.json").json()
    prediction = schema["paths"]["/api/v1/prediction/{flow_id}"]["post"]
    assert set(prediction["requestBody"]["content"]) == {
        "application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
    assert "requestBody" in schema["paths"]["/api/v1/feedback"]["post"]
    chat = schema["paths"][CHAT]["post"]["responses"]
    assert {"400", "401", "413", "422", "429"} <= set(chat)
    assert "error" in chat["401"]["content"]["application/json"]["schema"]["properties"]
    replicate = schema["paths"]["/v1/predictions"]["post"]["responses"]["401"]["content"]
    assert "application/problem+json" in replicate
    assert json.dumps(schema)  # serializable


def test_tokenizing_a_long_prompt_gives_its_memory_back(demo_folders):
    """Three 512 KiB prompts leave about 100 MiB behind without the release; with it, little."""
    import gc

    from transformers import AutoTokenizer

    from engine import text_task

    tokenizer = AutoTokenizer.from_pretrained(demo_folders["tiny-chat"])
    text = ("The quick brown fox jumps over the lazy dog. " * 12_000)[:512 * 1024]
    text_task._tokenize(tokenizer, "warm up")
    process = psutil.Process()
    before = process.memory_info().rss
    for _ in range(3):
        assert len(text_task._tokenize(tokenizer, text)) > 1000
        gc.collect()
    assert process.memory_info().rss - before < 40 * 2**20
