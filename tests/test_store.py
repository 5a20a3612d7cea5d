"""The store's behaviour, the same on both backends: SQLite (the default) and a real PostgreSQL
(marker `postgres`; tests/pg_fixtures.py starts it). Also migrations, and the replica protocol:
heartbeats, adopting a dead replica's predictions exactly once, fencing its late writes, cancels
asked through another replica."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from engine.errors import Forbidden, NotFound
from server.store import Store, StoreUnavailable, database_url
from server.store_schema import SCHEMA_VERSION, predictions, schema_version


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def location(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "ember.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture()
def store(location):
    store = Store(location, max_sessions_per_owner=3)
    yield store
    store.close()


def prediction(pid: str, status: str = "starting", owner: str | None = "alice", created: str = "2026-01-01T00:00:00Z",
               **extra) -> dict:
    return {"id": pid, "status": status, "created_at": created, "model": "o/m", "version": "v",
            "source": "replicate", "_owner": owner, **extra}


# ---------------------------------------------------------------- records

def test_predictions_are_saved_updated_scoped_and_paged(store):
    store.save_prediction(prediction("p1"))
    store.save_predictions([prediction("p1", "processing", output=["a"]),
                            prediction("p2", "succeeded", created="2026-01-02T00:00:00Z"),
                            prediction("p3", owner="bob", created="2026-01-03T00:00:00Z")])
    assert store.get_prediction("p1", "alice")["output"] == ["a"]
    assert store.get_prediction("p1", None)["status"] == "processing"
    with pytest.raises(NotFound):
        store.get_prediction("p1", "bob")
    with pytest.raises(NotFound):
        store.get_prediction("nope", None)
    assert [d["id"] for d in store.list_predictions("alice", None, 10)] == ["p2", "p1"]
    assert [d["id"] for d in store.list_predictions(None, None, 2)] == ["p3", "p2"]
    assert [d["id"] for d in store.list_predictions(None, "2026-01-02T00:00:00Z|p2", 10)] == ["p1"]


def test_sessions_limit_ownership_paging_and_expiry(store):
    first = store.create_session("alice", "o/m", flow_id="f")
    assert store.get_session(first["id"], "alice")["flow_id"] == "f"
    with pytest.raises(Forbidden):
        store.get_session(first["id"], "bob")
    with pytest.raises(NotFound):
        store.get_session("nope", "alice")
    assert store.find_session(first["id"]) == {"id": first["id"]} and store.find_session("nope") is None
    chosen = store.create_session("alice", "o/m", session_id="my-own-id", doc={"title": "t"})
    assert chosen["id"] == "my-own-id" and chosen["title"] == "t"
    store.create_session("alice", "o/m")
    time.sleep(0.01)
    store.touch_session(first["id"])
    store.create_session("alice", "o/m")  # at the limit: the least recently used session makes room
    with pytest.raises(NotFound):
        store.get_session("my-own-id", "alice")
    anonymous = store.create_session(None, "o/m")
    assert store.count_sessions(None) == 1 and store.count_sessions("alice") == 3
    everything = store.list_sessions("alice")
    assert len(everything) == 3
    page = store.list_sessions("alice", limit=2)
    rest = store.list_sessions("alice", after=page[-1]["id"])
    assert [s["id"] for s in page + rest] == [s["id"] for s in everything]
    assert [s["id"] for s in store.list_sessions("alice", flow_id="f")] == [first["id"]]
    with pytest.raises(NotFound):
        store.list_sessions("bob", after=first["id"] + "x")
    store.add_message(first["id"], "user", "hi")
    store.delete_session(first["id"], "alice")
    assert store.messages(session_id=first["id"]) == []
    assert store.expire_sessions(ttl_hours=-1) == 3  # every session is idle longer than that
    with pytest.raises(NotFound):
        store.get_session(anonymous["id"], None)


def test_messages_filters_deletion_and_feedback(store):
    mine = store.create_session("alice", "o/m", flow_id="f")["id"]
    theirs = store.create_session("bob", "o/m", flow_id="f")["id"]
    hello = store.add_message(mine, "user", "hello", flow_id="f", chat_id="c1")
    store.add_message(mine, "assistant", "hi!", flow_id="f", chat_id="c1",
                      doc={"tool_calls": [{"id": "t", "type": "function"}]})
    store.add_message(theirs, "user", "other", flow_id="f", chat_id="c2")
    assert [m["content"] for m in store.messages(session_id=mine)] == ["hello", "hi!"]
    assert store.messages(session_id=mine)[1]["tool_calls"][0]["id"] == "t"
    assert [m["content"] for m in store.messages(flow_id="f", newest_first=True)] == ["other", "hi!", "hello"]
    assert [m["content"] for m in store.messages(flow_id="f", owner="bob")] == ["other"]
    assert [m["content"] for m in store.messages(chat_id="c1", since=hello["created_at"])] == ["hello", "hi!"]
    assert store.messages(flow_id="f", until="2000-01-01T00:00:00Z") == []
    rated = store.add_feedback(hello["id"], "f", "c1", "THUMBS_UP", "nice")
    assert rated["rating"] == "THUMBS_UP" and store.feedback(flow_id="f", chat_id="c1") == [rated]
    with pytest.raises(NotFound):
        store.add_feedback("nope", "f", None, None, None)
    assert store.delete_messages(flow_id="f", owner="alice") == 2
    assert [m["content"] for m in store.messages(flow_id="f")] == ["other"]


def test_responses_are_upserted_scoped_and_deleted(store):
    store.save_response("resp_1", "alice", "in_progress", {"response": {"status": "in_progress"}})
    store.save_response("resp_1", "alice", "completed", {"response": {"status": "completed"}})
    assert store.get_response("resp_1", "alice")["response"]["status"] == "completed"
    with pytest.raises(NotFound):
        store.get_response("resp_1", "bob")
    store.delete_response("resp_1", "alice")
    with pytest.raises(NotFound):
        store.get_response("resp_1", "alice")


# ---------------------------------------------------------------- schema

def test_reopening_migrates_nothing_and_keeps_data(location):
    first = Store(location)
    first.save_prediction(prediction("kept"))
    first.close()
    again = Store(location)
    with again.engine.connect() as conn:
        assert conn.execute(select(schema_version.c.version)).scalars().all() == [SCHEMA_VERSION]
    assert again.get_prediction("kept", None)["id"] == "kept"
    again.close()


LEGACY_SQLITE = """
CREATE TABLE predictions (id TEXT PRIMARY KEY, owner TEXT, created_at TEXT NOT NULL, status TEXT NOT NULL,
    model TEXT, version TEXT, source TEXT, doc TEXT NOT NULL);
CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT, flow_id TEXT, model TEXT, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, doc TEXT NOT NULL DEFAULT '{}');
CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, session_id TEXT NOT NULL,
    flow_id TEXT, chat_id TEXT, role TEXT NOT NULL, content TEXT, created_at TEXT NOT NULL,
    doc TEXT NOT NULL DEFAULT '{}');
CREATE TABLE feedback (id TEXT PRIMARY KEY, message_id TEXT NOT NULL, flow_id TEXT, chat_id TEXT, rating TEXT,
    content TEXT, created_at TEXT NOT NULL);
CREATE TABLE responses (id TEXT PRIMARY KEY, owner TEXT, created_at TEXT NOT NULL, status TEXT NOT NULL,
    doc TEXT NOT NULL);
INSERT INTO predictions VALUES ('old', NULL, '2025-01-01T00:00:00Z', 'processing', 'o/m', 'v', 'replicate',
    '{"id": "old", "status": "processing", "created_at": "2025-01-01T00:00:00Z", "source": "replicate"}');
"""


def test_a_database_from_before_versioning_is_upgraded(tmp_path):
    path = tmp_path / "ember.db"
    legacy = sqlite3.connect(path)
    legacy.executescript(LEGACY_SQLITE)
    legacy.close()
    store = Store(path)
    with store.engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("predictions")}
        assert {"replica", "cancel_requested"} <= columns
        assert "sessions_owner_used" in {i["name"] for i in inspect(conn).get_indexes("sessions")}
        assert conn.execute(select(schema_version.c.version)).scalar() == SCHEMA_VERSION
    store.heartbeat()
    assert [d["id"] for d in store.adopt_orphans(60)] == ["old"]  # a record no replica names is an orphan
    store.close()


def test_database_urls():
    assert database_url(Path("/x/ember.db")) == "sqlite:////x/ember.db"
    assert database_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert database_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert database_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"


# ---------------------------------------------------------------- replicas

def test_a_dead_replicas_predictions_go_to_one_other_replica_which_alone_writes_them(location):
    a, b = Store(location, replica_id="replica-a"), Store(location, replica_id="replica-b")
    a.heartbeat()
    b.heartbeat()
    a.save_prediction(prediction("p"))
    assert b.adopt_orphans(lease_s=60) == []  # a is alive
    assert set(b.live_replicas(60)) == {"replica-a", "replica-b"}
    b.heartbeat()
    adopted = b.adopt_orphans(lease_s=0.0)  # a lease that has just run out, for a and b alike
    assert [(d["id"], d["_cancel_requested"]) for d in adopted] == [("p", False)]
    assert b.adopt_orphans(lease_s=0.0) == []  # b runs it now, and b's own row does not matter
    a.save_prediction(prediction("p", "succeeded"))  # a late write of the replica presumed dead
    assert b.get_prediction("p", None)["status"] == "starting"
    b.save_prediction(prediction("p", "processing"))
    assert b.get_prediction("p", None)["status"] == "processing"
    assert b.live_replicas(3600) == ["replica-b"]  # the row of a, whose lease ran out, was forgotten
    a.close()
    b.close()


def test_alone_a_starting_server_adopts_everything_unfinished(location):
    a, b = Store(location, replica_id="replica-a"), Store(location, replica_id="replica-b")
    a.heartbeat()
    a.save_prediction(prediction("p"))
    a.save_prediction(prediction("done", "succeeded"))
    assert [d["id"] for d in b.adopt_orphans(lease_s=60, alone=True)] == ["p"]
    a.close()
    b.close()


def test_each_orphan_is_adopted_by_exactly_one_of_many_replicas(location):
    seed = Store(location)
    seed.save_predictions([prediction(f"p{i:03d}") for i in range(60)])
    with seed.engine.begin() as conn:  # records of a replica that never heartbeat: orphans to all
        conn.execute(predictions.update().values(replica="gone"))
    seed.close()
    replicas = [Store(location, replica_id=f"r{i}") for i in range(4)]
    for replica in replicas:
        replica.heartbeat()
    claimed: dict[str, list[str]] = {}
    start = threading.Barrier(len(replicas))

    def claim(replica: Store) -> None:
        start.wait()
        claimed[replica.replica_id] = [d["id"] for d in replica.adopt_orphans(lease_s=60)]

    threads = [threading.Thread(target=claim, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    everyone = [pid for ids in claimed.values() for pid in ids]
    assert sorted(everyone) == [f"p{i:03d}" for i in range(60)]  # all of them, none twice
    for replica in replicas:
        replica.close()


def test_a_cancel_asked_through_another_replica_reaches_the_runner(location):
    runner, other = Store(location, replica_id="runner"), Store(location, replica_id="other")
    runner.heartbeat()
    runner.save_prediction(prediction("p", "processing"))
    runner.save_prediction(prediction("q", "processing"))
    assert other.request_cancel("p") is True
    assert runner.cancel_requests() == ["p"] and other.cancel_requests() == []
    runner.save_prediction(prediction("p", "canceled"))
    assert runner.cancel_requests() == [] and other.request_cancel("p") is False
    other.request_cancel("q")
    other.heartbeat()
    adopted = other.adopt_orphans(lease_s=0.0)  # the runner died before it saw the request
    assert [(d["id"], d["_cancel_requested"]) for d in adopted] == [("q", True)]
    runner.close()
    other.close()


def test_nul_characters_are_stored_and_looked_up_on_every_backend(store):
    session = store.create_session("alice", "o/m", session_id="chat\x00id")
    assert store.find_session("chat\x00id") == {"id": session["id"]}
    row = store.add_message(session["id"], "user", "a\x00b")
    assert row["content"] in ("a\x00b", "a\ufffdb")  # PostgreSQL text cannot hold NUL
    with pytest.raises(NotFound):
        store.get_prediction("nope\x00", None)


def test_an_unreachable_database_is_store_unavailable():
    pytest.importorskip("psycopg")
    from tests.conftest import free_port

    with pytest.raises(StoreUnavailable):
        Store(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")


def test_a_replica_whose_store_fails_says_so_and_accepts_nothing(tmp_path, demo_folders, models_file, monkeypatch):
    """/health turns 503 for load balancers; a create whose record cannot be committed is
    answered 503 (in the dialect's shape) and its job canceled, not left running unrecorded."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.conftest import API_KEY, make_settings

    (tmp_path / "demo").mkdir()
    for name, folder in demo_folders.items():
        (tmp_path / "demo" / name).symlink_to(folder, target_is_directory=True)
    app = create_app(make_settings(tmp_path, models_file))
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        assert client.get("/health").json()["replica"]["store"]["reachable"] is True

        def down(*args, **kwargs):
            raise StoreUnavailable("the store (database) is unavailable; try again shortly")

        monkeypatch.setattr(app.state.store, "ping", down)
        monkeypatch.setattr(app.state.store, "save_predictions", down)
        monkeypatch.setattr(app.state.store, "get_prediction", down)
        anonymous = client.get("/health", headers={"Authorization": ""})
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "unavailable"}
        detail = client.get("/health").json()["replica"]["store"]
        assert detail["reachable"] is False and "StoreUnavailable" in detail["error"]
        created = client.post("/v1/models/ember/tiny-chat/predictions", json={"input": {"prompt": "hi"}})
        assert created.status_code == 503 and created.json()["status"] == 503
        assert all(job.done or job.cancel_requested for job in app.state.engine.jobs.values())
        assert client.get("/v1/predictions/whatever").status_code == 503
