"""The store's tables (SQLAlchemy Core, one definition for SQLite and PostgreSQL) and its migrations.

Each record is a few indexed columns plus a JSON document (`doc`, text), so the dialects keep their
own fields without schema churn; columns exist only for what is filtered, sorted or claimed on.

`migrate` brings any database to SCHEMA_VERSION, idempotently and once per database however many
replicas start together: a new database gets the current tables at once; a database made before
versioning (SQLite files of earlier releases) is upgraded step by step. The version is kept in the
one-row table `schema_version`. On PostgreSQL the whole migration is one transaction under an
advisory lock (DDL is transactional there), so a second replica waits, then finds nothing to do.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (Boolean, Column, Connection, Double, Index, Integer, MetaData, Table, false, inspect,
                        select, text)
from sqlalchemy import Text as PlainText
from sqlalchemy.types import TypeDecorator

SCHEMA_VERSION = 3
MIGRATION_LOCK_KEY = 0x656D626572  # "ember": the advisory lock that serialises migrations on PostgreSQL


class Text(TypeDecorator):
    """Text that PostgreSQL takes whatever the client sent: it refuses NUL characters in strings,
    so they are stored (and looked up) as U+FFFD there. SQLite keeps them."""

    impl = PlainText
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if isinstance(value, str) and dialect.name == "postgresql" and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value


metadata = MetaData()

predictions = Table(
    "predictions", metadata,
    Column("id", Text, primary_key=True),
    Column("owner", Text),
    Column("created_at", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("model", Text),
    Column("version", Text),
    Column("source", Text),
    Column("doc", Text, nullable=False),
    Column("replica", Text),  # the server replica running it (its records win; see Store.save_predictions)
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
)
Index("predictions_owner_created", predictions.c.owner, predictions.c.created_at.desc())
PREDICTIONS_STATUS = Index("predictions_status", predictions.c.status)

sessions = Table(
    "sessions", metadata,
    Column("id", Text, primary_key=True),
    Column("owner", Text),
    Column("flow_id", Text),
    Column("model", Text),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("doc", Text, nullable=False, server_default="{}"),
)
# an owner's sessions, least recently used first: the ones a key at its session limit gives up
SESSIONS_OWNER_USED = Index("sessions_owner_used", sessions.c.owner, sessions.c.updated_at, sessions.c.id)

messages = Table(
    "messages", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", Text, unique=True, nullable=False),
    Column("session_id", Text, nullable=False),
    Column("flow_id", Text),
    Column("chat_id", Text),
    Column("role", Text, nullable=False),
    Column("content", Text),
    Column("created_at", Text, nullable=False),
    Column("doc", Text, nullable=False, server_default="{}"),
    sqlite_autoincrement=True,  # as before versioning: a deleted message's seq is never reused
)
Index("messages_session", messages.c.session_id, messages.c.seq)
Index("messages_flow", messages.c.flow_id, messages.c.seq)

feedback = Table(
    "feedback", metadata,
    Column("id", Text, primary_key=True),
    Column("message_id", Text, nullable=False),
    Column("flow_id", Text),
    Column("chat_id", Text),
    Column("rating", Text),
    Column("content", Text),
    Column("created_at", Text, nullable=False),
)

responses = Table(
    "responses", metadata,
    Column("id", Text, primary_key=True),
    Column("owner", Text),
    Column("created_at", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("doc", Text, nullable=False),
)

replicas = Table(
    "replicas", metadata,
    Column("id", Text, primary_key=True),
    Column("host", Text),
    Column("pid", Integer),
    Column("started_at", Text, nullable=False),
    Column("heartbeat", Double, nullable=False),  # time.time() of its last heartbeat
)

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))


def _add_replica_columns(conn: Connection) -> None:
    """2: predictions name the replica running them and carry cancel requests from other replicas."""
    present = {c["name"] for c in inspect(conn).get_columns("predictions")}
    if "replica" not in present:
        conn.execute(text("ALTER TABLE predictions ADD COLUMN replica TEXT"))
    if "cancel_requested" not in present:
        conn.execute(text("ALTER TABLE predictions ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE"))
    PREDICTIONS_STATUS.create(conn, checkfirst=True)


def _add_sessions_owner_index(conn: Connection) -> None:
    """3: an index of each owner's sessions by last use."""
    SESSIONS_OWNER_USED.create(conn, checkfirst=True)


# Steps that upgrade a database of version N-1 to N; each is idempotent (a new database already
# has what they add).
STEPS: dict[int, Callable[[Connection], None]] = {2: _add_replica_columns, 3: _add_sessions_owner_index}


def current_version(conn: Connection) -> int:
    """The database's schema version: 0 when it has no tables, 1 for a database made before
    versioning."""
    tables = set(inspect(conn).get_table_names())
    if "schema_version" in tables:
        found = conn.execute(select(schema_version.c.version)).scalar()
        if found is not None:
            return found
    return 1 if "predictions" in tables else 0


def migrate(conn: Connection) -> int:
    """Bring the database to SCHEMA_VERSION inside the caller's transaction; returns the version
    found before (0 for a new database)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise RuntimeError(f"the database has schema version {found}, newer than this ember's "
                           f"{SCHEMA_VERSION}: upgrade ember")
    if found == SCHEMA_VERSION:
        return found
    metadata.create_all(conn, checkfirst=True)
    for version in range(max(found, 1) + 1, SCHEMA_VERSION + 1):
        STEPS[version](conn)
    conn.execute(schema_version.delete())
    conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
    return found
