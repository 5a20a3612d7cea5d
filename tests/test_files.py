"""`/v1/files`: upload, metadata, content URL, listing, deletion, owner scoping, and the client."""

from __future__ import annotations

import io
import json

from fastapi.testclient import TestClient

from tests.conftest import OTHER_KEY
from tests.test_replicate import sdk


def upload(client, data: bytes = b"hello file", name: str = "note.txt", metadata: dict | None = None):
    form = {"metadata": json.dumps(metadata)} if metadata is not None else {}
    return client.post("/v1/files", files={"content": (name, data, "text/plain")}, data=form)


def test_upload_get_content_delete(client):
    response = upload(client, metadata={"purpose": "test"})
    assert response.status_code == 201
    stored = response.json()
    assert stored["name"] == "note.txt" and stored["size"] == 10 and stored["content_type"] == "text/plain"
    assert stored["metadata"] == {"purpose": "test"} and len(stored["checksums"]["sha256"]) == 64
    assert client.get(f"/v1/files/{stored['id']}").json() == stored
    assert stored["id"] in [f["id"] for f in client.get("/v1/files").json()["results"]]
    for url in (stored["urls"]["content"], f"/v1/files/{stored['id']}/download"):
        content = client.get(url)
        assert content.status_code == 200 and content.content == b"hello file"
        assert content.headers["content-type"].startswith("text/plain")
    assert client.delete(f"/v1/files/{stored['id']}").status_code == 204
    missing = client.get(f"/v1/files/{stored['id']}")
    assert missing.status_code == 404 and missing.json()["status"] == 404
    assert client.get(stored["urls"]["content"]).status_code == 404


def test_files_are_scoped_to_their_owner(client):
    stored = upload(client).json()
    other = TestClient(client.app, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert other.get(f"/v1/files/{stored['id']}").status_code == 404
    assert other.delete(f"/v1/files/{stored['id']}").status_code == 404
    assert stored["id"] not in [f["id"] for f in other.get("/v1/files").json()["results"]]
    anonymous = TestClient(client.app)
    assert anonymous.get(f"/v1/files/{stored['id']}").status_code == 401
    assert anonymous.get(stored["urls"]["content"]).content == b"hello file"  # the URL is the capability


def test_bad_metadata_and_missing_content_are_422(client):
    assert upload(client, metadata=["not", "an", "object"]).status_code == 422
    response = client.post("/v1/files", data={"metadata": "{}"})
    assert response.status_code == 422 and "content" in response.json()["detail"]


def test_the_official_client_uploads_lists_and_deletes(live_server):
    client = sdk(live_server)
    handle = io.BytesIO(b"\x89PNG fake")
    handle.name = "image.png"
    stored = client.files.create(handle, metadata={"k": "v"})
    assert stored.content_type == "image/png" and stored.metadata == {"k": "v"}
    assert client.files.get(stored.id).etag == stored.etag
    assert stored.id in [f.id for f in client.files.list()]
    assert client.files.delete(stored.id) is True
