"""A real cluster for fault tests: its own redis-server, a control worker, one compute worker.

Everything here is started by the test and ended by PID: a redis-server on a
free loopback port (append-only file on, so a restart keeps queued
messages), the portal's WSGI app in a thread (nodes fetch image blobs from
it), a control worker and a compute worker whose node is dedicated to the
tenant ``acme`` (its ``kind=auto`` launches are containers; ``kind=vm`` is
allowed too).  Messages from the test process go through a Celery app with
the portal's own settings, bound to that redis.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.conf import settings
from django.core.management import call_command
from rest_framework.test import APIClient

from portal.cloud import dispatch, services
from portal.cloud.models import ComputeNode, Instance, Network
from portal.tenancy.models import Tenant
from tests.e2e.test_end_to_end import ROOT, PortalServer, Stack, _client, _destroy_leftovers, wait_for
from tests.hostcaps import require_binary, require_libvirtd, require_root
from tests.netcleanup import table_for, teardown_node

VISIBILITY = "4"  # seconds before a message taken by a dead worker is delivered again
RESEND_AFTER = "10"  # seconds before a create or delete the node never took is sent again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """A redis-server of the test's own; restartable with its data."""

    def __init__(self, base: Path) -> None:
        self.port = _free_port()
        self.dir = base / "redis"
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        wait_for("redis-server", self.ping, timeout=20, every=0.05)

    def ping(self) -> bool:
        r = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
        return r.stdout.strip() == "PONG"

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): the append-only file is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


class Cluster:
    def __init__(self, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.base = base
        self.redis = Redis(base)
        self.server = PortalServer()
        settings.SKYPORT_PORTAL_URL = self.server.url
        # Celery reads CELERY_BROKER_URL from the environment before its settings (settings_test sets it)
        monkeypatch.setenv("CELERY_BROKER_URL", self.redis.url)
        self.app = Celery("faults", fixups=[])
        self.app.config_from_object("django.conf:settings", namespace="CELERY")
        self.app.conf.broker_url = self.redis.url
        self.app.conf.broker_transport_options = {"visibility_timeout": float(VISIBILITY)}
        # the API here derives task deadlines from the visibility timeout as the control worker
        # does (portal/cloud/deadlines.py): the resend judges a claim's age from its deadline
        monkeypatch.setitem(settings.CELERY_BROKER_TRANSPORT_OPTIONS, "visibility_timeout", float(VISIBILITY))
        monkeypatch.setattr(settings, "SKYPORT_BROKER_VISIBILITY_SECONDS", float(VISIBILITY))

        def send(queue: str, task: str, args: list[Any]) -> None:
            # the portal's broker hop to this cluster's Redis: the real one's lock and second try
            dispatch.publish(self.app, queue, task, args)

        monkeypatch.setattr(dispatch, "_send", send)
        self.node = f"flt{secrets.token_hex(3)}"
        self.stack = Stack(base, str(settings.DATABASES["default"]["NAME"]), self.redis.url)
        self.stack.env["SKYPORT_BROKER_VISIBILITY_SECONDS"] = VISIBILITY
        # a message the broker lost is sent again after this (ten of the stack's 1 s heartbeats)
        self.stack.env["SKYPORT_RESEND_AFTER_SECONDS"] = RESEND_AFTER
        # a message the control worker builds (a resend) points nodes at this test's server too
        self.stack.env["SKYPORT_PORTAL_URL"] = self.server.url
        self.stack.start(
            "control", "-A", "portal", "worker", "-Q", "control", "--pool", "threads", "--concurrency", "4"
        )
        self.compute: subprocess.Popen[bytes] | None = None
        self.start_compute()

    def start_compute(self) -> None:
        from portal.images.nodekeys import node_key

        self.stack.start(
            self.node, "-A", "compute.worker", "worker", "-Q", f"node.{self.node}", "--concurrency", "4",
            SKYPORT_NODE_NAME=self.node, SKYPORT_NODE_DIR=str(self.base / self.node),
            SKYPORT_NODE_KEY=node_key(self.node), SKYPORT_NFT_TABLE=table_for(self.node),
        )  # fmt: skip
        self.compute = self.stack.procs[-1]

    def kill_compute(self) -> None:
        """kill -9 of the compute worker and its children (pool, heartbeat)."""
        assert self.compute is not None
        os.killpg(self.compute.pid, signal.SIGKILL)
        self.compute.wait(10)

    def node_row(self) -> ComputeNode:
        return ComputeNode.objects.get(name=self.node)

    def wait_node_up(self, vm: bool = True) -> None:
        def up() -> bool:
            n = ComputeNode.objects.filter(name=self.node, status="up").first()
            return bool(n and n.drivers.get("container", {}).get("ok") and (not vm or n.drivers["vm"]["ok"]))

        wait_for(f"node {self.node} up", up, timeout=60)

    def close(self) -> None:
        self.stack.stop()
        self.server.stop()
        self.redis.stop()
        self.app.pool.force_close_all()


ARTIFACTS = ROOT / "test-artifacts" / "faults"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, transactional_db: Any
) -> Iterator[Cluster]:
    require_root()
    require_binary("crun")
    require_binary("redis-server")
    require_libvirtd()
    base = Path("/var/lib/skyport") / f"faults-{secrets.token_hex(4)}"
    base.mkdir(parents=True, mode=0o755)
    base.chmod(0o755)
    c = Cluster(base, monkeypatch)
    try:
        Tenant.objects.create(slug="acme", name="Acme")
        call_command("bootstrap", stdout=open(os.devnull, "w"))  # noqa: SIM115 - flavors
        call_command(
            "import_sample_images",
            "--dir",
            os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images")),
            stdout=open(os.devnull, "w"),  # noqa: SIM115
        )
        c.wait_node_up()
        node = c.node_row()
        # room for a burst of containers on this small machine: CPU overcommit for the test node
        ComputeNode.objects.filter(pk=node.pk).update(cpu_allocation_ratio=200.0)
        services.set_node_tenancy(c.node_row(), Tenant.objects.get(slug="acme"))
        yield c
    finally:
        c.close()
        # the workers' whole logs are kept with the test results (CI keeps test-artifacts/)
        kept = ARTIFACTS / request.node.name
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        for f in base.glob("*.log"):
            shutil.copy(f, kept / f.name)
        failed = any(
            getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call")
        )
        if failed:
            print(c.stack.logs())  # their tails, in the test's output
        _destroy_leftovers(base, [c.node])
        teardown_node(c.node, base / c.node, in_this_namespace=True)
        for net in Network.objects.all():
            subprocess.run(["ip", "link", "del", net.bridge], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def acme_client() -> APIClient:
    return _client(f"acme-{secrets.token_hex(3)}", "acme")


def launch(c: APIClient, name: str, kind: str = "auto", image: str = "sample") -> dict[str, Any]:
    flavor = c.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]
    r = c.post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": name, "image": image, "flavor": flavor, "kind": kind},
        format="json",
    )
    assert r.status_code == 202, r.content
    return dict(r.json())


def settled(c: APIClient, iid: str, state: str = "active", timeout: float = 120) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        got: dict[str, Any] = c.get(f"/api/v1/instances/{iid}/").json()
        return got if got["vm_state"] == state and got["task_state"] is None else None

    return wait_for(f"instance {iid} to be {state}", check, timeout=timeout)  # type: ignore[no-any-return]


def assert_true_and_no_orphans(cluster: Cluster) -> None:
    """After a fresh heartbeat: every live instance's power state is what the node has, no orphans."""
    from compute.config import NodeConfig
    from compute.drivers.container import ContainerDriver
    from compute.drivers.vm import LibvirtDriver

    since = time.time()
    wait_for(
        "a heartbeat after the fault",
        lambda: (hb := cluster.node_row().last_heartbeat) is not None and hb.timestamp() > since + 0.5,
        timeout=30,
    )
    node = cluster.node_row()
    assert node.orphans == [], node.orphans
    cfg = NodeConfig(node.name, cluster.base / node.name, "qemu:///system", "auto", "crun", cluster.redis.url)
    real = {
        i.instance_id: i.power_state.value
        for d in (LibvirtDriver(cfg), ContainerDriver(cfg))
        for i in d.list()
    }
    live = {str(i.pk): i.power_state for i in Instance.objects.live().filter(node=node)}
    assert real == live, f"node has {real}, portal says {live}"
    assert not Instance.objects.live().filter(task_state__isnull=False).exists()
