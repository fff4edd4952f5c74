"""Fixtures of the metering tests: the portal tests' world and fake nodes, and a clock to inject."""

from __future__ import annotations

import datetime as dt
import time
import types
from typing import Any

import pytest

from tests.portal.conftest import heartbeat, nodes, sent, world  # noqa: F401 -- fixtures

__all__ = ["Clock", "heartbeat"]


class Clock:
    """Simulated time for the portal (``timezone.now``) and the fake nodes (``time.time``)."""

    def __init__(self, start: dt.datetime) -> None:
        self.t = start.timestamp()

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.t, tz=dt.UTC)

    def set(self, at: dt.datetime) -> None:
        assert at.timestamp() >= self.t, "simulated time only moves forward"
        self.t = at.timestamp()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    monkeypatch.setattr("django.utils.timezone.now", c.now)
    shim: Any = types.SimpleNamespace(time=lambda: c.t, monotonic=time.monotonic, sleep=time.sleep)
    monkeypatch.setattr("compute.tasks.time", shim)
    return c
