"""The console relay: one WebSocket per session, bridged to a node's console hub through Redis.

An ASGI application (served by uvicorn, :mod:`portal.asgi`), so thousands of
idle sessions cost a coroutine each, not a thread.  ``/ws/console/<ticket>/``:

1. the ``Origin`` must be one of the portal's own (``ALLOWED_HOSTS`` or
   ``CSRF_TRUSTED_ORIGINS``); a browser on another site cannot ride a
   user's ticket (clients without a browser send no Origin and are let in:
   the ticket alone authorises them);
2. the ticket is redeemed once (:func:`portal.console.services.redeem`),
   which asks the node to start the hub;
3. output (binary frames) flows from the hub's ``:out`` stream, input
   (binary frames, or text ``{"type": "input", "data": ...}``, and
   ``{"type": "resize", "cols": c, "rows": r}``) goes to ``:in`` unless the
   session only views; text frames from the relay say ``ready``, ``notice``
   and, before it closes, ``closed`` with the reason.

Every refusal and every end is a WebSocket close with a code and a one-line
reason (see :data:`CLOSE`); the session's end is written with its reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http.request import validate_host

from compute.console.streams import IN_MAXLEN, LEASE_EVERY, LEASE_TTL, HubKeys, is_ready, redis_url
from compute.spec import ConsoleMode
from portal.console import services
from portal.console.models import ConsoleSession

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: close codes (4000-4999 are the application's): what a client can act on
CLOSE = {
    "ended": 1000,  # the command exited or the VM stopped
    "error": 1011,
    "ticket": 4401,  # unknown, used or expired ticket, or the instance is no longer usable
    "origin": 4403,
    "not_found": 4404,
    "idle": 4408,
    "node_gone": 4410,  # the node's hub went away (worker restart): open a new session
    "node_timeout": 4504,
}
PATH = re.compile(r"/ws/console/([A-Za-z0-9_-]{20,128})/?")
OPEN_TIMEOUT = 20.0  # the node starts a hub within this (a Python process plus a libvirt lookup)


def origin_allowed(origin: str) -> bool:
    """Whether a browser's Origin is the portal itself."""
    if origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.netloc.rsplit("@", 1)[-1]
    return validate_host(host.split(":")[0] if host.count(":") == 1 else host, settings.ALLOWED_HOSTS)


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    """The relay's ASGI entry point for WebSocket scopes."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    session = Session(scope, receive, send)
    await session.run()


class Session:
    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self._send = send
        self.closed = False
        self.last_activity = time.monotonic()
        self.told_read_only = False

    async def close(self, kind: str, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        reason = reason.strip()
        try:
            await self._send(
                {"type": "websocket.send", "text": json.dumps({"type": "closed", "reason": reason})}
            )
            # a close frame's reason is limited to 123 bytes
            short = reason.encode()[:123].decode(errors="ignore")
            await self._send({"type": "websocket.close", "code": CLOSE[kind], "reason": short})
        except Exception:  # the client is already gone
            log.debug("console client gone before close", exc_info=True)

    async def text(self, **message: Any) -> None:
        await self._send({"type": "websocket.send", "text": json.dumps(message)})

    async def run(self) -> None:
        match = PATH.fullmatch(self.scope.get("path", ""))
        if match is None:
            await self.close("not_found", "no such console endpoint: use /ws/console/<ticket>/")
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin):
            await self.close("origin", f"origin {origin[:60]} is not allowed")
            return
        try:
            session: ConsoleSession = await sync_to_async(services.redeem)(match.group(1))
        except services.TicketRefused as exc:
            await self.close("ticket", str(exc))
            return
        url = redis_url(settings.CELERY_BROKER_URL) or "redis://"  # redeem() refused any other broker
        r: aioredis.Redis = aioredis.from_url(url)  # type: ignore[no-untyped-call]
        kind, reason = "error", "the relay failed"
        try:
            kind, reason = await self.bridge(r, session)
        except Exception:
            log.exception("console session %s failed", session.pk)
        finally:
            if session.mode == ConsoleMode.EXEC:  # its own hub: end it now, not when the lease runs out
                await r.delete(HubKeys(session.hub).lease)
            await r.aclose()
            await sync_to_async(services.end)(session, reason)
            await self.close(kind, reason)

    async def bridge(self, r: aioredis.Redis, session: ConsoleSession) -> tuple[str, str]:
        keys = HubKeys(session.hub)
        mode = ConsoleMode(session.mode)
        await r.set(keys.lease, str(session.pk), ex=LEASE_TTL)
        shared_hub_running = mode is not ConsoleMode.EXEC and is_ready(await r.get(keys.alive))
        deadline = time.monotonic() + OPEN_TIMEOUT
        while not is_ready(await r.get(keys.alive)):
            ended = await _end_entry(r, keys)
            if ended is not None:
                return ended
            if time.monotonic() > deadline:
                return "node_timeout", "the node did not open the console in time; try again"
            await asyncio.sleep(0.05)
        start = "0-0"
        if shared_hub_running:  # join at the present: the history is the console log's
            last = await r.xrevrange(keys.out, count=1)
            start = last[0][0].decode() if last else "0-0"
        await self.text(type="ready", session=str(session.pk), mode=mode.value)
        tasks = {
            asyncio.create_task(self.pump_out(r, keys, start, mode), name="out"),
            asyncio.create_task(self.pump_in(r, keys, mode), name="in"),
            asyncio.create_task(self.watch(r, keys, mode), name="watch"),
        }
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result: tuple[str, str] = next(iter(done)).result()
        return result

    async def pump_out(
        self, r: aioredis.Redis, keys: HubKeys, last: str, mode: ConsoleMode
    ) -> tuple[str, str]:
        while True:
            got = await r.xread({keys.out: last}, count=64, block=1000)
            for _key, entries in got or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    if b"end" in fields:
                        return _ended(fields)
                    # awaiting the send is the backpressure: a slow client slows this reader, and
                    # the capped stream drops what it cannot keep instead of this process buffering
                    try:
                        await self._send({"type": "websocket.send", "bytes": fields[b"d"]})
                    except OSError:  # uvicorn's ClientDisconnected: the client went away mid-send
                        self.closed = True
                        return "ended", "the client closed the console"
                    if mode is ConsoleMode.VIEW:
                        self.last_activity = time.monotonic()

    async def pump_in(self, r: aioredis.Redis, keys: HubKeys, mode: ConsoleMode) -> tuple[str, str]:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                self.closed = True
                return "ended", "the client closed the console"
            data: bytes | None = message.get("bytes")
            text: str | None = message.get("text")
            if text is not None:
                try:
                    control = json.loads(text)
                except ValueError:
                    control = {}
                if not isinstance(control, dict):
                    control = {}
                if control.get("type") == "resize":
                    try:
                        size = f"{int(control['cols'])} {int(control['rows'])}"
                    except (KeyError, TypeError, ValueError):
                        continue
                    await r.xadd(keys.inp, {"size": size}, maxlen=IN_MAXLEN, approximate=True)
                    continue
                if control.get("type") == "input" and isinstance(control.get("data"), str):
                    data = control["data"].encode()
            if not data:
                continue
            if mode is ConsoleMode.VIEW:
                if not self.told_read_only:
                    self.told_read_only = True
                    await self.text(type="notice", message="view only: your keystrokes are not sent")
                continue
            self.last_activity = time.monotonic()
            await r.xadd(keys.inp, {"d": data[:65536]}, maxlen=IN_MAXLEN, approximate=True)

    async def watch(self, r: aioredis.Redis, keys: HubKeys, mode: ConsoleMode) -> tuple[str, str]:
        idle = settings.SKYPORT_CONSOLE_IDLE_SECONDS
        next_lease = time.monotonic() + LEASE_EVERY
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now >= next_lease:
                await r.set(keys.lease, "relay", ex=LEASE_TTL)
                next_lease = now + LEASE_EVERY
            if now - self.last_activity > idle:
                return "idle", f"idle for {idle:g} s: closed"
            if not await r.exists(keys.alive):
                ended = await _end_entry(r, keys)
                if ended is not None:
                    return ended
                return "node_gone", "the node's console went away (its worker restarted?): open a new session"


def _ended(fields: dict[bytes, bytes]) -> tuple[str, str]:
    """The close kind and reason of a hub's last entry."""
    why = fields.get(b"why", b"ended").decode()
    return (why if why in CLOSE else "ended"), fields[b"end"].decode()


async def _end_entry(r: aioredis.Redis, keys: HubKeys) -> tuple[str, str] | None:
    """How a hub ended, if its last entry says so."""
    last = await r.xrevrange(keys.out, count=1)
    if last and b"end" in last[0][1]:
        return _ended(last[0][1])
    return None
