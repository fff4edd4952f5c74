"""dispatch.publish: a publish kombu breaks mid-reconnect is made again on a connection of its own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from portal.cloud import dispatch

REAL_QUEUED = dispatch.queued  # the conftest keeps tests off the broker; this test means it


class FakeConnection:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ensured: list[dict[str, Any]] = []

    def ensure_connection(self, **kwargs: Any) -> None:
        self.ensured.append(kwargs)


class FakeConf:
    task_publish_retry_policy = {"max_retries": 40, "interval_start": 0, "interval_step": 0.25}


class FakeApp:
    """send_task fails like kombu's half torn-down channel while the pooled connection is used."""

    conf = FakeConf()

    def __init__(self, broken: int) -> None:
        self.broken = broken
        self.sent: list[tuple[str, str, Any]] = []
        self.connections: list[FakeConnection] = []

    def send_task(self, task: str, args: list[Any], queue: str, connection: Any = None) -> None:
        if connection is None and self.broken:
            self.broken -= 1
            raise AttributeError("'NoneType' object has no attribute 'client'")
        self.sent.append((task, queue, connection and connection.name))

    @contextlib.contextmanager
    def connection_for_write(self) -> Iterator[FakeConnection]:
        self.connections.append(FakeConnection(f"conn{len(self.connections) + 1}"))
        yield self.connections[-1]


def test_a_broken_publish_is_made_again_on_a_new_connection() -> None:
    app = FakeApp(broken=1)
    dispatch.publish(app, "node.a", "compute.instance.create", [{}])
    assert app.sent == [("compute.instance.create", "node.a", "conn1")]
    # the new connection waits for the broker as long as the publish retry policy does, not
    # only its connect timeout (a Redis restart outlasted that: a 500 in the burst of 100)
    assert app.connections[0].ensured == [FakeConf.task_publish_retry_policy]
    dispatch.publish(app, "node.a", "compute.instance.create", [{}])  # the pool works again
    assert app.sent[-1] == ("compute.instance.create", "node.a", None) and len(app.connections) == 1


def test_other_errors_are_not_swallowed() -> None:
    class Refused(FakeApp):
        def send_task(self, task: str, args: list[Any], queue: str, connection: Any = None) -> None:
            raise ConnectionRefusedError("after the retry policy")

    with pytest.raises(ConnectionRefusedError):
        dispatch.publish(Refused(broken=0), "node.a", "t", [])


@pytest.mark.filterwarnings("ignore:task_always_eager has no effect on send_task")
def test_queued_counts_a_queues_messages_on_the_real_broker_and_says_none_when_it_cannot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the sweeper reads to tell a silent node from beats it has not read yet."""
    import secrets
    import time

    from kombu import Connection

    from portal.celery import app

    queue = f"probe-{secrets.token_hex(4)}"
    with app.connection_for_write() as conn:
        try:
            for _ in range(3):
                app.send_task("portal.nothing", args=[], queue=queue, connection=conn)
            assert REAL_QUEUED(queue) == 3
        finally:
            channel: Any = conn.default_channel
            channel.queue_purge(queue)
            channel.queue_delete(queue)
    # an emptied queue, and one never declared, hold none (Redis: "NOT_FOUND" for an empty list);
    # the resend of a lost message (portal/cloud/resend.py) waits for exactly this 0
    assert REAL_QUEUED(queue) == 0
    assert REAL_QUEUED(f"never-{secrets.token_hex(4)}") == 0

    # a broker that does not answer (nothing listens on port 1): no evidence, and at once
    monkeypatch.setattr(app, "connection_for_read", lambda: Connection("redis://127.0.0.1:1/0"))
    t0 = time.monotonic()
    assert REAL_QUEUED("control") is None
    assert time.monotonic() - t0 < 10  # the sweeper is not held up
