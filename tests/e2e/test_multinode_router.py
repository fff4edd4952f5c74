"""Issue 19 acceptance across nodes: published ports, egress and security groups through real workers.

The three namespace "hosts" of ``test_multinode`` (real compute workers, a
VXLAN underlay of this test's own), grown by two namespaces:

```
outside  (the LAN in front of the nodes)     bridge lan  198.18.190.2/24  (the client)
           | lan1   | lan2   | lan3
h1..h3:  ext0 198.18.190.11..13 (each node's ExternalAddress pool, ports 20000-20009)
         up0  198.18.191.11..13 (SKYPORT_UPLINK: what source NAT leaves through)
           | wan1   | wan2   | wan3
upstream (what NAT reaches)                   bridge wan  198.18.191.1/24, an HTTP server on :8080
```

acme's container and tiny VM land on h2 (h1 and h3 are bobco's), never the
portal's own namespace.  Through the API and the operators' commands only: a
client in ``outside`` reaches the HTTP server of each through its published
port once a rule of their security group allows it, and not before (the
container) nor after the rule is removed; both reach ``upstream`` through
the node's NAT, and not with the tenant's egress off (the VM's user-data
tries every second and writes the outcome into the page it serves); after
the delete the ports are closed and the node's ``inet`` table names nothing
of either.

A second test, containers only (h1 and h2 acme's, h3 bobco's): tenants stay
apart under published ports and security groups, spoofed source addresses
and MACs are dropped on h2, and acme's network spans h1 and h2.

libvirtd runs in the host's namespace, not in h2's: the workers get
``SKYPORT_LIBVIRT_NETNS`` and move each VM's tap into their own namespace
(``compute.drivers.vm.VmDriver._adopt_taps``).

Every address is inside 198.18.176.0/20 (the tenant networks come from
``SKYPORT_TEST_NETWORK_POOL``; run with 198.18.176.0/20 so that the first
ones, 198.18.176-188.x, never meet these).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection

from portal.cloud import secgroups
from portal.cloud.models import ComputeNode, Instance
from portal.tenancy.models import Tenant
from tests.e2e import test_multinode as mn
from tests.e2e.test_end_to_end import ROOT, Stack, _client, wait_for
from tests.e2e.test_multinode import Underlay, _container_pid, _run, cluster  # noqa: F401 -- cluster is a fixture
from tests.hostcaps import require, require_binary
from tests.netcleanup import table_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]

UNDERLAY_HOST = "198.18.189.1"
HOSTS = {"h1": "198.18.189.11", "h2": "198.18.189.12", "h3": "198.18.189.13"}
CLIENT = "198.18.190.2"
EXTERNAL = {"h1": "198.18.190.11", "h2": "198.18.190.12", "h3": "198.18.190.13"}
UPSTREAM = "198.18.191.1"
UPLINK = {"h1": "198.18.191.11", "h2": "198.18.191.12", "h3": "198.18.191.13"}


class Edge:
    """The outside and upstream namespaces and each node's ext0 / up0 into them."""

    def __init__(self, underlay: Underlay) -> None:
        tag = underlay.bridge.removeprefix("mnbr")
        self.outside, self.upstream = f"sky-mn{tag}-out", f"sky-mn{tag}-up"
        self.node_ns = underlay.netns
        self.made: list[str] = []
        self.server: subprocess.Popen[bytes] | None = None

    def build(self, base: Path) -> None:
        for ns, br, address in ((self.outside, "lan", CLIENT), (self.upstream, "wan", UPSTREAM)):
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "add", br, "type", "bridge")
            _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", br)
            _run("ip", "-n", ns, "link", "set", br, "up")
        for h, node_ns in self.node_ns.items():
            i = h[-1]
            for dev, peer, ns, br, address in (
                ("ext0", f"lan{i}", self.outside, "lan", EXTERNAL[h]),
                ("up0", f"wan{i}", self.upstream, "wan", UPLINK[h]),
            ):
                _run(
                    "ip", "-n", node_ns, "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", ns
                )
                _run("ip", "-n", node_ns, "addr", "add", f"{address}/24", "dev", dev)
                _run("ip", "-n", node_ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", peer, "master", br, "up")
        www = base / "upstream-www"
        www.mkdir()
        (www / "index.html").write_text("upstream\n")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.upstream, "python3", "-m", "http.server", "-b", UPSTREAM, "8080"],
            cwd=www,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for("the upstream HTTP server", lambda: self.get(self.upstream, UPSTREAM, 8080), timeout=20)

    def get(self, ns: str, address: str, port: int, seconds: int = 2) -> bool:
        """An HTTP GET from namespace ``ns`` answered (any status: the connection was made)."""
        r = _run(
            "ip", "netns", "exec", ns, "curl", "-s", "-m", str(seconds), "-o", "/dev/null",
            f"http://{address}:{port}/", check=False,
        )  # fmt: skip
        return r.returncode == 0

    def teardown(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(10)
        for ns in self.made:  # the veths' other ends go with them
            _run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def edge(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Stack, Edge, dict[str, str]]]:
    require_binary("curl")
    monkeypatch.setattr(mn, "UNDERLAY_HOST", UNDERLAY_HOST)
    monkeypatch.setattr(mn, "HOSTS", HOSTS)
    pidfile = Path("/run/libvirtd.pid")
    libvirtd = pidfile.read_text().strip() if pidfile.exists() else "1"
    monkeypatch.setattr(
        mn, "NODE_ENV", {"SKYPORT_UPLINK": "up0", "SKYPORT_LIBVIRT_NETNS": f"/proc/{libvirtd}/ns/net"}
    )
    stack, underlay, nodes = request.getfixturevalue("cluster")
    edge = Edge(underlay)
    try:
        edge.build(stack.base)
        yield stack, edge, nodes
    finally:
        try:
            _destroy_vms(stack.base, list(nodes.values()))
        finally:
            edge.teardown()
    gone = _run("ip", "netns", "list").stdout
    assert edge.outside not in gone and edge.upstream not in gone


def _destroy_vms(base: Path, nodes: list[str]) -> None:
    """Destroy the VMs this test's instances left (after a failure), by instance id."""
    from compute.config import NodeConfig
    from compute.drivers.vm import LibvirtDriver

    ids = [str(i) for i in Instance.objects.values_list("pk", flat=True)]
    for node in nodes:
        driver = LibvirtDriver(NodeConfig(node, base / node, "qemu:///system", "qemu", "crun", ""))
        for iid in ids:
            driver.destroy(iid)


def test_published_ports_egress_and_security_groups_on_a_remote_node(
    edge: tuple[Stack, Edge, dict[str, str]],
) -> None:
    stack, net, nodes = edge
    try:
        _scenario(stack, net, nodes)
    except BaseException:
        print(stack.logs())
        raise


#: the tiny VM's user-data: an HTTP server on 8080, and every second whether upstream answers
VM_USER_DATA = f"""#!/bin/sh
mkdir -p /www
echo vm > /www/index.html
httpd -p 8080 -h /www
while :; do
    if timeout 3 wget -q -O /tmp/up http://{UPSTREAM}:8080/; then r=ok; else r=no; fi
    echo $r > /www/egress.tmp && mv /www/egress.tmp /www/egress.txt
    sleep 1
done
"""


def _scenario(stack: Stack, net: Edge, nodes: dict[str, str]) -> None:
    base = stack.base
    acme_tenant = Tenant.objects.create(slug="acme", name="Acme")
    Tenant.objects.create(slug="bobco", name="Bob Co")
    call_command("bootstrap")
    images = Path(os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images")))
    require(
        bool(sorted(images.glob("skyport-tiny-*.qcow2"))), f"the sample images in {images} (`make images`)"
    )
    call_command("import_sample_images", "--dir", str(images))
    op = _client("mr-operator", None, staff=True)
    acme = _client("mr-acme", "acme")
    wait_for(
        "three nodes up with healthy VM and container drivers",
        lambda: (
            ComputeNode.objects.filter(
                name__in=nodes.values(),
                status="up",
                drivers__container__ok=True,
                drivers__vm__ok=True,
                tunnel_address__isnull=False,
            ).count()
            == 3
        ),
        timeout=90,
    )
    for h, tenant in (("h1", "bobco"), ("h2", "acme"), ("h3", "bobco")):
        r = op.patch(f"/api/v1/nodes/{nodes[h]}/", {"tenancy": "dedicated", "owner": tenant}, format="json")
        assert r.status_code == 200, r.json()
        call_command("node", "external-address", nodes[h], EXTERNAL[h], "--ports", "20000-20009")
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]
    r = acme.post("/api/v1/security-groups/", {"tenant": "acme", "name": "web"}, format="json")
    assert r.status_code == 201, r.json()
    web_group = r.json()["id"]
    groups = [secgroups.default_group(acme_tenant).pk, web_group]

    def image(name: str) -> str:
        found = op.get("/api/v1/images/", {"name": name}).json()["results"][0]
        return f"{found['name']}:{found['version']}"

    def settled(iid: str, state: str = "active") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            got: dict[str, Any] = acme.get(f"/api/v1/instances/{iid}/").json()
            assert got["vm_state"] != "error", got
            return got if got["vm_state"] == state and got["task_state"] is None else None

        return wait_for(f"instance {iid} to be {state}", check, timeout=180)  # type: ignore[no-any-return]

    def launch(name: str, kind: str, image_name: str, **extra: Any) -> str:
        body = {
            "tenant": "acme", "name": name, "image": image(image_name), "flavor": flavor,
            "kind": kind, "security_group_ids": groups, **extra,
        }  # fmt: skip
        r = acme.post("/api/v1/instances/", body, format="json")
        assert r.status_code == 202, r.json()
        return str(r.json()["id"])

    ids = [launch("web1", "container", "busybox-web"), launch("vm1", "vm", "tiny", user_data=VM_USER_DATA)]
    box, vm = (settled(i) for i in ids)
    for inst in (box, vm):
        assert inst["node"] == nodes["h2"], "acme's instances run on h2, not in the portal's namespace"
    pid = _container_pid(base, box["node"], box["id"])
    port: dict[str, int] = {}
    for name, inst in (("box", box), ("vm", vm)):
        r = acme.post(
            "/api/v1/published-ports/",
            {"instance": inst["id"], "protocol": "tcp", "port": 8080},
            format="json",
        )
        assert r.status_code == 201, r.json()
        assert r.json()["external_address"] == EXTERNAL["h2"]
        port[name] = r.json()["external_port"]

    def from_outside(name: str, path: str = "", seconds: int = 2) -> str | None:
        """The body the outside client gets through the published port (None: no connection)."""
        r = _run(
            "ip", "netns", "exec", net.outside, "curl", "-s", "-m", str(seconds),
            f"http://{EXTERNAL['h2']}:{port[name]}/{path}", check=False,
        )  # fmt: skip
        return r.stdout if r.returncode == 0 else None

    def both_open() -> bool:
        return from_outside("box") is not None and from_outside("vm") == "vm\n"

    def both_closed() -> bool:
        return from_outside("box", seconds=1) is None and from_outside("vm", seconds=1) is None

    # 1. the web group has no rule for 8080 yet: refused from outside
    assert from_outside("box") is None
    # 2. adding the rule opens it on the running instances; removing it closes it
    rule = {"group": web_group, "direction": "ingress", "protocol": "tcp", "port_min": 8080, "port_max": 8080}
    r = acme.post("/api/v1/security-group-rules/", rule, format="json")
    assert r.status_code == 201, r.json()
    wait_for("the published ports to open (the VM's server up)", both_open, timeout=90, every=0.5)
    assert acme.delete(f"/api/v1/security-group-rules/{r.json()['id']}/").status_code == 204
    wait_for("the published ports to close", both_closed, timeout=10, every=0.2)
    r = acme.post("/api/v1/security-group-rules/", rule, format="json")
    assert r.status_code == 201, r.json()
    wait_for("the published ports to open again", both_open, timeout=10, every=0.2)

    # 3. egress: upstream through the node's source NAT; not with the tenant's egress off
    def container_upstream() -> bool:
        r = _run(
            "nsenter", "-t", str(pid), "-n", "curl", "-s", "-m", "2", "-o", "/dev/null",
            f"http://{UPSTREAM}:8080/", check=False,
        )  # fmt: skip
        return r.returncode == 0

    def vm_upstream() -> str | None:
        return from_outside("vm", "egress.txt")

    wait_for("the container to reach upstream", container_upstream, timeout=15, every=0.5)
    wait_for("the VM to reach upstream", lambda: vm_upstream() == "ok\n", timeout=30, every=0.5)
    call_command("network", "egress", "off", "acme")
    wait_for("egress off: the container cannot", lambda: not container_upstream(), timeout=10, every=0.2)
    wait_for("egress off: nor the VM", lambda: vm_upstream() == "no\n", timeout=20, every=0.5)
    call_command("network", "egress", "on", "acme")
    wait_for(
        "egress on again", lambda: container_upstream() and vm_upstream() == "ok\n", timeout=20, every=0.5
    )

    # 4. delete: the ports close and the node's table names nothing of the instances
    h2_ns = net.node_ns["h2"]
    table = table_for(nodes["h2"])

    def listing() -> str:
        return _run("ip", "netns", "exec", h2_ns, "nft", "-j", "list", "table", "inet", table).stdout

    traces = [str(p) for p in port.values()]
    traces += [i["addresses"][0]["address"] for i in (box, vm)]
    before = listing()
    assert all(t in before for t in traces), traces
    for inst in (box, vm):
        assert acme.delete(f"/api/v1/instances/{inst['id']}/").status_code == 202
    for inst in (box, vm):
        settled(inst["id"], "deleted")
    assert both_closed()
    after = listing()
    json.loads(after)  # the table is still there, holding the node's other state
    assert [t for t in traces if t in after] == []
    connection.close()


def test_tenants_apart_spoofing_dropped_and_a_second_node_under_published_ports(
    edge: tuple[Stack, Edge, dict[str, str]],
) -> None:
    """Containers only: h1 and h2 acme's, h3 bobco's, each tenant's web service published.

    bobco's container on h3 reaches neither acme's container on h2 (ping, TCP to the
    published service port, even with an on-link route into acme's network) although acme's
    rule lets anyone in on that port, while the outside client reaches both tenants'
    published ports; acme's rule cannot name bobco's group.  On h2 (not the portal's
    namespace) a foreign source address or a foreign MAC put on acme's container's NIC by
    root from the host side (``nsenter -n``: the container itself has no CAP_NET_ADMIN)
    gets neither to acme's other container nor out through NAT, and its own does.  acme's
    second container on h1 (the same network over VXLAN) and the one on h2 reach each other,
    and h2's published port still answers.
    """
    stack, net, nodes = edge
    try:
        _tenants_spoofing_second_node(stack, net, nodes)
    except BaseException:
        print(stack.logs())
        raise


def _in_ns(pid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    """A host tool (as root) in a container's network namespace."""
    return _run("nsenter", "-t", str(pid), "-n", *cmd, check=False)


def _tcp_from(pid: int, address: str, port: int, source: str = "") -> bool:
    """An HTTP GET from a container's namespace answered (optionally from a given source address)."""
    bind = ["--interface", source] if source else []
    r = _in_ns(pid, "curl", "-s", "-m", "2", "-o", "/dev/null", *bind, f"http://{address}:{port}/")
    return r.returncode == 0


def _ping_ns(pid: int, address: str, source: str = "", tries: int = 1) -> bool:
    bind = ["-I", source] if source else []
    return _in_ns(pid, "ping", "-c", str(tries), "-W", "1", *bind, address).returncode == 0


def _tenants_spoofing_second_node(stack: Stack, net: Edge, nodes: dict[str, str]) -> None:
    import ipaddress

    from portal.cloud.models import HostPort, Network

    base = stack.base
    tenants = {
        "acme": Tenant.objects.create(slug="acme", name="Acme"),
        "bobco": Tenant.objects.create(slug="bobco", name="Bob Co"),
    }
    call_command("bootstrap")
    images = Path(os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images")))
    web = sorted(images.glob("busybox-web-[0-9]*.oci.tar"))
    require(bool(web), f"the sample busybox-web image in {images} (`make images`)")
    version = web[-1].name.removeprefix("busybox-web-").removesuffix(".oci.tar")
    call_command(
        "import_image", str(web[-1]), "--name", "busybox-web", "--version", version,
        "--format", "oci", "--public", "--wait",
    )  # fmt: skip
    op = _client("ms-operator", None, staff=True)
    clients = {"acme": _client("ms-acme", "acme"), "bobco": _client("ms-bob", "bobco")}
    wait_for(
        "three nodes up with a healthy container driver",
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
    for h, tenant in (("h1", "acme"), ("h2", "acme"), ("h3", "bobco")):
        r = op.patch(f"/api/v1/nodes/{nodes[h]}/", {"tenancy": "dedicated", "owner": tenant}, format="json")
        assert r.status_code == 200, r.json()
        call_command("node", "external-address", nodes[h], EXTERNAL[h], "--ports", "20000-20009")
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]
    web_group: dict[str, int] = {}
    for tenant, c in clients.items():
        r = c.post("/api/v1/security-groups/", {"tenant": tenant, "name": "web"}, format="json")
        assert r.status_code == 201, r.json()
        web_group[tenant] = r.json()["id"]
    # acme's rule may not name bobco's group (nor its default one)
    for other in (web_group["bobco"], secgroups.default_group(tenants["bobco"]).pk):
        r = clients["acme"].post(
            "/api/v1/security-group-rules/",
            {"group": web_group["acme"], "direction": "ingress", "protocol": "tcp", "remote_group": other},
            format="json",
        )
        assert r.status_code == 400, (r.status_code, r.content)
        assert "same tenant" in r.json()["message"], r.json()
    # each web group lets anyone in on 8080 (so only the tenant boundary keeps bobco out)
    for tenant, c in clients.items():
        rule = {
            "group": web_group[tenant],
            "direction": "ingress",
            "protocol": "tcp",
            "port_min": 8080,
            "port_max": 8080,
        }
        r = c.post("/api/v1/security-group-rules/", rule, format="json")
        assert r.status_code == 201, r.json()

    def launch(tenant: str, name: str) -> str:
        body = {
            "tenant": tenant, "name": name, "image": f"busybox-web:{version}", "flavor": flavor,
            "kind": "container", "anti_affinity_group": "spread",
            "security_group_ids": [secgroups.default_group(tenants[tenant]).pk, web_group[tenant]],
        }  # fmt: skip
        r = clients[tenant].post("/api/v1/instances/", body, format="json")
        assert r.status_code == 202, r.json()
        return str(r.json()["id"])

    def settled(tenant: str, iid: str, state: str = "active") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            got: dict[str, Any] = clients[tenant].get(f"/api/v1/instances/{iid}/").json()
            assert got["vm_state"] != "error", got
            return got if got["vm_state"] == state and got["task_state"] is None else None

        return wait_for(f"instance {iid} to be {state}", check, timeout=120)  # type: ignore[no-any-return]

    launched = [("acme", launch("acme", "x")), ("acme", launch("acme", "y")), ("bobco", launch("bobco", "b"))]
    insts = [(tenant, settled(tenant, iid)) for tenant, iid in launched]
    on = {next(h for h, n in nodes.items() if n == i["node"]): (t, i) for t, i in insts}
    assert sorted(on) == ["h1", "h2", "h3"], "anti-affinity: acme on h1 and h2, bobco on h3"
    a1, a2, b1 = on["h2"][1], on["h1"][1], on["h3"][1]
    assert on["h3"][0] == "bobco"
    addr = {"a1": a1["addresses"][0]["address"], "a2": a2["addresses"][0]["address"]}
    addr["b1"] = b1["addresses"][0]["address"]
    pid = {k: _container_pid(base, i["node"], i["id"]) for k, i in (("a1", a1), ("a2", a2), ("b1", b1))}
    acme_net, bob_net = (Network.objects.get(tenant__slug=t) for t in ("acme", "bobco"))
    published: dict[str, int] = {}
    for key, tenant, inst, h in (("a1", "acme", a1, "h2"), ("b1", "bobco", b1, "h3")):
        r = clients[tenant].post(
            "/api/v1/published-ports/",
            {"instance": inst["id"], "protocol": "tcp", "port": 8080},
            format="json",
        )
        assert r.status_code == 201, r.json()
        assert r.json()["external_address"] == EXTERNAL[h]
        published[key] = r.json()["external_port"]

    def outside(key: str) -> bool:
        return net.get(net.outside, EXTERNAL["h2" if key == "a1" else "h3"], published[key])

    # 1. from outside both tenants' published ports answer
    wait_for("both tenants' published ports to answer", lambda: outside("a1") and outside("b1"), timeout=30)

    # 2. the same network on a second node: a1 (h2) and a2 (h1) reach each other over VXLAN
    wait_for(
        "a2 to reach a1's service across nodes", lambda: _tcp_from(pid["a2"], addr["a1"], 8080), timeout=20
    )
    assert _tcp_from(pid["a1"], addr["a2"], 8080)
    assert _ping_ns(pid["a1"], addr["a2"], tries=2) and _ping_ns(pid["a2"], addr["a1"], tries=2)
    assert outside("a1"), "h2's published port still answers with acme on two nodes"

    # 3. bobco's container reaches upstream through NAT but nothing of acme's: not a1's address
    #    (ping, the published service port), not acme's host addresses on h2 -- also with a route
    #    pointing acme's network on-link at its eth0
    wait_for("b1 to reach upstream through NAT", lambda: _tcp_from(pid["b1"], UPSTREAM, 8080), timeout=15)
    acme_hosts = list(HostPort.objects.filter(network=acme_net).values_list("address", flat=True))
    assert acme_hosts
    targets = [addr["a1"], addr["a2"], *acme_hosts]

    def b1_reaches_acme() -> list[str]:
        got = [f"ping {t}" for t in targets if _ping_ns(pid["b1"], t)]
        return got + [f"tcp {t}:8080" for t in (addr["a1"], addr["a2"]) if _tcp_from(pid["b1"], t, 8080)]

    assert b1_reaches_acme() == []
    _in_ns(pid["b1"], "ip", "route", "add", acme_net.cidr, "dev", "eth0").check_returncode()
    assert b1_reaches_acme() == [], "on-link"
    for key in ("a1", "a2"):  # nor acme's bobco's
        assert not _ping_ns(pid[key], addr["b1"]) and not _tcp_from(pid[key], addr["b1"], 8080)
    assert outside("a1") and outside("b1")

    # 4. spoofing on h2: a foreign source address on a1's NIC gets nowhere, its own still does
    network = ipaddress.ip_network(acme_net.cidr)
    known = {*addr.values(), *acme_hosts}
    foreign = next(str(a) for a in reversed(list(network.hosts())) if str(a) not in known)
    _in_ns(pid["a1"], "ip", "addr", "add", f"{foreign}/{network.prefixlen}", "dev", "eth0").check_returncode()
    assert not _ping_ns(pid["a1"], addr["a2"], source=foreign, tries=2), "spoofed source reached a2"
    assert not _tcp_from(pid["a1"], addr["a2"], 8080, source=foreign)
    assert not _tcp_from(pid["a1"], UPSTREAM, 8080, source=foreign), "spoofed source left through NAT"
    assert _ping_ns(pid["a1"], addr["a2"]) and _tcp_from(pid["a1"], UPSTREAM, 8080)
    _in_ns(pid["a1"], "ip", "addr", "del", f"{foreign}/{network.prefixlen}", "dev", "eth0").check_returncode()
    #    a foreign MAC with a1's own address: neither
    link = json.loads(_in_ns(pid["a1"], "ip", "-j", "link", "show", "eth0").stdout)
    own_mac = link[0]["address"]
    _in_ns(pid["a1"], "ip", "link", "set", "eth0", "address", "52:54:00:c6:12:99").check_returncode()
    _in_ns(pid["a1"], "ip", "neigh", "flush", "all")
    assert not _ping_ns(pid["a1"], addr["a2"], tries=2), "foreign MAC reached a2"
    assert not _tcp_from(pid["a1"], UPSTREAM, 8080), "foreign MAC left through NAT"
    _in_ns(pid["a1"], "ip", "link", "set", "eth0", "address", own_mac).check_returncode()
    _in_ns(pid["a1"], "ip", "neigh", "flush", "all")
    wait_for("a1 through again with its own MAC", lambda: _ping_ns(pid["a1"], addr["a2"]), timeout=10)
    assert _tcp_from(pid["a1"], UPSTREAM, 8080) and outside("a1")

    # 5. delete: the nodes clean up, the ports close
    for tenant, inst in insts:
        assert clients[tenant].delete(f"/api/v1/instances/{inst['id']}/").status_code == 202
    for tenant, inst in insts:
        settled(tenant, inst["id"], "deleted")
    assert not outside("a1") and not outside("b1")
    for inst in (a1, a2, b1):
        assert not (base / inst["node"] / "containers" / f"sky-{inst['id']}").exists()
    assert bob_net.bridge not in _run("ip", "-n", net.node_ns["h2"], "link", "show").stdout
    connection.close()
