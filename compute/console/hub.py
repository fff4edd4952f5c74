"""The console hub: one process per terminal on a node, bridging it to Redis streams.

The worker's ``compute.console.open`` task starts it (``python -m
compute.console.hub`` with a :class:`~compute.spec.ConsoleOpen`) and returns
at once, so a session never holds one of the worker's slots.  The hub claims
``<prefix>:alive`` (a second hub for the same name exits), opens the terminal
through the instance's driver, then copies output into the capped ``:out``
stream and input from ``:in`` into the terminal.  It ends, writing the reason
as the last entry of ``:out``, when

* the terminal closes (the VM stopped, the command exited: with its status),
* no relay session holds the lease any more (idle),
* the worker that started it is gone (a node worker restart ends its consoles,
  so a client is told and opens a new session instead of typing into nothing).

Memory is bounded by construction: one read of at most ``CHUNK`` bytes at a
time, streams capped at ``OUT_MAXLEN``/``IN_MAXLEN`` entries.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import sys
import threading
import time
from typing import Any

import redis

from compute.config import NodeConfig
from compute.console.streams import (
    ALIVE_TTL,
    CHUNK,
    END_KEEP,
    LEASE_TTL,
    NO_REDIS,
    OUT_MAXLEN,
    STARTING,
    HubKeys,
    redis_url,
)
from compute.console.terminal import Terminal, open_exec, open_serial
from compute.drivers.base import Driver, DriverError
from compute.spec import ConsoleMode, ConsoleOpen, from_json, to_json

log = logging.getLogger(__name__)


def open_terminal(driver: Driver, message: ConsoleOpen) -> Terminal:
    """The terminal ``message`` asks for, through the instance's driver (the driver knows the workload)."""
    if message.mode is ConsoleMode.EXEC:
        return open_exec(driver.exec_argv(message.instance_id, message.command, tty=True))
    return open_serial(driver.serial_pty(message.instance_id))


class Hub:
    """Bridges one :class:`Terminal` and the hub's streams until one of the ends above."""

    def __init__(self, client: redis.Redis, message: ConsoleOpen, parent: int | None = None) -> None:
        self.r = client
        self.message = message
        self.keys = HubKeys(message.hub)
        self.parent = parent
        self.token = f"{os.uname().nodename}:{os.getpid()}"
        self.stop = threading.Event()
        self.reason = ""
        self.why = "ended"  # for the relay's close code: ended | idle | node_gone | error

    def claim(self) -> bool:
        """Claim the hub's name; readers wait until the claim no longer says ``starting``."""
        if not self.r.set(self.keys.alive, f"{STARTING}{self.token}", nx=True, ex=ALIVE_TTL):
            return False
        # a fresh hub starts a fresh history: what a previous hub of the same name left is gone
        self.r.delete(self.keys.out, self.keys.inp)
        self.r.set(self.keys.alive, self.token, xx=True, ex=ALIVE_TTL)
        return True

    def end(self, reason: str, why: str = "ended") -> None:
        if not self.reason:
            self.reason, self.why = reason, why
        self.stop.set()

    def run(self, opener: Any) -> str:
        """Open the terminal with ``opener()`` and bridge it; returns why it ended."""
        if not self.claim():
            return "already running"
        self.r.set(self.keys.lease, "opening", ex=LEASE_TTL)
        try:
            term: Terminal = opener()
        except DriverError as exc:
            self.why = "error"
            self._finish(f"cannot open the console: {exc}")
            return self.reason
        feeder = threading.Thread(target=self._feed, args=(term,), daemon=True, name="console-input")
        feeder.start()
        try:
            self._pump(term)
        finally:
            self.stop.set()
            feeder.join(2)
            term.close()
            status = term.exit_status()
            if status is not None and self.reason.startswith("the command exited"):
                self.reason = f"the command exited with status {status}"
            self._finish(self.reason or "closed")
        return self.reason

    def _finish(self, reason: str) -> None:
        self.reason = self.reason or reason
        with contextlib.suppress(redis.RedisError):
            end: dict[Any, Any] = {"end": self.reason, "why": self.why}
            self.r.xadd(self.keys.out, end, maxlen=OUT_MAXLEN, approximate=True)
            for key in (self.keys.out, self.keys.inp):
                self.r.expire(key, END_KEEP)
            if self.r.get(self.keys.alive) == self.token.encode():
                self.r.delete(self.keys.alive)

    def _pump(self, term: Terminal) -> None:
        """Terminal → ``:out``; once a second: refresh the claim, check lease, parent and command."""
        next_tick = 0.0
        while not self.stop.is_set():
            ready, _, _ = select.select([term.fd], [], [], 0.5)
            if ready:
                try:
                    data = os.read(term.fd, CHUNK)
                except BlockingIOError:
                    data = None
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if data == b"":
                    # EIO/EOF: the other side of the pty is gone (VM stopped, command exited)
                    self._drain_exit(term)
                    return
                if data:
                    self.r.xadd(self.keys.out, {"d": data}, maxlen=OUT_MAXLEN, approximate=True)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 1.0
                self._tick(term)

    def _drain_exit(self, term: Terminal) -> None:
        if term.proc is not None:
            with contextlib.suppress(Exception):
                term.proc.wait(5)
            self.end("the command exited")
        else:
            self.end("the console closed: the VM is no longer running")

    def _tick(self, term: Terminal) -> None:
        if not self.r.set(self.keys.alive, self.token, xx=True, ex=ALIVE_TTL):
            self.end("the hub lost its claim", "error")
        elif not self.r.exists(self.keys.lease):
            self.end("idle: no client attached", "idle")
        elif self.parent is not None and os.getppid() != self.parent:
            self.end("the node's worker restarted: open a new session", "node_gone")
        elif term.exit_status() is not None:
            self.end("the command exited")

    def _feed(self, term: Terminal) -> None:
        """``:in`` → terminal, in this thread with its own connection (blocking reads)."""
        last = "0-0"  # the stream is this hub's own since claim(): input sent while opening counts
        conn = self.r
        while not self.stop.is_set():
            try:
                got: list[Any] = conn.xread({self.keys.inp: last}, count=64, block=500)  # type: ignore[assignment]
            except redis.RedisError as exc:
                self.end(f"lost the connection to Redis: {exc}", "error")
                return
            for _key, entries in got or []:
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    self._apply(term, fields)

    def _apply(self, term: Terminal, fields: dict[bytes, bytes]) -> None:
        if b"d" in fields and self.message.mode is not ConsoleMode.VIEW:
            data = fields[b"d"]
            while data and not self.stop.is_set():
                try:
                    data = data[os.write(term.fd, data) :]
                except BlockingIOError:
                    select.select([], [term.fd], [], 0.5)
                except OSError:
                    return
        elif b"size" in fields:
            with contextlib.suppress(ValueError):
                cols, rows = (int(v) for v in fields[b"size"].split())
                term.resize(max(1, min(cols, 1000)), max(1, min(rows, 1000)))


def main(argv: list[str]) -> int:
    """``python -m compute.console.hub <ConsoleOpen JSON>``: run one hub in this process."""
    import json

    from compute.tasks import make_driver

    logging.basicConfig(level=logging.INFO, format="console-hub %(levelname)s %(message)s")
    message = from_json(ConsoleOpen, json.loads(argv[1]))
    parent = int(argv[2]) if len(argv) > 2 else None
    config = NodeConfig.from_env()
    url = redis_url(config.broker_url)
    if url is None:
        log.error("%s", NO_REDIS)
        return 1
    client = redis.Redis.from_url(url)
    hub = Hub(client, message, parent)
    driver = make_driver(message.kind, config)
    reason = hub.run(lambda: open_terminal(driver, message))
    log.info("hub %s (%s) ended: %s", message.hub, to_json(message)["mode"], reason)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
