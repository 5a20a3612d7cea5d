"""The server skeleton: auth, health, model listing, error shapes, metrics, CLI guards."""

from __future__ import annotations

import time

import jwt
import pytest
from fastapi.testclient import TestClient

from tests.conftest import API_KEY


def test_health_lists_every_version_with_status(client):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    by_model = {m["model"]: m for m in body["models"]}
    assert by_model["acme/missing"]["status"] == "unavailable"
    assert "not on this machine" in by_model["acme/missing"]["error"]
    assert by_model["ember/tiny-chat"]["status"] in ("unloaded", "ready")


@pytest.mark.parametrize("header, status", [(None, 401), ("Bearer wrong", 401), ("Basic abc", 401),
                                            (f"Bearer {API_KEY}", 200)])
def test_api_key_auth(client, header, status):
    headers = {"Authorization": header} if header else {}
    response = TestClient(client.app).get("/v1/models", headers=headers)
    assert response.status_code == status


def test_auth_error_shape_follows_the_dialect(client):
    bare = TestClient(client.app)
    openai = bare.post("/v1/chat/completions", json={})
    assert openai.status_code == 401 and openai.json()["error"]["type"] == "authentication_error"
    replicate = bare.get("/v1/predictions")
    assert replicate.status_code == 401 and replicate.json()["status"] == 401
    assert replicate.headers["content-type"].startswith("application/problem+json")


def test_jwt_bearer_tokens(settings):
    from server.app import create_app

    app = create_app(settings.model_copy(update={"jwt_secret": "a-test-secret-of-at-least-32-bytes!!"}))
    with TestClient(app) as bare:
        claims = {"sub": "alice", "exp": int(time.time()) + 600}
        good = jwt.encode(claims, "a-test-secret-of-at-least-32-bytes!!", algorithm="HS256")
        assert bare.get("/v1/whoami", headers={"Authorization": f"Bearer {good}"}).json() == {"identity": "jwt:alice"}
        forged = jwt.encode(claims, "another-secret-that-is-32-bytes-long", algorithm="HS256")
        assert bare.get("/v1/whoami", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_models_list_has_openai_and_replicate_shapes(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert "ember/tiny-chat" in ids
    assert body["results"] == body["data"]
    chat = next(m for m in body["data"] if m["id"] == "ember/tiny-chat")
    assert chat["object"] == "model" and chat["owned_by"] == "ember"
    assert len(chat["latest_version"]["id"]) == 64


def test_model_and_version_endpoints(client):
    model = client.get("/v1/models/ember/tiny-chat").json()
    version_id = model["latest_version"]["id"]
    version = client.get(f"/v1/models/ember/tiny-chat/versions/{version_id}").json()
    schema = version["openapi_schema"]["components"]["schemas"]
    assert schema["Output"]["x-cog-array-type"] == "iterator"
    assert schema["Input"]["properties"]["max_new_tokens"]["default"] == 16
    assert isinstance(version["cog_version"], str)
    as_openai = client.get(f"/v1/models/ember/tiny-chat:{version_id}").json()
    assert as_openai["id"] == f"ember/tiny-chat:{version_id}"
    assert client.get("/v1/models/ember/tiny-chat/versions").json()["results"][0]["id"] == version_id


def test_unknown_model_is_404_with_a_listing(client):
    response = client.get("/v1/models/acme/nope")
    assert response.status_code == 404
    body = response.json()
    assert "Known models" in body["error"]["message"] and body["status"] == 404


def _http_samples(client) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in ("ember_http_requests_total", "ember_http_request_seconds_count"):
                samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_requests_by_route_and_status(client):
    before = _http_samples(client)
    client.get("/health")
    client.get("/v1/models/acme/nope")
    after = _http_samples(client)
    changed = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    health = ("ember_http_requests_total", ("method", "GET"), ("route", "/health"), ("status", "200"))
    assert changed[health] == 1
    assert changed[("ember_http_request_seconds_count", ("route", "/health"))] == 1
    missing = [key for key in changed if key[0] == "ember_http_requests_total" and ("status", "404") in key]
    assert len(missing) == 1 and dict(missing[0][1:])["route"].startswith("/v1/models/")
    assert changed[missing[0]] == 1


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    assert "/v1/models" in client.get("/openapi.json").json()["paths"]


def test_cli_refuses_public_bind_without_keys(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from server.cli import app

    monkeypatch.delenv("EMBER_API_KEYS", raising=False)
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "Refusing to bind" in result.output


def test_cli_models_lists_versions(monkeypatch, settings):
    from typer.testing import CliRunner

    from server.cli import app

    monkeypatch.setenv("EMBER_HOME", str(settings.home))
    result = CliRunner().invoke(app, ["models", "--models", str(settings.models)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "ember/tiny-chat" in result.output and "unavailable" in result.output


def test_memory_budgets_setting(settings):
    assert settings.model_copy(update={"memory_budgets": "cpu=1.5,cuda:0=70"}).memory_budget_bytes() == \
        {"cpu": int(1.5 * 2**30), "cuda:0": 70 * 2**30}
    with pytest.raises(ValueError, match="device=GiB"):
        settings.model_copy(update={"memory_budgets": "cpu=lots"}).memory_budget_bytes()


@pytest.mark.parametrize("path, read", [
    ("/v1/chat/completions", lambda body: body["error"]["message"]),
    ("/v1/predictions", lambda body: body["detail"]),
    ("/api/v1/prediction/tiny-chat-flow", lambda body: body["message"]),
])
def test_a_body_that_is_not_json_gets_a_clear_error_in_each_dialect(client, path, read):
    response = client.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422)
    assert "JSON" in read(response.json())
    assert client.get("/health").status_code == 200
