"""The portal under a real gunicorn, with the flags `make run` gives it (Makefile GUNICORN_FLAGS).

Some defects only show through the real server stack: what reaches the
server's log (a 500's traceback), and what happens to a keep-alive
connection after an early refusal.  The server uses the test database (a
SQLite file; tests using it need ``transactional_db``), logs into a
directory of the test's own, and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]


def make_run_flags() -> list[str]:
    """GUNICORN_FLAGS from the Makefile: the tests run the server as `make run` does."""
    found = re.search(r"^GUNICORN_FLAGS := (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert found, "Makefile has no GUNICORN_FLAGS"
    return shlex.split(found[1])


def database_url() -> str:
    """The test database (SQLite file, or the PostgreSQL pass's), for servers and workers in other
    processes."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    password = f":{quote(db['PASSWORD'], safe='')}" if db.get("PASSWORD") else ""
    host = quote(db.get("HOST") or "", safe="")  # a socket directory is a path
    return f"postgres://{db.get('USER') or ''}{password}@{host}:{db.get('PORT') or 5432}/{db['NAME']}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gunicorn:
    def __init__(self, base: Path, settings_module: str = "portal.settings") -> None:
        self.base = base
        self.port = _free_port()
        self.error_log = base / "web.log"
        self.access_log = base / "web-access.log"
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": settings_module,
            "DATABASE_URL": database_url(),
            "SKYPORT_VAR_DIR": str(base / "var"),
            "SKYPORT_SECRET_KEY": secrets.token_urlsafe(50),
            "SKYPORT_IMAGE_STORE": str(settings.SKYPORT_IMAGE_STORE),
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "SKYPORT_CACHE_URL": settings.CELERY_BROKER_URL,
        }
        cmd = [
            str(Path(sys.executable).with_name("gunicorn")), "portal.wsgi", "-b", f"127.0.0.1:{self.port}",
            *make_run_flags(), "-w", "1",  # one worker is enough here (the last -w wins)
            "--error-logfile", str(self.error_log), "--access-logfile", str(self.access_log),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    if s.recv(100).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                time.sleep(0.1)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"gunicorn did not start:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@contextlib.contextmanager
def serve(tmp_path: Path, settings_module: str = "portal.settings") -> Iterator[Gunicorn]:
    server = Gunicorn(tmp_path, settings_module)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gunicorn(tmp_path: Path, transactional_db: Any) -> Iterator[Gunicorn]:
    with serve(tmp_path) as server:
        yield server
