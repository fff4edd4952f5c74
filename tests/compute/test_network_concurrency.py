"""Pool processes of one compute worker prepare the same tenant network at the same moment.

A backlog of creates for one network (a broker back after a restart) lands on
every pool process at once; each must find the bridge, its address and the
VXLAN device ready, whoever made them.  Runs in a network namespace the test
makes (198.19.0.0/24 underlay inside it only); racers are forked processes.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from compute import nsenv
from compute.network import bridge, vxlan
from tests.hostcaps import require_binary, require_root

pytestmark = [pytest.mark.host]

RACERS = 4
ROUNDS = 8


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    require_binary("ip")
    ns = f"skrace-{secrets.token_hex(3)}"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")  # no dummy module here
        _ip("-n", ns, "addr", "add", "198.19.0.1/24", "dev", "ul0")
        _ip("-n", ns, "link", "set", "ul1", "up")
        _ip("-n", ns, "link", "set", "ul0", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _racer(ns: str, name: str, vni: int, barrier: Any, errors: Any) -> None:
    try:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        nsenv.setns(fd, nsenv.CLONE_NEWNET)
        os.close(fd)
        barrier.wait(30)
        bridge.ensure_bridge(name, mtu=1450, address="198.18.200.2/24", exclusive=True)
        vxlan.ensure_vxlan(vni, "198.19.0.1", name, 1450)
    except BaseException as exc:  # reported to the test, whatever it is
        errors.put(f"{type(exc).__name__}: {exc}")
        raise


def test_pool_processes_preparing_one_network_at_once_all_succeed(netns: str) -> None:
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    for rnd in range(ROUNDS):
        name, vni = f"skr{secrets.token_hex(4)}", 9000 + rnd
        barrier = ctx.Barrier(RACERS)
        procs = [ctx.Process(target=_racer, args=(netns, name, vni, barrier, errors)) for _ in range(RACERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        failed = []
        while not errors.empty():
            failed.append(errors.get())
        assert failed == [], f"round {rnd}: {failed}"
        assert [p.exitcode for p in procs] == [0] * RACERS
        out = subprocess.run(
            ["ip", "-n", netns, "-o", "-4", "addr", "show", "dev", name], capture_output=True, text=True
        ).stdout
        assert out.count("198.18.200.2/24") == 1, out


def test_threads_of_one_process_exclude_each_other(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """host_lock needs no thread lock of its own: each holder opens the file anew, and a flock
    belongs to the open file, so a second thread waits like a second process would."""
    import threading
    import time

    from compute.network import hostlock

    monkeypatch.setattr(hostlock, "LOCK_FILE", tmp_path / "net.lock")
    inside: list[int] = []
    overlaps: list[int] = []

    def hold() -> None:
        for _ in range(20):
            with hostlock.host_lock():
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert overlaps == []
