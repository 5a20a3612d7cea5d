"""The store: predictions, chat sessions and their messages, feedback, stored Responses API
responses, and the server replicas sharing them, behind one class with two backends.

`Store(location)` takes a SQLite file (a path, or a `sqlite:///...` URL: the embedded default) or a
PostgreSQL URL (`postgresql://...`, driven by psycopg 3), through SQLAlchemy Core; the tables and
their migrations are in server/store_schema.py. On SQLite one connection serves every thread under
a lock (as one writer at a time is all SQLite does anyway); on PostgreSQL each thread takes a
pooled connection.

Several server replicas may share a PostgreSQL store. Each has an id (`replica_id`) and heartbeats
into `replicas`; a prediction's record names the replica running it, and only that replica's
writes change it. The predictions of a replica whose heartbeat stopped are claimed by another
(`adopt_orphans`, `FOR UPDATE SKIP LOCKED`: each one by exactly one replica), and a cancel asked of
another replica's prediction is a flag that replica picks up (`request_cancel`, `cancel_requests`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, delete, event, func, or_, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.pool import StaticPool

from engine.errors import EmberError, Forbidden, NotFound
from engine.jobs import new_id, utcnow
from server.store_schema import Text, feedback, messages, migrate, predictions, replicas, responses, sessions

log = logging.getLogger("ember.store")

UNFINISHED = ("starting", "processing")
READ_ONLY = "ember_read_only"  # execution option: a SQLite connection that only reads begins no transaction


class StoreUnavailable(EmberError):
    """The database cannot be reached (a PostgreSQL server down, a network partition): each
    dialect answers 503, and the replica's /health says so."""

    status = 503
    code = "store_unavailable"


def database_url(location: Path | str) -> str:
    """A SQLAlchemy URL for a SQLite path or a database URL; `postgresql://` and `postgres://`
    take the psycopg 3 driver."""
    if isinstance(location, Path):
        return f"sqlite:///{location.resolve()}"
    for prefix in ("postgres://", "postgresql://"):
        if location.startswith(prefix):
            return "postgresql+psycopg://" + location.removeprefix(prefix)
    return location


def redacted(url: str) -> str:
    """The URL without its password, for logs and /health."""
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_engine(url: str):
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun below, not by the driver
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL survives a crash of this process (only an OS crash can lose the
        # newest commits) and spares an fsync per write.
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")
        dbapi_connection.execute("PRAGMA busy_timeout=5000")

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        if conn.get_execution_options().get(READ_ONLY):
            return  # one SELECT is consistent on its own: no transaction to begin and commit
        # IMMEDIATE: take the write lock at the start, so a transaction that reads then writes
        # (adopting orphans) waits for another process's instead of failing half-way.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _postgres_engine(url: str):
    return create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True,
                         connect_args={"connect_timeout": 5})


def _touch(conn: Connection, session_id: str, now: str) -> None:
    """Mark a session used now (it moves to the back of its owner's eviction order)."""
    conn.execute(update(sessions).where(sessions.c.id == session_id).values(updated_at=now))


@contextmanager
def _unavailable_as_503() -> Iterator[None]:
    """The driver's operational and interface errors become StoreUnavailable: on PostgreSQL lost,
    refused or timed-out connections; on SQLite a lock wait that ran out or a file that cannot be
    opened (and its other operational errors). Integrity and programming errors stay bugs."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        log.warning("store unavailable: %s", exc.orig or exc)
        raise StoreUnavailable("the store (database) is unavailable; try again shortly") from exc


class Store:
    def __init__(self, location: Path | str, max_sessions_per_owner: int | None = None,
                 replica_id: str | None = None):
        self.url = database_url(location)
        self.max_sessions_per_owner = max_sessions_per_owner
        self.replica_id = replica_id or new_id()
        self.engine = _sqlite_engine(self.url) if self.url.startswith("sqlite") else _postgres_engine(self.url)
        self.backend = self.engine.dialect.name  # "sqlite" | "postgresql"
        self.lock = threading.Lock() if self.backend == "sqlite" else nullcontext()
        with self._tx() as conn:
            migrate(conn)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A connection in a transaction, committed at the end of the block (rolled back on error)."""
        with self.lock, _unavailable_as_503(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for one query that only reads."""
        with self.lock, _unavailable_as_503(), self.engine.connect() as conn:
            yield conn.execution_options(**{READ_ONLY: True})

    def _insert(self, table):
        """INSERT with this backend's ON CONFLICT support."""
        return (pg_dialect if self.backend == "postgresql" else sqlite_dialect).insert(table)

    def close(self) -> None:
        with self.lock:
            self.engine.dispose()

    def ping(self) -> None:
        """Raises when the database cannot be reached."""
        with self._read() as conn:
            conn.exec_driver_sql("SELECT 1")

    # ------------------------------------------------------------ predictions

    def _upsert_predictions(self, conn: Connection, docs: list[dict]) -> None:
        """Insert or update records as this replica's. A record another replica has claimed since
        (this one was presumed dead) is left as it is: only the claimer's writes count."""
        rows = [{"id": doc["id"], "owner": doc.get("_owner"), "created_at": doc["created_at"],
                 "status": doc["status"], "model": doc.get("model"), "version": doc.get("version"),
                 "source": doc.get("source"), "doc": json.dumps(doc), "replica": self.replica_id}
                for doc in docs]
        statement = self._insert(predictions)
        statement = statement.on_conflict_do_update(
            index_elements=[predictions.c.id],
            set_={"status": statement.excluded.status, "doc": statement.excluded.doc,
                  "replica": statement.excluded.replica},
            where=or_(predictions.c.replica.is_(None), predictions.c.replica == statement.excluded.replica))
        conn.execute(statement, rows)

    def save_prediction(self, doc: dict) -> None:
        self.save_predictions([doc])

    def save_predictions(self, docs: list[dict]) -> None:
        """Several records in one transaction."""
        with self._tx() as conn:
            self._upsert_predictions(conn, docs)

    def get_prediction(self, prediction_id: str, owner: str | None) -> dict:
        with self._read() as conn:
            row = conn.execute(select(predictions.c.owner, predictions.c.doc)
                               .where(predictions.c.id == prediction_id)).first()
        if row is None or (owner is not None and row.owner not in (owner, None)):
            raise NotFound(f"Prediction {prediction_id} not found")
        return json.loads(row.doc)

    def list_predictions(self, owner: str | None, before: str | None, limit: int) -> list[dict]:
        """Newest first; `before` is a cursor `created_at|id` of the last item seen."""
        query = select(predictions.c.doc)
        if owner is not None:
            query = query.where(predictions.c.owner == owner)
        if before:
            created, _, pid = before.partition("|")
            query = query.where(or_(predictions.c.created_at < created,
                                    (predictions.c.created_at == created) & (predictions.c.id < pid)))
        query = query.order_by(predictions.c.created_at.desc(), predictions.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [json.loads(doc) for doc in conn.execute(query).scalars()]

    # ------------------------------------------------------------ replicas

    def heartbeat(self) -> None:
        """This replica is alive (its row is created on the first beat)."""
        statement = self._insert(replicas).values(id=self.replica_id, host=socket.gethostname(), pid=os.getpid(),
                                                  started_at=utcnow(), heartbeat=time.time())
        statement = statement.on_conflict_do_update(index_elements=[replicas.c.id],
                                                    set_={"heartbeat": statement.excluded.heartbeat})
        with self._tx() as conn:
            conn.execute(statement)

    def leave(self) -> None:
        """This replica stops: its unfinished predictions are anyone's to adopt from now on."""
        with self._tx() as conn:
            conn.execute(delete(replicas).where(replicas.c.id == self.replica_id))

    def live_replicas(self, lease_s: float) -> list[str]:
        with self._read() as conn:
            return list(conn.execute(select(replicas.c.id).where(replicas.c.heartbeat >= time.time() - lease_s)
                                     .order_by(replicas.c.id)).scalars())

    def adopt_orphans(self, lease_s: float, alone: bool = False) -> list[dict]:
        """Claim the unfinished predictions no live replica runs, and return them (with
        `_cancel_requested`). A replica is live while its last heartbeat is at most `lease_s` old;
        `alone` counts every other replica as gone (a SQLite database has one server, so at its
        start whatever is unfinished was interrupted). Rows another replica is claiming at the
        same moment are skipped, so each orphan goes to exactly one replica. Replicas whose lease
        ran out are forgotten."""
        cutoff = time.time() - lease_s
        live = select(replicas.c.id).where(replicas.c.id == self.replica_id if alone
                                           else replicas.c.heartbeat >= cutoff)
        mine = predictions.c.replica == self.replica_id
        orphans = (select(predictions.c.id, predictions.c.doc, predictions.c.cancel_requested)
                   .where(predictions.c.status.in_(UNFINISHED),
                          or_(predictions.c.replica.is_(None), ~mine & predictions.c.replica.not_in(live)))
                   .with_for_update(skip_locked=True, of=predictions))
        with self._tx() as conn:
            rows = conn.execute(orphans).all()
            if rows:
                conn.execute(update(predictions).where(predictions.c.id.in_([r.id for r in rows]))
                             .values(replica=self.replica_id))
            conn.execute(delete(replicas).where(replicas.c.heartbeat < cutoff, replicas.c.id != self.replica_id))
        return [{**json.loads(r.doc), "_cancel_requested": bool(r.cancel_requested)} for r in rows]

    def request_cancel(self, prediction_id: str) -> bool:
        """Ask the replica running an unfinished prediction to cancel it; False if it has ended."""
        with self._tx() as conn:
            changed = conn.execute(update(predictions)
                                   .where(predictions.c.id == prediction_id, predictions.c.status.in_(UNFINISHED))
                                   .values(cancel_requested=True))
            return changed.rowcount > 0

    def cancel_requests(self) -> list[str]:
        """Ids of this replica's unfinished predictions that another replica asked to cancel."""
        with self._read() as conn:
            return list(conn.execute(select(predictions.c.id).where(
                predictions.c.replica == self.replica_id, predictions.c.cancel_requested,
                predictions.c.status.in_(UNFINISHED))).scalars())

    # ------------------------------------------------------------ sessions

    def create_session(self, owner: str | None, model: str | None, flow_id: str | None = None,
                       session_id: str | None = None, doc: dict | None = None) -> dict:
        """A new session. A key at its session limit gives up its least recently used sessions to
        make room: OpenAI-style chat completions open a session on every call that names none, so
        refusing here would end a stateless client's service after that many calls."""
        limit = self.max_sessions_per_owner
        now = utcnow()
        session_id = session_id or new_id()
        mine = sessions.c.owner.is_not_distinct_from(owner)
        row = {"id": session_id, "owner": owner, "flow_id": flow_id, "model": model, "created_at": now,
               "updated_at": now, "doc": json.dumps(doc or {})}
        with self._tx() as conn:
            if limit is not None:  # all but the owner's limit - 1 most recently used make room for this one
                oldest = list(conn.execute(select(sessions.c.id).where(mine)
                                           .order_by(sessions.c.updated_at.desc(), sessions.c.id.desc())
                                           .offset(max(limit - 1, 0))).scalars())
                if oldest:
                    conn.execute(delete(messages).where(messages.c.session_id.in_(oldest)))
                    conn.execute(delete(sessions).where(sessions.c.id.in_(oldest)))
            conn.execute(sessions.insert(), row)
        return self._session(self._as_stored(row))

    def get_session(self, session_id: str, owner: str | None) -> dict:
        """The session; NotFound if absent, Forbidden if another identity owns it."""
        with self._read() as conn:
            row = conn.execute(select(sessions).where(sessions.c.id == session_id)).mappings().first()
        if row is None:
            raise NotFound(f"Session {session_id} not found", param="session_id")
        if row["owner"] is not None and owner != row["owner"]:
            raise Forbidden(f"Session {session_id} belongs to another API key", param="session_id")
        return self._session(row)

    def _as_stored(self, row: dict) -> dict:
        """A row's values as this backend stores them (what reading the row back would give)."""
        return {key: Text().process_bind_param(value, self.engine.dialect) for key, value in row.items()}

    @staticmethod
    def _session(row) -> dict:
        return {"id": row["id"], "owner": row["owner"], "flow_id": row["flow_id"], "model": row["model"],
                "created_at": row["created_at"], "updated_at": row["updated_at"], **json.loads(row["doc"])}

    def find_session(self, session_id: str) -> dict | None:
        with self._read() as conn:
            found = conn.execute(select(sessions.c.id).where(sessions.c.id == session_id)).scalar()
        return {"id": found} if found is not None else None

    def list_sessions(self, owner: str | None, flow_id: str | None = None, *, after: str | None = None,
                      limit: int = 100) -> list[dict]:
        """Newest first, at most `limit`; `after` is the id of the last session of the previous
        page (NotFound when it is not one of the owner's sessions)."""
        query = select(sessions.c.id)
        if owner is not None:
            query = query.where(sessions.c.owner == owner)
        if flow_id is not None:
            query = query.where(sessions.c.flow_id == flow_id)
        if after is not None:
            last = self.get_session(after, owner)
            query = query.where(or_(sessions.c.created_at < last["created_at"],
                                    (sessions.c.created_at == last["created_at"]) & (sessions.c.id < last["id"])))
        query = query.order_by(sessions.c.created_at.desc(), sessions.c.id.desc()).limit(limit)
        with self._read() as conn:
            ids = list(conn.execute(query).scalars())
        return [self.get_session(session_id, owner) for session_id in ids]

    def count_sessions(self, owner: str | None) -> int:
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(sessions)
                                .where(sessions.c.owner.is_not_distinct_from(owner))).scalar_one()

    def touch_session(self, session_id: str) -> None:
        with self._tx() as conn:
            _touch(conn, session_id, utcnow())

    def delete_session(self, session_id: str, owner: str | None) -> None:
        self.get_session(session_id, owner)
        with self._tx() as conn:
            conn.execute(delete(messages).where(messages.c.session_id == session_id))
            conn.execute(delete(sessions).where(sessions.c.id == session_id))

    def expire_sessions(self, ttl_hours: float) -> int:
        cutoff = (datetime.now(UTC) - timedelta(hours=ttl_hours)).isoformat().replace("+00:00", "Z")
        with self._tx() as conn:
            old = list(conn.execute(select(sessions.c.id).where(sessions.c.updated_at < cutoff)).scalars())
            if old:
                conn.execute(delete(messages).where(messages.c.session_id.in_(old)))
                conn.execute(delete(sessions).where(sessions.c.id.in_(old)))
        return len(old)

    # ------------------------------------------------------------ messages

    def add_message(self, session_id: str, role: str, content: str | None, *, flow_id: str | None = None,
                    chat_id: str | None = None, doc: dict | None = None) -> dict:
        return self.add_messages(session_id, [(role, content, doc)], flow_id=flow_id, chat_id=chat_id)[-1]

    def add_messages(self, session_id: str, new: list[tuple[str, str | None, dict | None]], *,
                     flow_id: str | None = None, chat_id: str | None = None) -> list[dict]:
        """Append (role, content, doc) messages to a session in one transaction that also touches
        the session; returns the stored rows, oldest first."""
        now = utcnow()
        rows = [{"id": new_id(), "session_id": session_id, "flow_id": flow_id, "chat_id": chat_id, "role": role,
                 "content": content, "created_at": now, "doc": json.dumps(doc or {})} for role, content, doc in new]
        with self._tx() as conn:
            conn.execute(messages.insert(), rows)
            _touch(conn, session_id, now)
        return [self._message(self._as_stored(row)) for row in rows]

    def get_message(self, message_id: str) -> dict:
        with self._read() as conn:
            row = conn.execute(select(messages).where(messages.c.id == message_id)).mappings().first()
        if row is None:
            raise NotFound(f"Message {message_id} not found")
        return self._message(row)

    @staticmethod
    def _message(row) -> dict:
        return {"id": row["id"], "session_id": row["session_id"], "flow_id": row["flow_id"],
                "chat_id": row["chat_id"], "role": row["role"], "content": row["content"],
                "created_at": row["created_at"], **json.loads(row["doc"])}

    def messages(self, *, session_id: str | None = None, flow_id: str | None = None,
                 chat_id: str | None = None, since: str | None = None, until: str | None = None,
                 owner: str | None = None, newest_first: bool = False) -> list[dict]:
        """Messages matching every filter given; `owner` keeps those of sessions it owns."""
        query = select(messages)
        for column, value in ((messages.c.session_id, session_id), (messages.c.flow_id, flow_id),
                              (messages.c.chat_id, chat_id)):
            if value is not None:
                query = query.where(column == value)
        if owner is not None:
            query = query.where(messages.c.session_id.in_(select(sessions.c.id).where(sessions.c.owner == owner)))
        if since:
            query = query.where(messages.c.created_at >= since)
        if until:
            query = query.where(messages.c.created_at <= until)
        query = query.order_by(messages.c.seq.desc() if newest_first else messages.c.seq.asc())
        with self._read() as conn:
            return [self._message(row) for row in conn.execute(query).mappings()]

    def delete_messages(self, **filters: Any) -> int:
        doomed = [message["id"] for message in self.messages(**filters)]
        if doomed:
            with self._tx() as conn:
                conn.execute(delete(messages).where(messages.c.id.in_(doomed)))
        return len(doomed)

    # ------------------------------------------------------------ feedback

    def add_feedback(self, message_id: str, flow_id: str | None, chat_id: str | None, rating: str | None,
                     content: str | None) -> dict:
        self.get_message(message_id)
        feedback_id = new_id()
        with self._tx() as conn:
            conn.execute(feedback.insert().values(id=feedback_id, message_id=message_id, flow_id=flow_id,
                                                  chat_id=chat_id, rating=rating, content=content,
                                                  created_at=utcnow()))
            return dict(conn.execute(select(feedback).where(feedback.c.id == feedback_id)).mappings().one())

    def feedback(self, flow_id: str | None = None, chat_id: str | None = None) -> list[dict]:
        query = select(feedback)
        if flow_id is not None:
            query = query.where(feedback.c.flow_id == flow_id)
        if chat_id is not None:
            query = query.where(feedback.c.chat_id == chat_id)
        with self._read() as conn:
            return [dict(row) for row in conn.execute(query.order_by(feedback.c.created_at)).mappings()]

    # ------------------------------------------------------------ responses (OpenAI Responses API)

    def save_response(self, response_id: str, owner: str | None, status: str, doc: dict) -> None:
        statement = self._insert(responses).values(id=response_id, owner=owner, created_at=utcnow(),
                                                   status=status, doc=json.dumps(doc))
        statement = statement.on_conflict_do_update(
            index_elements=[responses.c.id], set_={"status": statement.excluded.status,
                                                   "doc": statement.excluded.doc})
        with self._tx() as conn:
            conn.execute(statement)

    def get_response(self, response_id: str, owner: str | None) -> dict:
        """The stored document; NotFound if absent or owned by another identity (a response's
        existence is not revealed to other keys)."""
        with self._read() as conn:
            row = conn.execute(select(responses.c.owner, responses.c.doc)
                               .where(responses.c.id == response_id)).first()
        if row is None or row.owner not in (owner, None):
            raise NotFound(f"Response with id '{response_id}' not found.")
        return json.loads(row.doc)

    def delete_response(self, response_id: str, owner: str | None) -> None:
        self.get_response(response_id, owner)
        with self._tx() as conn:
            conn.execute(delete(responses).where(responses.c.id == response_id))
