"""A real PostgreSQL server for the `postgres` tests: a cluster of its own (initdb in a temp
folder, pg_ctl on a free loopback port), one database per test. PostgreSQL refuses to run as
root, so under root the cluster runs as `nobody`. Tests skip, saying why, when the PostgreSQL
binaries are not installed (Debian: `apt-get install postgresql`)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.jobs import new_id


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<major>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresServer:
    port: int
    folder: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"ember_{new_id(12)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _run_as_cluster_user(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    user = {"user": "nobody"} if os.geteuid() == 0 else {}
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120, **user, **kwargs)


@pytest.fixture(scope="session")
def postgres_server():
    from tests.conftest import free_port

    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin; "
                    "Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'ember[postgres]')")
    folder = Path(tempfile.mkdtemp(prefix="ember-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "nobody")
    data = folder / "data"
    port = free_port()
    _run_as_cluster_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                          "--no-sync", "-E", "UTF8"])
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    _run_as_cluster_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"),
                          "-w", "start"])
    try:
        yield PostgresServer(port, folder)
    finally:
        _run_as_cluster_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def postgres_url(postgres_server) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return postgres_server.create_database()
