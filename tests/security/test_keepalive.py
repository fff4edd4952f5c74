"""After an early refusal the connection still works, or the answer says it will close (issue 12, item 5).

Before: a PUT of 200 KB refused with 401 before its body was read was
answered ``Connection: keep-alive``, then gunicorn (which drains at most
64 KiB) closed the socket, and the client's next request on it failed.
These tests speak HTTP/1.1 over one raw socket to a real gunicorn started
with the Makefile's flags (tests/security/gunicorn.py).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import pytest

from portal.images.models import Image
from portal.tenancy.models import APIToken, Membership, Tenant
from tests.portal.conftest import make_user
from tests.security.gunicorn import Gunicorn, gunicorn

__all__ = ["gunicorn"]
# HTTP framing in gunicorn, whatever the database: the PostgreSQL pass leaves it out
pytestmark = [pytest.mark.slow, pytest.mark.db_agnostic]


class Conn:
    """One keep-alive connection; requests are written whole or with the body from a thread."""

    def __init__(self, server: Gunicorn) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.buf = b""
        self.sender: threading.Thread | None = None

    def send(
        self, method: str, path: str, body: bytes = b"", length: int | None = None, **headers: str
    ) -> None:
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length or len(body)}"]
        head += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if body:
            # the server may answer before it reads: send the body alongside, as a client would

            def send_body() -> None:
                with contextlib.suppress(OSError):  # the server may close while it arrives
                    self.sock.sendall(body)

            self.sender = threading.Thread(target=send_body, daemon=True)
            self.sender.start()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a response; got {self.buf[:200]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n and self._fill():
                pass
            body, self.buf = self.buf[:n], self.buf[n:]
        else:  # chunked
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buf) < size + 2:
                    self._fill()
                body, self.buf = body + self.buf[:size], self.buf[size + 2 :]
                if size == 0:
                    break
        return status, headers, body

    def closed_by_server(self) -> bool:
        self.sock.settimeout(10)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        if self.sender is not None:
            self.sender.join(10)
        self.sock.close()


@pytest.fixture
def conn(gunicorn: Gunicorn) -> Any:
    c = Conn(gunicorn)
    yield c
    c.close()


def _token(image_owner: Tenant) -> str:
    user = make_user(f"u{image_owner.slug}")
    m = Membership.objects.create(user=user, tenant=image_owner, role="member")
    token = APIToken(user=user, membership=m, name="t", expires_at="2999-01-01T00:00:00Z")
    key = token.issue()
    token.save()
    return key


def test_a_200_kb_put_refused_with_401_keeps_the_connection(conn: Conn) -> None:
    """The issue's case: the answer says keep-alive, and the next request on the socket works."""
    conn.send(
        "PUT", "/api/v1/images/1/file/?type=qcow2", b"x" * 200_000, Content_Type="application/octet-stream"
    )
    status, headers, _ = conn.response()
    assert status == 401
    assert headers["connection"] == "keep-alive"
    conn.send("GET", "/healthz")
    status, headers, body = conn.response()
    assert status == 200 and body == b'{"status": "ok"}'
    conn.send("GET", "/api/v1/flavors/")  # and the one after
    assert conn.response()[0] == 401


def test_a_larger_unread_body_is_answered_connection_close(conn: Conn) -> None:
    conn.send("PUT", "/api/v1/images/1/file/?type=qcow2", b"x" * (3 * 2**20),
              Content_Type="application/octet-stream")  # fmt: skip
    status, headers, _ = conn.response()
    assert status == 401
    assert headers["connection"] == "close"
    assert conn.closed_by_server()


def test_an_upload_declared_over_the_limit_is_413_and_close(conn: Conn, settings: Any) -> None:
    """Refused by its Content-Length alone (30 GiB over the 20 GiB limit): its body is never awaited."""
    acme = Tenant.objects.create(slug="acme", name="Acme")
    image = Image.objects.create(name="big", version="1", owner=acme)
    conn.send("PUT", f"/api/v1/images/{image.pk}/file/?type=qcow2", b"QFI\xfb", length=30 * 2**30,
              Authorization=f"Bearer {_token(acme)}", Content_Type="application/octet-stream")  # fmt: skip
    status, headers, body = conn.response()
    assert status == 413, body
    assert headers["connection"] == "close"
    assert conn.closed_by_server()


def test_a_body_the_view_read_keeps_the_connection(conn: Conn) -> None:
    acme = Tenant.objects.create(slug="acme", name="Acme")
    key = _token(acme)
    conn.send("POST", "/api/v1/ssh-keys/", b'{"name": "k", "public_key": "nope"}',
              Authorization=f"Bearer {key}", Content_Type="application/json")  # fmt: skip
    status, headers, _ = conn.response()
    assert status == 400 and headers["connection"] == "keep-alive"
    conn.send("GET", "/api/v1/ssh-keys/", Authorization=f"Bearer {key}")
    assert conn.response()[0] == 200
