"""Console faults: the node worker restarts during a session; a guest floods its terminal.

The "worker" here is a real process running the node's ``NodeService`` (the
code the Celery worker runs), started per message as the broker would deliver
it; killing it is what a worker restart does to its hubs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from compute.console.streams import CHUNK, OUT_MAXLEN, HubKeys
from compute.drivers.container import ContainerDriver
from compute.spec import InstanceSpec
from portal.cloud import dispatch
from tests.console.conftest import BROKER, Relay, Term, instance_row
from tests.console.test_console_ws import ticket
from tests.portal.conftest import World

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]

WORKER = (
    "import json, sys, time\n"
    "from compute.config import NodeConfig\n"
    "from compute.tasks import NodeService\n"
    "svc = NodeService(NodeConfig.from_env(), lambda t, p: None)\n"
    "svc.handle(sys.argv[1], json.loads(sys.argv[2]))\n"
    "time.sleep(600)\n"
)


@pytest.fixture(autouse=True)
def ws_url(settings: Any, relay: Relay) -> None:
    settings.SKYPORT_CONSOLE_WS_URL = f"ws://127.0.0.1:{relay.port}"


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch, container_node: ContainerDriver) -> Iterator[list[Any]]:
    """Each message to the node runs in a new worker process (killed at the end)."""
    started: list[subprocess.Popen[bytes]] = []

    def deliver(queue: str, task: str, args: list[Any]) -> None:
        env = {**os.environ, **container_node.config.as_env()}
        started.append(subprocess.Popen([sys.executable, "-c", WORKER, task, json.dumps(args[0])], env=env))

    monkeypatch.setattr(dispatch, "_send", deliver)
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_worker_restart_closes_with_a_reason_and_a_new_session_works(
    world: World, workers: list[Any], container: InstanceSpec
) -> None:
    instance_row(world, container, "container")
    term = Term(ticket(world, "a_member", container.instance_id, "exec")["ws_url"])
    term.wait_text("ready")
    term.type(b"echo before-$((2*3))\n")
    term.until(b"before-6")
    os.kill(workers[0].pid, signal.SIGKILL)  # the worker dies; its hubs notice within a second
    code, reason = term.wait_closed(timeout=15)
    assert (code, reason) == (4410, "the node's worker restarted: open a new session")
    again = Term(ticket(world, "a_member", container.instance_id, "exec")["ws_url"])
    again.wait_text("ready")
    again.type(b"echo after-$((3*3))\n")
    again.until(b"after-9")
    again.close()


def test_a_flood_of_output_stays_capped_in_redis(
    world: World, workers: list[Any], container: InstanceSpec
) -> None:
    """``yes`` in the shell: the stream never holds more than its cap, whatever the reader does."""
    instance_row(world, container, "container")
    t = ticket(world, "a_member", container.instance_id, "exec")
    term = Term(t["ws_url"])
    term.wait_text("ready")
    term.type(b"yes flood-flood-flood\n")
    term.until(b"flood-flood-flood\r\nflood")
    r = redis.Redis.from_url(BROKER)
    keys = HubKeys(t["session"])
    lengths, sizes = [], []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the test reads nothing more: the relay stays behind
        lengths.append(r.xlen(keys.out))
        sizes.append(r.memory_usage(keys.out) or 0)
        time.sleep(0.1)
    assert max(lengths) <= OUT_MAXLEN + 100  # approximate trimming overshoots by at most a node
    assert max(sizes) <= (OUT_MAXLEN + 100) * (CHUNK + 200)
    term.type(b"\x03")  # Ctrl-C reaches yes through the pty
    term.type(b"echo stopped-$((5*5))\n")
    term.until(b"stopped-25", timeout=60)
    term.close()
    term.wait_closed()
