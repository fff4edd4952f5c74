"""A request refused before its body was read leaves its connection usable, or says it will not.

Many refusals come before the body is looked at: 401 for a missing token,
413 for an upload whose declared length is over the limit, 404, 405.  The
body is still on its way.  gunicorn drains at most 64 KiB of it after the
response and otherwise closes the connection, after it has answered
``Connection: keep-alive``: a client that sends its next request on that
connection gets EPIPE or a reset (a 200 KB PUT refused with 401 did).

This WSGI middleware wraps the Django application (``portal.wsgi``).  It
counts what the application read of ``wsgi.input``; when the application
has answered, before the answer is sent:

* nothing left: nothing to do;
* at most ``SKYPORT_DRAIN_MAX_BYTES`` (1 MiB) left: keep the connection;
  the rest is read and dropped once the answer is out (bounded by
  ``SKYPORT_DRAIN_SECONDS`` on the socket), so the next request on the
  connection starts where it should;
* more left, or a chunked body of unknown length: the answer says
  ``Connection: close`` (gunicorn's ``Response.force_close``, reached
  through the ``start_response`` it passed in) and the connection ends.

Other servers (Django's development and test servers) drain the body
themselves; for them the middleware only counts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django.conf import settings

CHUNK = 64 * 1024
_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _CountingInput:
    """``wsgi.input`` that counts the bytes read through it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size) if size is not None and size >= 0 else self.stream.read()
        self.read_bytes += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data: bytes = self.stream.readline(size) if size is not None and size >= 0 else self.stream.readline()
        self.read_bytes += len(data)
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = self.stream.readlines(hint)
        self.read_bytes += sum(len(line) for line in lines)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


def _unread(environ: dict[str, Any], body: _CountingInput) -> int | None:
    """Bytes of the body the application left unread: 0, a count, or None when unknown (chunked)."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return None
    length = environ.get("CONTENT_LENGTH") or ""
    return max(0, int(length) - body.read_bytes) if length.isdigit() else 0


def _force_close(start_response: Callable[..., Any]) -> bool:
    """Make the server answer ``Connection: close`` (gunicorn); False when it cannot be told."""
    response = getattr(start_response, "__self__", None)
    force_close = getattr(response, "force_close", None)
    if callable(force_close):
        force_close()
        return True
    return False


class _DrainAfter:
    """The application's answer; when the server has sent it, the rest of the body is read."""

    def __init__(self, answer: Iterable[bytes], environ: dict[str, Any], body: _CountingInput, left: int):
        self.answer = answer
        self.environ = environ
        self.body = body
        self.left = left

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.answer)

    def close(self) -> None:
        try:
            close = getattr(self.answer, "close", None)
            if close is not None:
                close()
        finally:
            self._drain()

    def _drain(self) -> None:
        seconds = settings.SKYPORT_DRAIN_SECONDS
        deadline = time.monotonic() + seconds
        sock = self.environ.get("gunicorn.socket")
        before = sock.gettimeout() if sock is not None else None
        try:
            if sock is not None:
                sock.settimeout(seconds)
            while self.left > 0 and time.monotonic() < deadline:
                data = self.body.read(min(CHUNK, self.left))
                if not data:
                    break
                self.left -= len(data)
        except OSError:
            pass  # a stalled or gone client: the server closes the connection (its body is unread)
        finally:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(before)


class UnreadBodyMiddleware:
    def __init__(self, app: _WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = _CountingInput(environ["wsgi.input"])
        environ["wsgi.input"] = body
        answer = self.app(environ, start_response)
        left = _unread(environ, body)
        if left == 0:
            return answer
        if left is None or left > settings.SKYPORT_DRAIN_MAX_BYTES:
            _force_close(start_response)
            return answer
        return _DrainAfter(answer, environ, body, left)
