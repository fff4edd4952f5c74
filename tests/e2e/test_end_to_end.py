"""End to end with real Celery workers, Redis, libvirt and crun, through the API alone.

Two compute workers with different node names run on this machine, plus a
control worker; they share the test database (a SQLite file) and a private
Redis database.  A tenant whose node is dedicated gets a container for
``kind=auto``; a tenant on shared nodes gets VMs, spread across the nodes;
delete cleans both up; the events list shows each step.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import override_settings
from rest_framework.test import APIClient

from portal.cloud.models import ComputeNode, Network
from portal.images.nodekeys import node_key
from portal.tenancy.models import Membership, Tenant
from tests.hostcaps import require, require_binary, require_libvirtd, require_root
from tests.netcleanup import table_for, teardown_node

ROOT = Path(__file__).resolve().parents[2]
BROKER = settings.CELERY_BROKER_URL  # settings_test: a Redis database of the tests' own
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]


def _redis_up() -> bool:
    r = subprocess.run(["redis-cli", "-u", BROKER, "ping"], capture_output=True, text=True, timeout=5)
    return r.stdout.strip() == "PONG"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class PortalServer:
    """The portal's WSGI app on a free port of ``host``, in a thread: nodes fetch image blobs from it."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        from django.core.handlers.wsgi import WSGIHandler
        from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadedWSGIServer((host, 0), Quiet, allow_reuse_address=True)
        self.httpd.set_app(WSGIHandler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="portal-server", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class Stack:
    """Worker processes started by this test, ended by PID."""

    def __init__(self, base: Path, db_path: str, broker: str = BROKER, database_url: str = "") -> None:
        """``database_url``: the portal's database when not the SQLite file ``db_path``."""
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "DATABASE_URL": database_url or f"sqlite:///{db_path}",
            "CELERY_BROKER_URL": broker,
            "SKYPORT_VAR_DIR": str(base / "var"),
            "SKYPORT_SECRET_KEY": secrets.token_urlsafe(50),
            "SKYPORT_HEARTBEAT_SECONDS": "1",
            "SKYPORT_METERING_BEAT_SECONDS": "3",  # every third beat sampled (the default: a minute)
            "SKYPORT_ACCEL": os.environ.get("SKYPORT_ACCEL", "auto"),
        }

    def start(self, name: str, *args: str, wrap: tuple[str, ...] = (), **env: str) -> None:
        """Start ``celery *args``; ``wrap`` prefixes the command (e.g. nsenter into a netns, which execs)."""
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 -- kept open for the child's lifetime
        cmd = [
            *wrap,
            str(Path(sys.executable).with_name("celery")),
            *args,
            "--loglevel",
            "INFO",
            "-n",
            f"{name}@e2e",
        ]
        self.procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**self.env, **env},
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def start_cluster(self, nodes: list[str]) -> None:
        """A control worker and one compute worker per node name, state under ``base/<node>``."""
        self.start(
            "control", "-A", "portal", "worker", "-Q", "control", "--pool", "threads", "--concurrency", "4"
        )
        for node in nodes:
            self.start(
                node,
                "-A",
                "compute.worker",
                "worker",
                "-Q",
                f"node.{node}",
                "--concurrency",
                "2",
                SKYPORT_NODE_NAME=node,
                SKYPORT_NODE_DIR=str(self.base / node),
                SKYPORT_NODE_KEY=node_key(node),
                SKYPORT_NFT_TABLE=table_for(node),
            )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(self.base.glob("*.log")))


@pytest.fixture
def stack(settings: Any) -> Iterator[tuple[Stack, list[str]]]:
    require_root()
    require_binary("crun")
    require_libvirtd()
    require(_redis_up(), f"redis-server answering at {BROKER} (`make test` starts one)")
    base = Path("/var/lib/skyport") / f"e2e-{secrets.token_hex(4)}"
    base.mkdir(parents=True, mode=0o755)
    base.chmod(0o755)
    tag = secrets.token_hex(2)
    nodes = [f"e2e{tag}a", f"e2e{tag}b"]
    subprocess.run(["redis-cli", "-u", BROKER, "flushdb"], capture_output=True, timeout=10)
    server = PortalServer()
    settings.SKYPORT_PORTAL_URL = server.url
    s = Stack(base, str(settings.DATABASES["default"]["NAME"]))
    s.start_cluster(nodes)
    try:
        yield s, nodes
    finally:
        s.stop()
        server.stop()
        _destroy_leftovers(base, nodes)
        for node in nodes:
            teardown_node(node, base / node, in_this_namespace=True)
        for net in Network.objects.all():
            subprocess.run(["ip", "link", "del", net.bridge], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _destroy_leftovers(base: Path, nodes: list[str]) -> None:
    """Destroy what this test's instances left on its nodes (after a failure), by instance id."""
    from compute.config import NodeConfig
    from compute.drivers.container import ContainerDriver
    from compute.drivers.vm import LibvirtDriver
    from portal.cloud.models import Instance

    ids = [str(i) for i in Instance.objects.values_list("pk", flat=True)]
    for node in nodes:
        cfg = NodeConfig(
            node, base / node, "qemu:///system", os.environ.get("SKYPORT_ACCEL", "auto"), "crun", BROKER
        )
        for driver in (LibvirtDriver(cfg), ContainerDriver(cfg)):
            for iid in ids:
                driver.destroy(iid)


def _client(username: str, tenant: str | None, staff: bool = False) -> APIClient:
    user = get_user_model().objects.create_user(
        username=username, password=secrets.token_urlsafe(12), is_staff=staff
    )
    if tenant:
        Membership.objects.create(user=user, tenant=Tenant.objects.get(slug=tenant), role="member")
    c = APIClient()
    c.force_login(user)
    return c


def _ping(address: str, timeout: float = 60) -> bool:
    # From the network's gateway (.1), an address of every node that carries it: both nodes of
    # this test share one kernel and one bridge, and each node's rules know its own host address.
    gateway = str(ipaddress.ip_network(f"{address}/24", strict=False).network_address + 1)

    def once() -> bool:
        cmd = ["ping", "-c1", "-W1", "-I", gateway, address]
        return subprocess.run(cmd, capture_output=True, timeout=5).returncode == 0

    return bool(wait_for(f"ping {address}", once, timeout=timeout, every=0.5))


def test_api_to_running_vm_and_container(stack: tuple[Stack, list[str]]) -> None:
    s, (node_a, node_b) = stack
    try:
        _run(node_a, node_b)
    except BaseException:
        print(s.logs())
        raise


def _run(node_a: str, node_b: str) -> None:
    Tenant.objects.create(slug="acme", name="Acme")
    Tenant.objects.create(slug="bobco", name="Bob Co")
    call_command("bootstrap")  # default flavors
    call_command(
        "import_sample_images", "--dir", os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images"))
    )
    op = _client("e2e-operator", None, staff=True)
    acme = _client("e2e-acme", "acme")
    bob = _client("e2e-bob", "bobco")
    wait_for(
        "both nodes to register and report healthy drivers",
        lambda: (
            ComputeNode.objects.filter(
                name__in=[node_a, node_b], status="up", drivers__vm__ok=True, drivers__container__ok=True
            ).count()
            == 2
        ),
        timeout=90,
    )
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]
    sample = op.get("/api/v1/images/", {"name": "sample"}).json()["results"][0]
    image = f"{sample['name']}:{sample['version']}"

    def launch(c: APIClient, tenant: str, name: str, kind: str = "auto") -> dict[str, Any]:
        r = c.post(
            "/api/v1/instances/",
            {"tenant": tenant, "name": name, "image": image, "flavor": flavor, "kind": kind},
            format="json",
        )
        assert r.status_code == 202, r.json()
        return r.json()  # type: ignore[no-any-return]

    def settled(c: APIClient, iid: str, state: str = "active") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            got: dict[str, Any] = c.get(f"/api/v1/instances/{iid}/").json()
            assert got["vm_state"] != "error", got
            return got if got["vm_state"] == state and got["task_state"] is None else None

        return wait_for(f"instance {iid} to be {state}", check, timeout=180)  # type: ignore[no-any-return]

    # 1. both nodes shared: bobco's VMs spread across them
    vm1, vm2 = launch(bob, "bobco", "vm1"), launch(bob, "bobco", "vm2")
    assert vm1["decided_kind"] == vm2["decided_kind"] == "vm"
    assert {vm1["node"], vm2["node"]} == {node_a, node_b}, "spread puts the two VMs on different nodes"
    for vm in (vm1, vm2):
        got = settled(bob, vm["id"])
        assert got["power_state"] == "running"
        assert _ping(got["addresses"][0]["address"]), "the host reaches the guest on the tenant bridge"

    # 2. free node A, dedicate it to acme; acme's auto launch becomes a container there
    on_a = vm1 if vm1["node"] == node_a else vm2
    assert bob.delete(f"/api/v1/instances/{on_a['id']}/").status_code == 202
    settled(bob, on_a["id"], "deleted")
    r = op.patch(f"/api/v1/nodes/{node_a}/", {"tenancy": "dedicated", "owner": "acme"}, format="json")
    assert r.status_code == 200, r.json()
    ctr = launch(acme, "acme", "app")
    assert (ctr["decided_kind"], ctr["node"]) == ("container", node_a)
    assert ctr["isolation_reason"] == f"container on {node_a}: dedicated to acme"
    vm3 = launch(bob, "bobco", "vm3")
    assert (vm3["decided_kind"], vm3["node"]) == ("vm", node_b), "bobco never lands on acme's node"
    got = settled(acme, ctr["id"])
    assert got["power_state"] == "running"
    assert _ping(got["addresses"][0]["address"], timeout=20)
    # its logs, through the node's queue and a Redis reply: the image's first line, marked
    logs_url = f"/api/v1/instances/{ctr['id']}/logs/"
    lines = wait_for("the container's first log line", lambda: acme.get(logs_url).json()["lines"], 30)
    assert lines[0]["stream"] == "stdout" and "pid=1" in lines[0]["text"], lines
    took = []
    for _ in range(5):
        started = time.perf_counter()
        assert acme.get(logs_url, {"tail": 100}).status_code == 200
        took.append(time.perf_counter() - started)
    print(f"logs read through the node: median {sorted(took)[2] * 1000:.0f} ms of {len(took)}")
    with override_settings(SKYPORT_LOG_FOLLOW_SECONDS=2):  # a follow: the same line, then its end
        started = time.perf_counter()
        r = acme.get(logs_url, {"follow": 1})
        assert r.status_code == 200 and r["Content-Type"] == "application/x-ndjson"
        followed = [json.loads(x) for x in b"".join(r.streaming_content).decode().splitlines()]
    assert followed[0] == lines[0] and "follow limit of 2 s" in followed[-1]["end"], followed
    assert 2 <= time.perf_counter() - started < 8
    assert bob.get(logs_url).status_code == 404
    settled(bob, vm3["id"])

    # 3. delete everything; the nodes clean up and say so
    left = [(acme, ctr), (bob, vm3), (bob, vm1 if on_a is vm2 else vm2)]
    for c, inst in left:
        assert c.delete(f"/api/v1/instances/{inst['id']}/").status_code == 202
    for c, inst in left:
        settled(c, inst["id"], "deleted")
    kept = acme.get(logs_url, {"stream": "stdout", "tail": 1}).json()
    assert kept["retained"] is True and kept["lines"] == lines[:1], kept
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True
    ).stdout
    assert not any(inst["id"] in domains for _, inst in [(bob, vm1), (bob, vm2), (bob, vm3)])
    events = [
        e["action"]
        for e in acme.get("/api/v1/events/", {"object_id": ctr["id"], "ordering": "created_at"}).json()[
            "results"
        ]
    ]
    assert events == [
        "instance.schedule",
        "instance.create",
        "node.create",
        "dispatch.delete",
        "instance.delete",
        "node.delete",
    ]
    connection.close()
