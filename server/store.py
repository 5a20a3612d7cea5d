"""The embedded database (SQLite): predictions, chat sessions and their messages, feedback, and
stored Responses API responses.

One small class behind which Postgres could follow. Each record is a few indexed columns plus a
JSON document, so the dialects can keep their own fields without schema churn.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from engine.errors import Forbidden, NotFound, QuotaExceeded
from engine.jobs import new_id, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY, owner TEXT, created_at TEXT NOT NULL, status TEXT NOT NULL,
    model TEXT, version TEXT, source TEXT, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS predictions_owner_created ON predictions(owner, created_at DESC);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, owner TEXT, flow_id TEXT, model TEXT, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, doc TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, session_id TEXT NOT NULL,
    flow_id TEXT, chat_id TEXT, role TEXT NOT NULL, content TEXT, created_at TEXT NOT NULL,
    doc TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS messages_session ON messages(session_id, seq);
CREATE INDEX IF NOT EXISTS messages_flow ON messages(flow_id, seq);
CREATE TABLE IF NOT EXISTS feedback (
    id TEXT PRIMARY KEY, message_id TEXT NOT NULL, flow_id TEXT, chat_id TEXT, rating TEXT,
    content TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT, created_at TEXT NOT NULL, status TEXT NOT NULL, doc TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: Path, max_sessions_per_owner: int | None = None):
        self.max_sessions_per_owner = max_sessions_per_owner
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL survives a crash of this process (only an OS crash can lose the
        # newest commits) and spares an fsync per write.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # ------------------------------------------------------------ predictions

    _SAVE_PREDICTION = (
        "INSERT INTO predictions (id, owner, created_at, status, model, version, source, doc) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status=excluded.status, "
        "doc=excluded.doc")

    @staticmethod
    def _prediction_row(doc: dict) -> tuple:
        return (doc["id"], doc.get("_owner"), doc["created_at"], doc["status"], doc.get("model"),
                doc.get("version"), doc.get("source"), json.dumps(doc))

    def save_prediction(self, doc: dict) -> None:
        self._exec(self._SAVE_PREDICTION, self._prediction_row(doc))

    def save_predictions(self, docs: list[dict]) -> None:
        """Several records in one transaction."""
        rows = [self._prediction_row(doc) for doc in docs]
        with self.lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany(self._SAVE_PREDICTION, rows)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def get_prediction(self, prediction_id: str, owner: str | None) -> dict:
        rows = self._exec("SELECT owner, doc FROM predictions WHERE id = ?", (prediction_id,))
        if not rows or (owner is not None and rows[0]["owner"] not in (owner, None)):
            raise NotFound(f"Prediction {prediction_id} not found")
        return json.loads(rows[0]["doc"])

    def list_predictions(self, owner: str | None, before: str | None, limit: int) -> list[dict]:
        """Newest first; `before` is a cursor `created_at|id` of the last item seen."""
        sql, args = "SELECT doc FROM predictions WHERE 1=1", []
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        if before:
            created, _, pid = before.partition("|")
            sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            args += [created, created, pid]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        return [json.loads(r["doc"]) for r in self._exec(sql, tuple(args))]

    def unfinished_predictions(self) -> list[dict]:
        rows = self._exec("SELECT doc FROM predictions WHERE status IN ('starting', 'processing')")
        return [json.loads(r["doc"]) for r in rows]

    # ------------------------------------------------------------ sessions

    def create_session(self, owner: str | None, model: str | None, flow_id: str | None = None,
                       session_id: str | None = None, doc: dict | None = None) -> dict:
        limit = self.max_sessions_per_owner
        if limit is not None and self.count_sessions(owner) >= limit:
            raise QuotaExceeded(f"this key already has {limit} sessions, the limit; delete some "
                                "(or let idle ones expire) first", param="session_id")
        now = utcnow()
        session_id = session_id or new_id()
        self._exec("INSERT INTO sessions (id, owner, flow_id, model, created_at, updated_at, doc) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (session_id, owner, flow_id, model, now, now, json.dumps(doc or {})))
        return self.get_session(session_id, owner)

    def get_session(self, session_id: str, owner: str | None) -> dict:
        """The session; NotFound if absent, Forbidden if another identity owns it."""
        rows = self._exec("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            raise NotFound(f"Session {session_id} not found", param="session_id")
        row = rows[0]
        if row["owner"] is not None and owner != row["owner"]:
            raise Forbidden(f"Session {session_id} belongs to another API key", param="session_id")
        return {"id": row["id"], "owner": row["owner"], "flow_id": row["flow_id"], "model": row["model"],
                "created_at": row["created_at"], "updated_at": row["updated_at"], **json.loads(row["doc"])}

    def find_session(self, session_id: str) -> dict | None:
        rows = self._exec("SELECT id FROM sessions WHERE id = ?", (session_id,))
        return dict(rows[0]) if rows else None

    def list_sessions(self, owner: str | None, flow_id: str | None = None, *, after: str | None = None,
                      limit: int = 100) -> list[dict]:
        """Newest first, at most `limit`; `after` is the id of the last session of the previous
        page (NotFound when it is not one of the owner's sessions)."""
        sql, args = "SELECT id FROM sessions WHERE 1=1", []
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        if flow_id is not None:
            sql += " AND flow_id = ?"
            args.append(flow_id)
        if after is not None:
            last = self.get_session(after, owner)
            sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            args += [last["created_at"], last["created_at"], last["id"]]
        rows = self._exec(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
        return [self.get_session(r["id"], owner) for r in rows]

    def count_sessions(self, owner: str | None) -> int:
        return self._exec("SELECT COUNT(*) AS n FROM sessions WHERE owner IS ?", (owner,))[0]["n"]

    def touch_session(self, session_id: str) -> None:
        self._exec("UPDATE sessions SET updated_at = ? WHERE id = ?", (utcnow(), session_id))

    def delete_session(self, session_id: str, owner: str | None) -> None:
        self.get_session(session_id, owner)
        self._exec("DELETE FROM messages WHERE session_id = ?", (session_id,))
        self._exec("DELETE FROM sessions WHERE id = ?", (session_id,))

    def expire_sessions(self, ttl_hours: float) -> int:
        cutoff = (datetime.now(timezone.utc) - timedelta(hours=ttl_hours)).isoformat().replace("+00:00", "Z")
        old = [r["id"] for r in self._exec("SELECT id FROM sessions WHERE updated_at < ?", (cutoff,))]
        for session_id in old:
            self._exec("DELETE FROM messages WHERE session_id = ?", (session_id,))
            self._exec("DELETE FROM sessions WHERE id = ?", (session_id,))
        return len(old)

    # ------------------------------------------------------------ messages

    def add_message(self, session_id: str, role: str, content: str | None, *, flow_id: str | None = None,
                    chat_id: str | None = None, doc: dict | None = None) -> dict:
        message_id = new_id()
        self._exec("INSERT INTO messages (id, session_id, flow_id, chat_id, role, content, created_at, doc) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (message_id, session_id, flow_id, chat_id, role, content, utcnow(), json.dumps(doc or {})))
        self.touch_session(session_id)
        return self.get_message(message_id)

    def get_message(self, message_id: str) -> dict:
        rows = self._exec("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise NotFound(f"Message {message_id} not found")
        return self._message(rows[0])

    @staticmethod
    def _message(row: sqlite3.Row) -> dict:
        return {"id": row["id"], "session_id": row["session_id"], "flow_id": row["flow_id"],
                "chat_id": row["chat_id"], "role": row["role"], "content": row["content"],
                "created_at": row["created_at"], **json.loads(row["doc"])}

    def messages(self, *, session_id: str | None = None, flow_id: str | None = None,
                 chat_id: str | None = None, since: str | None = None, until: str | None = None,
                 owner: str | None = None, newest_first: bool = False) -> list[dict]:
        """Messages matching every filter given; `owner` keeps those of sessions it owns."""
        sql, args = "SELECT * FROM messages WHERE 1=1", []
        for column, value in (("session_id", session_id), ("flow_id", flow_id), ("chat_id", chat_id)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        if owner is not None:
            sql += " AND session_id IN (SELECT id FROM sessions WHERE owner = ?)"
            args.append(owner)
        if since:
            sql += " AND created_at >= ?"
            args.append(since)
        if until:
            sql += " AND created_at <= ?"
            args.append(until)
        sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq ASC"
        return [self._message(r) for r in self._exec(sql, tuple(args))]

    def delete_messages(self, **filters: Any) -> int:
        doomed = self.messages(**filters)
        for message in doomed:
            self._exec("DELETE FROM messages WHERE id = ?", (message["id"],))
        return len(doomed)

    # ------------------------------------------------------------ feedback

    def add_feedback(self, message_id: str, flow_id: str | None, chat_id: str | None, rating: str | None,
                     content: str | None) -> dict:
        self.get_message(message_id)
        feedback_id = new_id()
        self._exec("INSERT INTO feedback (id, message_id, flow_id, chat_id, rating, content, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (feedback_id, message_id, flow_id, chat_id, rating, content, utcnow()))
        return dict(self._exec("SELECT * FROM feedback WHERE id = ?", (feedback_id,))[0])

    def feedback(self, flow_id: str | None = None, chat_id: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM feedback WHERE 1=1", []
        if flow_id is not None:
            sql += " AND flow_id = ?"
            args.append(flow_id)
        if chat_id is not None:
            sql += " AND chat_id = ?"
            args.append(chat_id)
        return [dict(r) for r in self._exec(sql + " ORDER BY created_at", tuple(args))]

    # ------------------------------------------------------------ responses (OpenAI Responses API)

    def save_response(self, response_id: str, owner: str | None, status: str, doc: dict) -> None:
        self._exec("INSERT INTO responses (id, owner, created_at, status, doc) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT(id) DO UPDATE SET status=excluded.status, doc=excluded.doc",
                   (response_id, owner, utcnow(), status, json.dumps(doc)))

    def get_response(self, response_id: str, owner: str | None) -> dict:
        """The stored document; NotFound if absent or owned by another identity (a response's
        existence is not revealed to other keys)."""
        rows = self._exec("SELECT owner, doc FROM responses WHERE id = ?", (response_id,))
        if not rows or rows[0]["owner"] not in (owner, None):
            raise NotFound(f"Response with id '{response_id}' not found.")
        return json.loads(rows[0]["doc"])

    def delete_response(self, response_id: str, owner: str | None) -> None:
        self.get_response(response_id, owner)
        self._exec("DELETE FROM responses WHERE id = ?", (response_id,))
