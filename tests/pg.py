"""A throwaway PostgreSQL server for the test session, and an empty database per test.

The server starts once, on first use (:func:`new_dsn`), from the binaries on PATH or under
Debian's ``/usr/lib/postgresql/*/bin``: ``initdb`` (trust auth, UTF8, C locale) in a
temporary directory, ``pg_ctl start`` listening on 127.0.0.1 on a free port and on a Unix
socket in that directory.  ``fsync`` stays on: durability is what the queue promises, so
the tests run against a server that keeps it.  :func:`stop` (``pg_ctl stop -m fast``, then
the directory is removed) runs at the end of the session (``tests/conftest.py``) and at
exit.

PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
unprivileged ``nobody`` and owns its directory.

Each :func:`new_dsn` is a new, empty schema of the session's database, named first on the
DSN's ``search_path`` (``options=-csearch_path=...``): to the queue it is an empty database,
and tests are isolated from each other (a schema costs about a millisecond, a ``CREATE
DATABASE`` a fifth of a second).  LISTEN/NOTIFY channels are database-wide: tests that
listen must not run concurrently with others that enqueue (pytest runs one at a time).

Without the server binaries the PostgreSQL tests are skipped, saying why, unless ``CI`` is
set: under CI a missing PostgreSQL fails them.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

UNPRIVILEGED = "nobody"
SUPERUSER = "postgres"
DATABASE = "gateway_test"


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or the newest Debian version directory."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    root: Path
    port: int
    bin: Path
    run_as: dict[str, Any]
    started_in: float  # seconds: initdb + pg_ctl start
    options: str = ""  # the postgres options it was started with

    def halt(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected), keeping its data."""
        stopped = self.pg_ctl("-m", "fast", "-w", "stop")
        if stopped.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {stopped.stderr.strip()}")

    def resume(self) -> None:
        """Start it again after :meth:`halt`, on the same port and data."""
        started = self.pg_ctl(
            "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o", self.options, "start"
        )
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}")

    def remove(self) -> None:
        """Stop it (if running) and delete its directory."""
        self.pg_ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dsn(self, dbname: str = DATABASE, schema: str | None = None) -> str:
        base = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"
        return base if schema is None else f"{base}?options=-csearch_path%3D{schema}"

    def pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self.run_as,
        )


_server: Server | None = None
_failed: str | None = None
_lock = threading.Lock()
_numbers = itertools.count(1)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


def start_private() -> Server:
    """A server of its own for one test that stops and starts it (the session's server is
    shared); the caller removes it (:meth:`Server.remove`)."""
    return _start(session=False)


def _start(*, session: bool = True) -> Server:
    found = bin_dir()
    if found is None:
        raise FileNotFoundError(
            "initdb/pg_ctl not found on PATH or under /usr/lib/postgresql/*/bin "
            "(make system-deps installs Debian's postgresql)"
        )
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = pwd.getpwnam(UNPRIVILEGED)
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    root.chmod(0o700)
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=200"
        " -c fsync=on -c synchronous_commit=on"
    )
    server = Server(root, port, found, run_as, 0.0, options)
    init = subprocess.run(
        [
            str(found / "initdb"),
            "-D",
            str(server.data),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",  # initdb's own final sync only; the server keeps fsync on
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=root,
        **run_as,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stderr.strip()[-2000:]}")
    started = server.pg_ctl(
        "-l", str(root / "server.log"), "-w", "-t", "60", "-o", options, "start"
    )
    if started.returncode != 0:
        log = (root / "server.log").read_text(errors="replace")[-2000:]
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()} {log}")
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    server.started_in = time.monotonic() - began
    if session:
        atexit.register(stop)
    return server


def server() -> Server:
    """The session's server, started on first use; skips (or, under CI, fails) the calling
    test when PostgreSQL cannot be started."""
    global _server, _failed
    with _lock:
        if _server is None and _failed is None:
            try:
                _server = _start()
            except (OSError, RuntimeError, subprocess.SubprocessError, psycopg.Error) as exc:
                _failed = str(exc)
        if _server is None:
            _unavailable(_failed or "not started")
        assert _server is not None
        return _server


def new_dsn() -> str:
    """The DSN of a new, empty schema (to the queue: an empty database) on the session's
    server."""
    srv = server()
    name = f"t{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(srv.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return srv.dsn(schema=name)


def stop() -> None:
    """Stop the server (fast shutdown) and remove its directory."""
    global _server
    with _lock:
        srv, _server = _server, None
    if srv is None:
        return
    srv.pg_ctl("-m", "fast", "-w", "stop")
    shutil.rmtree(srv.root, ignore_errors=True)
