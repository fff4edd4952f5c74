"""One tenant network across two nodes through VXLAN; another tenant stays apart.

Three "hosts" are network namespaces on this machine, joined by an underlay
this test builds: a bridge in the host's namespace with 198.19.0.1/24 and a
veth into each namespace (198.19.0.11, .12, .13).  Each namespace runs a
real compute worker (``nsenter --net``: only the network namespace changes,
so crun still sees the host's cgroups) with ``SKYPORT_TUNNEL_ADDRESS`` set.
A Redis server of the test's own and the portal's blob server listen on
198.19.0.1, since 127.0.0.1 inside a namespace is that namespace's own
loopback; the control worker runs in the host's namespace.

h1 and h2 are dedicated to acme, h3 to bobco.  acme's two containers are
forced onto different nodes by an anti-affinity group and must reach each
other through the tunnel; bobco's container must not reach acme's, nor
acme's bobco's.  Everything the test made is removed by name or PID at the
end, and checked gone.

198.19.0.0/24 is this test's underlay: tenant networks of tests come from
198.19.224.0/19, ``make run`` allocates from 198.18.0.0, and the other
fixtures pick 198.19.1-254.x or 198.18.1-254.x.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import AlwaysEagerIgnored
from django.core.management import call_command
from django.db import connection

from compute.cgroups import SysCgroupFS
from portal.cloud import dispatch
from portal.cloud.models import ComputeNode, HostPort, Instance, Network
from portal.images.nodekeys import node_key
from portal.tenancy.models import Tenant
from tests.e2e.test_end_to_end import ROOT, PortalServer, Stack, _client, wait_for
from tests.hostcaps import require, require_binary, require_root
from tests.netcleanup import table_for, teardown_node

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]

UNDERLAY_HOST = "198.19.0.1"
UNDERLAY_PREFIX = 24
HOSTS = {"h1": "198.19.0.11", "h2": "198.19.0.12", "h3": "198.19.0.13"}
#: more environment for every compute worker (tests that grow the topology set e.g. SKYPORT_UPLINK)
NODE_ENV: dict[str, str] = {}


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


def _links() -> str:
    return _run("ip", "-o", "link", "show").stdout


class Underlay:
    """The test's bridge, namespaces and veths; every name carries the run's tag."""

    def __init__(self, tag: str) -> None:
        self.bridge = f"mnbr{tag}"
        self.netns = {h: f"sky-mn{tag}-{h}" for h in HOSTS}
        self.veths = {h: f"mnv{tag}{h[-1]}" for h in HOSTS}
        self.made_bridge = False
        self.made_netns: list[str] = []

    def build(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self.made_bridge = True
        _run("ip", "addr", "add", f"{UNDERLAY_HOST}/{UNDERLAY_PREFIX}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for h, address in HOSTS.items():
            ns, veth = self.netns[h], self.veths[h]
            _run("ip", "netns", "add", ns)
            self.made_netns.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "ul0", "netns", ns)
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/{UNDERLAY_PREFIX}", "dev", "ul0")
            _run("ip", "-n", ns, "link", "set", "ul0", "up")
        for h in HOSTS:
            r = _run("ip", "netns", "exec", self.netns[h], "ping", "-c1", "-W2", UNDERLAY_HOST, check=False)
            assert r.returncode == 0, f"underlay: {h} cannot reach {UNDERLAY_HOST}: {r.stdout}"

    def teardown(self) -> None:
        # Deleting a namespace deletes what is in it (tenant bridges, VXLAN devices), but the
        # kernel does it asynchronously: delete the veths (both ends) explicitly first.
        for veth in self.veths.values():
            if f" {veth}@" in _links():
                _run("ip", "link", "del", veth, check=False)
        for ns in self.made_netns:
            _run("ip", "netns", "del", ns, check=False)
        if self.made_bridge:
            _run("ip", "link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        links = _links()
        netns = _run("ip", "netns", "list").stdout
        names = [self.bridge, *self.veths.values()]
        return [n for n in names if f" {n}:" in links or f" {n}@" in links] + [
            ns for ns in self.netns.values() if ns in netns
        ]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Redis:
    """A redis-server of the test's own on the underlay address (with a password), ended by PID."""

    def __init__(self, base: Path) -> None:
        self.port = _free_port(UNDERLAY_HOST)
        password = secrets.token_hex(16)
        self.url = f"redis://default:{password}@{UNDERLAY_HOST}:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                "redis-server", "--bind", UNDERLAY_HOST, "--port", str(self.port),
                "--requirepass", password, "--save", "", "--appendonly", "no",
                "--dir", str(base), "--logfile", str(base / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

        def up() -> bool:
            r = subprocess.run(
                ["redis-cli", "--no-auth-warning", "-u", self.url, "ping"], capture_output=True, text=True
            )
            return r.stdout.strip() == "PONG"

        try:
            wait_for("the test's redis-server", up, timeout=20, every=0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _send_via(broker: str) -> Any:
    """dispatch._send, but through the test's broker (the portal app's pool is bound to another)."""
    from portal.celery import app

    def send(queue: str, task: str, args: list[Any]) -> None:
        with app.connection_for_write(broker) as conn, warnings.catch_warnings():
            # the test settings make tasks eager; send_task says so, and goes to the broker anyway
            warnings.simplefilter("ignore", AlwaysEagerIgnored)
            app.send_task(task, args=args, queue=queue, connection=conn)

    return send


@pytest.fixture
def cluster(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Stack, Underlay, dict[str, str]]]:
    require_root()
    for binary in ("ip", "nsenter", "crun", "conmon", "redis-server", "redis-cli", "ping"):
        require_binary(binary)
    require(Path("/sys/module/vxlan").exists() or _vxlan_loadable(), "the vxlan kernel module")
    tag = secrets.token_hex(3)
    base = Path("/var/lib/skyport") / f"mn-{tag}"
    base.mkdir(parents=True, mode=0o755)
    nodes = {h: f"mn{tag}{h}" for h in HOSTS}
    underlay = Underlay(tag)
    redis: Redis | None = None
    server: PortalServer | None = None
    stack: Stack | None = None
    try:
        underlay.build()
        redis = Redis(base)
        server = PortalServer(UNDERLAY_HOST)
        settings.SKYPORT_PORTAL_URL = server.url
        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, UNDERLAY_HOST]
        monkeypatch.setattr(dispatch, "_send", _send_via(redis.url))
        stack = Stack(base, str(settings.DATABASES["default"]["NAME"]), broker=redis.url)
        stack.start(
            "control", "-A", "portal", "worker", "-Q", "control", "--pool", "threads", "--concurrency", "4",
            SKYPORT_PORTAL_URL=server.url,  # where nodes fetch what the control worker points them at
        )  # fmt: skip
        for h, node in nodes.items():
            stack.start(
                node,
                "-A",
                "compute.worker",
                "worker",
                "-Q",
                f"node.{node}",
                "--concurrency",
                "2",
                wrap=("nsenter", f"--net=/run/netns/{underlay.netns[h]}", "--"),
                SKYPORT_NODE_NAME=node,
                SKYPORT_NODE_DIR=str(base / node),
                SKYPORT_NODE_KEY=node_key(node),
                SKYPORT_TUNNEL_ADDRESS=HOSTS[h],
                SKYPORT_NFT_TABLE=table_for(node),
                SKYPORT_CGROUP_PARENT=f"skyport-{node}",  # one kernel, three "hosts": a cgroup tree each
                **NODE_ENV,
            )
        yield stack, underlay, nodes
    finally:
        if stack is not None:
            stack.stop()
        _destroy_containers(base, list(nodes.values()))
        for node in nodes.values():  # their tables and bridges go with the namespaces
            teardown_node(node, base / node, in_this_namespace=False)
            SysCgroupFS().remove(f"/skyport-{node}")  # the node's own (empty by now) cgroup tree
        if server is not None:
            server.stop()
        if redis is not None:
            redis.stop()
        underlay.teardown()
        shutil.rmtree(base, ignore_errors=True)
    wait_for("the test's links and namespaces to be gone", lambda: underlay.leftovers() == [], timeout=10)
    assert stack is None or all(p.poll() is not None for p in stack.procs)
    assert redis is None or redis.proc.poll() is not None


def _vxlan_loadable() -> bool:
    return _run("modprobe", "-n", "vxlan", check=False).returncode == 0


def _destroy_containers(base: Path, nodes: list[str]) -> None:
    """Destroy what this test's instances left on its nodes (after a failure), by instance id."""
    from compute.config import NodeConfig
    from compute.drivers.container import ContainerDriver

    ids = [str(i) for i in Instance.objects.values_list("pk", flat=True)]
    for node in nodes:
        driver = ContainerDriver(NodeConfig(node, base / node, "qemu:///system", "qemu", "crun", ""))
        for iid in ids:
            driver.destroy(iid)


def _container_pid(base: Path, node: str, instance_id: str) -> int:
    return int((base / node / "containers" / f"sky-{instance_id}" / "pid").read_text().strip())


def _ping_from(pid: int, address: str, tries: int = 1) -> bool:
    """ping from inside a container's network namespace (the host's ping, as root)."""
    r = _run("nsenter", "-t", str(pid), "-n", "ping", "-c", str(tries), "-W", "1", address, check=False)
    return r.returncode == 0


def seed_tenants_and_busybox() -> str:
    """Tenants acme and bobco, the default flavors and the sample busybox image; returns its version."""
    Tenant.objects.create(slug="acme", name="Acme")
    Tenant.objects.create(slug="bobco", name="Bob Co")
    call_command("bootstrap")
    images = Path(os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images")))
    busybox = sorted(images.glob("busybox-[0-9]*.oci.tar"))
    require(bool(busybox), f"the sample busybox image in {images} (`make images`)")
    version = busybox[-1].name.removeprefix("busybox-").removesuffix(".oci.tar")
    call_command(
        "import_image", str(busybox[-1]), "--name", "busybox", "--version", version,
        "--format", "oci", "--public", "--wait",
    )  # fmt: skip
    return version


def dedicate(op: Any, nodes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """h1 and h2 dedicated to acme, h3 to bobco (through the API); each node as the API answered."""
    answered = {}
    for h, tenant in (("h1", "acme"), ("h2", "acme"), ("h3", "bobco")):
        r = op.patch(f"/api/v1/nodes/{nodes[h]}/", {"tenancy": "dedicated", "owner": tenant}, format="json")
        assert r.status_code == 200, r.json()
        answered[h] = r.json()
    return answered


def test_tenant_network_spans_nodes_and_tenants_stay_apart(
    cluster: tuple[Stack, Underlay, dict[str, str]],
) -> None:
    stack, underlay, nodes = cluster
    try:
        _scenario(stack.base, underlay, nodes)
    except BaseException:
        print(stack.logs())
        raise


def _scenario(base: Path, underlay: Underlay, nodes: dict[str, str]) -> None:
    version = seed_tenants_and_busybox()
    op = _client("mn-operator", None, staff=True)
    acme = _client("mn-acme", "acme")
    bob = _client("mn-bob", "bobco")
    wait_for(
        "three nodes up with a healthy container driver and their tunnel addresses",
        lambda: (
            ComputeNode.objects.filter(
                name__in=nodes.values(),
                status="up",
                drivers__container__ok=True,
                tunnel_address__isnull=False,
            ).count()
            == 3
        ),
        timeout=90,
    )
    for h, node in dedicate(op, nodes).items():
        assert node["tunnel_address"] == HOSTS[h]
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]

    def launch(c: Any, tenant: str, name: str, group: str = "") -> dict[str, Any]:
        body = {
            "tenant": tenant, "name": name, "image": f"busybox:{version}", "flavor": flavor,
            "kind": "container", "anti_affinity_group": group,
        }  # fmt: skip
        r = c.post("/api/v1/instances/", body, format="json")
        assert r.status_code == 202, r.json()
        return r.json()  # type: ignore[no-any-return]

    def settled(c: Any, iid: str, state: str = "active") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            got: dict[str, Any] = c.get(f"/api/v1/instances/{iid}/").json()
            assert got["vm_state"] != "error", got
            return got if got["vm_state"] == state and got["task_state"] is None else None

        return wait_for(f"instance {iid} to be {state}", check, timeout=120)  # type: ignore[no-any-return]

    a1 = launch(acme, "acme", "a1", group="spread")
    a1 = settled(acme, a1["id"])
    a2 = settled(acme, launch(acme, "acme", "a2", group="spread")["id"])
    b1 = settled(bob, launch(bob, "bobco", "b1")["id"])
    assert {a1["node"], a2["node"]} == {nodes["h1"], nodes["h2"]}, "anti-affinity: one per acme node"
    assert b1["node"] == nodes["h3"]
    addr = {i["name"]: i["addresses"][0]["address"] for i in (a1, a2, b1)}
    pid = {i["name"]: _container_pid(base, i["node"], i["id"]) for i in (a1, a2, b1)}
    acme_net = Network.objects.get(tenant__slug="acme")
    bob_net = Network.objects.get(tenant__slug="bobco")
    assert acme_net.vni != bob_net.vni

    # each acme node carries the network on its own address, with a VXLAN device towards the other
    hosts = dict(HostPort.objects.filter(network=acme_net).values_list("node__name", "address"))
    assert set(hosts) == {nodes["h1"], nodes["h2"]} and len(set(hosts.values())) == 2
    for h, other in (("h1", "h2"), ("h2", "h1")):
        ns = underlay.netns[h]
        vx = _run("ip", "-n", ns, "-d", "link", "show", f"skx-{acme_net.vni}").stdout
        assert f"vxlan id {acme_net.vni}" in vx and f"local {HOSTS[h]}" in vx and "dstport 4789" in vx
        assert f"master {acme_net.bridge}" in vx and "mtu 1450" in vx
        fdb = _run("ip", "netns", "exec", ns, "bridge", "fdb", "show", "dev", f"skx-{acme_net.vni}").stdout
        assert f"00:00:00:00:00:00 dst {HOSTS[other]}" in fdb
        br = _run("ip", "-n", ns, "-4", "addr", "show", "dev", acme_net.bridge).stdout
        assert f"{hosts[nodes[h]]}/" in br
    # h3 never heard of acme's network, nor h1/h2 of bobco's
    assert acme_net.bridge not in _run("ip", "-n", underlay.netns["h3"], "link", "show").stdout
    for h in ("h1", "h2"):
        assert bob_net.bridge not in _run("ip", "-n", underlay.netns[h], "link", "show").stdout

    # acme's containers reach each other across nodes (through the tunnel), both ways
    assert wait_for("a1 to ping a2 across nodes", lambda: _ping_from(pid["a1"], addr["a2"]), timeout=20)
    assert _ping_from(pid["a2"], addr["a1"], tries=2)
    # bobco's container cannot reach acme's, nor acme's bobco's: no route, and none with one either.
    # (Root in the container's namespace points the other subnet at eth0, as a tenant could in a VM.)
    for src, dst in (("b1", "a1"), ("b1", "a2"), ("a1", "b1"), ("a2", "b1")):
        assert not _ping_from(pid[src], addr[dst]), f"{src} reached {dst}"
    other = {"b1": acme_net.cidr, "a1": bob_net.cidr, "a2": bob_net.cidr}
    for name, cidr in other.items():
        _run("nsenter", "-t", str(pid[name]), "-n", "ip", "route", "add", cidr, "dev", "eth0")
    for src, dst in (("b1", "a1"), ("b1", "a2"), ("a1", "b1"), ("a2", "b1")):
        assert not _ping_from(pid[src], addr[dst], tries=2), f"{src} reached {dst} on-link"
    assert _ping_from(pid["a1"], addr["a2"]), "acme still reaches itself"

    # a2's node no longer carries acme's network: the other node drops it from its flood list
    assert acme.delete(f"/api/v1/instances/{a2['id']}/").status_code == 202
    settled(acme, a2["id"], "deleted")
    h_a1 = next(h for h, n in nodes.items() if n == a1["node"])
    h_a2 = next(h for h, n in nodes.items() if n == a2["node"])

    def flood(h: str) -> str:
        dev = f"skx-{acme_net.vni}"
        return _run("ip", "netns", "exec", underlay.netns[h], "bridge", "fdb", "show", "dev", dev).stdout

    wait_for(
        f"{h_a1} to prune {h_a2} from its flood list",
        lambda: f"00:00:00:00:00:00 dst {HOSTS[h_a2]}" not in flood(h_a1),
        timeout=15,
        every=0.2,
    )

    # delete everything; the nodes clean up
    for c, inst in ((acme, a1), (bob, b1)):
        assert c.delete(f"/api/v1/instances/{inst['id']}/").status_code == 202
    for c, inst in ((acme, a1), (bob, b1)):
        settled(c, inst["id"], "deleted")
    for inst in (a1, a2, b1):
        assert not (base / inst["node"] / "containers" / f"sky-{inst['id']}").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid[inst["name"]], 0)
    connection.close()
