"""A test client of a console hub's Redis streams (what the portal's relay does, synchronously)."""

from __future__ import annotations

import os
import time

import redis

from compute.console.streams import LEASE_TTL, HubKeys, is_ready

BROKER = os.environ.get("SKYPORT_TEST_BROKER_URL", "redis://127.0.0.1:6379/5")


class HubClient:
    def __init__(self, hub: str) -> None:
        self.r = redis.Redis.from_url(BROKER)
        self.keys = HubKeys(hub)
        self.last = "0-0"
        self.output = b""
        self.end: str | None = None

    def hold(self) -> None:
        self.r.set(self.keys.lease, "test", ex=LEASE_TTL)

    def wait_alive(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not is_ready(self.r.get(self.keys.alive)):
            self.read(0.05)
            if self.end is not None:
                raise AssertionError(f"the hub ended before it came up: {self.end}")
            if time.monotonic() > deadline:
                raise AssertionError("the hub did not come up")

    def send(self, data: bytes) -> None:
        self.r.xadd(self.keys.inp, {"d": data})

    def read(self, block: float = 0.2) -> None:
        got = self.r.xread({self.keys.out: self.last}, count=256, block=int(block * 1000))
        for _key, entries in got or []:
            for entry_id, fields in entries:
                self.last = entry_id.decode()
                if b"d" in fields:
                    self.output += fields[b"d"]
                if b"end" in fields:
                    self.end = fields[b"end"].decode()

    def read_until(self, needle: bytes, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not seen in {timeout} s; got {self.output[-500:]!r}")
            self.hold()
            self.read()
        return self.output

    def wait_end(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while self.end is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the hub did not end; output {self.output[-300:]!r}")
            self.read()
        return self.end

    def cleanup(self) -> None:
        self.r.delete(self.keys.out, self.keys.inp, self.keys.lease)
