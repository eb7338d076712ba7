"""A real PostgreSQL server for the store tests (never a mock), and a fresh database per test.

Where the server comes from, in order:
1. `RESYNTH_TEST_POSTGRES`: a URL of a role allowed to create databases (`.ci/run` starts a server and
   sets it);
2. a throwaway server started here from Debian's binaries (/usr/lib/postgresql/*/bin): `initdb` in a
   temporary folder on a free loopback port, trust authentication, stopped at exit. `initdb` refuses to
   run as root, so as root it runs as the `postgres` user (runuser).
If neither works, `available()` says why and the PostgreSQL variants of the tests are skipped with it.
"""
from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ENV = "RESYNTH_TEST_POSTGRES"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@dataclass
class Server:
    """A throwaway PostgreSQL server: `url` is its superuser's URL on the `postgres` database."""

    folder: Path
    port: int
    bin_dir: Path
    as_postgres: bool
    stopped: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        done = self._run("pg_ctl", "-D", str(self.folder / "data"), "-o", options, "-l", str(self.folder / "log"),
                         "-w", "-t", "60", "start")
        if done.returncode != 0:
            log = (self.folder / "log").read_text() if (self.folder / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {log[-500:]}")
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
            self.stopped = True

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_server() -> Server:
    """initdb + pg_ctl start in a new temporary folder; RuntimeError with the reason if impossible."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin); install Debian's postgresql")
    as_postgres = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="resynth-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    server = Server(folder, _free_port(), bin_dir, as_postgres)
    done = server._run("initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync",
                       "-E", "UTF8", "--locale=C")
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {(done.stderr or done.stdout).strip()[-300:]}")
    try:
        server.start()
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    atexit.register(server.destroy)
    return server


_state: dict = {}


def admin_url() -> str | None:
    """A URL allowed to create databases, or None (then `why()` says why); the server starts once."""
    if "url" not in _state:
        if os.environ.get(ENV):
            _state["url"], _state["why"] = os.environ[ENV], None
        else:
            try:
                _state["server"] = start_server()
                _state["url"], _state["why"] = _state["server"].url, None
            except Exception as exc:  # no binaries, not allowed to run them, ...: the reason is the skip
                _state["url"], _state["why"] = None, f"no PostgreSQL server ({ENV} unset; {exc})"
        if _state["url"]:
            try:
                _admin("SELECT 1")
            except Exception as exc:
                _state["url"], _state["why"] = None, f"PostgreSQL at {ENV} unreachable: {str(exc).splitlines()[0]}"
    return _state["url"]


def superuser() -> bool:
    """Whether the admin role may create roles and hand them databases (the tests of other roles' grants)."""
    if not admin_url():
        return False
    return bool(sql(_state["url"], "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")[0][0][0])


def why() -> str:
    admin_url()
    return _state.get("why") or ""


def _admin(sql: str, url: str | None = None) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url or _state["url"])
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database or "postgres",
                         password=u.password, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


def create_database() -> str:
    """A new, empty database on the test server; its URL (drop it with `drop_database`)."""
    url = admin_url()
    assert url, why()
    name = f"rs_{uuid.uuid4().hex[:16]}"
    _admin(f'CREATE DATABASE "{name}"')
    return _with_database(url, name)


def drop_database(url: str) -> None:
    from sqlalchemy.engine import make_url

    _admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def sql(url: str, *statements: str) -> list:
    """Run statements on a store's database with a plain connection (as `_sql` does on SQLite files)."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    out = []
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, password=u.password,
                         autocommit=True, connect_timeout=10) as conn:
        for statement in statements:
            cursor = conn.execute(statement)
            out.append(cursor.fetchall() if cursor.description else [])
    return out


def database_on(server_url: str) -> str:
    """A new database on another server (e.g. a private `start_server()`), as `create_database` makes."""
    name = f"rs_{uuid.uuid4().hex[:16]}"
    _admin(f'CREATE DATABASE "{name}"', server_url)
    return _with_database(server_url, name)
